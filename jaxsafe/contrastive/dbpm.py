r"""Dynamic Bad Pair Mining (DBPM): find and down-weight bad positive pairs.

Lan, Yan, Hong & Feng, "Towards Enhancing Time Series Contrastive Learning: A Dynamic Bad Pair
Mining Approach", ICLR 2024 (arXiv:2302.03357); the authors' code
``lanxiang1017/DynamicBadPairMining_ICLR24`` (``models/dbpm_model.py``: the trainer's
``memory_module`` and re-weighting loop). A plug-in without parameters on top of any per-pair
contrastive loss L_(i,e) of pair i at epoch e (:func:`jaxsafe.contrastive.ntxent_per_pair`); the
memory M_(i,e) = L_(i,e) is a pytree carried and checkpointed with the train state. At epoch e,

.. math::

    m_{i,e} = \frac{1}{e-1} \sum_{e'=1}^{e-1} \frac{e'}{E}\, L_{i,e'}, \qquad
    w_{i,e} = \frac{1}{\sigma_e \sqrt{2\pi}}
        \exp\Bigl(-\frac{(L_{i,e} - \mu_e)^2}{2 \sigma_e^2}\Bigr),

μ_e and σ_e the mean and population std of m over i; w applies to flagged pairs, noisy
(m_(i,e) ≤ μ_e − β_np σ_e) or faulty (m_(i,e) ≥ μ_e + β_fp σ_e), the others keep w = 1, and the
loss is mean_i w_(i,e) L_(i,e), w stop-gradient. m is the authors' epoch-weighted sum
(``mode='epoch_weighted'``, the default; :func:`statistics`), ``mode='mean'`` the paper's plain
mean. w is the Gaussian *density*, as in the reference, above 1 where σ_e < 0.399
(``normalized=True`` divides it by its peak). Epochs are 0-based: DBPM acts from
``epoch >= warmup``. Deviations, where the reference fails: pairs without history are left out
of μ_e, σ_e and never flagged; σ_e = 0 flags nothing (the reference: NaN weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

__all__ = [
    "DBPMConfig",
    "MODES",
    "flags",
    "gaussian_weight",
    "init_memory",
    "pair_weights",
    "record",
    "reweight",
    "statistics",
]

MODES = ("mean", "epoch_weighted")


@dataclasses.dataclass(frozen=True)
class DBPMConfig:
    """DBPM hyper-parameters; defaults are the paper's / reference code's.

    Attributes:
      warmup: epochs of plain training before DBPM acts (50).
      num_epochs: total training epochs ``E`` (80); the memory has one row per epoch.
      beta_np: noisy-pair threshold ``t_np = mu - beta_np sigma`` (2.0).
      beta_fp: faulty-pair threshold ``t_fp = mu + beta_fp sigma`` (3.0).
      mode: ``'epoch_weighted'`` (authors' code) or ``'mean'`` (paper's equation), see
        :func:`statistics`.
      normalized: use the peak-normalised Gaussian in (0, 1] instead of the density.
    """

    warmup: int = 50
    num_epochs: int = 80
    beta_np: float = 2.0
    beta_fp: float = 3.0
    mode: str = "epoch_weighted"
    normalized: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {MODES}.")
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs={self.num_epochs}; expected >= 1.")
        if not 0 <= self.warmup <= self.num_epochs:
            raise ValueError(
                f"warmup={self.warmup}; expected 0 <= warmup <= num_epochs={self.num_epochs}."
            )
        if self.beta_np < 0 or self.beta_fp < 0:
            raise ValueError(f"beta_np={self.beta_np}, beta_fp={self.beta_fp}; expected >= 0.")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`flags` / :func:`pair_weights`."""
        return dict(warmup=self.warmup, beta_np=self.beta_np, beta_fp=self.beta_fp, mode=self.mode)


def init_memory(num_instances: int, num_epochs: int) -> dict:
    """Empty memory ``{'losses': (E, N) float32 zeros, 'recorded': (E, N) bool False}``."""
    if num_instances < 1 or num_epochs < 1:
        raise ValueError(
            f"num_instances={num_instances}, num_epochs={num_epochs}; both must be >= 1."
        )
    shape = (int(num_epochs), int(num_instances))
    return {"losses": jnp.zeros(shape, jnp.float32), "recorded": jnp.zeros(shape, bool)}


def _check_memory(memory) -> tuple[int, int]:
    if not isinstance(memory, Mapping) or set(memory) != {"losses", "recorded"}:
        keys = sorted(memory) if isinstance(memory, Mapping) else type(memory).__name__
        raise ValueError(
            f"memory must be init_memory's dict with keys ['losses', 'recorded'], got {keys}."
        )
    losses, rec = memory["losses"], memory["recorded"]
    if losses.ndim != 2 or rec.shape != losses.shape:
        raise ValueError(
            f"memory losses {losses.shape} and recorded {rec.shape} must both be "
            "(num_epochs, num_instances)."
        )
    return losses.shape


