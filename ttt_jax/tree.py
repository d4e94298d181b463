"""Pytree helpers shared by training, checkpoints and reports: params by ``a/b/c`` path."""

from __future__ import annotations

from typing import Any

import jax


def path_str(path) -> str:
    """``layers_0/seq_modeling_block/W1`` for a ``jax.tree_util`` key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree) -> dict[str, Any]:
    """``{path_str: leaf}`` of every leaf, in tree order."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
