"""Dynamic Bad Pair Mining (DBPM): find and down-weight bad positive pairs.

Lan, Yan, Hong & Feng, "Towards Enhancing Time Series Contrastive Learning: A Dynamic Bad Pair
Mining Approach", ICLR 2024 (arXiv:2302.03357); the authors' code
github.com/lanxiang1017/DynamicBadPairMining_ICLR24 (``models/dbpm_model.py``: the trainer's
``memory_module`` dict and re-weighting loop). A plug-in with no learnable
parameters on top of any per-pair contrastive loss ``L_(i,e)`` of pair ``(u_i, v_i)`` at epoch
``e`` (here :func:`jaxsafe.contrastive.ntxent_per_pair`).

**Memory module** ``M in R^{N x E}``: ``M_(i,e) = L_(i,e)``, the (unweighted) loss of pair ``i``
recorded at epoch ``e``. Stored transposed, ``losses (E, N)``, with a boolean ``recorded``
mask, so it is a pytree of arrays carried, sharded and checkpointed with the train state.

**Identification.** At epoch ``e``, from the epochs before it,

    m_(i,e) = 1/(e-1) sum_{e'=1}^{e-1} (e'/E) L_(i,e')      (authors' code; mode='epoch_weighted')
    m_(i,e) = 1/(e-1) sum_{e'=1}^{e-1} L_(i,e')             (paper's text: plain mean; mode='mean')
    mu_e    = 1/N sum_i m_(i,e)
    sigma_e = sqrt(1/N sum_i (m_(i,e) - mu_e)^2)            (population std, like np.std)
    noisy positive pair  (NP):  m_(i,e) <= t_np = mu_e - beta_np sigma_e
    faulty positive pair (FP):  m_(i,e) >= t_fp = mu_e + beta_fp sigma_e

**Transformation.** Bad pairs' losses are multiplied by a weight from a Gaussian of their
*current* loss, unflagged pairs keep weight 1:

    w_(i,e) = 1                                                         if pair i is not flagged
    w_(i,e) = T(L_(i,e); M_e) = exp(-(L_(i,e) - mu_e)^2 / (2 sigma_e^2)) / (sigma_e sqrt(2 pi))
    training loss = mean_i w_(i,e) L_(i,e),  w held constant (stop-gradient).

The paper calls ``w`` a weight in (0, 1), but the Gaussian *density* exceeds 1 wherever
``sigma_e < 1/sqrt(2 pi) ~ 0.399`` and ``L`` is near ``mu_e`` (then a flagged pair is
*up*-weighted). The reference uses the density (``scipy.stats.norm(mu, sd).pdf``) and so does
the default here; ``normalized=True`` divides it by its peak ``1/(sigma_e sqrt(2 pi))``, giving
``exp(-(L - mu_e)^2 / (2 sigma_e^2))`` in (0, 1].

Epochs are 0-based: with ``warmup = 50`` (paper/reference default, of 80 epochs) DBPM acts from
the 51st epoch on (``epoch >= warmup``, as the reference's ``epoch >= warm_epochs``), using the
losses of epochs ``0 .. epoch-1``. The paper's defaults are ``beta_np = 2``, ``beta_fp = 3``,
with Adam (lr 3e-4) and batch size 512 for the encoder (the experiment's choice, not this
module's).

Reference-code details and where this module differs:

* ``mode='epoch_weighted'`` (the default) reproduces the reference's
  ``np.mean(np.array(v) * [(1 + k) / max_epochs for k in range(epoch)])``:
  ``m_i = 1/n_i sum_{e'<e} ((e'+1)/E) L_(i,e')``. The weights do *not* sum to one, so this is
  not a weighted average: ``m_i`` shrinks by about ``(e+1)/(2E)`` relative to the plain mean
  and, since ``mu_e, sigma_e`` come from these shrunken ``m_i`` while ``T`` is evaluated at the
  current (unshrunken) loss, the Gaussian weights differ from the paper's. The thresholds are
  unchanged by a common scale factor, but later epochs count more.
* Pairs with no recorded history (never seen before ``epoch``) are excluded from ``mu_e``,
  ``sigma_e`` and are never flagged; the reference would fail on them (``np.mean([])``).
* If ``sigma_e = 0`` (all ``m_i`` equal) nothing is flagged; the reference would flag every
  pair (``m_i <= mu_e``) and produce NaN weights (``norm(mu, 0).pdf``).
* The reference flags a pair as noisy *or* faulty (``if .. elif``); both get the same ``T``, and
  with ``sigma_e > 0`` and non-negative betas the two sets are disjoint anyway.
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
      mode: ``'epoch_weighted'`` (authors' code) or ``'mean'`` (paper's equation), see the
        module docstring.
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
            raise ValueError(f"warmup={self.warmup}; expected 0 <= warmup <= num_epochs="
                             f"{self.num_epochs}.")
        if self.beta_np < 0 or self.beta_fp < 0:
            raise ValueError(f"beta_np={self.beta_np}, beta_fp={self.beta_fp}; expected >= 0.")

    def kwargs(self) -> dict:
        """Keyword arguments of :func:`flags` / :func:`pair_weights`."""
        return dict(warmup=self.warmup, beta_np=self.beta_np, beta_fp=self.beta_fp,
                    mode=self.mode)


def init_memory(num_instances: int, num_epochs: int) -> dict:
    """Empty memory ``{'losses': (E, N) float32 zeros, 'recorded': (E, N) bool False}``."""
    if num_instances < 1 or num_epochs < 1:
        raise ValueError(f"num_instances={num_instances}, num_epochs={num_epochs}; both must "
                         "be >= 1.")
    shape = (int(num_epochs), int(num_instances))
    return {"losses": jnp.zeros(shape, jnp.float32), "recorded": jnp.zeros(shape, bool)}


def _check_memory(memory) -> tuple[int, int]:
    if not isinstance(memory, Mapping) or set(memory) != {"losses", "recorded"}:
        keys = sorted(memory) if isinstance(memory, Mapping) else type(memory).__name__
        raise ValueError(f"memory must be init_memory's dict with keys ['losses', 'recorded'], "
                         f"got {keys}.")
    losses, rec = memory["losses"], memory["recorded"]
    if losses.ndim != 2 or rec.shape != losses.shape:
        raise ValueError(f"memory losses {losses.shape} and recorded {rec.shape} must both be "
                         "(num_epochs, num_instances).")
    return losses.shape


def _check_batch(instance_ids, per_pair_loss):
    instance_ids, per_pair_loss = jnp.asarray(instance_ids), jnp.asarray(per_pair_loss)
    if per_pair_loss.ndim != 1:
        raise ValueError(f"per_pair_loss must have shape (B,), got {per_pair_loss.shape}.")
    if instance_ids.shape != per_pair_loss.shape:
        raise ValueError(f"instance_ids shape {instance_ids.shape} must equal per_pair_loss "
                         f"shape {per_pair_loss.shape}.")
    if not jnp.issubdtype(instance_ids.dtype, jnp.integer):
        raise ValueError(f"instance_ids must be integer indices, got dtype {instance_ids.dtype}.")
    return instance_ids, per_pair_loss


def _in_range(ids, n):
    """Negative and too-large ids -> ``n``, which scatters drop and gathers fill."""
    return jnp.where((ids >= 0) & (ids < n), ids, n)


def record(memory: dict, epoch, instance_ids, per_pair_loss, valid=None) -> dict:
    """Writes ``M[epoch, ids] = L`` (stop-gradient) and marks those entries recorded.

    Args:
      memory: from :func:`init_memory`.
      epoch: 0-based epoch (int or traced int32 scalar).
      instance_ids: ``(B,)`` dataset indices of the batch's instances in ``[0, N)``.
      per_pair_loss: ``(B,)`` unweighted per-pair losses (the reference records the loss before
        DBPM's re-weighting).
      valid: optional ``(B,)`` bool; rows with ``False`` (padding) are not written.

    Out-of-range (and negative) ids are dropped. If an id occurs twice in a batch, which loss
    is kept is unspecified (each instance occurs once per epoch with the reference's loader).
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
    """
    m, mu, sigma, _ = _summary(memory, epoch, mode)
    return m, mu, sigma


def flags(memory: dict, epoch, *, warmup: int = 50, beta_np: float = 2.0,
          beta_fp: float = 3.0, mode: str = "epoch_weighted"):
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


def pair_weights(per_pair_loss, instance_ids, memory: dict, epoch, *, warmup: int = 50,
                 beta_np: float = 2.0, beta_fp: float = 3.0, mode: str = "epoch_weighted",
                 normalized: bool = False):
    """DBPM weights ``w_(i,e)`` of a batch, ``(B,)``, stop-gradient; 1 for unflagged pairs.

    Args:
      per_pair_loss: ``(B,)`` current losses ``L_(i,e)``.
      instance_ids: ``(B,)`` dataset indices (out-of-range ids get weight 1).
      memory, epoch, warmup, beta_np, beta_fp, mode: see :func:`flags`.
      normalized: peak-normalised Gaussian (in (0, 1]) instead of the density.
    """
    ids, loss = _check_batch(instance_ids, per_pair_loss)
    loss = jax.lax.stop_gradient(loss).astype(jnp.float32)
    noisy, faulty = flags(memory, epoch, warmup=warmup, beta_np=beta_np, beta_fp=beta_fp,
                          mode=mode)
    _, mu, sigma = statistics(memory, epoch, mode)
    bad = jnp.take(noisy | faulty, _in_range(ids, noisy.shape[0]), mode="fill", fill_value=False)
    # Unflagged rows may have sigma = 0; keep their (unused) Gaussian finite.
    safe_sigma = jnp.where(sigma > 0, sigma, 1.0)
    w = jnp.where(bad, gaussian_weight(loss, mu, safe_sigma, normalized), 1.0)
    return jax.lax.stop_gradient(w)


def reweight(per_pair_loss, instance_ids, memory: dict, epoch, config: DBPMConfig,
             valid=None):
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
