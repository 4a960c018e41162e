"""The PyTorch reference arms of benchmarks/erasure.py do what the authors' code does: the UCE edit
equals jaxsafe's closed form, and the ESD-x update trains exactly the cross-attention parameters
jaxsafe's ESD-x trains, with ESD's loss. Needs the torch extra."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from benchmarks.common import load_config  # noqa: E402
from benchmarks.reference import erasure as reference  # noqa: E402


def test_reference_uce_equals_the_closed_form():
    from jaxsafe.erasure import closed_form

    r = np.random.default_rng(0)
    kernels = {
        name: (0.1 * r.standard_normal((12, d))).astype(np.float32)
        for name, d in (("a/to_k", 5), ("a/to_v", 7), ("b/to_k", 9))
    }
    c_e, c_g = r.standard_normal((2, 4, 12)).astype(np.float32)
    c_p = r.standard_normal((10, 12)).astype(np.float32)
    kw = {"lam": 0.5, "erase_scale": 0.7, "preserve_scale": 0.3}
    want = closed_form.uce_edit(kernels, c_e, c_g, c_p, **kw)
    got = reference.uce_edit(kernels, c_e, c_g, c_p, **kw)
    for name in kernels:
        np.testing.assert_allclose(got[name], np.asarray(want[name]), atol=2e-5, rtol=1e-4)


def test_reference_esd_x_trains_the_cross_attention_with_esds_loss():
    from flax import nnx

    from experiments import t2i_testbed as tb
    from jaxsafe.erasure import params as ep
    from jaxsafe.nn.unet2d_condition import UNet2DConditionModel

    c = load_config("configs/t2i/testbed.py:cpu")
    cfg = tb.unet_config(c)
    shape = (cfg.sample_size, cfg.sample_size, cfg.in_channels)
    context = (c.data.max_length, c.text_encoder.hidden_size)
    call, cells = reference.make_esd_x_update(cfg, shape, context, lr=1e-3)
    ours = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    _, trained, _ = nnx.split(ours, ep.nnx_filter(ep.selection("xattn", "")), ...)
    assert cells["n_trained"] == sum(x.size for x in jax.tree.leaves(trained))

    # At the first update the trained UNet is the original, so with eta = 1 the loss is
    # mean((e_p - (e_0 - (e_p - e_0)))^2) = 4 mean((e_p - e_0)^2).
    orig, z, t = cells["model_orig"], cells["z"], cells["t"]
    with torch.no_grad():
        e_0 = orig(z, t, encoder_hidden_states=cells["emb_0"]).sample
        e_p = orig(z, t, encoder_hidden_states=cells["emb_p"]).sample
    expected = 4 * float(((e_p - e_0) ** 2).mean())
    before = {k: v.clone() for k, v in cells["model"].state_dict().items()}
    assert call() == pytest.approx(expected, rel=1e-4, abs=1e-8)
    changed = {k for k, v in cells["model"].state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("attn2" in k for k in changed)
