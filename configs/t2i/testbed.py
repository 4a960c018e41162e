r"""The miniature text-to-image test bed (`experiments/t2i_testbed.py`) and its oracle.

A tiny CLIP text encoder and a tiny SD UNet trained jointly, from scratch, on the captioned
shapes set (`jaxsafe.data.shapes`) in a fixed 8×8×12 latent space (PCA of 4×4 patches):
ε-prediction DDPM loss with linear betas (1e-4 to 0.02 over T = 1000: Ho et al.'s CIFAR-10 32×32
schedule; SD's scaled_linear 0.00085..0.012 is tuned for its VAE latents), 10 % caption dropout to
the empty prompt for classifier-free guidance, DDIM sampling with guidance 4.

    python -m launch.train --config=configs/t2i/testbed.py:cpu --workdir=/tmp/testbed
    python -m launch.export_testbed --workdir=/tmp/testbed        # -> /tmp/testbed/export

Variants (`--config=configs/t2i/testbed.py:<arg>`):
  cpu (default)  the test-bed model: 20,000 steps, the ellipse drawn twice as often as each
                 other shape (docs/testbed.md: the command, its time and its figures);
  smoke          seconds, for tests: a narrower model, 8 steps of batch 4;
  lightness      the One More Step test bed (docs/oms.md): the lightness world ("on a black /
                 white background") with Stable Diffusion's scaled-linear schedule (β 0.00085 to
                 0.012, terminal SNR 0.0047), 12,000 steps;
  lightness_smoke  the same in seconds, for tests;
  without        trained without the concepts the erasure table erases (circle, square, red,
                 green never drawn; their words never seen): the robustness table's
                 "trained without the concept" row (docs/erasure.md), 6,000 steps;
  oracle         trains the oracle classifier (experiment `train_testbed_oracle`, ~30 minutes);
  oracle_smoke   the oracle run in seconds, for tests.
"""

import ml_collections

from configs import shared

VARIANTS = ("cpu", "smoke", "lightness", "lightness_smoke", "without", "oracle", "oracle_smoke")


def _train(num_steps: int, every: int, seed: int = 0, batch_size: int = 32) -> dict:
    # One step per call: XLA:CPU runs convolution gradients inside a lax.scan 20-80x slower than
    # the same step called on its own (jax 0.10.2), so scanning steps only pays off elsewhere.
    return shared.train(
        num_steps=num_steps,
        steps_per_call=1,
        log_every=every,
        eval_every=every,
        checkpoint_every=every,
        keep_checkpoints=2,
        seed=seed,
        batch_size=batch_size,
    )


def _oracle(arg: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "train_testbed_oracle"
    c.variant = arg
    c.data = dict(train_seed=0, heldout_seed=1, heldout_size=2000)
    c.oracle = dict(width=32, num_features=128, noise_max=0.1, out="")
    c.optimizer = dict(lr=1e-3, weight_decay=1e-4)
    c.train = _train(1500, 250, batch_size=128)
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    if arg == "oracle_smoke":
        c.data.update(heldout_size=64)
        c.train = _train(40, 20, batch_size=32)
    return c


def get_config(arg=None):
    arg = shared.variant(arg, VARIANTS)
    if arg.startswith("oracle"):
        return _oracle(arg)
    c = ml_collections.ConfigDict()
    c.experiment = "t2i_testbed"
    c.variant = arg
    # shape_weights (circle, ellipse, square, triangle): the ellipse is drawn twice as often,
    # because a model trained on the uniform stream drew it as its near concept, the circle
    # (docs/testbed.md).
    c.data = dict(
        train_seed=0,
        heldout_seed=1,
        max_length=12,
        caption_dropout=0.1,
        shape_weights=(1.0, 2.0, 1.0, 1.0),
        world="grey",
        colour_weights=None,
    )
    c.latent = dict(patch=4, components=12, fit_images=1000)
    c.text_encoder = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    # On the 8×8×12 patch-PCA latent (experiments/t2i_testbed.py); attention_head_dim is the
    # number of heads (diffusers' naming).
    c.unet = dict(
        block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    c.train_text_encoder = True
    c.scheduler = dict(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
    )  # z is not bounded by [-1, 1]: clipping erases colour
    c.sampling = dict(kind="ddim", num_inference_steps=25, guidance_scale=4.0, batch_size=32)
    c.optimizer = dict(lr=1e-3, warmup_steps=100, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999)
    c.eval = dict(heldout_examples=256, samples_per_concept=16, fid_samples=256, seed=0)
    c.train = _train(20000, 1000)
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    if arg.startswith("lightness"):
        c.data.world = "lightness"
        # SD's schedule (v1 scheduler_config.json): ᾱ_T = 0.0047, the flaw OMS fixes.
        c.scheduler.update(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        c.train = _train(12000, 1000)
    if arg == "without":
        # (circle, ellipse, square, triangle) and (red, orange, green, blue): the erasure
        # table's targets get weight 0, the ellipse keeps its double weight.
        c.data.shape_weights = (0.0, 2.0, 0.0, 1.0)
        c.data.colour_weights = (0.0, 1.0, 0.0, 1.0)
        c.train = _train(6000, 1000)
    if arg.endswith("smoke"):
        c.train.batch_size = 4
        c.latent.fit_images = 32
        c.text_encoder.update(hidden_size=32, intermediate_size=64)
        c.unet.update(block_out_channels=(16, 32), attention_head_dim=2)
        c.sampling.update(num_inference_steps=4, batch_size=8)
        c.optimizer.warmup_steps = 2
        c.eval.update(heldout_examples=16, samples_per_concept=2, fid_samples=16)
        c.train = _train(8, 4)
    return c
