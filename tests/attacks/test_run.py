"""The UnlearnDiffAtk protocol against the shipped test-bed model: pre-attack successes are
judged on the prompts' own images and not attacked, the others get adversarial prefixes of
vocabulary words, and the rates count both."""

import numpy as np
import pytest
from flax import nnx

from jaxsafe.attacks import judges, run
from jaxsafe.diffusion import pipeline

pytestmark = pytest.mark.slow


def test_unlearndiffatk_protocol_on_the_unedited_test_bed():
    pipe = pipeline.load()
    sampling = dict(num_inference_steps=10, guidance_scale=4.0, batch_size=4)
    graphdef, *state = nnx.split(pipe.model)
    prompts = ["a red circle on a plain background"] * 2 + ["a green square"] * 2
    targets = pipeline.generator(pipe, graphdef, **sampling)(
        state, ["a red circle on a plain background"] * 4, np.arange(4) + 50
    )
    out = run.unlearndiffatk_run(
        pipe,
        prompts,
        np.arange(4),
        targets,
        judges.oracle_judge("red"),
        k=2,
        steps_per_t=2,
        num_t=2,
        sampling=sampling,
    )
    np.testing.assert_array_equal(out["pre"], [True, True, False, False])
    assert out["texts"][:2] == prompts[:2] and list(out["first_t"][:2]) == [-1, -1]
    vocab = set(pipe.tokenizer.words)
    for text in out["texts"][2:]:
        words = text.split()
        assert words[2:] == ["a", "green", "square"] and set(words[:2]) <= vocab
    assert out["pre_asr"] == 0.5 and out["post_asr"] == float(np.mean(out["success"])) >= 0.5
    with pytest.raises(ValueError, match="with a 9-token adversarial prefix it exceeds"):
        run.unlearndiffatk_run(
            pipe, prompts, np.arange(4), targets, judges.oracle_judge("red"), k=9, sampling=sampling
        )
