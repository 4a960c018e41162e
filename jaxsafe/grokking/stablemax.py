r"""StableMax and the cross-entropy losses of "Grokking at the Edge of Numerical Stability".

Prieto, Barsbey, Mediano & Birdal, ICLR 2025 (arXiv:2501.04697). StableMax replaces ``exp`` in
softmax with a piecewise function that grows linearly instead of exponentially,

.. math::

    s(x) = \begin{cases} x + 1 & x \ge 0 \\ 1 / (1 - x) & x < 0 \end{cases}, \qquad
    \mathrm{StableMax}(x)_i = \frac{s(x_i)}{\sum_j s(x_j)},

so scaling up the logits cannot drive the probabilities to exactly 0/1 in floating point
("Softmax Collapse"). Since :math:`\log s(x) = \operatorname{sign}(x) \log(1 + |x|)`,
StableMax(x) = softmax(sign(x) · log1p(abs(x))).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "s",
    "log_s",
    "stablemax",
    "log_stablemax",
    "stablemax_cross_entropy",
    "softmax_cross_entropy",
]


def _as_float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def s(x):
    """StableMax's replacement for ``exp`` in softmax (Prieto et al., 2025).

    s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0. It is continuous with
    s(0) = s'(0) = 1. Each branch only ever sees inputs from its own half-line
    (the "double where" trick), so the discarded branch cannot produce inf/NaN
    that would leak into the gradient (e.g. 1/(1 - x) at x == 1).
    """
    x = _as_float(x)
    pos = x >= 0
    x_pos = jnp.where(pos, x, 0)
    x_neg = jnp.where(pos, 0, x)
    return jnp.where(pos, x_pos + 1, 1 / (1 - x_neg))


def log_s(x):
    """log s(x) = sign(x) * log1p(|x|), with the correct derivative 1 at x = 0.

    Written per branch rather than as ``sign(x) * log1p(abs(x))``: autodiff of the
    latter gives derivative 0 at x = 0 because d sign / dx = d|x|/dx = 0 there.
    """
    x = _as_float(x)
    pos = x >= 0
    x_pos = jnp.where(pos, x, 0)
    x_neg = jnp.where(pos, 0, x)
    return jnp.where(pos, jnp.log1p(x_pos), -jnp.log1p(-x_neg))


def log_stablemax(x, axis: int = -1):
    """log StableMax(x)_i = log s(x_i) - logsumexp_j(log s(x_j)).

    Uses the log1p form of log s, so there is no division and no log of a
    ratio that could underflow to log(0).
    """
    z = log_s(x)
    return z - jax.nn.logsumexp(z, axis=axis, keepdims=True)


def stablemax(x, axis: int = -1):
    """StableMax(x)_i = s(x_i) / sum_j s(x_j) (Prieto et al., 2025).

    Computed as the direct ratio (a few ulp; exp(log_stablemax) loses ~log s(x)
    ulps), after dividing s by its row max so the denominator cannot overflow.
    The divisor is capped at sqrt(finfo.max) because XLA divides via the
    reciprocal, which flushes to zero for divisors near finfo.max. It is held
    constant for autodiff, which is exact since the ratio is scale invariant.
    """
    sx = s(x)
    cap = math.sqrt(float(jnp.finfo(sx.dtype).max))
    scale = jnp.minimum(jnp.max(sx, axis=axis, keepdims=True), cap)
    sx = sx / jax.lax.stop_gradient(scale)
    return sx / jnp.sum(sx, axis=axis, keepdims=True)


def _cast_logits(logits, dtype=None):
    """Casts logits to the loss dtype, refusing float64 when JAX would truncate it.

    Without x64 mode JAX silently turns float64 into float32, which would defeat
    the point of asking for float64 (which delays Softmax Collapse in the paper).
    """
    logits = _as_float(logits)
    if dtype is None:
        return logits
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            "dtype=float64 needs x64 enabled: call jax.config.update('jax_enable_x64', True) "
            "or set JAX_ENABLE_X64=1 (otherwise JAX silently computes in float32)."
        )
    return logits.astype(dtype)


def _check_labels(logits, labels):
    labels = jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a class axis, got shape {logits.shape}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} must equal logits.shape[:-1] {logits.shape[:-1]} "
            f"(logits shape {logits.shape})."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
    return labels


def _row_max(z):
    """``max_j z_j`` (keepdims), constant for autodiff. Behind an optimization barrier, the
    reduction stays one pass of its own: the float64 StableMax loss ran faster with it than when
    XLA:CPU was free to fuse the reduction into its elementwise consumers."""
    return jax.lax.optimization_barrier(jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True)))


def _label_logit(z, labels):
    """``z[..., labels]`` as a masked sum, not a gather: its gradient is then elementwise
    instead of a scatter, which XLA:CPU runs as a separate pass."""
    return jnp.sum(jnp.where(jnp.arange(z.shape[-1]) == labels[..., None], z, 0), axis=-1)


def stablemax_cross_entropy(logits, labels, *, dtype=None):
    r"""Per-example StableMax cross-entropy (Prieto et al., 2025).

    .. math::
        L_i = -\log \frac{s(z_{i y_i})}{\sum_j s(z_{ij})}
            = \log \sum_j \frac{s(z_{ij})}{s(m_i)} + \log s(m_i) - \log s(z_{i y_i}),
        \qquad m_i = \max_j z_{ij},

    the reference's ``-log(s(z_y) / sum_j s(z_j))`` (``utils.py::stablemax_cross_entropy`` of
    ``LucasPrietoAl/grokking-at-the-edge-of-numerical-stability``) with each row divided by its
    largest term: the ratios lie in (0, 1], the sum in [1, C], so nothing overflows or leaves
    the normal range for any finite logits, and three logarithms per example are taken (the
    :func:`log_stablemax` form takes a logarithm and an exponential per logit, which made this
    loss most of a float64 grokking step; docs/benchmarks.md). ``m`` is held constant for
    autodiff, which is exact since the loss does not depend on it.

    Args:
      logits: ``[..., num_classes]`` array.
      labels: integer class indices of shape ``logits.shape[:-1]``.
      dtype: optional dtype to compute in (e.g. ``jnp.float64``, which requires
        ``jax_enable_x64``); defaults to the logits' dtype.

    Returns:
      Loss of shape ``logits.shape[:-1]`` in the compute dtype.
    """
    z = _cast_logits(logits, dtype)
    labels = _check_labels(z, labels)
    m = _row_max(z)
    pos, m_pos = z >= 0, m >= 0
    z_pos, z_neg = jnp.where(pos, z, 0), jnp.where(pos, 0, z)  # each branch sees its half-line
    m_nonneg, m_neg = jnp.where(m_pos, m, 0), jnp.where(m_pos, 0, m)
    # s(z) / s(m), one division per logit: z >= 0 (so m >= 0): (z + 1) / (m + 1); z < 0:
    # (1 - m) / (1 - z) if m < 0, else 1 / ((1 - z)(m + 1)), which may overflow to a ratio of 0.
    num = jnp.where(pos, z_pos + 1, jnp.where(m_pos, 1, 1 - m_neg))
    den = jnp.where(pos, m_nonneg + 1, (1 - z_neg) * jnp.where(m_pos, m_nonneg + 1, 1))
    return jnp.log(jnp.sum(num / den, axis=-1)) + log_s(m[..., 0]) - log_s(_label_logit(z, labels))


def softmax_cross_entropy(logits, labels, *, dtype=None):
    """Per-example softmax cross-entropy, L_i = -log softmax(z_i)_{y_i}.

    Same arguments and ``dtype`` handling as :func:`stablemax_cross_entropy`;
    the baseline loss that exhibits Softmax Collapse in Prieto et al. (2025).
    """
    logits = _cast_logits(logits, dtype)
    labels = _check_labels(logits, labels)
    # log Σ exp(z - m) - (z_y - m): z_y - m is exact (0 for the largest logit), so a tiny loss
    # keeps its digits (z - logsumexp(z) would round it to ulp(m)).
    z = logits - _row_max(logits)
    return jnp.log(jnp.sum(jnp.exp(z), axis=-1)) - _label_logit(z, labels)
