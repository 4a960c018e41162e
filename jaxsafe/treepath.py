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
