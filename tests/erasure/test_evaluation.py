"""Test-bed erasure metrics: the retained prompts and the utility Fréchet distance against the
original model."""

import numpy as np
import pytest

from jaxsafe.data import shapes
from jaxsafe.erasure import evaluation


def test_retained_captions_name_no_target_nor_synonym():
    captions = evaluation.retained_captions(["square", "red"], 200, seed=1)
    assert len(captions) == 200
    words = {w for c in captions for w in c.split()}
    assert not words & {"square", "box", "red"}
    assert {"circle", "orange", "triangle"} <= words  # the rest of the world stays in
    assert evaluation.retained_captions(["square"], 5, 0) != evaluation.retained_captions(
        ["square"], 5, 1
    )
    # Without targets they are the stream's own captions.
    assert evaluation.retained_captions([], 3, 0) == [
        shapes.example(1, i)["caption"] for i in range(3)
    ]


@pytest.mark.slow
def test_the_fd_compares_with_the_original_model_on_independent_seeds(tiny_pipe):
    """A generator that *is* the original model drawn with the reference's seeds scores 0; the
    original with its own seeds scores the sampling-noise floor, above 0."""
    from flax import nnx

    from jaxsafe.diffusion import pipeline

    graphdef, state = nnx.split(tiny_pipe.model)
    sampling = dict(kind="ddim", num_inference_steps=2, guidance_scale=4.0, batch_size=8)
    gen = pipeline.generator(tiny_pipe, graphdef, **sampling)
    shift = evaluation.FID_SEED_OFFSET  # evaluated seeds + shift = the reference's seeds
    kw = dict(k=1, seed=0, fid_samples=24, sampling=sampling)
    same = evaluation.evaluate(
        tiny_pipe, lambda c, s: gen((state,), c, np.asarray(s) + shift), ["red"], **kw
    )
    floor = evaluation.evaluate(tiny_pipe, lambda c, s: gen((state,), c, s), ["red"], **kw)
    assert abs(same["oracle_fd"]) < 1e-3 < floor["oracle_fd"]


@pytest.mark.slow
def test_one_generator_per_model_folder_and_settings_with_the_weights_as_arguments(tiny_folder):
    import jax
    from flax import nnx

    from jaxsafe.diffusion import pipeline

    a, b = pipeline.load(tiny_folder), pipeline.load(tiny_folder)
    (ga, sa), (gb, _) = nnx.split(a.model), nnx.split(b.model)
    sampling = dict(kind="ddim", num_inference_steps=2, guidance_scale=4.0, batch_size=4)
    gen = pipeline.generator(a, ga, **sampling)
    assert pipeline.generator(b, gb, **sampling) is gen  # compiled once
    assert pipeline.generator(a, ga, **{**sampling, "guidance_scale": 3.0}) is not gen
    # Weights are arguments: an edited state through the shared function draws what a fresh
    # generator of that state draws.
    edited = jax.tree.map(lambda x: x * 0.9, sa)
    fresh = pipeline.make_generator(
        a,
        lambda s, x, t, e: nnx.merge(ga, *s)(x, t, e),
        lambda s, ids: nnx.merge(ga, *s).encode(ids),
        **sampling,
    )
    caps, seeds = ["a red square", "a blue circle"], np.array([1, 2])
    np.testing.assert_allclose(
        gen((edited,), caps, seeds), fresh((edited,), caps, seeds), rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(gen((edited,), caps, seeds), gen((sa,), caps, seeds), atol=1e-3)
