"""Shared pieces of the DBPM configs (Lan et al., ICLR 2024; reference config/config_ecg.yaml).

Paper / reference values: SimCLR with the ResNet-34-style 1-D encoder (final fc to 256), a
projection head 256 -> 512 -> 256, NT-Xent with t = 0.2, the authors' augmentations
(`augment.variant='dbpm'`, dataset.py: scaling N(1, 1.1^2) per time step; permutation into 2..8
segments + jitter sigma 0.8; 'ts_tcc' is TS-TCC's: mean 2, 1..7 segments), Adam lr 3e-4, batch
512, 80 epochs of which the first 50 are DBPM's warm-up, thresholds beta_np = 2, beta_fp = 3
(run.sh: --cutnp 2 --cutfp 3), the reference code's epoch-weighted memory statistic
(`mode='epoch_weighted'`; 'mean' is the paper's equation), 5 seeds in the paper.

Variants of every setting (`--config=configs/dbpm/<setting>.py:<arg>`):
  (none) / paper  the paper's hyper-parameters on that dataset;
  cpu             minutes on a CPU: a quarter-width ResNet (16..128 channels, fc to 64, head
                  64 -> 128 -> 64), 40 epochs with the warm-up scaled to 25 (50/80 of the run);
  smoke           seconds, for tests: a two-stage 8/16-channel ResNet, 2 epochs, warm-up 1.

Local data sets are looked up under $JAXSAFE_DATA (default ~/data); override with
--config.data.path=...
"""

import os

import ml_collections

from configs import shared

VARIANTS = ("paper", "cpu", "smoke")
PAPER_WARMUP_FRACTION = 50 / 80


def data_root() -> str:
    return os.environ.get("JAXSAFE_DATA", os.path.expanduser("~/data"))


def base(arg: str | None) -> ml_collections.ConfigDict:
    arg = shared.variant(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.experiment = "dbpm"
    c.variant = arg
    c.data = dict(
        source="bundled",
        dataset="BasicMotions",
        path="",
        sampling_rate=100,
        task="diagnostic",
        resplit=0.0,
        standardize=True,
        seed=0,
    )
    c.model = dict(
        name="resnet34", widths=(64,), blocks=(1,), features=256, head_hidden=512, head_out=256
    )
    c.augment = dict(variant="dbpm", scale_sigma=1.1, jitter_sigma=0.8, per_timestep=True)
    c.temperature = 0.2
    c.epochs = 80
    c.dbpm = dict(
        enabled=True, warmup=50, beta_np=2.0, beta_fp=3.0, mode="epoch_weighted", normalized=False
    )
    c.bad_pairs = dict(noisy_fraction=0.0, faulty_fraction=0.0, faulty_view="shuffle", seed=0)
    c.optimizer = dict(lr=3e-4)
    c.probe = dict(steps=300, l2=1e-4)
    # -1: derived from the epoch length by experiments/dbpm.py's `resolve` (see its docstring),
    # before config.json is written.
    c.train = shared.train(
        batch_size=512,
        num_steps=-1,
        steps_per_call=-1,
        log_every=-1,
        eval_every=-1,
        checkpoint_every=-1,
        fsdp_min_size=2**10,
    )
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    return c


def set_epochs(c, epochs: int) -> None:
    """`epochs` with the paper's warm-up fraction (50 of 80 epochs)."""
    c.epochs = epochs
    c.dbpm.warmup = round(PAPER_WARMUP_FRACTION * epochs)


def finish(c, cpu_batch: int, smoke_batch: int = 16) -> ml_collections.ConfigDict:
    """Applies the cpu / smoke variant after the setting is filled in."""
    if c.variant == "cpu":
        c.model.update(name="resnet_small", features=64, head_hidden=128, head_out=64)
        c.train.batch_size = cpu_batch
        set_epochs(c, 40)
    elif c.variant == "smoke":
        c.model.update(
            name="custom", widths=(8, 16), blocks=(1, 1), features=16, head_hidden=32, head_out=16
        )
        c.train.batch_size = smoke_batch
        c.epochs, c.dbpm.warmup = 2, 1
        c.probe.steps = 50
    return c
