r"""The model side every erasure method shares: which parameters train, the two score functions,
named kernels for closed-form editors, and the token rows those editors fit.

Trained methods split a loaded :class:`~jaxsafe.diffusion.pipeline.T2I` once
(:func:`split_trainable`): ``params`` (the trained subset) and ``frozen = {"rest": everything
else, "original": a copy of params}``, so the frozen original costs only a copy of the trained
subset, and

.. math::

    \epsilon_\theta(x_t, t, c) = \mathrm{merge}(\mathrm{params}, \mathrm{rest})(x_t, t, c),
    \qquad \epsilon^*(x_t, t, c) = \mathrm{merge}(\mathrm{original}, \mathrm{rest})(x_t, t, c)

(:func:`score_functions`) are the two closures every objective of ``esd``, ``spm``,
``advunlearn``, ``safegen`` and ``trce`` is built from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsafe.erasure import closed_form
from jaxsafe.treepath import named_leaves, replace_by_name


def split_trainable(model: nnx.Module, trainable):
    """``(graphdef, params, frozen)`` of ``model`` with ``params`` the variables matching the NNX
    filter ``trainable`` and ``frozen = {"rest": other variables, "original": a copy of
    params}``."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError("the trainable selection matches no parameter of the model")
    return graphdef, params, {"rest": rest, "original": jax.tree.map(jnp.copy, params)}


def trained_model(graphdef, params, frozen) -> nnx.Module:
    return nnx.merge(graphdef, params, frozen["rest"])


def original_model(graphdef, frozen) -> nnx.Module:
    return nnx.merge(graphdef, frozen["original"], frozen["rest"])


def score_functions(graphdef):
    """``(eps_theta(params, frozen, x, t, emb), eps_star(frozen, x, t, emb))``: the trained
    model's and the frozen original's noise predictions (module docstring)."""

    def eps_theta(params, frozen, x, t, emb):
        return trained_model(graphdef, params, frozen)(x, t, emb)

    def eps_star(frozen, x, t, emb):
        return original_model(graphdef, frozen)(x, t, emb)

    return eps_theta, eps_star


def random_rows(loss_fn, batch_size: int):
    """Wraps ``loss_fn`` so that each step uses ``batch_size`` rows drawn (with replacement,
    from the step's key) from a fixed batch of prompt rows: every (erase, guide) pair is seen,
    with ESD's one prompt per iteration as ``batch_size = 1``."""

    def wrapped(params, frozen, extra, batch, rng):
        k_pick, k = jax.random.split(rng)
        n = jax.tree.leaves(batch)[0].shape[0]
        idx = jax.random.randint(k_pick, (batch_size,), 0, n)
        return loss_fn(params, frozen, extra, jax.tree.map(lambda x: x[idx], batch), k)

    return wrapped


# Closed-form editors read and rewrite named kernels of the model.


def kernels(model: nnx.Module, names: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """``{name: array}`` of the model's parameters ``names`` (default: every cross-attention
    key/value kernel, ``jaxsafe.erasure.params.cross_attention_kv``)."""
    from jaxsafe.erasure.params import cross_attention_kv

    named = named_leaves(nnx.state(model, nnx.Param))
    names = cross_attention_kv(named) if names is None else list(names)
    missing = [n for n in names if n not in named]
    if missing:
        raise KeyError(f"no parameter(s) {missing[:3]} in the model")
    return {n: jnp.asarray(named[n]) for n in names}


def set_kernels(model: nnx.Module, new: dict[str, jax.Array]) -> None:
    """Writes ``new`` (name -> array of the same shape) into the model's parameters in place;
    the model is unchanged if any new tensor is not finite."""
    state = nnx.state(model, nnx.Param)
    unknown = sorted(set(new) - set(named_leaves(state)))
    if unknown:
        raise KeyError(f"no parameter(s) {unknown[:3]} in the model")
    state = replace_by_name(state, new, what="the model")  # checks shapes
    for n, x in new.items():
        if not bool(jnp.all(jnp.isfinite(x))):
            # e.g. a closed-form edit with λ = 0 and too few rows: A is singular.
            raise FloatingPointError(
                f"{n}: the edited tensor has non-finite values; the model was not changed"
            )
    nnx.update(model, state)


def erase_rows(pipe, pairs: Sequence[tuple[str, str]]):
    """(C_e, C_guide): the aligned token rows (``closed_form.aligned_tail``) of every
    (erased, guide) prompt pair of the pipeline's text encoder, stacked."""
    prompts = [a for a, _ in pairs] + [b for _, b in pairs]
    emb, lens = np.asarray(pipe.embed(prompts)), pipe.lengths(prompts)
    n = len(pairs)
    rows = [closed_form.aligned_tail(emb[i], lens[i], emb[n + i], lens[n + i]) for i in range(n)]
    return np.concatenate([a for a, _ in rows]), np.concatenate([b for _, b in rows])


def preserve_rows(pipe, preserve: Sequence[str], *, all_rows: Sequence[str] = ()):
    """Token rows of the preserved prompts from their last word token on (None for none); the
    prompts in ``all_rows`` contribute every one of their token rows (padding included), as the
    reference UCE script does for the empty prompt."""
    preserve, all_rows = list(preserve), list(all_rows)
    if not preserve and not all_rows:
        return None
    out = []
    if preserve:
        emb, lens = np.asarray(pipe.embed(preserve)), pipe.lengths(preserve)
        out += [closed_form.aligned_tail(e, n, e, n)[0] for e, n in zip(emb, lens)]
    if all_rows:
        out += list(np.asarray(pipe.embed(all_rows)))
    return np.concatenate(out)


def uce_edit(pipe, concepts, uce) -> dict[str, jax.Array]:
    """UCE's new cross-attention key/value kernels of ``pipe.model`` (not written back) for a
    config's ``concepts`` (``jaxsafe.erasure.prompts``) and ``uce`` settings (``lam``,
    ``erase_scale``, ``preserve_scale``, ``preserve_empty``, ``preserve_all_rows``;
    ``configs/erasure/uce.py``)."""
    from jaxsafe.erasure import prompts

    c_e, c_g = erase_rows(pipe, prompts.prompt_pairs(concepts))
    keep = prompts.expand(concepts.templates, prompts.preserve_words(concepts))
    retained = [""] * bool(uce.preserve_empty) + keep
    if uce.preserve_all_rows:
        c_p = preserve_rows(pipe, [], all_rows=retained)
    else:
        c_p = preserve_rows(pipe, keep, all_rows=[""] * bool(uce.preserve_empty))
    scale = closed_form.uce_preserve_scale(uce.preserve_scale, len(keep) + uce.preserve_empty)
    edit = jax.jit(
        lambda k: closed_form.uce_edit(
            k, c_e, c_g, c_p, erase_scale=uce.erase_scale, preserve_scale=scale, lam=uce.lam
        )
    )
    return jax.block_until_ready(edit(kernels(pipe.model)))
