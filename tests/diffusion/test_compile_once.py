"""The samplers compile once per shape: a second call with the same shapes reuses the program,
a new batch size compiles one more. A retrace on every call (a Python value that should have
been static, a fresh closure per call) would make sampling a run of compiles."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsafe.diffusion import image_model, schedulers, t2i
from jaxsafe.train import split_model


def _toy_unet(params, x, t, emb):
    # Depends on every input so none of them can be dropped from the program.
    return (
        params["w"] * x
        + 1e-3 * t[:, None, None, None]
        + jnp.mean(emb, axis=(1, 2))[:, None, None, None]
    )


def test_t2i_sampler_compiles_once_per_shape(compile_log):
    config = schedulers.SchedulerConfig()
    sample = t2i.make_t2i_sampler(_toy_unet, config, num_inference_steps=4, latent_shape=(8, 8, 4))
    params = {"w": jnp.float32(0.5)}
    emb = lambda b, v: jnp.full((b, 3, 16), v, jnp.float32)  # noqa: E731
    with compile_log() as names:
        a = sample(params, emb(2, 1.0), emb(1, 0.0), jnp.arange(2))
        b = sample(params, emb(2, 2.0), emb(1, 0.5), jnp.arange(2) + 7)
        assert names.count("jit(sample)") == 1, names
        sample(params, emb(3, 1.0), emb(1, 0.0), jnp.arange(3))
        assert names.count("jit(sample)") == 2, names
    # The second call really ran on its own inputs.
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


@pytest.mark.slow
def test_pfgmpp_sample_fn_compiles_once_per_shape(compile_log):
    config = importlib.import_module("configs.pfgmpp.cifar10_d128").get_config("smoke")
    graphdef, params, frozen = split_model(image_model.build_model(config))
    sample_fn = image_model.make_sample_fn(graphdef, config, num_steps=2)
    with compile_log() as names:
        x, _ = image_model.generate(
            sample_fn, params, frozen, jax.random.key(0), num=6, batch_size=2
        )
        assert names.count("jit(sample)") == 1, names
        image_model.generate(sample_fn, params, frozen, jax.random.key(1), num=3, batch_size=3)
        assert names.count("jit(sample)") == 2, names
    assert x.shape[0] == 6 and np.all(np.isfinite(x))
    # Three batches drawn with different keys: different images.
    assert np.abs(x[0] - x[2]).max() > 1e-3 and np.abs(x[2] - x[4]).max() > 1e-3


@pytest.mark.slow
def test_pfgmpp_sample_fn_compiles_once_for_every_alpha(compile_log):
    """α as an argument: one program for a whole noise-injection sweep, with the images of the
    sampler that has α built in."""
    config = importlib.import_module("configs.pfgmpp.cifar10_d128").get_config("smoke")
    graphdef, params, frozen = split_model(image_model.build_model(config))
    sample_fn = image_model.make_sample_fn(graphdef, config, num_steps=2)
    key, labels = jax.random.key(0), jnp.zeros((2,), jnp.int32)
    with compile_log() as names:
        a = sample_fn(params, frozen, key, labels, jnp.float32(0.1))
        b = sample_fn(params, frozen, key, labels, jnp.float32(0.3))
        assert names.count("jit(sample)") == 1, names
    built_in = image_model.make_sample_fn(graphdef, config, num_steps=2, noise_injection_alpha=0.3)
    np.testing.assert_allclose(
        np.asarray(b), np.asarray(built_in(params, frozen, key, labels)), rtol=0, atol=1e-5
    )
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
