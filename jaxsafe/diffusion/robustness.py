r"""Post-training weight quantisation, PFGM++'s model-compression robustness probe.

Xu et al., "PFGM++: Unlocking the Potential of Physics-Inspired Generative Models", ICML 2023,
robustness experiments (smaller D degrades less when the trained weights are quantised); the form
follows the reference ``Newbeeer/pfgmpp`` ``generate_quant.py`` (``quantize_tensor`` /
``dequantize_tensor``, b = 5, 6 there). Each parameter tensor W is replaced by its uniform
(affine) b-bit quantisation, de-quantised back to floats:

.. math::

    s = \frac{\max W - \min W}{2^b - 1}, \quad z = \mathrm{round}(-\min W / s), \quad
    q = \mathrm{clip}\bigl(\mathrm{round}(W / s + z), 0, 2^b - 1\bigr), \quad \hat W = s\,(q - z),

so Ŵ takes at most 2^b values and :math:`|\hat W - W| \le s/2` everywhere. Deviations, both at
range edges: (1) the range is widened to contain 0 (as PyTorch's observers do), where the
reference clamps z into [0, 2^b − 1] and so clips all-positive or all-negative tensors; (2) z is
rounded, where the reference truncates it with ``int()`` (clipping the smallest weights by up to
s instead of s/2). For tensors straddling 0 the grids coincide. The reference quantises only
conv/linear weights outside norm, embedding, mapping and 32×32-resolution layers; ``include``
selects leaves by name the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsafe.treepath import path_name

__all__ = ["quantize_params", "quantize_tensor"]


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"bits must be an integer >= 1, got {bits!r}.")


def quantize_tensor(w, bits: int):
    """Ŵ = s (q − z): per-tensor b-bit uniform quantisation of one floating array."""
    _check_bits(bits)
    w = jnp.asarray(w)
    compute = jnp.promote_types(w.dtype, jnp.float32)  # bf16/f16 lack the integers up to 2^b
    x = w.astype(compute)
    qmax = 2.0**bits - 1
    lo, hi = jnp.minimum(jnp.min(x), 0), jnp.maximum(jnp.max(x), 0)
    s = (hi - lo) / qmax
    safe_s = jnp.where(s > 0, s, 1)  # an all-zero tensor stays all-zero
    z = jnp.round(-lo / safe_s)
    q = jnp.clip(jnp.round(x / safe_s + z), 0, qmax)
    return jnp.where(s > 0, safe_s * (q - z), x).astype(w.dtype)


def quantize_params(params, bits: int, *, include=None):
    """Quantises every floating leaf of a pytree (e.g. an `nnx.State`) to `bits` bits per tensor.

    Args:
      params: any pytree; non-floating leaves (integers, RNG keys) are returned unchanged.
      bits: an integer >= 1.
      include: optional `include(name) -> bool` on the leaf's `jaxsafe.treepath.path_name`
        ('blocks/0/conv/kernel'); leaves it rejects are returned unchanged.

    Returns:
      A pytree of the same structure, dtypes and shapes.
    """
    _check_bits(bits)

    def leaf(path, w):
        if not (hasattr(w, "dtype") and jnp.issubdtype(w.dtype, jnp.floating)):
            return w
        if include is not None and not include(path_name(path)):
            return w
        return quantize_tensor(w, bits)

    return jax.tree_util.tree_map_with_path(leaf, params)
