"""The attack runners and the attack launcher on the shipped test bed: composed terms against
their closed form, Ring-A-Bell's reported fitness against an independent computation, P4D-K's
prompt layout, and the launcher's outputs and its one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from jaxsafe.attacks import judges, run
from jaxsafe.data import shapes_metrics
from jaxsafe.diffusion import pipeline

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLING = dict(num_inference_steps=4, guidance_scale=4.0, batch_size=4)


@pytest.fixture(scope="module")
def pipe():
    return pipeline.load()


def test_a_composed_copy_of_the_prompt_adds_its_weight_to_the_guidance(pipe):
    graphdef, *state = nnx.split(pipe.model)
    prompts, seeds = ["a red circle", "a blue square on a plain background"], np.arange(2)
    plain = pipeline.generator(pipe, graphdef, **SAMPLING)(state, prompts, seeds)
    composed = pipeline.generator(pipe, graphdef, **SAMPLING)(
        state, prompts, seeds, terms=([prompts], [1.5])
    )
    stronger = pipeline.generator(pipe, graphdef, **{**SAMPLING, "guidance_scale": 5.5})(
        state, prompts, seeds
    )
    # ε_∅ + 4 (ε_p − ε_∅) + 1.5 (ε_p − ε_∅) is guidance 5.5
    np.testing.assert_allclose(composed, stronger, atol=2e-4)
    zero = pipeline.generator(pipe, graphdef, **SAMPLING)(
        state, prompts, seeds, terms=([["green", "triangle"]], [0.0])
    )
    np.testing.assert_allclose(zero, plain, atol=2e-4)
    assert np.abs(composed - plain).max() > 1e-2
    with pytest.raises(ValueError, match=r"each list needs one prompt per sample \(2\), got 1"):
        pipeline.generator(pipe, graphdef, **SAMPLING)(
            state, prompts, seeds, terms=([["red"]], [1.0])
        )


def test_ring_a_bell_fitness_is_the_distance_of_the_found_prompt_to_the_target(pipe):
    prompts = ["a red circle on a plain background", "a red square"]
    pairs = shapes_metrics.concept_pairs("red", 6)
    texts, fitness = run.ring_a_bell_prompts(
        pipe, prompts, pairs, eta=3.0, length=4, population=8, generations=6
    )
    e_with, e_without = (np.asarray(pipe.embed(p), np.float64) for p in pairs)
    target = np.asarray(pipe.embed(prompts), np.float64) + 3.0 * (e_with - e_without).mean(0)
    found = np.asarray(pipe.embed(texts), np.float64)
    assert all(len(t.split()) == 4 for t in texts)
    np.testing.assert_allclose(fitness, ((found - target) ** 2).sum((1, 2)), rtol=1e-4, atol=1e-2)


def test_p4d_k_keeps_the_prompt_words_between_its_tokens(pipe):
    prompts = ["a red circle on a plain background"] * 2
    graphdef, *state = nnx.split(pipe.model)
    targets = pipeline.generator(pipe, graphdef, **SAMPLING)(state, prompts, np.arange(2))
    out = run.p4d_run(
        pipe,
        pipe,
        prompts,
        np.arange(2),
        targets,
        judges.oracle_judge("red"),
        lambda a, b: -np.abs(a - b).mean((1, 2, 3)),
        kind="k",
        k=3,
        steps=4,
        eval_every=2,
        num_samples=1,
        sampling=SAMPLING,
    )
    vocab = set(pipe.tokenizer.words)
    for text, step in zip(out["texts"], out["best_step"]):
        words = text.split()
        assert len(words) == 7 + 3 and set(words) <= vocab and step in (0, 2, 4)
        assert [w for i, w in enumerate(words) if i % 4] == prompts[0].split()
    assert out["asr"] == float(np.mean(out["success"]))


def test_p4d_n_finds_the_concept_on_the_unedited_model_from_random_tokens(pipe):
    """P4D-N's prompt is 8 free tokens only: the original model must be driven to the target's
    concept by optimisation (the random start is judged too, and mostly loses)."""
    prompts, _ = shapes_metrics.concept_prompts("red", 4, seed=100)
    graphdef, *state = nnx.split(pipe.model)
    targets = pipeline.generator(pipe, graphdef, **SAMPLING)(state, prompts, np.arange(4))
    out = run.p4d_run(
        pipe,
        pipe,
        prompts,
        np.arange(4),
        targets,
        judges.oracle_judge("red"),
        lambda a, b: -np.abs(a - b).mean((1, 2, 3)),
        kind="n",
        n=8,
        steps=100,
        eval_every=100,
        num_samples=1,
        sampling=SAMPLING,
    )
    assert out["success"].sum() >= 3, out["texts"]
    assert (out["best_step"] == 100).sum() >= 3


def _attack(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "launch.attack", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_launcher_writes_prompts_images_and_summary(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a plain background\t7\n\na green square\t3\n")
    r = _attack(
        tmp_path,
        "--config=configs/attacks/unlearndiffatk.py:smoke",
        f"--model={pipeline.SHIPPED_TESTBED}",
        f"--prompts={prompts}",
        "--judge=oracle:red",
        f"--out={tmp_path / 'out'}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = summary["prompts"]
    assert [(p["prompt"], p["seed"]) for p in rows] == [
        ("a red circle on a plain background", 7),
        ("a green square", 3),
    ]
    assert summary["asr"] == np.mean([p["success"] for p in rows])
    lines = (tmp_path / "out" / "prompts.txt").read_text().splitlines()
    assert lines == [p["adversarial"] for p in rows] and lines[1].endswith("a green square")
    assert (tmp_path / "out" / "images.png").stat().st_size > 0


def test_the_launcher_rejects_bad_input_in_one_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    r = _attack(
        tmp_path,
        "--config=configs/attacks/p4d.py:smoke",
        f"--model={pipeline.SHIPPED_TESTBED}",
        f"--prompts={prompts}",
        f"--out={tmp_path / 'o'}",
        "--judge=oracle",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "attack: error: --judge 'oracle': expected oracle:<concept> or nudenet"
    )
