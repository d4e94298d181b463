"""Training pieces of the Moshi-TTT hybrid: init (with the no-op graft), grafting, param groups.

Param groups (``param_group``): ``alpha`` (every ``forward_ssm_gating/gating_alpha``), ``ttt``
(everything else under a ``seq_modeling_block``) and ``backbone`` (the rest). The optimizer
runs AdamW per group through ``optax.multi_transform`` with the base learning rate times
``ttt.weight_lr_multiplier`` / ``ttt.alpha_lr_multiplier``; ``ttt.freeze_backbone`` (or an
``optim.trainable`` regex that a param does not match) zeroes a param's update.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from ttt_jax.checkpoint import merge_params
from ttt_jax.config import OptimConfig
from ttt_jax.moshi.config import MoshiTTTConfig, TTTArgs
from ttt_jax.moshi.hybrid import MoshiTTTLM
from ttt_jax.training import decay_mask, learning_rate_schedule
from ttt_jax.tree import path_str

GROUPS = ("backbone", "ttt", "alpha")
FROZEN = "freeze"


def param_group(path: str) -> str:
    """``alpha``, ``ttt`` or ``backbone`` for an ``a/b/c`` param path."""
    if "forward_ssm_gating" in path.split("/"):
        return "alpha"
    if "seq_modeling_block" in path.split("/"):
        return "ttt"
    return "backbone"


def param_labels(params, ttt: TTTArgs, trainable: Optional[str] = None) -> Any:
    """The optimizer label of every leaf: a group of ``GROUPS`` or ``"freeze"``."""
    regex = re.compile(trainable) if trainable is not None else None

    def label(path, _):
        name = path_str(path)
        group = param_group(name)
        if (ttt.freeze_backbone and group == "backbone") or (regex and not regex.search(name)):
            return FROZEN
        return group

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim: OptimConfig, ttt: TTTArgs, total_steps: int) -> optax.GradientTransformation:
    """Frozen grads zeroed, global-norm clipping over the rest, then AdamW per param group."""
    schedule = learning_rate_schedule(optim, total_steps)
    scales = {"backbone": 1.0, "ttt": ttt.weight_lr_multiplier, "alpha": ttt.alpha_lr_multiplier}

    def adamw(scale):
        return optax.adamw(lambda step: schedule(step) * scale, b1=optim.b1, b2=optim.b2,
                           eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)

    transforms = {g: adamw(s) for g, s in scales.items()}
    transforms[FROZEN] = optax.set_to_zero()
    labels = lambda params: param_labels(params, ttt, optim.trainable)  # noqa: E731
    frozen = lambda params: jax.tree.map(lambda l: l == FROZEN, labels(params))  # noqa: E731
    steps = [optax.masked(optax.set_to_zero(), frozen)]
    if optim.grad_clip > 0:
        steps.append(optax.clip_by_global_norm(optim.grad_clip))
    steps.append(optax.multi_transform(transforms, labels))
    return optax.chain(*steps)


def noop_graft(params, cfg: MoshiTTTConfig):
    """Zeroes ``o_proj`` of every grafted TTT layer: the blocks then add exactly nothing."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    for key in flat:
        if "seq_modeling_block" in key and key[-2:] == ("o_proj", "kernel"):
            flat[key] = jnp.zeros_like(flat[key])
    return flax.traverse_util.unflatten_dict(flat)


def sample_tokens(cfg: MoshiTTTConfig, length: int, batch: int = 1) -> jax.Array:
    """Zero token ids of the model's input shape ``[B, T, K]``."""
    return jnp.zeros((batch, length, cfg.num_streams), jnp.int32)


def init_params(cfg: MoshiTTTConfig, key: jax.Array, length: Optional[int] = None):
    """Fresh params of ``MoshiTTTLM(cfg)``; with ``ttt.noop_init`` the grafted blocks are no-ops."""
    length = length or cfg.ttt.mini_batch_size
    params = MoshiTTTLM(cfg).init(key, sample_tokens(cfg, length))["params"]
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
