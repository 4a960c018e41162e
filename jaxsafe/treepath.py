"""Readable names for pytree leaves: the one naming used by sharding rules, optimizer masks,
checkpoint checks and per-tensor metrics."""

import jax


def path_name(path) -> str:
    """Turns a JAX key path into an 'a/b/0/c' string ('' for the root).

    A trailing `value` key (how `flax.nnx.Variable` boxes flatten, as an attribute in memory
    and as a dict key in checkpoint metadata) is dropped, so parameters are named like
    'layers/0/kernel' everywhere.
    """
    parts = []
    for key in path:
        # DictKey/FlattenedIndexKey have .key, GetAttrKey .name, SequenceKey .idx.
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def named_leaves(tree, is_leaf=None) -> dict:
    """`{path_name: leaf}` for every leaf of `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {path_name(p): x for p, x in flat}


def replace_by_name(tree, new, *, complete: bool = False, what: str = "tree"):
    """``tree`` with the leaves ``new`` names (``{path_name: array}``) replaced, each cast to the
    old leaf's dtype after a shape check. Unknown names raise ``KeyError``; with ``complete`` a
    leaf of ``tree`` that ``new`` does not name does too. The one way to fill a tree by leaf name
    (checkpoint restores, weight files, closed-form edits)."""
    import jax.numpy as jnp

    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(p) for p, _ in flat]
    unknown = sorted(set(new) - set(names))
    missing = sorted(set(names) - set(new)) if complete else []
    if unknown or missing:
        raise KeyError(f"{what}: names do not fit: missing {missing[:3]}, unknown {unknown[:3]}")
    leaves = []
    for name, (_, old) in zip(names, flat, strict=True):
        if name not in new:
            leaves.append(old)
            continue
        x = new[name]
        if tuple(x.shape) != tuple(old.shape):
            raise ValueError(
                f"{what}: {name}: shape {tuple(x.shape)} != the model's {tuple(old.shape)}"
            )
        leaves.append(jnp.asarray(x, old.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
