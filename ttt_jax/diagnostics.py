"""TTT inner-loop diagnostics: the self-supervised loss of every token, computed three ways.

For token ``t`` of mini-batch ``m`` and an inner state ``S`` the loss is the one the inner loop
descends (docs/architecture.md §1.5): ``0.5 * || LN(f(XK_t; S)) - (XV_t - XK_t) ||^2``. It is evaluated with

* ``w0``: the initial weights ``W0`` (the layer's learned initial state, never updated);
* ``before``: the state at the start of mini-batch ``m`` (before its gradient step);
* ``after``: the state after mini-batch ``m``'s update.

Healthy test-time learning shows ``w0 > before > after``, with ``before`` falling along the
sequence (the paper's figure of the inner loss over positions). The per-layer inputs come from
running the model with ``capture_intermediates`` and the layer's own ``ttt_inputs``; nothing in
the model changes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.math import inner
from ttt_jax.math.ttt import token_weights

KINDS = ("w0", "before", "after")
# The name under which every TTTLayer sows its inner-loop inputs (``intermediates``).
SOWN = "ttt_inputs"


def reconstruction_loss(state, xk, xv, ln_weight, ln_bias):
    """``0.5 * ||LN(f(xk; state)) - (xv - xk)||^2`` per token: ``[B, H, T]`` for ``[B, H, T, f]``.

    ``ln_weight``/``ln_bias`` are ``[H, 1, f]``; ``state`` holds ``[B, H, ...]`` weights.
    """
    return inner.loss(state, xk, xv, ln_weight, ln_bias)


def _update(state, xk, xv, lr, tok, ln_weight, ln_bias):
    """The state after one mini-batch (docs/architecture.md §1.6): ``W' = W - (eta_last^T * XK)^T G``."""
    acts, _, gs = inner.loss_grads(state, xk, xv, ln_weight, ln_bias)
    return inner.step(state, acts, gs, tok[-1] * lr)


def inner_losses(params, xq, xk, xv, lr, learnable_token_idx, ln_weight, ln_bias):
    """The inner loss of every token with ``W0``, before and after its mini-batch's update.

    Args: as :func:`ttt_jax.math.ttt.ttt_dual` (``xq`` is unused but accepted for symmetry).

    Returns:
      ``({"w0", "before", "after"} -> [B, H, L] float32, final_state)``; the final state is the
      one ``ttt_dual`` returns (a shorter last mini-batch when ``L % b != 0``).
    """
    del xq
    bsz, heads, length, f = xk.shape
    b = learnable_token_idx.shape[-1]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]  # [H, 1, f]
    state = inner.init_state(params, bsz)
    w0 = reconstruction_loss(state, xk, xv, lnw, lnb)  # [B, H, L]

    def step(carry, x):
        k, v, r = x
        before = reconstruction_loss(carry, k, v, lnw, lnb)
        new = _update(carry, k, v, r, tok[:k.shape[-2]], lnw, lnb)
        return new, (before, reconstruction_loss(new, k, v, lnw, lnb))

    n, rem = divmod(length, b)
    befores, afters = [], []
    if n:
        cut = n * b
        xs = [x[:, :, :cut].reshape(bsz, heads, n, b, *x.shape[3:]) for x in (xk, xv, lr)]
        xs = [jnp.moveaxis(x, 2, 0) for x in xs]  # [n, B, H, b, ...]
        state, (bef, aft) = jax.lax.scan(step, state, xs)
        befores.append(jnp.moveaxis(bef, 0, 2).reshape(bsz, heads, cut))
        afters.append(jnp.moveaxis(aft, 0, 2).reshape(bsz, heads, cut))
    if rem:
        state, (bef, aft) = step(state, (xk[:, :, n * b:], xv[:, :, n * b:], lr[:, :, n * b:]))
        befores.append(bef)
        afters.append(aft)
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=2)  # noqa: E731
    return {"w0": w0, "before": cat(befores), "after": cat(afters)}, state


def layer_inputs(model, params, tokens) -> list[tuple[tuple[str, ...], tuple]]:
    """``[(path, (xq, xk, xv, lr))]`` for every TTT layer of ``model`` on ``tokens``, in call
    order; ``path`` locates the layer's params in ``params``. Works for any model built from
    ``TTTLayer`` (each layer sows its inner-loop inputs when ``intermediates`` is mutable)."""
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get("intermediates", {})))
    return [(key[:-1], value[0]) for key, value in flat.items() if key[-1] == SOWN]


def _layer_params(params, path: tuple[str, ...]):
    for name in path:
        params = params[name]
    return params


def model_inner_losses(model, params, tokens) -> list[dict[str, jax.Array]]:
    """Per TTT layer of ``model``, ``{"w0", "before", "after"} -> [L]``: each token's loss
    averaged over batch and heads. ``tokens`` are the model's inputs starting at position 0."""
    found = layer_inputs(model, params, tokens)
    if not found:
        raise ValueError(f"{type(model).__name__} has no TTT layers: inner-loss diagnostics "
                         f"need at least one")
    out = []
    for path, (xq, xk, xv, lr) in found:
        p = _layer_params(params, path)
        depth = sum(1 for name in p if name.startswith("W"))
        inner_params = tuple((p[f"W{j + 1}"], p[f"b{j + 1}"]) for j in range(depth))
        losses, _ = inner_losses(inner_params, xq, xk, xv, lr, p["learnable_token_idx"],
                                 p["ttt_norm_weight"], p["ttt_norm_bias"])
        out.append({k: jnp.mean(v, axis=(0, 1)) for k, v in losses.items()})
    return out


def jitted_mean_inner_losses(model) -> Callable:
    """``f(params, tokens) -> [{"w0", "before", "after"} -> float]`` per TTT layer: the inner
    loss averaged over every token (what training logs every ``train.diagnostics_every`` steps);
    compiled once per call of this function."""
    curves_fn = jax.jit(lambda p, t: model_inner_losses(model, p, t))

    def mean_losses(params, tokens):
        curves = jax.device_get(curves_fn(params, jnp.asarray(tokens)))
        return [{k: float(np.mean(c[k])) for k in KINDS} for c in curves]

    return mean_losses


def binned(curves: list[dict[str, Any]], width: int) -> dict[str, Any]:
    """Averages per-position curves over bins of ``width`` tokens, for JSON and plots.

    Returns ``{"bin_start": [...], "bin_end": [...], "layers": [{kind: [...]}]}``.
    """
    length = int(np.asarray(curves[0]["w0"]).shape[0])
    starts = list(range(0, length, width))
    ends = [min(s + width, length) for s in starts]
    layers = [{k: [float(np.mean(np.asarray(c[k])[s:e])) for s, e in zip(starts, ends)]
               for k in KINDS} for c in curves]
    return {"bin_start": starts, "bin_end": ends, "layers": layers}
