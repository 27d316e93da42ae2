"""Nested-dict pytrees as flat {path tuple: leaf} maps, for matching variables by name."""

from typing import Any

import jax

Path = tuple[str, ...]


def flatten(tree: Any) -> dict[Path, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def unflatten(flat: dict[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
