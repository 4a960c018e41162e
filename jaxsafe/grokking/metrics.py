"""Diagnostics from "Grokking at the Edge of Numerical Stability" (Prieto et al., ICLR 2025).

* Softmax Collapse (SC): the softmax denominator rounds to exactly the max term,
  so correct examples get zero loss and zero gradient.
* Naive Loss Minimisation (NLM): the gradient mostly points along the weights,
  so training just scales the logits up instead of changing the predictions.

All metrics are pure, jittable and return JAX scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsafe.grokking.stablemax import _cast_logits
from jaxsafe.treepath import path_name

__all__ = [
    "accuracy",
    "softmax_collapse_fraction",
    "zero_loss_fraction",
    "nlm_cosine",
    "global_nlm_cosine",
    "path_name",
]


def _fraction(hits, mask):
    """Mean of boolean ``hits``, or its ``mask``-weighted mean (e.g. to skip padding rows)."""
    if mask is None:
        return jnp.mean(hits)
    mask = jnp.asarray(mask)
    if mask.shape != hits.shape:
        raise ValueError(f"mask shape {mask.shape} must equal the per-row shape {hits.shape}.")
    return jnp.sum(jnp.where(hits, mask, 0)) / jnp.sum(mask)


def accuracy(logits, labels, *, mask=None):
    """Fraction of rows whose ``argmax`` is the label, ties going to the first maximum as in
    ``jnp.argmax`` (finite logits).

    Computed as ``z_y == max(z)`` with every logit before ``y`` smaller: plain reductions, where
    XLA:CPU's ``argmax`` (a reduction over value-index pairs) took most of a grokking step's
    metrics time (docs/benchmarks.md). ``mask`` weights the rows, e.g. 0 for padding.
    """
    z = jnp.asarray(logits)
    j, y = jnp.arange(z.shape[-1]), jnp.asarray(labels)[..., None]
    low = jnp.asarray(-jnp.inf, z.dtype)
    z_y = jnp.max(jnp.where(j == y, z, low), axis=-1)
    before = jnp.max(jnp.where(j < y, z, low), axis=-1)  # -inf when y = 0
    return _fraction((z_y == jnp.max(z, axis=-1)) & (before < z_y), mask)


def softmax_collapse_fraction(logits, dtype=None, *, mask=None):
    """Fraction of rows whose shifted softmax denominator is exactly 1.

    A row z collapses when sum_j exp(z_j - max_k z_k) == 1 in floating point,
    i.e. every non-max term underflowed or was absorbed by rounding. This is
    the paper's SC criterion, which depends on the precision: by default it is
    evaluated in the logits' own dtype, so float64 logits with a gap of ~20-30
    do not collapse where float32 ones do (a gap of ~40+ collapses even in
    float64). Pass ``dtype`` to evaluate in the dtype the loss is computed in
    (float64 requires ``jax_enable_x64``). ``mask`` (shape
    ``logits.shape[:-1]``) weights the rows, e.g. 0 for padding.
    """
    z = _cast_logits(logits, dtype)
    z = z - jnp.max(z, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(z), axis=-1)
    return _fraction(total == 1, mask)


def zero_loss_fraction(per_example_loss, *, mask=None):
    """Fraction of per-example losses that are exactly 0 (no gradient signal).

    ``mask`` (same shape as the loss) weights the examples, e.g. 0 for padding.
    """
    return _fraction(jnp.asarray(per_example_loss) == 0, mask)


def _leaf_pairs(params, grads):
    p_struct, g_struct = jax.tree.structure(params), jax.tree.structure(grads)
    if p_struct != g_struct:
        raise ValueError(
            f"params and grads must have the same tree structure, got {p_struct} and {g_struct}."
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [(path, _flat32(p), _flat32(g)) for (path, p), g in zip(flat, jax.tree.leaves(grads))]


def _flat32(x):
    # Reduce in at least float32: bf16/fp16 dot products are too coarse for a cosine.
    x = jnp.ravel(jnp.asarray(x))
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _cosine(dot, sq_a, sq_b):
    # A zero tensor has no direction: report 0 rather than NaN.
    denom = jnp.sqrt(sq_a) * jnp.sqrt(sq_b)
    ok = denom > 0
    return jnp.where(ok, dot / jnp.where(ok, denom, 1), 0)


def nlm_cosine(params, grads):
    """Per-tensor cos(theta, -grad), keyed by :func:`path_name` of each leaf.

    cos(theta, -g) = -<theta, g> / (||theta|| ||g||). Values near +1 mean the
    descent direction -g mostly scales theta up (naive loss minimisation); ⊥Grad
    removes exactly this component. Tensors with zero norm give 0.
    """
    return {
        path_name(path): _cosine(-jnp.vdot(p, g), jnp.vdot(p, p), jnp.vdot(g, g))
        for path, p, g in _leaf_pairs(params, grads)
    }


def global_nlm_cosine(params, grads):
    """cos(theta, -grad) over the concatenation of all parameter tensors."""
    pairs = _leaf_pairs(params, grads)
    dot = sum(jnp.vdot(p, g) for _, p, g in pairs)
    pp = sum(jnp.vdot(p, p) for _, p, _ in pairs)
    gg = sum(jnp.vdot(g, g) for _, _, g in pairs)
    return _cosine(-dot, pp, gg)
