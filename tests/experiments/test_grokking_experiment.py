"""The grokking experiment: paper configs, the padded full-batch loss, every setting's smoke run,
and the main demo reproducing the paper's ⊥AdamW-vs-AdamW finding."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import grokking, run_experiment
from jaxsafe import parallel, train
from jaxsafe.data import one_hot_operands
from jaxsafe.grokking import softmax_collapse_fraction

REPO = Path(__file__).resolve().parents[2]
SETTINGS = [
    "adamw",
    "perp_adamw",
    "softmax_float32",
    "softmax_float64",
    "stablemax",
    "weight_decay",
    "sparse_parity",
]


def config(setting, arg=None):
    return importlib.import_module(f"configs.grokking.{setting}").get_config(arg)


# Values from the authors' run_main_experiments.sh (docs/grokking_defaults.md), typed in by hand.
PAPER = {
    "softmax_float32": dict(
        lr=5e-4, b2=0.99, eps=1e-30, wd=0.0, steps=20000, loss=("softmax", "float32")
    ),
    "stablemax": dict(
        lr=0.01, b2=0.999, eps=1e-25, wd=0.0, steps=80000, loss=("stablemax", "float64")
    ),
    "perp_adamw": dict(lr=0.01, b2=0.999, eps=1e-8, wd=0.0, steps=300, loss=("softmax", "float32")),
    "softmax_float64": dict(
        lr=0.01, b2=0.99, eps=1e-25, wd=0.0, steps=80000, loss=("softmax", "float64")
    ),
    "weight_decay": dict(
        lr=1e-3, b2=0.99, eps=1e-25, wd=1.5, steps=5000, loss=("softmax", "float32")
    ),
    "adamw": dict(lr=0.005, b2=0.99, eps=1e-25, wd=0.0, steps=500, loss=("softmax", "float32")),
}


@pytest.mark.parametrize("setting", sorted(PAPER))
def test_paper_configs_hold_the_paper_values(setting):
    c, want = config(setting), PAPER[setting]
    o = c.optimizer
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay) == (
        want["lr"],
        0.9,
        want["b2"],
        want["eps"],
        want["wd"],
    )
    assert c.train.num_steps == want["steps"]
    assert (c.loss.name, c.loss.dtype) == want["loss"]
    assert (c.data.p, c.data.op, c.data.train_fraction) == (113, "add", 0.4)
    assert o.perp == ("per_tensor" if setting == "perp_adamw" else None)
    # Softmax Collapse at the reference's --softmax_precision: 64 only in the float64 softmax
    # run; StableMax runs at the default 32. The transformer's data start at operand 1.
    assert c.loss.sc_dtype == ("float64" if setting == "softmax_float64" else "float32")
    assert c.data.first_operand == (1 if setting == "weight_decay" else 0)


def test_softmax_collapse_is_measured_in_the_configured_dtype():
    # Logits with a gap of 20: exp(-20) = 2.1e-9 is below float32's half-ulp of 1 (6e-8), so the
    # row collapses in float32 but not in float64.
    logits = np.zeros((4, 5), np.float32)
    logits[:, 0] = 20.0
    with jax.enable_x64(True):
        for sc, want in (("float32", 1.0), ("float64", 0.0), ("loss", 0.0)):
            c = config("stablemax", "smoke")
            c.loss.sc_dtype = sc
            dtype = grokking.sc_dtype(c.loss)
            assert float(softmax_collapse_fraction(logits, dtype)) == want
    c.loss.sc_dtype = "float16"
    with pytest.raises(
        ValueError,
        match=r"loss.sc_dtype='float16'; expected 'float32', "
        r"'float64' or 'loss'",
    ):
        grokking.sc_dtype(c.loss)


def test_padded_full_batch_loss_equals_unpadded_mean():
    c = config("adamw", "smoke")
    mesh = parallel.make_mesh()
    data = grokking.load_data(c.data)
    model = grokking.build_model(c, data)
    graphdef, params, frozen = train.split_model(model)
    loss_fn = grokking.make_loss_fn(graphdef, c)
    padded = grokking.pad_split(data["train"], 8)
    assert len(padded["y"]) % 8 == 0 and padded["mask"].sum() == len(data["train"]["y"])
    loss, (metrics, _) = loss_fn(params, frozen, {}, padded, jax.random.key(0))
    # Independent forward pass: one-hot inputs through the module's weights in numpy.
    h = one_hot_operands(data["train"]["x"], c.data.p).astype(np.float64)
    for i, layer in enumerate(model.layers):
        h = h @ np.asarray(layer.kernel[...], np.float64)
        if i < len(model.layers) - 1:
            h = np.maximum(h, 0)
    z = h - h.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    y = data["train"]["y"]
    np.testing.assert_allclose(loss, -logp[np.arange(len(y)), y].mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        metrics["accuracy"], (h.argmax(-1) == y).mean(), rtol=1e-6, atol=1e-7
    )
    del mesh


def test_unknown_names_fail_clearly():
    c = config("adamw", "smoke")
    with c.unlocked():
        c.model.name = "resnet"
    with pytest.raises(ValueError, match=r"model.name='resnet'; expected 'mlp' or 'transformer'"):
        grokking.build_model(c, None)
    with c.unlocked():
        c.optimizer.name = "lion"
    with pytest.raises(ValueError, match=r"optimizer.name='lion'; expected 'adamw' or 'sgd'"):
        grokking.make_optimizer(c.optimizer)


@pytest.mark.parametrize("setting", ["adamw", "perp_adamw", "softmax_float32", "weight_decay"])
@pytest.mark.slow
def test_float32_smoke_runs_train(setting, tmp_path):
    c = config(setting, "smoke")
    final = run_experiment(c, str(tmp_path))
    rows = train.read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == c.train.num_steps // c.train.log_every
    assert losses[-1] < losses[0]
    assert 0 <= final["train_accuracy"] <= 1 and np.isfinite(final["test_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["softmax_float64", "stablemax", "sparse_parity"])
def test_float64_smoke_runs_train(setting, tmp_path):
    # A subprocess: these runs switch on jax_enable_x64, which must not leak into other tests.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            f"--config=configs/grokking/{setting}.py:smoke",
            f"--workdir={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = train.read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert json.load(open(tmp_path / "config.json"))["loss"]["dtype"] == "float64"


@pytest.mark.slow
def test_main_demo_reproduces_perp_adamw_vs_adamw(tmp_path):
    """Paper, Fig. 1/6: AdamW without weight decay memorises and collapses, ⊥AdamW generalises."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run(
        [sys.executable, "-m", "launch.grokking_demo", f"--workdir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    png = tmp_path / "grokking_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    final = {}
    for name in ("adamw", "perp_adamw"):
        rows = train.read_jsonl(str(tmp_path / name / "metrics.jsonl"))
        final[name] = {k: v for r in rows for k, v in r.items()}  # last value of each key
    assert final["adamw"]["eval/train_accuracy"] == 1.0
    assert final["adamw"]["eval/test_accuracy"] < 0.1
    assert final["adamw"]["train/sc_fraction"] > 0.3
    assert final["perp_adamw"]["eval/test_accuracy"] > 0.95
    assert final["perp_adamw"]["train/sc_fraction"] == 0.0
    assert "⊥AdamW" in p.stdout and "test accuracy" in p.stdout


def test_unknown_experiment_is_named():
    from experiments import get

    with pytest.raises(ValueError, match=r"unknown experiment 'grok'; known: .*grokking"):
        get("grok")
