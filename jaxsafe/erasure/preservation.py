r"""Preservation terms: what keeps an erased model useful, as composable pieces.

Each is a plain function of network outputs, to be added to an erasure objective with a weight:

* :func:`retain_mse` — retain-set regulariser (AdvUnlearn, Zhang et al., NeurIPS 2024, eq. 6;
  ESD-style preservation): ‖ε_θ(x_t, c_r, t) − sg[ε*(x_t, c_r, t)]‖² on prompts c_r that must
  keep their behaviour.
* :func:`anchor_mse` — latent anchoring (SPM, Lyu et al., CVPR 2024, eq. 6): the same distance on
  *anchor* embeddings (sampled surrogate concepts or random embeddings near the concept), so that
  the edit stays local in embedding space.
* :func:`unconditional_drift_mse` — TRCE's regulariser (Chen et al., 2025): ‖ε_θ(x_t, ∅, t) −
  sg[ε*(x_t, ∅, t)]‖², the unconditional prediction must not drift (it is the base of
  classifier-free guidance for every prompt).

They are one computation, the mean squared distance of the trained prediction to the frozen one
on some conditioning, named for the role it plays; the stop-gradient is applied here so callers
cannot forget it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["anchor_mse", "frozen_match_mse", "retain_mse", "unconditional_drift_mse"]


def frozen_match_mse(pred: jax.Array, frozen_pred: jax.Array) -> jax.Array:
    """mean ‖pred − sg[frozen_pred]‖² (the shared computation)."""
    if pred.shape != frozen_pred.shape:
        raise ValueError(f"pred {pred.shape} and frozen_pred {frozen_pred.shape} differ in shape")
    return jnp.mean((pred - jax.lax.stop_gradient(frozen_pred)) ** 2)


retain_mse = frozen_match_mse
anchor_mse = frozen_match_mse
unconditional_drift_mse = frozen_match_mse
