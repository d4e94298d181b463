"""Training pieces as plain functions: the optax chain, the train state, pure train/eval steps.

Nothing here is jitted: ``train.py`` jits ``train_step`` once at the edge (with the state
donated). Gradient accumulation is a ``lax.scan`` over micro-batches inside the step.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from ttt_jax.config import OptimConfig
from ttt_jax.math.cross_entropy import cross_entropy
from ttt_jax.tree import path_str

# Parameter leaves that are never weight-decayed: norms, biases and per-head TTT vectors.
NO_DECAY = ("bias", "scale", "weight", "learnable_token_idx", "learnable_ttt_lr_bias",
            "ttt_norm_weight", "ttt_norm_bias", "b1", "b2")


class TrainState(struct.PyTreeNode):
    """Everything a step changes: ``step``, ``params``, ``opt_state``, and ``carry``, the
    model state carried from one step's batch to the next (``carries_state``; ``None``, an
    empty pytree, for every other model, so their checkpoints hold the first three only)."""

    step: jax.Array
    params: Any
    opt_state: Any
    carry: Any = None


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


FROZEN = "freeze"
DEFAULT_GROUP = "train"


def param_labels(params, pattern: Optional[str] = None,
                 group_of: Optional[Callable[[str], str]] = None, frozen: Sequence[str] = ()):
    """The optimizer label of every leaf: its group (``group_of(path)``, or ``"train"``), or
    ``"freeze"`` when the group is in ``frozen`` or the path does not match ``pattern``."""
    regex = re.compile(pattern) if pattern is not None else None

    def label(path, _):
        name = path_str(path)
        group = group_of(name) if group_of is not None else DEFAULT_GROUP
        if group in frozen or (regex is not None and not regex.search(name)):
            return FROZEN
        return group

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig, total_steps: int, *,
                   group_of: Optional[Callable[[str], str]] = None,
                   scales: Optional[Mapping[str, float]] = None,
                   frozen: Sequence[str] = ()) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW on the warmup+cosine schedule, per param group.

    Args:
      cfg: the ``optim`` section; ``cfg.trainable`` (a path regex) freezes non-matching params.
      total_steps: length of the schedule.
      group_of: param path -> group name (an architecture's param groups); ``None``: one group.
      scales: learning-rate multiplier per group (1 when absent).
      frozen: groups whose params get no update.

    Frozen params get a zero update (no weight decay either), and clipping sees only the
    gradients of the trained params. A run with one group and nothing frozen gets the plain
    ``chain(clip, adamw)``.
    """
    schedule = learning_rate_schedule(cfg, total_steps)
    scales = dict(scales or {})

    def adamw(scale: float):
        lr = schedule if scale == 1.0 else (lambda step: schedule(step) * scale)
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)

    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    if group_of is None and cfg.trainable is None and not frozen:
        return optax.chain(*clip, adamw(scales.get(DEFAULT_GROUP, 1.0)))
    groups = set(scales) | ({DEFAULT_GROUP} if group_of is None else set())
    transforms = {g: adamw(scales.get(g, 1.0)) for g in groups}
    transforms[FROZEN] = optax.set_to_zero()
    labels = lambda params: param_labels(params, cfg.trainable, group_of, frozen)  # noqa: E731
    is_frozen = lambda params: jax.tree.map(lambda l: l == FROZEN, labels(params))  # noqa: E731
    return optax.chain(optax.masked(optax.set_to_zero(), is_frozen), *clip,
                       optax.multi_transform(transforms, labels))


