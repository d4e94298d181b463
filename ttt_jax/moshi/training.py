"""Grafting TTT layers into a Moshi backbone: fresh hybrid params that keep the base's arrays.

The optimizer's param groups of the hybrid live with its registration
(``ttt_jax.moshi.registration``).
"""

from __future__ import annotations

from typing import Optional

import jax

from ttt_jax import registry
from ttt_jax.checkpoint import merge_params
from ttt_jax.moshi.config import MoshiTTTConfig
from ttt_jax.moshi.registration import param_group


def graft(base_params, cfg: MoshiTTTConfig, key: Optional[jax.Array] = None, *, target=None,
          strict_backbone: bool = True):
    """Params of the hybrid ``cfg`` that take every backbone array from ``base_params``.

    ``base_params`` are those of a model with fewer (or no) TTT layers, e.g. a plain Moshi
    backbone imported with ``convert.from_state_dict``; the new TTT params keep their init
    (zero ``o_proj`` with ``ttt.noop_init``, which the module's init applies). ``target``: params
    of ``cfg`` to fill (e.g. from a jitted ``registry.get("moshi_ttt").init_params``) instead of
    initialising them here from ``key``.

    Returns:
      ``(params, report)`` (a ``checkpoint.RestoreReport``); with ``strict_backbone`` every
      missing param must be a TTT param.
    """
    if target is None:
        if key is None:
            raise ValueError("graft needs a PRNG key or target params to initialise the TTT layers")
        target = registry.get("moshi_ttt").init_params(cfg, key)
    params, report = merge_params(base_params, target)
    if strict_backbone:
        bad = [k for k in report.missing if param_group(k) == "backbone"] + report.mismatched
        if bad:
            raise ValueError(f"the base params do not cover the backbone: {bad[:10]}")
    return params, report