def _check_batch(instance_ids, per_pair_loss):
    instance_ids, per_pair_loss = jnp.asarray(instance_ids), jnp.asarray(per_pair_loss)
    if per_pair_loss.ndim != 1:
        raise ValueError(f"per_pair_loss must have shape (B,), got {per_pair_loss.shape}.")
    if instance_ids.shape != per_pair_loss.shape:
        raise ValueError(
            f"instance_ids shape {instance_ids.shape} must equal per_pair_loss "
            f"shape {per_pair_loss.shape}."
        )
    if not jnp.issubdtype(instance_ids.dtype, jnp.integer):
        raise ValueError(f"instance_ids must be integer indices, got dtype {instance_ids.dtype}.")
    return instance_ids, per_pair_loss


def _in_range(ids, n):
    """Negative and too-large ids -> ``n``, which scatters drop and gathers fill."""
    return jnp.where((ids >= 0) & (ids < n), ids, n)


def record(memory: dict, epoch, instance_ids, per_pair_loss, valid=None) -> dict:
    """Writes ``M[epoch, ids] = L`` (stop-gradient) and marks those entries recorded.

    Out-of-range (and negative) ids are dropped. If an id occurs twice in a batch, which loss
    is kept is unspecified (each instance occurs once per epoch with the reference's loader).

    Args:
      memory: from :func:`init_memory`.
      epoch: 0-based epoch (int or traced int32 scalar).
      instance_ids: ``(B,)`` dataset indices of the batch's instances in ``[0, N)``.
      per_pair_loss: ``(B,)`` unweighted per-pair losses (the reference records the loss before
        DBPM's re-weighting).
      valid: optional ``(B,)`` bool; rows with ``False`` (padding) are not written.
    """
    num_epochs, n = _check_memory(memory)
    if isinstance(epoch, int) and not 0 <= epoch < num_epochs:
        raise ValueError(f"epoch={epoch}; expected 0 <= epoch < num_epochs={num_epochs}.")
    ids, loss = _check_batch(instance_ids, per_pair_loss)
    ids = _in_range(ids, n)
    if valid is not None:
        ids = jnp.where(jnp.asarray(valid, bool), ids, n)
    loss = jax.lax.stop_gradient(loss).astype(jnp.float32)
    return {
        "losses": memory["losses"].at[epoch, ids].set(loss, mode="drop"),
        "recorded": memory["recorded"].at[epoch, ids].set(True, mode="drop"),
    }


