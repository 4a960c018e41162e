r"""One More Step on the lightness test bed (`experiments/oms.py`, docs/oms.md).

    python -m launch.train --config=configs/oms/testbed.py:cpu --workdir=/tmp/oms

trains the OMS network on the lightness world's (latent, caption) pairs with the shipped
lightness test-bed model's latent map and frozen text encoder (`base.folder`, default
`jaxsafe/data/assets/testbed_lightness`), exports it to `<workdir>/export` and measures
brightness and oracle accuracy without OMS, with OMS, and with an OMS prompt that differs from
the base prompt (low-frequency control).

Variants (`--config=configs/oms/testbed.py:<arg>`): `cpu` (default), `smoke` (seconds, for
tests). The OMS guidance scale is the reference pipeline's default, 1.0 (its README uses 2.0 for
SD 2.1); the noise scale is the reference code's (`oms.step`, noise="code").
"""

import ml_collections

from configs import shared

VARIANTS = ("cpu", "smoke")


def get_config(arg=None):
    arg = shared.variant(arg, VARIANTS)
    c = ml_collections.ConfigDict()
    c.experiment = "oms"
    c.variant = arg
    c.base = dict(folder="")  # "": the shipped lightness test bed (pipeline.LIGHTNESS_TESTBED)
    c.data = dict(world="lightness", train_seed=0, heldout_seed=1, caption_dropout=0.1)
    # The test bed's UNet layout without its time path (UNet2DConditionWoCTModel).
    c.oms_unet = dict(
        block_out_channels=(64, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    c.optimizer = dict(lr=1e-3, warmup_steps=100, weight_decay=0.0, grad_clip=1.0, ema_decay=0.999)
    # The base model's sampler as the test bed samples it (DDIM 25 steps, guidance 4).
    c.sampling = dict(
        num_inference_steps=25,
        guidance_scale=4.0,
        batch_size=64,
        oms_guidance_scale=1.0,
        oms_noise="code",
    )
    c.eval = dict(heldout_examples=256, samples=128, real_images=1000, seed=0)
    c.train = shared.train(
        num_steps=3000,
        log_every=500,
        eval_every=500,
        checkpoint_every=500,
        keep_checkpoints=2,
        batch_size=32,
    )
    c.mesh = shared.mesh()
    c.sharding_rules = shared.sharding_rules()
    if arg == "smoke":
        c.train.batch_size = 4
        c.oms_unet.update(block_out_channels=(16, 16), attention_head_dim=2, norm_num_groups=4)
        c.sampling.update(num_inference_steps=4, batch_size=8)
        c.optimizer.warmup_steps = 2
        c.eval.update(heldout_examples=8, samples=4, real_images=50)
        c.train.update(num_steps=4, log_every=2, eval_every=2, checkpoint_every=2)
    return c
