"""TTT inner-loop diagnostics: the self-supervised loss of every token, computed three ways.

For token ``t`` of mini-batch ``m`` and an inner state ``S`` the loss is the one the inner loop
descends (DESIGN §1.5): ``0.5 * || LN(f(XK_t; S)) - (XV_t - XK_t) ||^2``. It is evaluated with

* ``w0``: the initial weights ``W0`` (the layer's learned initial state, never updated);
* ``before``: the state at the start of mini-batch ``m`` (before its gradient step);
* ``after``: the state after mini-batch ``m``'s update.

Healthy test-time learning shows ``w0 > before > after``, with ``before`` falling along the
sequence (the paper's figure of the inner loss over positions). The per-layer inputs come from
running the model with ``capture_intermediates`` and the layer's own ``ttt_inputs``; nothing in
the model changes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.config import ModelConfig
from ttt_jax.math import inner
from ttt_jax.math.inner import mm
from ttt_jax.math.layernorm import layer_norm
from ttt_jax.math.ttt import token_weights

KINDS = ("w0", "before", "after")


def reconstruction_loss(state, xk, xv, ln_weight, ln_bias):
    """``0.5 * ||LN(f(xk; state)) - (xv - xk)||^2`` per token: ``[B, H, T]`` for ``[B, H, T, f]``.

    ``ln_weight``/``ln_bias`` are ``[H, 1, f]``; ``state`` holds ``[B, H, ...]`` weights.
    """
    return inner.loss(state, xk, xv, ln_weight, ln_bias)


def _update(state, xk, xv, lr, tok, ln_weight, ln_bias):
    """The state after one mini-batch (DESIGN §1.6): ``W' = W - (eta_last^T * XK)^T G``."""
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


def layer_inputs(model_cfg: ModelConfig, params, tokens):
    """``[(xq, xk, xv, lr)]`` per layer of a TTT-LM on ``tokens [B, L]`` (positions from 0)."""
    from ttt_jax.models.ttt_lm import TTTLM
    from ttt_jax.nn.ttt_layer import TTTLayer

    _, state = TTTLM(model_cfg).apply(
        {"params": params}, tokens, capture_intermediates=lambda mdl, _: mdl.name == "seq_norm",
        mutable=["intermediates"])
    found = state["intermediates"]
    layer = TTTLayer(model_cfg.ttt, jnp.dtype(model_cfg.dtype))
    out = []
    for i in range(model_cfg.num_layers):
        h = found[f"layers_{i}"]["seq_norm"]["__call__"][0]
        out.append(layer.apply({"params": params[f"layers_{i}"]["seq_modeling_block"]}, h,
                               method="ttt_inputs"))
    return out


def model_inner_losses(model_cfg: ModelConfig, params, tokens) -> list[dict[str, jax.Array]]:
    """Per layer, ``{"w0", "before", "after"} -> [L]``: each token's loss averaged over batch and
    heads. ``tokens`` are ``[B, L]`` inputs starting at position 0."""
    if model_cfg.seq_modeling != "ttt":
        raise ValueError(f"model.seq_modeling={model_cfg.seq_modeling!r} has no TTT layers: "
                         f"inner-loss diagnostics need 'ttt'")
    out = []
    for i, (xq, xk, xv, lr) in enumerate(layer_inputs(model_cfg, params, tokens)):
        p = params[f"layers_{i}"]["seq_modeling_block"]
        widths = len(model_cfg.ttt.inner_widths) - 1
        inner_params = tuple((p[f"W{j + 1}"], p[f"b{j + 1}"]) for j in range(widths))
        losses, _ = inner_losses(inner_params, xq, xk, xv, lr, p["learnable_token_idx"],
                                 p["ttt_norm_weight"], p["ttt_norm_bias"])
        out.append({k: jnp.mean(v, axis=(0, 1)) for k, v in losses.items()})
    return out


@functools.lru_cache(maxsize=4)
def _jitted_inner_losses(model_cfg: ModelConfig):
    return jax.jit(lambda p, t: model_inner_losses(model_cfg, p, t))


def mean_inner_losses(model_cfg: ModelConfig, params, tokens) -> list[dict[str, float]]:
    """Per layer, ``{"w0", "before", "after"}``: the inner loss averaged over every token of
    ``tokens [B, L]`` (what training logs every ``train.diagnostics_every`` steps)."""
    curves = jax.device_get(_jitted_inner_losses(model_cfg)(params, jnp.asarray(tokens)))
    return [{k: float(np.mean(c[k])) for k in KINDS} for c in curves]


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
