"""Grafting TTT layers into a Moshi backbone: fresh hybrid params that keep the base's arrays.

The optimizer's param groups of the hybrid live with its registration
(``ttt_jax.moshi.registration``).
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from ttt_jax import registry
from ttt_jax.checkpoint import merge_params
from ttt_jax.moshi.config import MoshiTTTConfig
from ttt_jax.moshi.registration import param_group


def noop_graft(params, cfg: MoshiTTTConfig):
    """Zeroes ``o_proj`` of every grafted TTT layer: the blocks then add exactly nothing."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    for key in flat:
        if "seq_modeling_block" in key and key[-2:] == ("o_proj", "kernel"):
            flat[key] = jnp.zeros_like(flat[key])
    return flax.traverse_util.unflatten_dict(flat)


def init_params(cfg: MoshiTTTConfig, key: jax.Array):
    """Fresh params of ``MoshiTTTLM(cfg)``; with ``ttt.noop_init`` the grafted blocks are no-ops."""
    params = registry.get("moshi_ttt").init_params(cfg, key)
    return noop_graft(params, cfg) if cfg.ttt.noop_init else params


def graft(base_params, cfg: MoshiTTTConfig, key: Optional[jax.Array] = None, *, target=None,
          strict_backbone: bool = True):
    """Params of the hybrid ``cfg`` that take every backbone array from ``base_params``.

    ``base_params`` are those of a model with fewer (or no) TTT layers, e.g. a plain Moshi
    backbone imported with ``convert.from_state_dict``; the new TTT params keep their init
    (zero ``o_proj`` with ``ttt.noop_init``). ``target``: fresh params of ``cfg`` to fill
    (e.g. from a jitted ``init_params``) instead of initialising them here from ``key``.

    Returns:
      ``(params, report)`` (a ``checkpoint.RestoreReport``); with ``strict_backbone`` every
      missing param must be a TTT param.
    """
    if target is None:
        if key is None:
            raise ValueError("graft needs a PRNG key or target params to initialise the TTT layers")
        target = init_params(cfg, key)
    elif cfg.ttt.noop_init:
        target = noop_graft(target, cfg)
    params, report = merge_params(base_params, target)
    if strict_backbone:
        bad = [k for k in report.missing if param_group(k) == "backbone"] + report.mismatched
        if bad:
            raise ValueError(f"the base params do not cover the backbone: {bad[:10]}")
    return params, report
