"""SFD's text version on the tiny test bed: forgetting prompts against their overrides, the
one-step generator, and what trains."""

import json

import jax
import numpy as np
import pytest

from experiments import erase_sfd
from jaxsafe import parallel
from jaxsafe.diffusion import pipeline, schedulers
from jaxsafe.erasure import prompts


def smoke(tiny_folder):
    from configs.erasure import sfd

    c = sfd.get_config("smoke")
    c.model.folder = tiny_folder
    return c


@pytest.mark.slow
def test_override_prompts_replace_the_erased_word_by_its_guide(tiny_folder):
    c = smoke(tiny_folder)
    pairs = prompts.prompt_pairs(c.concepts)
    # The override: the same caption without the colour word, its article fixed.
    assert ("a red square on a dotted background", "a square on a dotted background") in pairs
    assert ("a red ellipse", "an ellipse") in pairs
    task = erase_sfd.build(c, parallel.make_mesh())
    # G and f_ψ start as the teacher's UNet; only UNet tensors train.
    for net in ("G", "psi"):
        for a, b in zip(jax.tree.leaves(task.params[net]), jax.tree.leaves(task.frozen["teacher"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from jaxsafe.treepath import named_leaves

    assert all(n.startswith("unet/") for n in named_leaves(task.params["G"]))


@pytest.mark.slow
def test_one_step_generator_is_the_x0_prediction_at_t_init(tiny_folder):
    from flax import nnx

    pipe = pipeline.load(tiny_folder)
    graphdef, params, rest = nnx.split(pipe.model, erase_sfd._unet, ...)
    gen = erase_sfd.one_step_generator(pipe, graphdef, rest, 625, batch_size=4)
    images = gen(params, ["a red square", "a blue circle", "a green box"], np.array([3, 4, 5]))
    assert images.shape == (3, 32, 32, 3)
    # By hand for the second caption: ε at the latent √(1 − ᾱ) z of step 625, x₀, decoded.
    abar = np.asarray(schedulers.alphas_cumprod(pipe.scheduler))
    z = jax.random.normal(jax.random.key(4), pipe.latent_shape)[None]
    x_t = np.sqrt(1 - abar[625]) * z
    emb = pipe.embed(["a blue circle"])
    eps = pipe.model(x_t, np.array([625]), emb)
    x0 = (x_t - np.sqrt(1 - abar[625]) * eps) / np.sqrt(abar[625])
    np.testing.assert_allclose(images[1], np.asarray(pipe.decode(x0))[0], rtol=1e-4, atol=1e-4)
    # Batching and padding change nothing: image k depends on its caption and seed only.
    alone = gen(params, ["a green box"], np.array([5]))
    np.testing.assert_allclose(alone[0], images[2], rtol=1e-5, atol=1e-5)
    # Concept arithmetic at the one step, by hand for the first caption: the x₀ of each prompt
    # at the same latent, x̂₀ = x₀(p) + 0.8 (x₀(c) − x₀(∅)), decoded.
    captions, seeds = ["a red square", "a blue circle", "a green box"], np.array([3, 4, 5])
    composed = gen(params, captions, seeds, terms=([["red", "circle", "box"]], [0.8]))
    z = jax.random.normal(jax.random.key(3), pipe.latent_shape)[None]
    x_t = np.sqrt(1 - abar[625]) * z

    def x0_of(text):
        e = pipe.model(x_t, np.array([625]), pipe.embed([text]))
        return (x_t - np.sqrt(1 - abar[625]) * e) / np.sqrt(abar[625])

    want = x0_of("a red square") + 0.8 * (x0_of("red") - x0_of(""))
    np.testing.assert_allclose(composed[0], np.asarray(pipe.decode(want))[0], rtol=1e-4, atol=1e-4)
    assert np.abs(composed[0] - images[0]).max() > 1e-2


@pytest.mark.slow
def test_smoke_run_exports_a_one_step_generator_and_leaves_the_teacher(
    tiny_folder, tmp_path, erase_on_8_devices
):
    """The smoke run on 8 devices: the export is the trained one-step generator (UNet
    parameters only; the text encoder is the original's)."""
    summary = erase_on_8_devices("sfd")
    meta = json.loads((tmp_path / "export" / "sfd.json").read_text())
    assert meta == {"method": "SFD", "one_step": True, "t_init": 625}
    from flax import nnx

    from jaxsafe.treepath import named_leaves

    before = named_leaves(nnx.state(pipeline.load(tiny_folder).model, nnx.Param))
    after = named_leaves(nnx.state(pipeline.load(summary["export"]).model, nnx.Param))
    moved = [n for n in before if not np.array_equal(np.asarray(before[n]), np.asarray(after[n]))]
    assert moved and all(n.startswith("unet/") for n in moved)


def test_a_stable_diffusion_folder_needs_retain_prompts(tiny_folder, monkeypatch):
    c = smoke(tiny_folder)
    real = pipeline.load

    def not_testbed(folder=None, **kwargs):
        p = real(folder, **kwargs)
        p.testbed = False
        return p

    monkeypatch.setattr(pipeline, "load", not_testbed)
    with pytest.raises(ValueError, match="sfd.retain_prompts: SFD's remaining term needs"):
        erase_sfd.build(c, parallel.make_mesh())
