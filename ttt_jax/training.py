"""Training pieces as plain functions: the optax chain, the train state, pure train/eval steps.

Nothing here is jitted: ``train.py`` jits ``train_step`` once at the edge (with the state
donated). Gradient accumulation is a ``lax.scan`` over micro-batches inside the step.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from ttt_jax.config import OptimConfig
from ttt_jax.tree import path_str

# Parameter leaves that are never weight-decayed: norms, biases and per-head TTT vectors.
NO_DECAY = ("bias", "scale", "weight", "learnable_token_idx", "learnable_ttt_lr_bias",
            "ttt_norm_weight", "ttt_norm_bias", "b1", "b2")


class TrainState(struct.PyTreeNode):
    """Everything a step changes: ``step``, ``params``, ``opt_state``."""

    step: jax.Array
    params: Any
    opt_state: Any


def decay_mask(params) -> Any:
    """``True`` for leaves that get weight decay: matrices that are not norms or biases."""

    def keep(path, leaf):
        name = getattr(path[-1], "key", str(path[-1]))
        return leaf.ndim >= 2 and name not in NO_DECAY

    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``cfg.learning_rate`` then cosine decay to ``min_lr_ratio`` of it."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def trainable_labels(params, pattern: Optional[str]) -> Any:
    """``"train"`` for leaves whose path matches ``pattern`` (all when None), else ``"freeze"``."""
    regex = re.compile(pattern) if pattern is not None else None
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if regex is None or regex.search(path_str(p)) else "freeze", params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the warmup+cosine schedule.

    With ``cfg.trainable`` set, params whose path does not match are frozen (their updates are
    zero) via ``optax.multi_transform``; clipping sees only the trained params' gradients.
    """
    adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                        eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
    if cfg.trainable is None:
        return tx
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                                 lambda params: trainable_labels(params, cfg.trainable))


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array,
               seq_len: int) -> TrainState:
    """Initial params (float32) and optimizer state."""
    params = model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of counted tokens.

    Args:
      logits: ``[B, L, V]`` float32.
      targets: ``[B, L]`` int.
      mask: optional ``[B, L]`` weights (e.g. only the answer positions of a recall task).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, L]
    if mask is None:
        return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def _loss_sums(model: nn.Module, params, tokens, mask):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:], mask)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation) -> Callable:
    """Returns ``train_step(state, tokens, mask) -> (state, metrics)``, pure.

    ``tokens: [k, m, L+1]`` holds ``k`` micro-batches of ``m`` sequences (``k = grad_accum``);
    ``mask`` is ``None`` or ``[k, m, L]``. Gradients of the summed loss are accumulated over the
    micro-batches by a ``lax.scan`` and divided by the total token count once, so ``k`` micro-
    batches of ``m`` give the update of one batch of ``k*m``.
    """

    def train_step(state: TrainState, tokens, mask=None):
        def micro(carry, xs):
            grads, loss_sum, count = carry
            toks, msk = xs
            (s, n), g = jax.value_and_grad(
                lambda p: _loss_sums(model, p, toks, msk), has_aux=True)(state.params)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + s, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, count), _ = jax.lax.scan(micro, init, (tokens, mask))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable:
    """Returns ``eval_step(params, tokens, mask) -> (loss_sum, count)`` for ``tokens [B, L+1]``."""

    def eval_step(params, tokens, mask=None):
        return _loss_sums(model, params, tokens, mask)

    return eval_step