def _summary(memory: dict, epoch, mode: str):
    """``(m, mu, sigma, seen)``; see :func:`statistics`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}.")
    num_epochs, _ = _check_memory(memory)
    past = jnp.arange(num_epochs)[:, None] < epoch
    used = memory["recorded"] & past
    values = jnp.where(used, memory["losses"], 0.0)
    if mode == "epoch_weighted":
        values = values * ((jnp.arange(num_epochs, dtype=jnp.float32) + 1) / num_epochs)[:, None]
    count = jnp.sum(used, axis=0)
    seen = count > 0
    m = jnp.sum(values, axis=0) / jnp.maximum(count, 1)
    n_seen = jnp.maximum(jnp.sum(seen), 1)
    mu = jnp.sum(jnp.where(seen, m, 0.0)) / n_seen
    sigma = jnp.sqrt(jnp.sum(jnp.where(seen, jnp.square(m - mu), 0.0)) / n_seen)
    return m, mu, sigma, seen


def statistics(memory: dict, epoch, mode: str = "epoch_weighted"):
    """``(m (N,), mu_e, sigma_e)`` from the epochs before ``epoch``.

    ``m_i`` is the plain mean of instance ``i``'s recorded losses (``mode='mean'``, paper) or
    the reference's epoch-weighted mean ``1/n_i sum ((e'+1)/E) L_(i,e')`` (``'epoch_weighted'``),
    ``n_i`` the number of epochs before ``epoch`` in which ``i`` was recorded. ``mu_e`` and
    ``sigma_e`` are the mean and population std of ``m`` over the instances with ``n_i > 0``;
    ``m_i = 0`` for the others.

    The reference's ``np.mean(np.array(v) * [(1 + k) / max_epochs for k in range(epoch)])``
    weights do *not* sum to one, so ``'epoch_weighted'`` is not a weighted average: ``m_i``
    shrinks by about ``(e+1)/(2E)`` relative to the plain mean and, since ``mu_e, sigma_e`` come
    from these shrunken ``m_i`` while the Gaussian weight is evaluated at the current
    (unshrunken) loss, the weights differ from the paper's. The thresholds are unchanged by a
    common scale factor, but later epochs count more.
    """
    m, mu, sigma, _ = _summary(memory, epoch, mode)
    return m, mu, sigma


def flags(
    memory: dict,
    epoch,
    *,
    warmup: int = 50,
    beta_np: float = 2.0,
    beta_fp: float = 3.0,
    mode: str = "epoch_weighted",
):
    """Noisy and faulty pairs, ``(N,)`` bool each: ``m_i <= t_np`` and ``m_i >= t_fp``.

    ``t_np = mu_e - beta_np sigma_e``, ``t_fp = mu_e + beta_fp sigma_e``. All ``False`` while
    ``epoch < warmup``, for instances without history, and when ``sigma_e = 0``.
    """
    m, mu, sigma, seen = _summary(memory, epoch, mode)
    active = (jnp.asarray(epoch) >= warmup) & (sigma > 0) & seen
    noisy = active & (m <= mu - beta_np * sigma)
    faulty = active & (m >= mu + beta_fp * sigma)
    return noisy, faulty


def gaussian_weight(loss, mu, sigma, normalized: bool = False):
    """``T(L; mu, sigma)``: the N(mu, sigma^2) density at ``L``, or its peak-normalised form."""
    g = jnp.exp(-jnp.square(loss - mu) / (2 * jnp.square(sigma)))
    return g if normalized else g / (sigma * math.sqrt(2 * math.pi))


def pair_weights(
    per_pair_loss,
    instance_ids,
    memory: dict,
    epoch,
    *,
    warmup: int = 50,
    beta_np: float = 2.0,
    beta_fp: float = 3.0,
    mode: str = "epoch_weighted",
    normalized: bool = False,
):
    """DBPM weights ``w_(i,e)`` of a batch, ``(B,)``, stop-gradient; 1 for unflagged pairs.

    Args:
      per_pair_loss: ``(B,)`` current losses ``L_(i,e)``.
      instance_ids: ``(B,)`` dataset indices (out-of-range ids get weight 1).
      memory, epoch, warmup, beta_np, beta_fp, mode: see :func:`flags`.
      normalized: peak-normalised Gaussian (in (0, 1]) instead of the density.
    """
    ids, loss = _check_batch(instance_ids, per_pair_loss)
    loss = jax.lax.stop_gradient(loss).astype(jnp.float32)
    noisy, faulty = flags(memory, epoch, warmup=warmup, beta_np=beta_np, beta_fp=beta_fp, mode=mode)
    _, mu, sigma = statistics(memory, epoch, mode)
    bad = jnp.take(noisy | faulty, _in_range(ids, noisy.shape[0]), mode="fill", fill_value=False)
    # Unflagged rows may have sigma = 0; keep their (unused) Gaussian finite.
    safe_sigma = jnp.where(sigma > 0, sigma, 1.0)
    w = jnp.where(bad, gaussian_weight(loss, mu, safe_sigma, normalized), 1.0)
    return jax.lax.stop_gradient(w)


def reweight(per_pair_loss, instance_ids, memory: dict, epoch, config: DBPMConfig, valid=None):
    """One DBPM step: ``(loss, new_memory, metrics)`` for a batch.

    ``loss = sum_i v_i w_i L_i / sum_i v_i`` (the reference's ``mean(w * L)``; ``v`` is
    ``valid``, all ones by default), the memory with this batch's unweighted losses recorded at
    ``epoch``, and metrics: the fractions of the batch flagged noisy / faulty and the mean
    weight over flagged pairs (0 when none is flagged).
    """
    ids, loss = _check_batch(instance_ids, per_pair_loss)
    v = jnp.ones(loss.shape, jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    w = pair_weights(loss, ids, memory, epoch, normalized=config.normalized, **config.kwargs())
    noisy, faulty = flags(memory, epoch, **config.kwargs())
    ids_ok = _in_range(ids, noisy.shape[0])
    b_noisy = jnp.take(noisy, ids_ok, mode="fill", fill_value=False) * v
    b_faulty = jnp.take(faulty, ids_ok, mode="fill", fill_value=False) * v
    n = jnp.maximum(jnp.sum(v), 1.0)
    n_bad = jnp.sum(b_noisy + b_faulty)
    metrics = {
        "dbpm/noisy_fraction": jnp.sum(b_noisy) / n,
        "dbpm/faulty_fraction": jnp.sum(b_faulty) / n,
        "dbpm/flagged_weight": jnp.sum((b_noisy + b_faulty) * w) / jnp.maximum(n_bad, 1.0),
    }
    total = jnp.sum(v * w * loss) / n
    new_memory = record(memory, epoch, ids, loss, valid=None if valid is None else v > 0)
    return total, new_memory, metrics
