"""The PyTorch reference arm of benchmarks/diffusion.py (EDM's DDPM++ SongUNet, EDMPrecond, the
PFGM++ perturbation and EDM's Heun steps) is the same maths as jaxsafe's: jaxsafe's weights load
into it by name and give the same denoiser output. Needs the torch extra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.reference import diffusion as reference  # noqa: E402

TINY = {
    "img_resolution": 8,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 16,
    "channel_mult": (1, 2),
    "channel_mult_emb": 4,
    "num_blocks": 1,
    "attn_resolutions": (4,),
    "dropout": 0.0,
}


@pytest.mark.parametrize("fast_convs", [False, True], ids=["xla_convs", "winograd_convs"])
def test_jaxsafe_weights_load_by_name_and_give_the_same_denoiser(fast_convs, monkeypatch):
    """``winograd_convs``: jaxsafe.nn.conv3x3's thresholds lowered so that this small network's
    3 x 3 convolutions run Winograd (8 x 8 and 4 x 4 levels) on the CPU."""
    from flax import nnx

    from jaxsafe.nn import conv3x3

    if fast_convs:
        monkeypatch.setattr(conv3x3, "MIN_CHANNELS", 1)
        monkeypatch.setattr(conv3x3, "MIN_TILES", 1)

    from jaxsafe.diffusion import image_model
    from jaxsafe.nn.songunet import SongUNet
    from jaxsafe.weights.convert import model_params, params_to_state_dict

    ours = SongUNet(**TINY, rngs=nnx.Rngs(3))
    ours.eval()
    theirs = reference.song_unet(**TINY).eval()
    # strict: every name and shape of the reference is one of jaxsafe's and vice versa
    theirs.load_state_dict(
        {
            k: torch.from_numpy(np.array(v))
            for k, v in params_to_state_dict(model_params(ours)).items()
        },
        strict=True,
    )
    r = np.random.default_rng(0)
    x = r.standard_normal((3, 8, 8, 3)).astype(np.float32)
    sigma = np.array([0.01, 1.0, 40.0], np.float32)
    want = image_model.make_denoiser(ours, 0.5)(jnp.asarray(x), jnp.asarray(sigma), None)
    with torch.no_grad():
        got = reference.denoiser(
            theirs, torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(sigma)
        )
    np.testing.assert_allclose(
        got.permute(0, 2, 3, 1).numpy(),
        np.asarray(want),
        atol=1e-4 * float(np.abs(np.asarray(want)).max()),
        rtol=1e-4,
    )


def test_the_cifar10_network_has_jaxsafes_parameter_count():
    from flax import nnx

    from benchmarks.common import load_config
    from jaxsafe.diffusion import image_model

    config = load_config("configs/pfgmpp/cifar10_d128.py:paper")
    config.augment.p = 0.0  # the reference arm has no augmentation pipeline (map_augment)
    kwargs = image_model.songunet_kwargs(config)
    ours = nnx.eval_shape(lambda: image_model.build_model(config))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    assert sum(p.numel() for p in reference.song_unet(**kwargs).parameters()) == count


def test_other_songunet_settings_are_refused():
    with pytest.raises(ValueError, match="the PyTorch reference is DDPM\\+\\+"):
        reference.song_unet(**TINY, embedding_type="fourier")


def test_heun_time_steps_are_edms():
    """N = 18, sigma in [0.002, 80], rho = 7: endpoints, the appended 0, and the rho-spacing
    (sigma_i^(1/rho) evenly spaced)."""
    t = reference.heun_steps()
    assert t.shape == (19,) and t[-1] == 0.0
    np.testing.assert_allclose(t[[0, 17]], [80.0, 0.002], rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        np.diff(t[:-1] ** (1 / 7)),
        np.full(17, (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17),
        rtol=1e-9,
        atol=1e-12,
    )


def test_pfgmpp_perturbation_norm_has_the_closed_form_mean():
    """|n|^2 = r^2 B / (1 - B), B ~ Beta(N/2, D/2), r = sigma sqrt(D): E|n|^2 = sigma^2 N D /
    (D - 2), and the direction is uniform (mean zero)."""
    torch.manual_seed(0)
    shape, D, sigma = (4000, 3, 4, 4), 128.0, 2.0
    n = (
        reference.pfgmpp_perturbation(
            torch.full((shape[0],), sigma), shape, D, np.random.default_rng(0)
        )
        .reshape(shape[0], -1)
        .double()
    )
    dims = 48
    mean_sq = float((n**2).sum(1).mean())
    assert mean_sq == pytest.approx(sigma**2 * dims * D / (D - 2), rel=0.03, abs=1.0)
    assert float(n.mean(0).abs().max()) < 0.15 * sigma
