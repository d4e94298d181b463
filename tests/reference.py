"""An independent, naive float64 numpy reference of the whole TTT layer in the primal form.

Written from docs/architecture.md §1 only (no ttt_jax code is called or copied), slow and explicit on
purpose: Python loops over batch rows, heads and tokens, every inner gradient derived by hand
(textbook LayerNorm backward, hand-derived tanh-GELU derivative). Tests compare the library
against this; ``test_ttt_correctness.py`` checks the hand gradients with finite differences.

Shapes: ``B`` batch, ``L`` sequence, ``d`` width, ``H`` heads, ``f`` head dim, ``b`` mini-batch
size, ``F`` inner-MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# docs/architecture.md §1.5 / §1.8: eps of the per-head inner LayerNorm and of post_norm.
LN_EPS = 1e-6
# Smallest norm divided by in the Q/K L2 normalisation.
L2_EPS = 1e-12
# tanh-GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


# ----------------------------------------------------------------------------- small pieces


def to_f64(tree):
    """Converts every leaf of a nested dict of arrays to a float64 numpy array."""
    if isinstance(tree, Mapping):
        return {k: to_f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x ** 3)))


def gelu_tanh_derivative(x):
    """d/dx of 0.5 x (1 + tanh(u)), u = c (x + a x^3):
    0.5 (1 + tanh u) + 0.5 x (1 - tanh(u)^2) c (1 + 3 a x^2)."""
    u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x ** 3)
    t = np.tanh(u)
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x ** 2)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t ** 2) * du


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def layer_norm(z, weight, bias, eps=LN_EPS):
    """LayerNorm over the last axis with biased variance."""
    mu = z.mean(axis=-1, keepdims=True)
    var = ((z - mu) ** 2).mean(axis=-1, keepdims=True)
    return weight * (z - mu) / np.sqrt(var + eps) + bias


def layer_norm_backward(z, dy, weight, eps=LN_EPS):
    """Textbook LayerNorm backward for one vector ``z`` [f] given ``dy = dLoss/dLN(z)``.

    x_hat = (z - mu) / s, s = sqrt(var + eps), y = w x_hat + bias; with g = dy * w,
    dz = (g - mean(g) - x_hat * mean(g * x_hat)) / s.
    """
    n = z.shape[-1]
    mu = z.sum() / n
    s = np.sqrt(((z - mu) ** 2).sum() / n + eps)
    x_hat = (z - mu) / s
    g = dy * weight
    return (g - g.sum() / n - x_hat * (g * x_hat).sum() / n) / s


# ----------------------------------------------------------------------------- inner model


def inner_forward(state, k):
    """The inner model before its LayerNorm, for one row ``k`` [f].

    Args:
      state: list of ``(W [f_in, f_out], b [1, f_out])``; one pair (linear) or two (mlp).
      k: ``[f]``.

    Returns:
      ``(inputs, pre)``: the input and pre-activation of every layer; ``pre[-1]`` is f_pre(k).
    """
    inputs, pre = [k], []
    for idx, (w, b) in enumerate(state):
        z = inputs[-1] @ w + b[0]
        pre.append(z)
        if idx + 1 < len(state):
            inputs.append(gelu_tanh(z))
    return inputs, pre


def inner_loss(state, k, v, ln_w, ln_b):
    """``0.5 || LN(f_pre(k)) - (v - k) ||^2`` for one token (docs/architecture.md §1.5)."""
    _, pre = inner_forward(state, k)
    r = layer_norm(pre[-1], ln_w, ln_b) - (v - k)
    return 0.5 * float((r ** 2).sum())


def inner_grads(state, k, v, ln_w, ln_b):
    """Hand-derived gradient of ``inner_loss`` w.r.t. every ``W`` and ``b`` of ``state``.

    Returns:
      list of ``(dW [f_in, f_out], db [1, f_out])`` aligned with ``state``.
    """
    inputs, pre = inner_forward(state, k)
    dy = layer_norm(pre[-1], ln_w, ln_b) - (v - k)  # dLoss / dLN
    dz = layer_norm_backward(pre[-1], dy, ln_w)  # dLoss / d(last pre-activation)
    out = [None] * len(state)
    for idx in range(len(state) - 1, -1, -1):
        out[idx] = (np.outer(inputs[idx], dz), dz[None, :].copy())
        if idx > 0:
            da = dz @ state[idx][0].T  # dLoss / d(gelu output of the previous layer)
            dz = da * gelu_tanh_derivative(pre[idx - 1])
    return out


def inner_loop(params, xq, xk, xv, lr, token_idx, ln_w, ln_b):
    """The TTT inner loop in the primal form, explicit loops over rows, heads and tokens.

    Inside a mini-batch starting from ``W0`` every gradient is taken at ``W0``; token ``i``
    reads out with ``W_i = W0 - sum_{j<=i} tok[i] lr[j] grad_j(W0)``; the next mini-batch
    starts from ``W_{last}``. A final partial mini-batch is a shorter mini-batch.

    Args:
      params: list of ``(W [H, f_in, f_out], b [H, 1, f_out])``, the initial state per head.
      xq, xk, xv: ``[B, H, L, f]``.
      lr: ``[B, H, L]`` per-token learning rates.
      token_idx: ``[b]`` learnable_token_idx; its length is the mini-batch size.
      ln_w, ln_b: ``[H, f]`` the inner LayerNorm.

    Returns:
      ``(out [B, H, L, f], final_state)``, ``final_state`` a list of ``(W [B, H, ...], b)``
      after the last (possibly partial) mini-batch.
    """
    xq, xk, xv, lr = (np.asarray(a, np.float64) for a in (xq, xk, xv, lr))
    token_idx = np.asarray(token_idx, np.float64)
    params = [(np.asarray(w, np.float64), np.asarray(b, np.float64)) for w, b in params]
    ln_w, ln_b = np.asarray(ln_w, np.float64), np.asarray(ln_b, np.float64)
    bsz, heads, length, f = xq.shape
    mb = token_idx.shape[0]
    tok = [max(0.0, 1.0 / (i + 1) + token_idx[i]) for i in range(mb)]
    out = np.zeros((bsz, heads, length, f))
    final = [(np.zeros((bsz,) + w.shape), np.zeros((bsz,) + b.shape)) for w, b in params]
    for r in range(bsz):
        for h in range(heads):
            state = [(w[h].copy(), b[h].copy()) for w, b in params]
            for start in range(0, length, mb):
                stop = min(start + mb, length)
                grads = [inner_grads(state, xk[r, h, j], xv[r, h, j], ln_w[h], ln_b[h])
                         for j in range(start, stop)]
                state_i = state
                for i in range(stop - start):
                    state_i = []
                    for layer, (w0, b0) in enumerate(state):
                        dw = sum(lr[r, h, start + j] * grads[j][layer][0] for j in range(i + 1))
                        db = sum(lr[r, h, start + j] * grads[j][layer][1] for j in range(i + 1))
                        state_i.append((w0 - tok[i] * dw, b0 - tok[i] * db))
                    _, pre = inner_forward(state_i, xq[r, h, start + i])
                    out[r, h, start + i] = xq[r, h, start + i] + layer_norm(pre[-1], ln_w[h],
                                                                            ln_b[h])
                state = state_i  # W of the mini-batch's last token
            for layer, (w, b) in enumerate(state):
                final[layer][0][r, h] = w
                final[layer][1][r, h] = b
    return out, final


# ----------------------------------------------------------------------------- layer pieces


def causal_depthwise_conv(x, kernel, bias):
    """``y[t] = sum_i kernel[i] x[t - K + 1 + i] + bias``, zeros before the start.

    Args: x ``[B, L, C]``, kernel ``[K, C]`` (last tap = current token), bias ``[C]``.
    """
    bsz, length, chans = x.shape
    ksize = kernel.shape[0]
    y = np.zeros_like(x)
    for t in range(length):
        acc = bias.copy()
        for i in range(ksize):
            src = t - ksize + 1 + i
            if src >= 0:
                acc = acc + kernel[i] * x[:, src]
        y[:, t] = acc
    return y


def l2_normalize(x):
    norm = np.sqrt((x ** 2).sum(axis=-1, keepdims=True))
    return x / np.maximum(norm, L2_EPS)


def rope(x, positions, mini_batch_size, theta, layout):
    """Bounded RoPE: rotates pairs of ``x [B, H, L, f]`` by ``(p % b) * theta**(-2k/f)``.

    ``interleaved`` pairs ``(2k, 2k+1)``, ``half`` pairs ``(k, k + f/2)``;
    ``(a, b) -> (a cos - b sin, a sin + b cos)``.
    """
    f = x.shape[-1]
    p = (np.asarray(positions) % mini_batch_size).astype(np.float64)  # [B, L]
    y = x.copy()
    for k in range(f // 2):
        if layout == "interleaved":
            i, j = 2 * k, 2 * k + 1
        elif layout == "half":
            i, j = k, k + f // 2
        else:
            raise ValueError(layout)
        angle = p * theta ** (-2.0 * k / f)  # [B, L]
        c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # [B, 1, L]
        a, b = x[..., i], x[..., j]
        y[..., i] = a * c - b * s
        y[..., j] = a * s + b * c
    return y


def split_heads(x, heads):
    bsz, length, d = x.shape
    return x.reshape(bsz, length, heads, d // heads).transpose(0, 2, 1, 3)  # [B, H, L, f]


def inner_params(p, cfg):
    """The initial inner state ``[(W1, b1)]`` or ``[(W1, b1), (W2, b2)]`` from the params."""
    n_layers = 1 if cfg.ttt_layer_type == "linear" else 2
    return [(p[f"W{i + 1}"], p[f"b{i + 1}"]) for i in range(n_layers)]


def layer_inputs(params, cfg, x, position_ids=None, ttt_base_lr=None):
    """Projections, optional L2 norm and RoPE, learning rates (docs/architecture.md §1.1-1.4).

    Args:
      params: the TTTLayer params dict (``variables['params']``), any array type.
      cfg: the TTTConfig.
      x: ``[B, L, d]``.
      position_ids: ``[B, L]`` (default ``arange(L)``), only used with RoPE.
      ttt_base_lr: overrides ``cfg.ttt_base_lr`` (tests use 0 to switch the inner update off).

    Returns:
      ``(xq, xk, xv, lr)``: ``[B, H, L, f]`` each and ``lr [B, H, L]``, float64.
    """
    p = to_f64(params)
    x = np.asarray(x, np.float64)
    bsz, length, d = x.shape
    heads, f = cfg.num_heads, d // cfg.num_heads
    q = x @ p["q_proj"]["kernel"]
    if cfg.share_qk:
        k = causal_depthwise_conv(q, p["conv_k"]["kernel"], p["conv_k"]["bias"])
        q = causal_depthwise_conv(q, p["conv_q"]["kernel"], p["conv_q"]["bias"])
    else:
        k = x @ p["k_proj"]["kernel"]
    v = x @ p["v_proj"]["kernel"]
    xq, xk, xv = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if cfg.qk_l2_norm:
        xq, xk = l2_normalize(xq), l2_normalize(xk)
    if cfg.use_rope:
        pos = (np.broadcast_to(np.arange(length), (bsz, length)) if position_ids is None
               else np.broadcast_to(np.asarray(position_ids), (bsz, length)))
        xq = rope(xq, pos, cfg.mini_batch_size, cfg.rope_theta, cfg.rope_layout)
        xk = rope(xk, pos, cfg.mini_batch_size, cfg.rope_theta, cfg.rope_layout)
    base_lr = cfg.ttt_base_lr if ttt_base_lr is None else ttt_base_lr
    lr = np.zeros((bsz, heads, length))
    for h in range(heads):
        logits = x @ p["learnable_ttt_lr_weight"][h] + p["learnable_ttt_lr_bias"][h]  # [B, L]
        lr[:, h] = base_lr * sigmoid(logits) / f
    return xq, xk, xv, lr


def layer_output(params, cfg, ttt_out, x):
    """Merge heads -> post_norm -> optional gate -> o_proj (docs/architecture.md §1.8)."""
    p = to_f64(params)
    x = np.asarray(x, np.float64)
    bsz, heads, length, f = ttt_out.shape
    out = ttt_out.transpose(0, 2, 1, 3).reshape(bsz, length, heads * f)  # [B, L, d]
    out = layer_norm(out, p["post_norm"]["scale"], p["post_norm"]["bias"])
    if cfg.use_gate:
        out = gelu_tanh(x @ p["g_proj"]["kernel"]) * out
    return out @ p["o_proj"]["kernel"]


def ttt_layer(params, cfg, x, position_ids=None, ttt_base_lr=None):
    """The whole TTT layer ``[B, L, d] -> [B, L, d]`` in float64, primal form.

    Args:
      params: ``variables['params']`` of a ``TTTLayer``.
      cfg: its TTTConfig.
      x: ``[B, L, d]``.
      position_ids: optional ``[B, L]``.
      ttt_base_lr: overrides ``cfg.ttt_base_lr`` (0 disables the inner update).
    """
    p = to_f64(params)
    xq, xk, xv, lr = layer_inputs(p, cfg, x, position_ids, ttt_base_lr)
    out, _ = inner_loop(inner_params(p, cfg), xq, xk, xv, lr, p["learnable_token_idx"],
                        p["ttt_norm_weight"], p["ttt_norm_bias"])
    return layer_output(p, cfg, out, x)
