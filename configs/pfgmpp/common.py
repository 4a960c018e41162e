"""Shared pieces of the PFGM++ / EDM configs.

Paper values: PFGM++ (Xu et al., ICML 2023) trains with EDM's code and hyper-parameters
(Newbeeer/pfgmpp `train.py` and `training/training_loop.py` defaults, as NVlabs/edm): Adam
(0.9, 0.999, 1e-8), lr 1e-3 with a 10 Mimg linear warm-up, batch 512, EMA half-life 0.5 Mimg with
ramp-up ratio 0.05, dropout 0.13, 200 Mimg of training, DDPM++ (model_channels 128,
channel_mult (2, 2, 2), 4 blocks per resolution, attention at 16×16, positional embedding,
(1, 1) resampling filter), P_mean −1.2, P_std 1.2, σ_data 0.5; Heun sampling with 18 steps
(NFE 35), σ ∈ [0.002, 80], ρ = 7 (40 steps on FFHQ-64). FFHQ-64: batch 256, lr 2e-4, dropout
0.05, channel_mult (1, 2, 2, 2); EDM's non-leaky augmentation with p = 0.12 (0.15 on FFHQ) and
its 9 labels fed to the network (`augment_dim` 9). The cpu and smoke variants train without it
(`augment.p = 0`: minutes on 8x8/16x16 digits, where flips and rotations change the digit).

Variants of every setting (`--config=configs/pfgmpp/<setting>.py:<arg>`):
  (none) / paper  the paper's run;
  cpu             the same D (and conditioning) on the offline digits data (scikit-learn's 8×8
                  digits upsampled to 16×16): a small SongUNet that draws recognisable digits
                  after ~15 minutes on 2 CPU cores, with the Fréchet distance on the shipped
                  digits classifier's features;
  smoke           seconds, for tests: 8×8 digits, an 8-channel U-Net, 8 steps.
"""

import ml_collections

from configs import shared

VARIANTS = ("paper", "cpu", "smoke")
INF = float("inf")


def ddpmpp(**overrides) -> dict:
    """EDM's `--arch=ddpmpp` SongUNet arguments (CIFAR-10 widths)."""
    m = dict(
        model_channels=128,
        channel_mult=(2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        dropout=0.13,
        label_dropout=0.0,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
        dtype="float32",
    )
    m.update(overrides)
    return m


def base(arg: str | None, D: float) -> ml_collections.ConfigDict:
    """The CIFAR-10 DDPM++ run with augmentation dimension D (inf = EDM)."""
    arg = shared.variant(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.experiment = "pfgmpp"
    c.variant = arg
    c.data = dict(
        name="tfds",
        tfds_name="cifar10",
        split="train",
        data_dir=ml_collections.FieldReference(None, field_type=str),
        path=ml_collections.FieldReference(None, field_type=str),
        resolution=32,
        channels=3,
        flip=False,
        cond=False,
        num_classes=10,
        seed=0,
    )
    c.model = ddpmpp()
    c.pfgmpp = dict(D=float(D), P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    c.augment = dict(p=0.12)  # EDM's train.py --augment (0.15 on FFHQ)
    c.optimizer = dict(
        lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, lr_rampup_kimg=10_000.0, grad_clip=0.0, nan_to_num=True
    )
    c.ema = dict(halflife_kimg=500.0, rampup_ratio=0.05)
    c.sampler = dict(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    # FID needs the user's Inception weights and statistics (docs/diffusion.md, "FID"):
    # --config.eval.feature_net=inception --config.eval.fid_ref=cifar10_train.npz
    # --config.eval.num_samples=50000. Without them the paper runs log sample grids only.
    c.eval = dict(
        num_samples=64,
        batch_size=64,
        grid=64,
        feature_net="none",
        use_ema=True,
        seed=0,
        fid_ref="",
        fid_weights="",
    )
    c.train = shared.train(
        batch_size=512,
        num_steps=390_625,  # 200 Mimg / 512
        steps_per_call=5,
        eval_every=10_000,
        checkpoint_every=5_000,
    )
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    return c


def set_steps(c, num_steps: int, steps_per_call: int, log_every: int, eval_every: int) -> None:
    c.train.num_steps = num_steps
    c.train.steps_per_call = steps_per_call
    c.train.log_every = log_every
    c.train.eval_every = eval_every
    c.train.checkpoint_every = eval_every


def finish(c) -> ml_collections.ConfigDict:
    """Applies the cpu / smoke variants (offline digits data) after the setting is filled in."""
    if c.variant == "paper":
        return c
    c.data.update(name="digits", split="all", resolution=16, flip=False)  # flips change digits
    c.augment.p = 0.0
    c.eval.update(feature_net="digits", num_samples=256, batch_size=256, grid=100)
    c.sampler.num_steps = 18
    if c.variant == "cpu":
        # 0.31 M parameters, 6.8 GFLOP per step of 64 images: 2,000 steps (128 kimg, 71 epochs)
        # take ~15 minutes on 2 free cores. No dropout: this small net underfits. One step per
        # call: on XLA:CPU this train step runs ~10x slower inside a lax.scan than jitted alone.
        c.model.update(
            model_channels=16,
            channel_mult=(1, 2, 2),
            num_blocks=1,
            attn_resolutions=(),
            dropout=0.0,
        )
        c.train.batch_size = 64
        c.optimizer.update(lr=1e-3, lr_rampup_kimg=10.0)
        c.ema.halflife_kimg = 10.0
        set_steps(c, 2000, 1, 50, 500)
    else:  # smoke
        c.data.resolution = 8
        c.model.update(
            model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0
        )
        c.train.batch_size = 16
        c.optimizer.update(lr=2e-3, lr_rampup_kimg=0.05)
        c.ema.halflife_kimg = 0.1
        c.eval.update(num_samples=32, batch_size=32, grid=16)
        c.sampler.num_steps = 4
        set_steps(c, 8, 2, 2, 8)
        c.train.async_checkpointing = False
    return c
