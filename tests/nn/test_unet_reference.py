"""The PyTorch reference arm of benchmarks/t2i.py (diffusers' UNet2DConditionModel built from
our config) is the same network: the same parameter count as jaxsafe's UNet for the test bed's
config and its output shape. Needs the torch extra."""

import jax
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from benchmarks.common import load_config  # noqa: E402
from benchmarks.reference.unet import make_forward  # noqa: E402


def test_the_reference_unet_is_the_test_beds_network():
    from flax import nnx

    from experiments import t2i_testbed as tb
    from jaxsafe.nn.unet2d_condition import UNet2DConditionModel

    c = load_config("configs/t2i/testbed.py:cpu")
    cfg = tb.unet_config(c)
    shape = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
    call, model = make_forward(cfg, 2, shape, (c.data.max_length, c.text_encoder.hidden_size))
    ours = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert sum(p.numel() for p in model.parameters()) == count
    assert tuple(call().shape) == (2, cfg.out_channels, cfg.sample_size, cfg.sample_size)
