r"""RECE: Reliable and Efficient Concept Erasure (Gong, Chen, Wei, Chen, Jiang, ECCV 2024).

Reference code ``CharlesGong12/RECE`` (``close_form_emb_regzero``, ``edit_model_adversarial``).
Starting from a UCE-edited model, RECE alternates two closed forms over the cross-attention
key/value projections W_l (the current, edited ones) and W*_l (the original ones): the
adversarial embedding that makes the edited model reproduce what the original made of the
concept embedding c (Sec. 3.2, with Sec. 3.3's regulariser; one row per token, a linear solve:
:func:`adversarial_embedding`),

.. math::

    c' = \arg\min_{c'} \sum_l \lVert W_l c' - W^*_l c \rVert^2 + \lambda \lVert c' \rVert^2
       = \Bigl(\sum_l W_l^\top W_l + \lambda I\Bigr)^{-1} \sum_l W_l^\top W^*_l\, c,

then a UCE edit mapping c' onto the guide's values W_l c_guide while the preserved rows keep
theirs (:func:`rece_round`). :func:`select_round` keeps the round a scorer rates best (the paper:
the nudity rate, or the erased object's accuracy) as the reference does; :func:`iterate` runs
the loop. Defaults: λ = 0.1 for nudity, 10⁻³ for styles and objects; the edit's λ_UCE = 0.1,
erase scale 1, preserve scale 0.1. Deviation: the reference derives c' from all 77 token rows
and maps them onto all 77 of the guide; here from the caller's rows (the experiment passes UCE's
aligned tail; c' is row-wise linear in c, so any choice composes). Kernels are Flax kernels
K = Wᵀ, so Σ WᵀW = Σ K Kᵀ and Σ WᵀW* = Σ K K*ᵀ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsafe.erasure import closed_form

__all__ = [
    "RECEResult",
    "SELECT_MODES",
    "adversarial_embedding",
    "iterate",
    "rece_round",
    "select_round",
]

SELECT_MODES = ("min", "max", "last")


def _check_kernels(kernels: Mapping, original: Mapping) -> int:
    if not kernels:
        raise ValueError("kernels: expected at least one (d_in, d_out) kernel, got none")
    if set(kernels) != set(original):
        missing = sorted(set(kernels) ^ set(original))[:3]
        raise ValueError(
            f"kernels and original must name the same projections; they differ in {missing}"
        )
    d_in = None
    for name, K in kernels.items():
        K, K0 = jnp.shape(K), jnp.shape(original[name])
        if len(K) != 2 or K != K0:
            raise ValueError(
                f"{name}: expected matching (d_in, d_out) kernels, got {K} (current) "
                f"and {K0} (original)"
            )
        if d_in is not None and K[0] != d_in:
            raise ValueError(
                f"{name}: every kernel must read the same embedding width d_in = {d_in}, got {K[0]}"
            )
        d_in = K[0]
    return d_in


def adversarial_embedding(
    kernels: Mapping[str, jax.Array], original: Mapping[str, jax.Array], c: jax.Array, lam: float
) -> jax.Array:
    """c' = (Σ_l W_lᵀW_l + λI)⁻¹ Σ_l W_lᵀW*_l c, row by row (module docstring).

    Args:
      kernels: name -> (d_in, d_out) current (edited) kernels K_l = W_lᵀ.
      original: name -> (d_in, d_out) original kernels K*_l, the same names.
      c: (n, d_in) concept embedding rows.
      lam: λ ≥ 0, the pull of c' towards 0 (λ = 0 needs Σ WᵀW invertible).
    Returns:
      (n, d_in) adversarial rows c'.
    """
    d_in = _check_kernels(kernels, original)
    c = jnp.asarray(c)
    if c.ndim != 2 or c.shape[1] != d_in:
        raise ValueError(f"c: expected (n, {d_in}) embedding rows, got shape {c.shape}")
    if not isinstance(lam, jax.Array) and lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    dtype = jnp.promote_types(c.dtype, jnp.float32)
    A = lam * jnp.eye(d_in, dtype=dtype)
    B = jnp.zeros((d_in, d_in), dtype)
    for name, K in kernels.items():
        K, K0 = jnp.asarray(K, dtype), jnp.asarray(original[name], dtype)
        A = A + K @ K.T
        B = B + K @ K0.T
    return jnp.linalg.solve(A, B @ c.astype(dtype).T).T


def rece_round(
    kernels: Mapping[str, jax.Array],
    original: Mapping[str, jax.Array],
    C_e,
    C_guide,
    C_p=None,
    *,
    lam_emb: float,
    lam: float = 0.1,
    erase_scale=1.0,
    preserve_scale: float = 0.1,
) -> tuple[dict, jax.Array]:
    """One RECE round: ``(new kernels, c')`` with c' = :func:`adversarial_embedding` of the
    concept rows ``C_e`` (n, d_in) and the new kernels the UCE edit of the current ones mapping
    c' onto the guide rows ``C_guide`` (n, d_in) while ``C_p`` (m, d_in) keep their values
    (``closed_form.uce_edit`` with λ = ``lam``)."""
    c_adv = adversarial_embedding(kernels, original, C_e, lam_emb)
    new = closed_form.uce_edit(
        kernels,
        c_adv,
        C_guide,
        C_p,
        erase_scale=erase_scale,
        preserve_scale=preserve_scale,
        lam=lam,
    )
    return new, c_adv


def select_round(
    scores: Sequence[float], mode: str = "min", admissible: Sequence[bool] | None = None
) -> int:
    """Index of the round to keep: the lowest (``min``) or highest (``max``) score among the
    admissible rounds, the earliest on ties (the reference replaces its saved model only on a
    strict improvement), or the last round (``last``, the reference's rule for artistic styles).
    ``admissible`` (default: all) marks rounds allowed to be chosen (the reference's object
    rule: other classes within 0.1 of UCE); round 0 is always admissible."""
    if mode not in SELECT_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {SELECT_MODES}")
    scores = [float(s) for s in scores]
    if not scores:
        raise ValueError("scores: expected one score per round, got none")
    if mode == "last":
        return len(scores) - 1
    ok = [True] * len(scores) if admissible is None else [bool(a) for a in admissible]
    if len(ok) != len(scores):
        raise ValueError(f"admissible: expected {len(scores)} flags (one per round), got {len(ok)}")
    if any(np.isnan(scores)):
        raise ValueError(f"scores must not be NaN, got {scores}")
    ok[0] = True
    sign = 1.0 if mode == "min" else -1.0
    best = 0
    for i, s in enumerate(scores):
        if ok[i] and sign * s < sign * scores[best]:
            best = i
    return best


@dataclasses.dataclass
class RECEResult:
    """What :func:`iterate` returns: the kept kernels, their round (0 = the starting model), each
    evaluated round's score (None without a callback) and the adversarial rows of each round."""

    kernels: dict
    best_round: int
    scores: list
    admissible: list
    adversarial: list


def iterate(
    kernels: Mapping[str, jax.Array],
    original: Mapping[str, jax.Array],
    C_e,
    C_guide,
    C_p=None,
    *,
    rounds: int,
    lam_emb: float,
    lam: float = 0.1,
    erase_scale=1.0,
    preserve_scale: float = 0.1,
    score: Callable[[dict], float | tuple[float, bool]] | None = None,
    select: str = "min",
    stop_at: float | None = None,
) -> RECEResult:
    """RECE's loop: ``rounds`` applications of :func:`rece_round` from ``kernels`` (the UCE-edited
    start), each round's model scored by ``score(kernels) -> float`` (or ``(float, admissible)``),
    the start included, and the round :func:`select_round` picks with ``select`` kept. Stops
    early when a score reaches ``stop_at`` (the reference stops at an object accuracy of 0).
    Without ``score`` the last round is kept. The round function is jitted once."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    step = jax.jit(
        lambda k: rece_round(
            k,
            original,
            C_e,
            C_guide,
            C_p,
            lam_emb=lam_emb,
            lam=lam,
            erase_scale=erase_scale,
            preserve_scale=preserve_scale,
        )
    )

    def evaluate(k):
        if score is None:
            return None, True
        s = score(k)
        return (float(s[0]), bool(s[1])) if isinstance(s, tuple) else (float(s), True)

    current = dict(kernels)
    s, ok = evaluate(current)
    scores, admissible, adversarial = [s], [ok], []
    best, best_kernels = 0, current
    for r in range(1, rounds + 1):
        current, c_adv = step(current)
        adversarial.append(np.asarray(c_adv))
        s, ok = evaluate(current)
        scores.append(s)
        admissible.append(ok)
        if score is None:
            best, best_kernels = r, current
        elif select_round(scores, select, admissible) == r:
            best, best_kernels = r, current
        if (
            stop_at is not None
            and s is not None
            and (s <= stop_at if select != "max" else s >= stop_at)
        ):
            break
    if score is not None and select == "last":
        best, best_kernels = len(scores) - 1, current
    return RECEResult(
        kernels=dict(best_kernels),
        best_round=best,
        scores=scores,
        admissible=admissible,
        adversarial=adversarial,
    )
