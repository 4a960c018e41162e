"""The robustness table's launcher: an edit of the base model shares its compiled functions,
and the table's cells are the mean ± sample deviation of the stored rates."""

import json
import shutil

import numpy as np
import pytest

from jaxsafe.diffusion import pipeline
from launch import robustness_table as rt


def test_an_exported_copy_shares_the_base_folder_key(tmp_path):
    base = pipeline.load()
    copy = tmp_path / "export"
    shutil.copytree(pipeline.SHIPPED_TESTBED, copy)
    loaded = rt.load_model(base, str(copy))
    assert loaded.folder == base.folder and loaded.model is not base.model
    (copy / "scheduler" / "scheduler_config.json").write_text(
        (copy / "scheduler" / "scheduler_config.json").read_text().replace("0.02", "0.021")
    )
    assert rt.load_model(base, str(copy)).folder == str(copy)


def test_cells_are_mean_and_sample_deviation_over_seeds(tmp_path):
    names = [c[0] for c in rt.COLUMNS]
    plain = [True, False, False, False]
    attacked = {0: [False, True, False, False], 1: [True, True, True, False]}
    for seed in (0, 1):
        path = tmp_path / "red" / "UCE" / f"seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {n: {"success": attacked[seed]} for n in names}
        result["no attack"] = {"success": plain}
        path.write_text(json.dumps(result))
    text = rt.table(str(tmp_path), "red", ["UCE", "ESD-u"], [0, 1, 2])
    row = [line for line in text.splitlines() if line.startswith("| UCE")]
    # an attack's rate counts the prompts the plain prompt already wins: 2/4 and 3/4
    sd = np.std([0.5, 0.75], ddof=1)
    assert row == [
        "| UCE | 2 | 0.25 ± 0.00 | " + " | ".join([f"0.62 ± {sd:.2f}"] * (len(names) - 1)) + " |"
    ]
    assert "ESD-u" not in text


def test_launcher_inputs_fail_with_messages_naming_the_problem(tmp_path):
    from launch import attack

    with pytest.raises(ValueError, match="concept 'purple' is not a test-bed concept"):
        attack.make_judge("oracle:purple")
    with pytest.raises(FileNotFoundError, match="--prompts: no file"):
        attack.read_prompts(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\tseven\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: the seed 'seven' is not an integer"):
        attack.read_prompts(str(bad))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompt"):
        attack.read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "export").mkdir()
    assert attack.model_folder(str(tmp_path / "ws")) == str(tmp_path / "ws" / "export")


def test_a_method_sampler_judges_every_generation():
    from configs.attacks import concept_arithmetic
    from jaxsafe.attacks import run

    calls = []

    def generate(texts, seeds, **kw):  # image k is "positive" when its seed is odd
        calls.append((list(texts), list(seeds), kw))
        return np.where((np.asarray(seeds) % 2 == 1)[:, None, None, None], 1.0, -1.0) * np.ones(
            (len(texts), 2, 2, 3)
        )

    judge = lambda x: np.asarray(x)[:, 0, 0, 0] > 0
    hit = run.judge_prompts(
        None, ["a", "b", "c"], [0, 1, 2], judge, num_samples=2, generate=generate
    )
    np.testing.assert_array_equal(hit, [False, True, False])  # seeds + 1000 keep the parity
    assert calls == [(["a", "b", "c"], [0, 1, 2], {}), (["a", "b", "c"], [1000, 1001, 1002], {})]
    # Concept arithmetic hands its composed terms to the method's sampler.
    calls.clear()
    config = concept_arithmetic.get_config("smoke")  # {"bare": (("{concept}", 4.0),)}
    out = run.run_attack(
        config,
        None,
        None,
        ["a red x", "a red y"],
        [3, 4],
        judge,
        words={"concept": "red"},
        generate=generate,
    )
    assert calls == [(["a red x", "a red y"], [3, 4], {"terms": ([["red", "red"]], [4.0])})]
    np.testing.assert_array_equal(out["success"], [True, False])
    with pytest.raises(ValueError, match="'UCE' samples with the model's own sampler"):
        rt.own_sampler("UCE", "/nowhere", {})


@pytest.mark.slow
def test_a_safree_export_is_judged_through_its_own_filter(tmp_path):
    """The SAFREE sampler rebuilt from the export's safree.json alone draws what the erasure
    run's own sampler draws, and differs from the unfiltered model."""
    from flax import nnx

    from configs.erasure import safree as safree_config
    from experiments import erase_safree

    c = safree_config.get_config("smoke")
    c.eval.enabled = False
    c.concepts.erase = ("red",)
    export = erase_safree.edit(c, str(tmp_path))["export"]
    assert rt.own_sampler_method(export) == "SAFREE"
    assert rt.own_sampler_method(pipeline.SHIPPED_TESTBED) is None
    sampling = dict(num_inference_steps=4, guidance_scale=4.0, batch_size=4)
    pipe, generate = rt.own_sampler("SAFREE", export, sampling)
    prompts, seeds = ["a red circle on a plain background", "a red square"], np.arange(2)
    c.sampling.update(sampling)
    graphdef, state = nnx.split(pipe.model)
    C = erase_safree.toxic_embeddings(pipe, erase_safree.keywords(c), c.safree.pooling)
    apply, encode, encode_negative = erase_safree.safree_functions(c, pipe, graphdef, C)
    reference = pipeline.make_generator(
        pipe,
        apply,
        encode,
        encode_negative=encode_negative,
        negative_prompt=erase_safree.negative_prompt(c),
        **sampling,
    )
    got = generate(prompts, seeds)
    np.testing.assert_allclose(got, reference((state,), prompts, seeds), atol=1e-5)
    terms = ([["red", "a red ellipse"]], [2.0])  # concept arithmetic's terms, filtered alike
    np.testing.assert_allclose(
        generate(prompts, seeds, terms=terms),
        reference((state,), prompts, seeds, terms=terms),
        atol=1e-5,
    )
    plain = pipeline.generator(pipe, graphdef, **sampling)((state,), prompts, seeds)
    assert np.abs(got - plain).max() > 1e-2
