"""Which parameters an erasure method edits or trains: predicates on parameter names.

Names are ``jaxsafe.treepath.path_name`` strings of the NNX state, e.g.
``unet/down_blocks/0/attentions/0/transformer_blocks/0/attn2/to_k/kernel`` (diffusers
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight``). A *selection* is a
predicate ``name -> bool``; :func:`nnx_filter` turns it into an NNX filter, so
``nnx.split(model, nnx_filter(sel), ...)`` puts exactly the selected parameters in the trained
state and the rest in the frozen one, which the trainer never updates. Masking by the split
rather than by ``optax.masked`` also keeps gradients and optimizer moments off the frozen
parameters, which matters at SD scale.

ESD's ``train_method`` choices (Gandikota et al., ICCV 2023, Sec. 4; ``train-esd.py``):
``xattn`` (ESD-x), every cross-attention parameter (``attn2``); ``xattn-strict``, only
``attn2/to_k`` and ``attn2/to_v``; ``noxattn`` (ESD-u), every UNet parameter except
cross-attention, the time embedding and the output block (``train-esd.py`` L167–168 leaves out
``out.``: CompVis' [norm, SiLU, conv], diffusers' ``conv_norm_out`` and ``conv_out``);
``selfattn``, the self-attention layers (``attn1``); ``full``, every UNet parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from flax import nnx

from jaxsafe.treepath import path_name

__all__ = ["TRAIN_METHODS", "cross_attention_kv", "nnx_filter", "select", "selection"]

Selection = Callable[[str], bool]

TRAIN_METHODS: dict[str, Selection] = {
    "xattn": lambda n: "/attn2/" in n,
    "xattn-strict": lambda n: re.search(r"/attn2/to_[kv]/", n) is not None,
    "noxattn": lambda n: (
        not ("/attn2/" in n or n.startswith(("time_embedding/", "conv_norm_out/", "conv_out/")))
    ),
    "selfattn": lambda n: "/attn1/" in n,
    "full": lambda n: True,
}


def selection(train_method: str, component: str = "unet") -> Selection:
    """The predicate of ``train_method`` applied to ``component``'s parameters (names with the
    ``component/`` prefix; ``component=""`` for a bare UNet's names)."""
    if train_method not in TRAIN_METHODS:
        raise ValueError(
            f"train_method={train_method!r}; expected one of {', '.join(TRAIN_METHODS)}"
        )
    pred, prefix = TRAIN_METHODS[train_method], f"{component}/" if component else ""

    def sel(name: str) -> bool:
        return name.startswith(prefix) and pred(name[len(prefix) :])

    return sel


def nnx_filter(sel: Selection):
    """An NNX filter matching the ``nnx.Param`` variables whose name satisfies ``sel``."""

    def f(path, value) -> bool:
        return isinstance(value, nnx.Param) and sel(path_name(path))

    return f


def select(named: dict, sel: Selection) -> list[str]:
    """Sorted names of ``named`` (``{name: leaf}``) that ``sel`` selects; raises if none."""
    out = sorted(n for n in named if sel(n))
    if not out:
        raise ValueError(
            f"the selection matches no parameter among {len(named)} (first names: "
            f"{sorted(named)[:3]})"
        )
    return out


def cross_attention_kv(named: dict) -> list[str]:
    """Names of the cross-attention key and value kernels (``.../attn2/to_{k,v}/kernel``), the
    matrices the closed-form editors (UCE, RECE, TRCE) rewrite, in a stable order."""
    return select(named, lambda n: re.search(r"/attn2/to_[kv]/kernel$", n) is not None)