def new_state(params, optimizer: optax.GradientTransformation, carry=None) -> TrainState:
    """Step 0: ``params``, a fresh optimizer state and the model's initial ``carry``."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), carry=carry)


class OwnObjective:
    """Mixin of a Linen model that is trained on its own objective rather than next-token
    cross-entropy: its ``loss_sums(tokens, mask) -> (loss_sum, count)`` receives the
    dataset's whole micro-batch, and the train step sums both over micro-batches and divides
    once, as for cross-entropy (e.g. ``count = 1`` per micro-batch averages per-micro-batch
    losses)."""

    def loss_sums(self, tokens, mask):
        """``(loss_sum, count)`` of one micro-batch; each model with this mixin defines it."""
        raise TypeError(f"{type(self).__name__} is an OwnObjective model but does not define "
                        f"loss_sums(tokens, mask)")


def carries_state(model: nn.Module) -> bool:
    """Whether ``model`` is trained with a state carried between steps: it defines
    ``init_carry(batch)`` and ``loss_sums_carry(tokens, mask, carry) -> ((loss_sum, count),
    carry')`` and sets ``persistent_states`` (e.g. a Moshi model reading recordings in order).
    Row ``i`` of every batch continues row ``i`` of the one before."""
    return bool(getattr(model, "persistent_states", False))


def init_carry(model: nn.Module, params, batch: int):
    """The carried state of ``batch`` fresh rows, or ``None`` when the model carries none."""
    if not carries_state(model):
        return None
    return model.apply({"params": params}, batch, method="init_carry")


def _loss_sums(model: nn.Module, params, tokens, mask):
    if isinstance(model, OwnObjective):
        return model.apply({"params": params}, tokens, mask, method="loss_sums")
    if hasattr(model, "next_token_loss"):  # the LM head inside the loss (ModelConfig.loss_chunk)
        return model.apply({"params": params}, tokens[:, :-1], tokens[:, 1:], mask,
                           method="next_token_loss")
    logits = model.apply({"params": params}, tokens[:, :-1])
    return cross_entropy(logits, tokens[:, 1:], mask)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, *,
                    skip_nonfinite: bool = False) -> Callable:
    """Returns ``train_step(state, tokens, mask) -> (state, metrics)``, pure.

    ``tokens: [k, m, L+1]`` holds ``k`` micro-batches of ``m`` sequences (``k = grad_accum``);
    ``mask`` is ``None`` or ``[k, m, L]``. Gradients of the summed loss are accumulated over the
    micro-batches by a ``lax.scan`` and divided by the total token count once, so ``k`` micro-
    batches of ``m`` give the update of one batch of ``k*m``.

    ``metrics`` holds ``loss`` and ``grad_norm`` (the global norm, non-finite as soon as one
    gradient is). With ``skip_nonfinite``, a step whose loss or gradient norm is not finite
    keeps the old params and optimizer state (a ``jnp.where`` on every leaf; the step counter
    still advances, so the batch is consumed) and reports ``metrics["skipped"]``.

    A model that ``carries_state`` reads ``state.carry`` (one entry per batch row) and leaves
    its new value in the returned state; no gradient flows from one step into the last.
    """

    carried = carries_state(model)

    def loss(params, toks, msk, rows):
        if not carried:
            s, n = _loss_sums(model, params, toks, msk)
            return s, (n, None)
        (s, n), rows = model.apply({"params": params}, toks, msk, rows,
                                   method="loss_sums_carry")
        return s, (n, rows)

    def train_step(state: TrainState, tokens, mask=None):
        k = tokens.shape[0]
        # The carried rows follow the batch's rows: micro-batch i holds rows [i*m, (i+1)*m).
        rows = (None if state.carry is None else
                jax.tree.map(lambda c: c.reshape(k, c.shape[0] // k, *c.shape[1:]), state.carry))

        def micro(carry, xs):
            grads, loss_sum, count = carry
            toks, msk, r = xs
            (s, (n, r)), g = jax.value_and_grad(loss, has_aux=True)(state.params, toks, msk, r)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + s, count + n), r

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()))
        (grads, loss_sum, count), rows = jax.lax.scan(micro, init, (tokens, mask, rows))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.tree.norm(grads)}
        carry = (None if rows is None else
                 jax.tree.map(lambda c: c.reshape(-1, *c.shape[2:]), rows))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            carry=carry)
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            kept = state.replace(step=state.step + 1)
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, kept)
            metrics["skipped"] = jnp.logical_not(ok)
        return new, metrics

    return train_step


def all_finite(tree) -> jax.Array:
    """One boolean: every floating-point leaf of ``tree`` is finite (jit it; one reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_eval_step(model: nn.Module) -> Callable:
    """Returns ``eval_step(params, tokens, mask) -> (loss_sum, count)`` for ``tokens [B, L+1]``."""

    def eval_step(params, tokens, mask=None):
        return _loss_sums(model, params, tokens, mask)

    return eval_step
