"""One mini-batch of the dual form, forward and derivative (docs/architecture.md §1.6).

``dual_step`` advances the inner state over one mini-batch of ``b`` tokens and returns the
pre-LN outputs, every gradient taken at the mini-batch's start state; ``dual_outputs`` is its
output half (shared with streaming, ``ttt_stream.py``). ``_dual_step_bwd`` is ``dual_step``'s
derivative written by hand: the scan of ``ttt_scan.py`` runs it from the last mini-batch to
the first. Inputs are per head: ``[B, H, b, f]`` and ``lr: [B, H, b]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ttt_jax.math import inner
from ttt_jax.math.inner import InnerState, mm
from ttt_jax.math.layernorm import layer_norm_l2_grad


def _swap(x: Array) -> Array:
    return jnp.swapaxes(x, -1, -2)


def dual_outputs(state: InnerState, acts, gs, xq, lr, tok, acc=None, first=None):
    """Pre-LN outputs of one mini-batch frame in the dual form.

    Token ``i`` reads the weights ``state - tok[i] * (acc + sum_{j<=i} lr_j grad_j)``, every
    gradient taken at ``state`` (``acts, gs`` from ``inner.loss_grads`` on the frame's keys).

    Args:
      state: ``[B, H, ...]`` weights; acts, gs: per layer ``[B, H, b, .]``.
      xq: ``[B, H, b, f]``; lr: ``[B, H, b]``; tok: ``[b]``.
      acc: ``[B, H, ...]`` gradients accumulated before the frame, or None (none).
      first: ``xq @ W_0`` when already computed (without the bias), or None.

    Returns:
      ``z_bar: [B, H, b, f]``.
    """
    eta = jnp.tril(tok[:, None] * lr[..., None, :])  # [B, H, b, b]
    xbar = xq
    for i, ((w, bias), a, g) in enumerate(zip(state, acts, gs)):
        m = eta * (mm(xbar, _swap(a)) + 1.0)  # M_i = tril(eta * (xbar_i a_i^T + 1))
        z_bar = (mm(xbar, w) if i or first is None else first) + bias  # [B, H, b, f_out]
        if acc is not None:
            aw, ab = acc[i]
            z_bar = z_bar - tok[:, None] * (mm(xbar, aw) + ab)
        z_bar = z_bar - mm(m, g)
        if i + 1 < len(state):
            xbar = inner.gelu_tanh(z_bar)
    return z_bar


def dual_step(state: InnerState, xq, xk, xv, lr, tok, ln_weight, ln_bias):
    """One mini-batch in the dual form: ``dual_delta`` with its update applied."""
    delta, z_bar = dual_delta(state, xq, xk, xv, lr, tok, ln_weight, ln_bias)
    return inner.apply_update(state, delta), z_bar


def dual_delta(state: InnerState, xq, xk, xv, lr, tok, ln_weight, ln_bias):
    """One mini-batch in the dual form, its update returned rather than applied.

    Args:
      state: inner weights at the mini-batch start, ``W: [B, H, f_in, f_out]``,
        ``bias: [B, H, 1, f_out]``.
      xq, xk, xv: ``[B, H, b, f]``.
      lr: ``[B, H, b]`` per-token learning rates.
      tok: ``[b]`` token weights; ``eta[i, j] = tok[i] * lr[j]``.
      ln_weight, ln_bias: ``[H, 1, f]``.

    Returns:
      ``(delta, z_bar)``: the update, ``state' = state - delta`` after the mini-batch
      (``inner.weighted_grad_sums`` with ``tok[-1] * lr``), and the pre-LN outputs
      ``[B, H, b, f]``. The scan of ``ttt_scan.py`` applies ``delta`` at the start of the next
      step: subtracted here, it would overwrite the weights while the queries still read them,
      and XLA would copy the weights at every step to keep both.

    With more than one inner layer (TTT-MLP) the keys and the queries go through the first
    layer's start weights in one ``[2b, f]`` product: on the CPU that step runs about 1.2-1.4x
    faster; for TTT-Linear the same merge measured slower (benchmarks/README.md).
    """
    first_k = first_q = None
    if len(state) > 1:  # keys and queries through the first layer in one product
        b = xk.shape[-2]
        both = mm(jnp.concatenate([xk, xq], axis=-2), state[0][0])
        first_k, first_q = both[..., :b, :], both[..., b:, :]
    acts, _, gs = inner.loss_grads(state, xk, xv, ln_weight, ln_bias, first=first_k)
    z_bar = dual_outputs(state, acts, gs, xq, lr, tok, first=first_q)
    return inner.weighted_grad_sums(acts, gs, tok[-1] * lr), z_bar


def _keys(state: InnerState, xk, xv, ln_weight, ln_bias):
    """``inner.loss_grads`` keeping ``backs[i] = G_i W_i^T`` (``G_{i-1}`` before ``gelu'``).

    Returns ``(acts, zs, gs, backs)``; ``backs[0]`` is None (docs/architecture.md §1.5).
    """
    acts, zs = inner.forward(state, xk)
    gs = [layer_norm_l2_grad(zs[-1], xv - xk, ln_weight, ln_bias)]
    backs = [None] * len(state)
    for i in range(len(state) - 1, 0, -1):
        backs[i] = mm(gs[0], _swap(state[i][0]))
        gs.insert(0, backs[i] * inner.gelu_tanh_grad(zs[i - 1]))
    return acts, zs, gs, backs


def _dual_step_bwd(res, cts, keys=None):
    """The derivative of ``dual_step``: ``_dual_step_bwd_parts`` with the carried state's
    cotangent added to the step's own."""
    own, *rest = _dual_step_bwd_parts(res, cts, keys)
    return (inner.accumulate(cts[0], own), *rest)


def _dual_step_bwd_parts(res, cts, keys=None):
    """The derivative of ``dual_step`` by hand (docs/architecture.md §1.6).

    Only the step's inputs are kept; the keys' forward, the inner gradients and the queries'
    path are recomputed here (a few matmuls), then every product of §1.6 is transposed once.
    Elementwise pieces (the closed-form LayerNorm gradient, ``gelu_tanh'``) are differentiated
    by ``jax.vjp`` of their closed forms. ``keys``: ``_keys`` at the step's state when already
    computed (recomputed otherwise).

    Returns the step's own part of the start state's cotangent (the carried one ``cts[0]``
    left out: the start state's is their sum), then the cotangents of ``xq, xk, xv - xk, lr,
    tok`` and of the LayerNorm's weight and bias.
    """
    state, xq, xk, xv, lr, tok, ln_weight, ln_bias = res
    d_next, dzb = cts
    nl = len(state)
    ws = [w for w, _ in state]
    e = tok[-1] * lr  # [B, H, b]: the update's per-token weights
    # Keys through the layers and the inner gradients at the start state (§1.5).
    acts, zs, gs, backs = keys if keys is not None else _keys(state, xk, xv, ln_weight, ln_bias)
    _, ln_vjp = jax.vjp(layer_norm_l2_grad, zs[-1], xv - xk, ln_weight, ln_bias)
    gps = [inner.gelu_tanh_grad(z) for z in zs[:-1]] + [None]
    # Queries through the updated layers (only what the derivative reads).
    eta = jnp.tril(tok[:, None] * lr[..., None, :])  # [B, H, b, b]
    xbars, sims, ms, zbs = [xq], [], [], []
    for i in range(nl):
        sims.append(mm(xbars[i], _swap(acts[i])))
        ms.append(eta * (sims[i] + 1.0))  # M_i = tril(eta * (xbar_i a_i^T + 1))
        if i + 1 < nl:
            zbs.append(mm(xbars[i], ws[i]) + state[i][1] - mm(ms[i], gs[i]))
            xbars.append(inner.gelu_tanh(zbs[i]))

    # The update W' = W - A^T (e * G), bias' = bias - e G.
    dgs, das = [None] * nl, [None] * nl
    de = 0.0
    for i, (dw_next, db_next) in enumerate(d_next):
        adw = mm(acts[i], dw_next) + db_next  # [B, H, b, f_out]
        dgs[i] = -e[..., None] * adw
        de = de - jnp.sum(adw * gs[i], axis=-1)
        das[i] = -mm(e[..., None] * gs[i], _swap(dw_next))
    # The step's own cotangents of W_i and bias_i: queries, chain and keys terms.
    dws, dbs = [None] * nl, [None] * nl
    plus = lambda a, b: b if a is None else a + b  # noqa: E731
    # The queries' path, last layer first: zb_i = xbar_i W_i + bias_i - M_i G_i.
    dtok = jnp.zeros_like(tok)
    dlr = de * tok[-1]
    dtok = dtok.at[-1].add(jnp.sum(de * lr))
    dz = dzb
    for i in range(nl - 1, -1, -1):
        dws[i] = plus(dws[i], inner.mm_tn(xbars[i], dz))
        dbs[i] = plus(dbs[i], jnp.sum(dz, axis=-2, keepdims=True))
        dm = -mm(dz, _swap(gs[i]))  # [B, H, b, b]
        dgs[i] = dgs[i] - inner.mm_tn(ms[i], dz)
        dxbar = mm(dz, _swap(ws[i]))
        # M_i = tril(tok lr^T) * (xbar_i a_i^T + 1)
        deta = jnp.tril(dm * (sims[i] + 1.0))
        dtok = dtok + jnp.sum(deta * lr[..., None, :], axis=(0, 1, 3))
        dlr = dlr + jnp.sum(deta * tok[:, None], axis=-2)
        ds = dm * eta
        dxbar = dxbar + mm(ds, acts[i])
        das[i] = das[i] + inner.mm_tn(ds, xbars[i])
        if i == 0:
            dxq = dxbar
        else:
            dz = dxbar * inner.gelu_tanh_grad(zbs[i - 1])
    # The inner gradients' chain G_{i-1} = (G_i W_i^T) * gelu'(Z_{i-1}), first link first.
    dzs = [None] * nl
    for i in range(1, nl):
        dback = dgs[i - 1] * gps[i - 1]
        dgs[i] = dgs[i] + mm(dback, ws[i])
        dws[i] = plus(dws[i], inner.mm_tn(dback, gs[i]))
        _, gpp_vjp = jax.vjp(inner.gelu_tanh_grad, zs[i - 1])
        dzs[i - 1] = gpp_vjp(dgs[i - 1] * backs[i])[0]
    dzs[-1], dtarget, dlnw, dlnb = ln_vjp(dgs[-1])
    # The keys' forward, last layer first: Z_i = a_i W_i + bias_i, a_{i+1} = gelu(Z_i).
    dxk = -dtarget
    for i in range(nl - 1, -1, -1):
        dws[i] = plus(dws[i], inner.mm_tn(acts[i], dzs[i]))
        dbs[i] = plus(dbs[i], jnp.sum(dzs[i], axis=-2, keepdims=True))
        da = das[i] + mm(dzs[i], _swap(ws[i]))
        if i:
            dzs[i - 1] = dzs[i - 1] + da * gps[i - 1]
        else:
            dxk = dxk + da
    dstate = tuple(zip(dws, dbs))
    return dstate, dxq, dxk, dtarget, dlr, dtok, dlnw, dlnb
