r"""Low-rank adapters on the linear layers of a network (Flax NNX).

A frozen linear map y = x W + b gets a trainable low-rank branch (LoRA, Hu et al., ICLR 2022;
the one-dimensional "membrane" of SPM, Lyu et al., CVPR 2024, Sec. 3.1, is rank r = 1):

.. math::

    y = x W + b + s\, \frac{\alpha}{r}\, (x D)\, U, \qquad
    D \in \mathbb{R}^{d_\mathrm{in} \times r}, \quad U \in \mathbb{R}^{r \times d_\mathrm{out}},

D (``adapter/down/kernel``) Kaiming-uniform (bound 1/√d_in, PyTorch's ``nn.Linear`` default
that LoRA/SPM keep) and U (``adapter/up/kernel``) zero at the start, so a freshly adapted network
computes exactly what the original does; α/r is LoRA's scale (SPM: α = 1, r = 1). s is the
*strength* (SPM's transport rate γ): an :class:`AdapterStrength` variable, 1 by default, that
:func:`strength` sets for one call, a scalar or a (B,) vector that gives every sample its own
strength inside one jitted call; it is not an ``nnx.Param`` (never trained, never exported).
:func:`add_adapters` replaces the selected ``nnx.Linear`` layers by :class:`AdaptedLinear`,
which keeps the layer's own ``kernel``/``bias`` (so names and diffusers export are unchanged);
the default selection is every linear layer of the Stable Diffusion UNet's transformer blocks
(``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out/0``; ``ff/net/0/proj``,
``ff/net/2``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.treepath import named_leaves, path_name, replace_by_name

__all__ = [
    "TRANSFORMER_BLOCK_LINEARS",
    "AdaptedLinear",
    "AdapterStrength",
    "LowRankAdapter",
    "adapter_params",
    "add_adapters",
    "is_adapter_param",
    "load_adapter_params",
    "strength",
]

# Every nnx.Linear of a diffusers-layout BasicTransformerBlock (jaxsafe.nn.sd_layers).
TRANSFORMER_BLOCK_LINEARS = re.compile(
    r"(^|/)transformer_blocks/\d+/(attn[12]/(to_q|to_k|to_v|to_out/0)|ff/net/(0/proj|2))$"
)

# PyTorch nn.Linear's kaiming_uniform_(a=√5): U(−1/√fan_in, 1/√fan_in).
_KAIMING_UNIFORM = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class AdapterStrength(nnx.Variable):
    """The multiplier ``s`` of an adapter's branch: a scalar or a per-sample ``(B,)`` vector."""


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name belongs to an adapter (``.../adapter/...``)."""
    return "/adapter/" in f"/{name}"


def _batch_strength(s: jax.Array, x: jax.Array) -> jax.Array:
    if s.ndim == 0:
        return s
    if s.ndim == 1 and x.ndim >= 2 and s.shape[0] == x.shape[0]:
        return s.reshape((-1,) + (1,) * (x.ndim - 1))
    raise ValueError(
        f"strength must be a scalar or (B,) with B = {x.shape[0]} (the batch of the "
        f"layer input {x.shape}), got shape {s.shape}"
    )


class LowRankAdapter(nnx.Module):
    """``s · (α / r) · (x D) U`` (module docstring), ``down`` = D, ``up`` = U (zero at init)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 1,
        alpha: float = 1.0,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not (isinstance(rank, (int, np.integer)) and rank >= 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.down = nnx.Linear(in_features, self.rank, kernel_init=_KAIMING_UNIFORM, **kw)
        self.up = nnx.Linear(self.rank, out_features, kernel_init=nnx.initializers.zeros, **kw)
        self.strength = AdapterStrength(jnp.ones((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        s = _batch_strength(jnp.asarray(self.strength[...]), x)
        return (s * self.scale) * self.up(self.down(x))


class AdaptedLinear(nnx.Linear):
    """An ``nnx.Linear`` (the same ``kernel``/``bias`` variables and settings as the layer it
    wraps) plus a :class:`LowRankAdapter` at ``adapter``: ``y = x W + b + adapter(x)``."""

    def __init__(self, linear: nnx.Linear, *, rank: int = 1, alpha: float = 1.0, rngs: nnx.Rngs):
        if not isinstance(linear, nnx.Linear) or isinstance(linear, AdaptedLinear):
            raise ValueError(
                f"linear must be an nnx.Linear without an adapter, got {type(linear).__name__}"
            )
        # Linear.__init__ would draw new weights: take the wrapped layer's variables and settings.
        for key, value in vars(linear).items():
            if not key.startswith("_"):
                setattr(self, key, nnx.data(value) if key in ("kernel", "bias") else value)
        self.adapter = LowRankAdapter(
            linear.in_features,
            linear.out_features,
            rank=rank,
            alpha=alpha,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            rngs=rngs,
        )

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding)
        return y + self.adapter(inputs).astype(y.dtype)


def _parent_and_key(root, path):
    node = root
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node, path[-1]


def add_adapters(
    model: nnx.Module,
    *,
    rank: int = 1,
    alpha: float = 1.0,
    rngs: nnx.Rngs,
    select: Callable[[str], bool] | None = None,
) -> nnx.Module:
    """A copy of ``model`` whose ``nnx.Linear`` layers named (``a/b/0/c`` paths) as ``select``
    accepts (default: :data:`TRANSFORMER_BLOCK_LINEARS`) are :class:`AdaptedLinear` of the given
    rank and α. The original model is left untouched."""
    select = select or (lambda name: TRANSFORMER_BLOCK_LINEARS.search(name) is not None)
    model = nnx.clone(model)
    targets = [
        (path, node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
        and not isinstance(node, AdaptedLinear)
        and select(path_name(path))
    ]
    if not targets:
        raise ValueError("the selection matches no nnx.Linear layer of the model")
    for path, linear in targets:
        parent, key = _parent_and_key(model, path)
        new = AdaptedLinear(linear, rank=rank, alpha=alpha, rngs=rngs)
        if isinstance(key, int):
            parent[key] = new
        else:
            setattr(parent, key, new)
    return model


@contextlib.contextmanager
def strength(model: nnx.Module, s):
    """Sets every adapter's strength of ``model`` to ``s`` (scalar or ``(B,)``) for the block.

    A ``(B,)`` strength gives every sample of the batch (the leading axis of the layer's input)
    its own value, so a per-prompt strength stays inside one jitted call::

        model = nnx.merge(graphdef, state)        # inside jax.jit
        with adapters.strength(model, gamma):     # gamma: (B,) traced array
            eps = model(x, t, emb)

    Each adapter gets a fresh :class:`AdapterStrength` (the old variable is put back on exit)
    rather than a new value in its variable, so this also works where the variable was created
    at another trace level (a module merged outside a ``lax.scan`` body that calls it)."""
    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, LowRankAdapter)]
    if not modules:
        raise ValueError("the model has no adapters (see add_adapters)")
    s = jnp.asarray(s, jnp.float32)
    if s.ndim > 1:
        raise ValueError(f"strength must be a scalar or (B,), got shape {s.shape}")
    old = [m.strength for m in modules]
    for m in modules:
        m.strength = AdapterStrength(s)
    try:
        yield model
    finally:
        for m, o in zip(modules, old):
            m.strength = o


def adapter_params(model: nnx.Module) -> dict[str, jax.Array]:
    """``{name: array}`` of the model's adapter parameters (names relative to ``model``)."""
    named = named_leaves(nnx.state(model, nnx.Param))
    return {n: x for n, x in named.items() if is_adapter_param(n)}


def load_adapter_params(model: nnx.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``tensors`` (the :func:`adapter_params` names and shapes, all of them) into the
    model's adapters in place; raises ``KeyError`` for missing or unknown names."""
    state = nnx.state(model, nnx.Param)
    expected = {n for n in named_leaves(state) if is_adapter_param(n)}
    missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unknown:
        raise KeyError(
            f"adapter tensors do not fit the model: missing {missing[:3]}, unknown {unknown[:3]}"
        )
    nnx.update(
        model,
        replace_by_name(
            state, {k: np.asarray(v) for k, v in tensors.items()}, what="adapter tensors"
        ),
    )
