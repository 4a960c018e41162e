"""The grokking experiment's loss and evaluator measure Softmax Collapse in ``loss.sc_dtype``
(float32, the reference's ``--softmax_precision``, by default) even when the loss is float64.

The model is replaced by one that returns its input, so the logits are chosen by hand: float64
rows whose collapse differs between float32 and float64. The expected fractions are computed
in NumPy, independently of ``jaxsafe.grokking``."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import grokking as G
from jaxsafe import train

# Rows (5 classes): a gap of 20 (4 exp(-20) = 8e-9 < 2^-24, float32's half ulp of 1: collapses
# in float32 only), no collapse in either, a gap of 200 (exp(-200) = 1e-87: collapses in both),
# a gap of 16.5 (4 exp(-16.5) = 2.7e-7: collapses in neither).
LOGITS = np.array(
    [
        [20.0, 0.0, 0.0, 0.0, 0.0],
        [3.0, 0.0, 1.0, 2.0, 0.5],
        [0.0, -200.0, -300.0, -250.0, -200.0],
        [0.0, 0.0, 0.0, 16.5, 0.0],
    ]
)
LABELS = np.array([0, 0, 0, 3], np.int32)


def _collapsed_fraction(logits, dtype):
    """NumPy: the fraction of rows whose sum_j exp(z_j - max z) is exactly 1 in ``dtype``."""
    z = logits.astype(dtype)
    z = z - z.max(-1, keepdims=True)
    return float(np.mean(np.exp(z).sum(-1, dtype=dtype) == 1))


class _Identity(nnx.Module):
    """Returns its input as the logits (times a parameter equal to 1, so there is a parameter)."""

    def __init__(self):
        self.w = nnx.Param(jnp.ones((), jnp.float32))

    def __call__(self, x, rngs=None):
        return x * self.w[...]


def _config(setting, sc_dtype):
    c = importlib.import_module(f"configs.grokking.{setting}").get_config("smoke")
    if sc_dtype is not None:
        c.loss.sc_dtype = sc_dtype
    return c


@pytest.mark.parametrize(
    "setting,sc_dtype,measured_in",
    [
        ("stablemax", None, np.float32),  # float64 StableMax loss, default sc_dtype
        ("softmax_float64", "float32", np.float32),
        (
            "softmax_float64",
            None,
            np.float64,
        ),  # the float64 run measures at 64, as --softmax_precision 64
        ("softmax_float64", "loss", np.float64),
    ],
)
def test_loss_and_evaluator_measure_collapse_in_the_configured_dtype(
    setting, sc_dtype, measured_in
):
    assert _collapsed_fraction(LOGITS, np.float32) == 0.5
    assert _collapsed_fraction(LOGITS, np.float64) == 0.25
    want = _collapsed_fraction(LOGITS, measured_in)
    c = _config(setting, sc_dtype)
    assert c.loss.dtype == "float64"
    with jax.enable_x64(True):
        graphdef, params, frozen = train.split_model(_Identity())
        # Padded to 8 rows of which 4 are padding (all-zero logits, weight 0).
        batch = G.pad_split({"x": LOGITS, "y": LABELS}, 8)
        _, (metrics, _) = G.make_loss_fn(graphdef, c)(params, frozen, {}, batch, jax.random.key(0))
        assert float(metrics["sc_fraction"]) == want
        data = {"train": {"x": LOGITS, "y": LABELS}, "test": {"x": LOGITS[:2], "y": LABELS[:2]}}
        state = type("State", (), {"params": params, "frozen": frozen})()
        out = G.make_evaluator(graphdef, c, data)(state)
    assert float(out["train_sc_fraction"]) == want
    assert float(out["test_sc_fraction"]) == _collapsed_fraction(LOGITS[:2], measured_in)
