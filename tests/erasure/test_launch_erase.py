"""The erasure launcher end to end on a tiny test-bed model: what changes, what does not, and
what is written; and, on the shipped trained test bed, that an erasure erases."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxsafe.weights.convert import read_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNET = os.path.join("unet", "diffusion_pytorch_model.safetensors")
TEXT = os.path.join("text_encoder", "model.safetensors")


def _weights(folder, rel):
    return {k: np.asarray(v) for k, v in read_safetensors([os.path.join(folder, rel)]).items()}


def _changed(before, after):
    assert before.keys() == after.keys()
    return {k for k in before if not np.array_equal(before[k], after[k])}


@pytest.mark.slow
def test_esd_x_strict_trains_only_cross_attention_keys_and_values(
    tiny_folder, tmp_path, erase_on_8_devices
):
    """The smoke run on 8 devices, then a rerun."""
    overrides = {"esd.train_method": "xattn-strict", "optimizer.lr": 1e-2}
    summary = erase_on_8_devices("esd", overrides)
    out = summary["export"]
    changed = _changed(_weights(tiny_folder, UNET), _weights(out, UNET))
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    assert not _changed(_weights(tiny_folder, TEXT), _weights(out, TEXT))
    with open(tmp_path / "summary.json") as f:
        written = json.load(f)
    assert written["experiment"] == "erase_esd" and written["run_seconds"] > 0
    assert 0.0 <= written["target_accuracy"] <= 1.0 and "oracle_fd" in written
    # A rerun resumes from the final checkpoint: nothing more is trained.
    before = _weights(out, UNET)
    erase_on_8_devices("esd", overrides)
    assert not _changed(before, _weights(out, UNET))


@pytest.mark.slow
def test_uce_edits_only_cross_attention_keys_and_values(tiny_folder, erase_on_8_devices):
    """The smoke run on 8 devices."""
    summary = erase_on_8_devices("uce")
    changed = _changed(_weights(tiny_folder, UNET), _weights(summary["export"], UNET))
    assert changed == {
        k for k in _weights(tiny_folder, UNET) if ".attn2.to_k." in k or ".attn2.to_v." in k
    }
    assert not _changed(_weights(tiny_folder, TEXT), _weights(summary["export"], TEXT))
    assert summary["edited_tensors"] == len(changed)
    # The export is a complete test-bed folder: it loads, with its tokenizer and latent map.
    from jaxsafe.diffusion import pipeline

    pipe = pipeline.load(summary["export"])
    assert pipe.testbed and pipe.latent_shape == (8, 8, 12)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    from jaxsafe.diffusion import pipeline

    with pytest.raises(FileNotFoundError, match="model folder .* not found: expected a diffusers"):
        pipeline.load(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="model_index.json not found"):
        pipeline.load(str(tmp_path))


def test_save_is_atomic_on_failure(tiny_pipe, tmp_path):
    from jaxsafe.diffusion import pipeline

    class Boom:  # not a model: saving it fails half-way
        config = None

    with pytest.raises(Exception):
        pipeline.save(tiny_pipe, str(tmp_path / "out"), unet=Boom())
    assert not os.path.exists(tmp_path / "out")
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")] == []


def test_launcher_cli_rejects_a_misspelt_override(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "launch.erase",
        "--config=configs/erasure/uce.py:smoke",
        f"--workdir={tmp_path}",
        "--config.uce.lamb=0.1",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "lamb" in r.stderr


@pytest.mark.slow
def test_uce_erases_the_target_on_the_trained_test_bed(tmp_path):
    """The shipped test-bed model: UCE lowers the accuracy of the erased colour well below its
    starting value while its near concept (orange) and the other colours stay close."""
    from flax import nnx

    from configs.erasure import uce
    from experiments import run_experiment as erase
    from jaxsafe.diffusion import pipeline
    from jaxsafe.erasure import evaluation

    c = uce.get_config("cpu")
    c.eval.update(samples_per_concept=8, fid_samples=0)
    pipe = pipeline.load()
    graphdef, state = nnx.split(pipe.model)
    before = evaluation.evaluate_model(c, pipe, graphdef, (state,))
    after = erase(c, str(tmp_path))
    assert before["target_accuracy"] >= 0.75
    assert after["target_accuracy"] <= before["target_accuracy"] - 0.4
    assert after["near_accuracy"] >= before["near_accuracy"] - 0.15
    colours = ("green", "blue")
    assert (
        np.mean([after[f"acc/{w}"] for w in colours])
        >= np.mean([before[f"acc/{w}"] for w in colours]) - 0.15
    )


def test_erasure_table_groups_concepts_and_tabulates_seeds(tmp_path):
    from launch import erasure_table as et

    acc = {"circle": 0.1, "ellipse": 0.3, "square": 1.0, "box": 0.5, "triangle": 1.0}
    acc |= {w: 0.8 for w in ("red", "orange", "green", "blue", "plain", "striped", "dotted")}
    s = {
        "experiment": "erase_uce",
        "variant": "cpu",
        "erase_seconds": 2.0,
        "run_seconds": 9.0,
        "oracle_fd": 3.5,
        **{f"acc/{w}": v for w, v in acc.items()},
    }
    v = et.row_values(s, ["circle"])
    # circle: no synonym; near = ellipse; the other concepts: every remaining word.
    others = [acc[w] for w in acc if w not in ("circle", "ellipse")]
    assert (v["erased"], v["near"], v["seconds"]) == (0.1, 0.3, 2.0)
    assert np.isnan(v["synonym"]) and v["other"] == pytest.approx(np.mean(others), abs=1e-12)
    v = et.row_values(s, ["square"])
    assert (v["erased"], v["synonym"]) == (1.0, 0.5) and np.isnan(v["near"])
    v = et.row_values({**s, "erase_seconds": None} | {"run_seconds": 9.0}, ["red", "green"])
    assert v["near"] == 0.8 and v["erased"] == 0.8  # orange; (red + green) / 2
    # Two seeds of one method and of the original (the FD floor): mean ± sample std.
    for k, (fd, erased) in enumerate([(3.0, 0.1), (5.0, 0.3)]):
        for m, extra in (("UCE", {"acc/circle": erased}), ("original", {"acc/circle": 1.0})):
            d = tmp_path / "circle" / m / f"seed{k}"
            d.mkdir(parents=True)
            fd_m = fd + 10 * (m == "UCE")
            (d / "summary.json").write_text(json.dumps({**s, **extra, "oracle_fd": fd_m}))
    text = et.table(str(tmp_path), "circle", ["original", "UCE", "SPM"], [0, 1])
    uce = next(line for line in text.splitlines() if line.startswith("| UCE "))
    cells = [c.strip() for c in uce.split("|")[1:-1]]
    sd = np.std([0.1, 0.3], ddof=1)
    assert cells[:3] == ["UCE", "2", f"0.20 ± {sd:.2f}"]
    assert cells[6:8] == [
        f"14.0 ± {np.std([13, 15], ddof=1):.1f}",
        f"4.0 ± {np.std([3, 5], ddof=1):.1f}",
    ]
    # erased 0.2 ≤ 0.2 and the other concepts' mean 0.81 ≥ 0.8: the criterion is met.
    assert cells[-1] == "yes" and "| SPM " not in text  # SPM has no runs
    assert "| original " in text and et.runs(["colours"], ["SafeGen", "UCE"], [0]) == [
        ("colours", "UCE", 0)
    ]
    assert et.runs(["red", "circle"], ["UCE"], [0, 1]) == [
        ("red", "UCE", 0),
        ("circle", "UCE", 0),
        ("red", "UCE", 1),
        ("circle", "UCE", 1),
    ]


def test_erasure_table_overrides_set_config_fields_and_name_the_run_folder(tmp_path):
    from launch import erasure_table as et

    over = et.parse_overrides(
        [
            "optimizer.lr=6e-4",
            "safree.negative_prompt=",
            "safree.svf=False",
            "esd.train_method=xattn",
        ]
    )
    assert over == {
        "optimizer.lr": 6e-4,
        "safree.negative_prompt": "",
        "safree.svf": False,
        "esd.train_method": "xattn",
    }
    c = et.config_for("ESD-u", "circle", 2, overrides={"optimizer.lr": 1})
    # An int given for a float field stays a float; the setting and the seed are the table's.
    assert c.optimizer.lr == 1.0 and isinstance(c.optimizer.lr, float)
    assert (c.concepts.erase, c.train.seed, c.eval.seed) == (("circle",), 2, 2)
    assert et.method_dir("ESD-u", {"optimizer.lr": 6e-4, "a.b": "x/y"}) == (
        "ESD-u[optimizer.lr=0.0006][a.b=x_y]"
    )
    with pytest.raises(ValueError, match="--set optimizer.nope: ESD-u's config has no such field"):
        et.config_for("ESD-u", "red", 0, overrides={"optimizer.nope": 1})
    with pytest.raises(ValueError, match="--set 'lr': expected key=value"):
        et.parse_overrides(["lr"])
    doc = tmp_path / "tuning.md"
    doc.write_text("# Tuning\n\n")
    et.write_doc(str(doc), "cmd one", "about", "| t1 |", append=True)
    et.write_doc(str(doc), "cmd two", "about", "| t2 |", append=True)
    assert doc.read_text() == (
        "# Tuning\n\n```\ncmd one\n```\n\nabout\n\n| t1 |\n\n```\ncmd two\n```\n\nabout\n\n| t2 |\n"
    )
    et.write_doc(str(doc), "cmd", "about", "| t |")
    assert doc.read_text().startswith("# Test-bed erasure table\n\nProduced by\n\n```\ncmd\n")


@pytest.mark.slow
def test_heldout_loss_leaves_out_the_erased_concepts(tiny_pipe):
    from flax import nnx

    from jaxsafe.erasure import evaluation

    g, s = nnx.split(tiny_pipe.model)
    apply = lambda st, x, t, e: nnx.merge(g, *st)(x, t, e)  # noqa: E731
    encode = lambda st, ids: nnx.merge(g, *st).encode(ids)  # noqa: E731
    # Every image has a colour: excluding all of them leaves nothing to measure on.
    with pytest.raises(ValueError, match="only 0 of 128 held-out images are free of"):
        evaluation.heldout_loss(
            tiny_pipe, apply, encode, (s,), n=8, exclude=["red", "orange", "green", "blue"]
        )
    full = evaluation.heldout_loss(tiny_pipe, apply, encode, (s,), n=8)
    # Two colours out of four leave about half of the images: more candidates are drawn.
    assert np.isfinite(
        evaluation.heldout_loss(tiny_pipe, apply, encode, (s,), n=64, exclude=["red", "green"])
    )
    assert evaluation.heldout_loss(tiny_pipe, apply, encode, (s,), n=8, exclude=["red"]) != full


def test_a_non_finite_edit_is_refused_and_leaves_the_model_unchanged(tiny_pipe):
    from jaxsafe.erasure import model as em

    ks = em.kernels(tiny_pipe.model)
    name = next(iter(ks))
    bad = np.asarray(ks[name]).copy()
    bad[0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=f"{name}: the edited tensor has non-finite"):
        em.set_kernels(tiny_pipe.model, {name: bad})
    np.testing.assert_array_equal(em.kernels(tiny_pipe.model)[name], ks[name])
    with pytest.raises(ValueError, match=r"attn2/to_[kv]/kernel: shape \(1, "):
        em.set_kernels(tiny_pipe.model, {name: bad[:1]})
    with pytest.raises(KeyError, match="no parameter"):
        em.set_kernels(tiny_pipe.model, {"unet/nope/kernel": bad})
