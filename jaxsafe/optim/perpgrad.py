r"""⊥Grad: keep only the gradient component orthogonal to the weights.

From "Grokking at the Edge of Numerical Stability" (Prieto, Barsbey, Mediano &
Birdal, ICLR 2025), Eq. 12:

.. math::

    g_\perp = g - \frac{\langle \theta, g \rangle}{\langle \theta, \theta \rangle}\, \theta

Removing the radial component stops "naive loss minimisation" (growing ||θ||
to scale the logits up, which drives softmax towards collapse), so the model
has to change direction to reduce the loss. Modes:

* ``'per_tensor'`` (reference code): each parameter tensor is projected on
  its own, and by default g⊥ is rescaled to the norm of g
  (g⊥ <- g⊥ ||g|| / ||g⊥||), so only the direction changes.
* ``'global'`` (paper Eq. 12): θ and g are the concatenation of all tensors;
  only the total <θ, g⊥> vanishes, not each tensor's. No rescale by default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["perpgrad", "perp_adamw", "perp_sgd", "PERPGRAD_MODES"]

PERPGRAD_MODES = ("per_tensor", "global")


def _acc(x):
    # Reductions in at least float32, so bf16 params still get a clean projection.
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _vdot(a, b):
    return jnp.vdot(_acc(a), _acc(b))


def _safe_div(num, den, ok, default):
    return jnp.where(ok, num / jnp.where(ok, den, 1), default)


def _project(gs, ps, rescale, eps):
    """Projects the list of tensors ``gs`` (as one vector) orthogonally to ``ps``."""
    tt = sum(_vdot(p, p) for p in ps)
    tg = sum(_vdot(p, g) for p, g in zip(ps, gs))
    # <θ,θ> <= eps (e.g. zero-initialised biases): no direction to remove, so
    # the coefficient is 0 and g passes through unchanged.
    coef = _safe_div(tg, tt, tt > eps, 0)
    outs = [_acc(g) - coef * _acc(p) for p, g in zip(ps, gs)]
    if rescale:
        g_norm = jnp.sqrt(sum(_vdot(g, g) for g in gs))
        o_norm = jnp.sqrt(sum(jnp.vdot(o, o) for o in outs))
        # g⊥ = 0 (g = 0 or exactly parallel to θ) stays 0 instead of 0 * inf.
        scale = _safe_div(g_norm, o_norm, o_norm > eps, 1)
        outs = [o * scale for o in outs]
    return [o.astype(g.dtype) for o, g in zip(outs, gs)]


def perpgrad(mode: str = "per_tensor", rescale: bool | None = None, eps: float = 1e-30):
    """⊥Grad as an optax transformation; ``update`` must be given ``params``.

    g⊥ = g - (<θ, g> / <θ, θ>) θ   (Prieto et al., ICLR 2025, Eq. 12)

    Args:
      mode: ``'per_tensor'`` projects every tensor separately (the reference
        implementation); ``'global'`` projects the concatenated parameter vector
        (the paper's equation).
      rescale: rescale g⊥ to the norm of g (over the same tensor/vector used for
        the projection). ``None`` means ``True`` for ``'per_tensor'`` (as in
        the reference code) and ``False`` for ``'global'``.
      eps: tensors with <θ, θ> <= eps pass the gradient through unchanged, and
        g⊥ with norm <= eps is not rescaled. The reference code uses 1e-30.

    Returns:
      An ``optax.GradientTransformation`` with empty state.
    """
    if mode not in PERPGRAD_MODES:
        raise ValueError(
            f"Unknown perpgrad mode {mode!r}; "
            f"valid modes are {', '.join(map(repr, PERPGRAD_MODES))}."
        )
    if rescale is None:
        rescale = mode == "per_tensor"

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("perpgrad needs params: call update(grads, state, params)")
        if mode == "per_tensor":
            updates = jax.tree.map(
                lambda g, p: _project([g], [p], rescale, eps)[0], updates, params
            )
        else:
            gs, treedef = jax.tree.flatten(updates)
            ps = treedef.flatten_up_to(params)
            updates = jax.tree.unflatten(treedef, _project(gs, ps, rescale, eps))
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def perp_adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, **perp_kwargs):
    """⊥AdamW: :func:`perpgrad` followed by ``optax.adamw``.

    Defaults follow the reference code's ⊥AdamW: its OrthoGrad wrapper builds
    ``torch.optim.AdamW`` from only ``lr`` and ``weight_decay`` (default 0 in its
    CLI, and 0 in all its ⊥AdamW runs), so betas and eps are PyTorch's defaults
    (0.9, 0.999), 1e-8. Note ``optax.adamw`` itself defaults to weight decay
    1e-4; here it is 0. ``perp_kwargs`` go to :func:`perpgrad`.
    """
    return optax.chain(
        perpgrad(**perp_kwargs),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def perp_sgd(learning_rate, momentum=None, **perp_kwargs):
    """⊥SGD: :func:`perpgrad` followed by ``optax.sgd``.

    The reference experiments run ⊥SGD with momentum 0.8; the default here is
    plain SGD (``momentum=None``). ``perp_kwargs`` go to :func:`perpgrad`.
    """
    return optax.chain(perpgrad(**perp_kwargs), optax.sgd(learning_rate, momentum=momentum))
