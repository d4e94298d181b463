"""The TTT inner loop over a sequence: dual form per mini-batch, scanned (docs/architecture.md §1.6-1.7).

Inputs are per head and already projected: ``xq, xk, xv: [B, H, L, f]`` float32 and the
per-token learning rates ``lr: [B, H, L]``. Every mini-batch of ``b`` tokens starts from the
state carried by the previous one; every gradient inside it is taken at that state.

Two implementations of the same function:

* ``ttt_dual`` (``[B, H, L, f]``) and ``ttt_dual_tokens`` (token-major ``[B, L, H, f]``, the
  layer's): the dual form, a ``lax.scan`` over mini-batches, a few matmuls per step, with an
  exact shorter final mini-batch when ``L % b != 0``. By default the scan (``scan_tokens``)
  reads each mini-batch from the token-major inputs and writes its outputs in place, and is
  differentiated by hand (``_dual_step_bwd``): the backward pass keeps the carried state only
  every k-th mini-batch (1 by default) and recomputes the rest. ``hand_vjp=False`` is the same
  function differentiated by autodiff under ``jax.checkpoint`` (the reference for the tests).
* ``ttt_primal``: the definition, a ``lax.scan`` over tokens that accumulates per-token
  gradients taken at the mini-batch's starting state. Slow; a baseline for benchmarks and the
  basis of streaming decode.

Streaming (chunks that start and end anywhere inside a mini-batch) is in ``ttt_stream.py``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ttt_jax.math import inner
from ttt_jax.math.inner import InnerState, mm
from ttt_jax.math.layernorm import layer_norm, layer_norm_l2_grad, layer_norm_lean


def token_weights(learnable_token_idx: Float[Array, "b"]) -> Float[Array, "b"]:
    """``tok[i] = max(0, 1/(i+1) + learnable_token_idx[i])`` (docs/architecture.md §1.4)."""
    b = learnable_token_idx.shape[-1]
    base = 1.0 / jnp.arange(1, b + 1, dtype=jnp.float32)
    return jnp.maximum(0.0, base + learnable_token_idx.astype(jnp.float32))


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
    """One mini-batch in the dual form.

    Args:
      state: inner weights at the mini-batch start, ``W: [B, H, f_in, f_out]``,
        ``bias: [B, H, 1, f_out]``.
      xq, xk, xv: ``[B, H, b, f]``.
      lr: ``[B, H, b]`` per-token learning rates.
      tok: ``[b]`` token weights; ``eta[i, j] = tok[i] * lr[j]``.
      ln_weight, ln_bias: ``[H, 1, f]``.

    Returns:
      ``(state', z_bar)``: the state after the mini-batch and the pre-LN outputs ``[B, H, b, f]``.

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
    return inner.step(state, acts, gs, tok[-1] * lr), z_bar


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
    """The derivative of ``dual_step`` by hand (docs/architecture.md §1.6).

    Only the step's inputs are kept; the keys' forward, the inner gradients and the queries'
    path are recomputed here (a few matmuls), then every product of §1.6 is transposed once.
    Elementwise pieces (the closed-form LayerNorm gradient, ``gelu_tanh'``) are differentiated
    by ``jax.vjp`` of their closed forms. ``keys``: ``_keys`` at the step's state when already
    computed (recomputed otherwise).
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
    dws = [dw for dw, _ in d_next]
    dbs = [db for _, db in d_next]
    dgs, das = [None] * nl, [None] * nl
    de = 0.0
    for i in range(nl):
        adw = mm(acts[i], dws[i]) + dbs[i]  # [B, H, b, f_out]
        dgs[i] = -e[..., None] * adw
        de = de - jnp.sum(adw * gs[i], axis=-1)
        das[i] = -mm(e[..., None] * gs[i], _swap(dws[i]))
    # The queries' path, last layer first: zb_i = xbar_i W_i + bias_i - M_i G_i.
    dtok = jnp.zeros_like(tok)
    dlr = de * tok[-1]
    dtok = dtok.at[-1].add(jnp.sum(de * lr))
    dz = dzb
    for i in range(nl - 1, -1, -1):
        dws[i] = dws[i] + inner.mm_tn(xbars[i], dz)
        dbs[i] = dbs[i] + jnp.sum(dz, axis=-2, keepdims=True)
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
        dws[i] = dws[i] + inner.mm_tn(dback, gs[i])
        _, gpp_vjp = jax.vjp(inner.gelu_tanh_grad, zs[i - 1])
        dzs[i - 1] = gpp_vjp(dgs[i - 1] * backs[i])[0]
    dzs[-1], dtarget, dlnw, dlnb = ln_vjp(dgs[-1])
    # The keys' forward, last layer first: Z_i = a_i W_i + bias_i, a_{i+1} = gelu(Z_i).
    dxk = -dtarget
    for i in range(nl - 1, -1, -1):
        dws[i] = dws[i] + inner.mm_tn(acts[i], dzs[i])
        dbs[i] = dbs[i] + jnp.sum(dzs[i], axis=-2, keepdims=True)
        da = das[i] + mm(dzs[i], _swap(ws[i]))
        if i:
            dzs[i - 1] = dzs[i - 1] + da * gps[i - 1]
        else:
            dxk = dxk + da
    dstate = tuple(zip(dws, dbs))
    return dstate, dxq, dxk, dtarget, dlr, dtok, dlnw, dlnb


def _chunk(x, i):
    """Mini-batch ``i`` of a token-major ``[B, n, b, H, ...]`` array, as ``[B, H, b, ...]``."""
    return jnp.swapaxes(jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False), 1, 2)


def _put(buf, y, i):
    """Writes ``y: [B, H, b, ...]`` as mini-batch ``i`` of ``buf: [B, n, b, H, ...]`` (in place)."""
    return jax.lax.dynamic_update_index_in_dim(buf, jnp.swapaxes(y, 1, 2), i, axis=1)


def _groups(n: int, group: int) -> list[tuple[int, int, int]]:
    """``(first, count, size)``: ``count`` groups of ``size`` mini-batches from ``first``."""
    head = n - n % group
    out = [(0, head // group, group)] if head else []
    if n % group:
        out.append((head, 1, n % group))
    return out


def auto_lanes(heads: int, head_dim: int) -> int:
    """How many independent lanes of heads the scan runs side by side (``scan_tokens``).

    2 on the CPU when the heads split evenly and are at least 32 wide, else 1. On the CPU each
    step's small batched products cost more in thread hand-offs than they gain from splitting
    one product over the cores; two independent chains of half the heads are scheduled on the
    cores side by side instead (benchmarks/README.md). Narrower heads are all overhead (twice
    the ops, and a longer compile); accelerators run the whole batch in each kernel.
    """
    cpu = jax.default_backend() == "cpu"
    return 2 if cpu and heads % 2 == 0 and head_dim >= 32 else 1


def _lane_slices(heads: int, lanes: int) -> list[slice]:
    if lanes < 1 or heads % lanes:
        raise ValueError(f"lanes: {lanes} must be >= 1 and divide the number of heads ({heads})")
    size = heads // lanes
    return [slice(k * size, (k + 1) * size) for k in range(lanes)]


def _split(tree, lanes):
    """``[B, H, ...]`` leaves (``[H, ...]`` with ``axis=0``) as one tree per lane of heads."""
    return tuple(jax.tree.map(lambda a, sl=sl: a[:, sl], tree) for sl in lanes)


def _merge(trees, axis=1):
    """The inverse of ``_split``: lanes concatenated along the heads axis."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=axis) if len(a) > 1 else a[0],
                        *trees)


def _frame(xs, i, sl):
    """Mini-batch ``i`` of every input, heads ``sl`` only: ``[B, h, b, ...]``."""
    return tuple(_chunk(x, i)[:, sl] for x in xs)


def _forward_step(lanes, tok, ln_weight, ln_bias, xs):
    """The scan step of the forward pass: every lane's ``dual_step``, outputs written in place."""
    def step(carry, i):
        states, z_bar = carry
        new, zs = [], []
        for sl, state in zip(lanes, states):
            state, z = dual_step(state, *_frame(xs, i, sl), tok, ln_weight[sl], ln_bias[sl])
            new.append(state)
            zs.append(z)
        return (tuple(new), _put(z_bar, _merge(zs), i)), None

    return step


def _scan_tokens_plain(state, xs, tok, ln_weight, ln_bias, group, lanes):
    """``n`` mini-batches in the dual form, read from and written to the token-major layout."""
    del group  # used by the derivative only
    lanes = _lane_slices(xs[0].shape[3], lanes)
    step = _forward_step(lanes, tok, ln_weight, ln_bias, xs)
    z_bar = jnp.zeros(xs[0].shape, xs[0].dtype)
    (states, z_bar), _ = jax.lax.scan(step, (_split(state, lanes), z_bar),
                                      jnp.arange(xs[0].shape[1]))
    return _merge(states), z_bar


def _scan_tokens_fwd(state, xs, tok, ln_weight, ln_bias, group, lanes):
    """The forward pass, keeping the start state of every ``group``-th mini-batch only."""
    lanes = _lane_slices(xs[0].shape[3], lanes)
    step = _forward_step(lanes, tok, ln_weight, ln_bias, xs)
    carry = (_split(state, lanes), jnp.zeros(xs[0].shape, xs[0].dtype))
    starts = []
    for first, count, size in _groups(xs[0].shape[1], group):
        def run_group(carry, k, first=first, size=size):
            end, _ = jax.lax.scan(step, carry, first + k * size + jnp.arange(size))
            return end, carry[0]

        carry, group_starts = jax.lax.scan(run_group, carry, jnp.arange(count))
        starts.append(group_starts)
    states, z_bar = carry
    return (_merge(states), z_bar), (starts, xs, tok, ln_weight, ln_bias)


def _scan_tokens_bwd(group, lanes, res, cts):
    """Groups last first: recompute the group's start states and inner gradients from the kept
    state, then run ``_dual_step_bwd`` from the group's last mini-batch to its first."""
    starts, xs, tok, ln_weight, ln_bias = res
    d_state, d_zbar = cts
    lanes = _lane_slices(xs[0].shape[3], lanes)

    def step_back(carry, inp):
        d_states, d_consts, d_xs = carry
        i, states, keys = inp
        new, frames, consts = [], [], []
        for sl, state, d_st, key in zip(lanes, states, d_states, keys):
            d_st, *d_frame, dt, dw, db = _dual_step_bwd(
                (state, *_frame(xs, i, sl), tok, ln_weight[sl], ln_bias[sl]),
                (d_st, _chunk(d_zbar, i)[:, sl]), key)
            new.append(d_st)
            frames.append(tuple(d_frame))
            consts.append((dt, dw, db))
        dt = sum(c[0] for c in consts)
        dw, db = (_merge([c[k] for c in consts], axis=0) for k in (1, 2))
        d_consts = tuple(c + d for c, d in zip(d_consts, (dt, dw, db)))
        d_xs = tuple(_put(buf, _merge(d), i) for buf, d in zip(d_xs, zip(*frames)))
        return (tuple(new), d_consts, d_xs), None

    def advance(states, i):  # a mini-batch's start state and its inner gradients, every lane
        new, keys = [], []
        for sl, state in zip(lanes, states):
            _, xk, xv, lr = _frame(xs, i, sl)
            key = _keys(state, xk, xv, ln_weight[sl], ln_bias[sl])
            acts, _, gs, _ = key
            new.append(inner.step(state, acts, gs, tok[-1] * lr))
            keys.append(key)
        return tuple(new), (states, tuple(keys))

    d_consts = (jnp.zeros_like(tok), jnp.zeros_like(ln_weight), jnp.zeros_like(ln_bias))
    carry = (_split(d_state, lanes), d_consts, tuple(jnp.zeros_like(x) for x in xs))
    for (first, _, size), group_starts in reversed(list(zip(_groups(xs[0].shape[1], group),
                                                            starts))):
        def group_back(carry, inp, first=first, size=size):
            k, start = inp
            idx = first + k * size + jnp.arange(size)
            _, (states, keys) = jax.lax.scan(advance, start, idx)
            carry, _ = jax.lax.scan(step_back, carry, (idx, states, keys), reverse=True)
            return carry, None

        count = jax.tree.leaves(group_starts)[0].shape[0]
        carry, _ = jax.lax.scan(group_back, carry, (jnp.arange(count), group_starts),
                                reverse=True)
    d_states, d_consts, d_xs = carry
    return (_merge(d_states), d_xs, *d_consts)


scan_tokens = jax.custom_vjp(_scan_tokens_plain, nondiff_argnums=(5, 6))
scan_tokens.defvjp(_scan_tokens_fwd, _scan_tokens_bwd)
scan_tokens.__doc__ = """``n`` mini-batches in the dual form, token-major, differentiated by hand.

``scan_tokens(state, xs, tok, ln_weight, ln_bias, group, lanes) -> (state, z_bar)`` with
``xs = (xq, xk, xv, lr)`` laid out ``[B, n, b, H, f]`` (``lr: [B, n, b, H]``: the projections'
own layout, a reshape of ``[B, L, H, f]``) and ``z_bar: [B, n, b, H, f]``. Each step reads its
mini-batch with a dynamic slice and writes its outputs in place, so no input or output is
ever transposed as a whole. The backward pass keeps the start state of every ``group``-th
mini-batch (the last group may be shorter), recomputes the others, and runs
``_dual_step_bwd`` from the last mini-batch to the first, writing the inputs' cotangents in
place the same way. ``lanes`` splits the heads into that many independent chains inside each
step (heads never interact, so the values are the same; see ``auto_lanes``).
"""


def _scan(step: Callable, carry, xs, group: int):
    """``lax.scan`` whose steps are rematerialised in the backward pass.

    Each step is wrapped in ``jax.checkpoint``: only its inputs and carried state are saved, and
    its internals are recomputed (cheaper on CPU than storing them, and far less memory). With
    ``group > 0`` only every ``group``-th carried state is saved as well, and each group of
    steps is recomputed from it.
    """
    step = jax.checkpoint(step, prevent_cse=False)
    n = jax.tree.leaves(xs)[0].shape[0]
    if group <= 1 or n <= 1:
        return jax.lax.scan(step, carry, xs)
    group = min(group, n)
    g = n // group
    head = jax.tree.map(lambda x: x[: g * group].reshape((g, group) + x.shape[1:]), xs)
    body = jax.checkpoint(lambda c, x: jax.lax.scan(step, c, x), prevent_cse=False)
    carry, ys = jax.lax.scan(body, carry, head)
    ys = jax.tree.map(lambda y: y.reshape((g * group,) + y.shape[2:]), ys)
    if n % group:
        tail = jax.tree.map(lambda x: x[g * group:], xs)
        carry, ys_tail = jax.lax.scan(step, carry, tail)
        ys = jax.tree.map(lambda y, y_tail: jnp.concatenate([y, y_tail]), ys, ys_tail)
    return carry, ys


def _dual_chunks(state, xs, tok, ln_weight, ln_bias, group, hand_vjp, lanes):
    """``n`` whole mini-batches, token-major ``[B, n, b, H, ...]`` in and ``z_bar`` out.

    ``hand_vjp``: ``scan_tokens``; otherwise the same steps differentiated by autodiff under
    ``jax.checkpoint`` (``_scan``), on inputs transposed to ``[n, B, H, b, ...]``.
    """
    if hand_vjp:
        n = xs[0].shape[1]
        return scan_tokens(state, xs, tok, ln_weight, ln_bias, min(max(group, 1), n), lanes)
    xs = tuple(jnp.moveaxis(jnp.swapaxes(x, 2, 3), 1, 0) for x in xs)  # [n, B, H, b, ...]

    def step(carry, x):
        return dual_step(carry, *x, tok, ln_weight, ln_bias)

    state, z_bar = _scan(step, state, xs, group)  # [n, B, H, b, f]
    return state, jnp.swapaxes(jnp.moveaxis(z_bar, 0, 1), 2, 3)


def ttt_dual_tokens(params: InnerState, xq: Float[Array, "B L H f"], xk: Float[Array, "B L H f"],
                    xv: Float[Array, "B L H f"], lr: Float[Array, "B L H"],
                    learnable_token_idx: Float[Array, "b"], ln_weight: Float[Array, "H f"],
                    ln_bias: Float[Array, "H f"], *, checkpoint_group: int = 0,
                    initial_state: InnerState | None = None, hand_vjp: bool = True,
                    lanes: int | None = None):
    """``ttt_dual`` on token-major inputs ``[B, L, H, f]`` (``lr: [B, L, H]``).

    The projections' own layout (``[B, L, d]`` split into heads by a reshape); ``out`` comes
    back ``[B, L, H, f]``. Returns ``(out, state)`` as ``ttt_dual``.
    """
    bsz, length, heads, f = xq.shape
    b = learnable_token_idx.shape[-1]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]  # [H, 1, f]
    state = initial_state if initial_state is not None else inner.init_state(params, bsz)
    lanes = auto_lanes(heads, f) if lanes is None else lanes
    n, r = divmod(length, b)
    parts = []
    if n:
        xs = tuple(x[:, :n * b].reshape(bsz, n, b, *x.shape[2:]) for x in (xq, xk, xv, lr))
        state, z_bar = _dual_chunks(state, xs, tok, lnw, lnb, checkpoint_group, hand_vjp,
                                    lanes)
        parts.append(z_bar.reshape(bsz, n * b, heads, f))
    if r:  # the final partial mini-batch is a shorter mini-batch, no padding (docs/architecture.md §1.7)
        xs = tuple(x[:, n * b:, None] for x in (xq, xk, xv, lr))  # [B, 1, r, ...]
        xs = tuple(jnp.moveaxis(x, 2, 1) for x in xs)
        state, z_bar = _dual_chunks(state, xs, tok[:r], lnw, lnb, 0, hand_vjp, lanes)
        parts.append(z_bar.reshape(bsz, r, heads, f))
    z_bar = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    return xq + layer_norm_lean(z_bar, ln_weight, ln_bias), state


def ttt_dual(params: InnerState, xq: Float[Array, "B H L f"], xk: Float[Array, "B H L f"],
             xv: Float[Array, "B H L f"], lr: Float[Array, "B H L"],
             learnable_token_idx: Float[Array, "b"], ln_weight: Float[Array, "H f"],
             ln_bias: Float[Array, "H f"], *, checkpoint_group: int = 0,
             initial_state: InnerState | None = None, hand_vjp: bool = True,
             lanes: int | None = None):
    """TTT over a whole sequence in the dual form.

    Args:
      params: initial inner weights per head, ``W: [H, f_in, f_out]``, ``bias: [H, 1, f_out]``.
      xq, xk, xv: ``[B, H, L, f]`` float32.
      lr: ``[B, H, L]`` per-token learning rates ``ttt_base_lr * sigmoid(.) / f``.
      learnable_token_idx: ``[b]``; its length is the mini-batch size.
      ln_weight, ln_bias: ``[H, f]`` the inner LayerNorm.
      checkpoint_group: keep the carried state only every this many mini-batches in the
        backward pass (0 or 1: every mini-batch).
      initial_state: ``[B, H, ...]`` weights to start from instead of tiling ``params``.
      hand_vjp: differentiate the scan by its hand-written derivative (``scan_tokens``);
        False: by autodiff of ``dual_step`` under ``jax.checkpoint``. Same values either way,
        to float rounding.
      lanes: independent chains of heads inside each step of the hand-differentiated scan
        (must divide ``H``); None: ``auto_lanes(H, f)``. The same values for any choice.

    Returns:
      ``(out, state)``: ``out = xq + LN(z_bar)`` of shape ``[B, H, L, f]`` and the inner state
      after the last (possibly partial) mini-batch.
    """
    tokens = (*(jnp.swapaxes(x, 1, 2) for x in (xq, xk, xv)), jnp.swapaxes(lr, 1, 2))
    out, state = ttt_dual_tokens(params, *tokens, learnable_token_idx, ln_weight, ln_bias,
                                 checkpoint_group=checkpoint_group, initial_state=initial_state,
                                 hand_vjp=hand_vjp, lanes=lanes)
    return jnp.swapaxes(out, 1, 2), state


def primal_token_step(carry, x, tok, ln_weight, ln_bias):
    """One token of the primal form; the carry holds the mini-batch's start state.

    Args:
      carry: ``(state0, acc, idx)``: weights at the mini-batch start ``[B, H, ...]``, the
        ``lr``-weighted sum of this mini-batch's gradients so far (same shapes) and the token's
        index inside its mini-batch (an int32 scalar, or ``[B]``: one per batch element).
      x: ``(xq, xk, xv, lr)`` of one token: ``[B, H, f]`` and ``[B, H]``.
      tok: ``[b]`` token weights.
      ln_weight, ln_bias: ``[H, 1, f]``.

    Returns:
      ``(carry', z_bar)`` with ``z_bar: [B, H, f]`` the pre-LN output of the token.
    """
    state0, acc, idx = carry
    xq, xk, xv = (v[..., None, :] for v in x[:3])  # [B, H, 1, f]
    lr = x[3][..., None]  # [B, H, 1]: a mini-batch of one token
    acts, _, gs = inner.loss_grads(state0, xk, xv, ln_weight, ln_bias)
    acc = inner.accumulate(acc, inner.weighted_grad_sums(acts, gs, lr))
    per_row = jnp.shape(idx) + (1, 1, 1)  # a scalar index, or one per batch element [B]
    t = tok[idx].reshape(per_row)
    state_i = inner.apply_update(state0, acc, t)
    _, zq = inner.forward(state_i, xq)
    last = (idx == tok.shape[0] - 1).reshape(per_row)
    state0 = jax.tree.map(lambda new, old: jnp.where(last, new, old), state_i, state0)
    acc = jax.tree.map(lambda a: jnp.where(last, jnp.zeros_like(a), a), acc)
    return (state0, acc, (idx + 1) % tok.shape[0]), zq[-1][..., 0, :]


def ttt_primal(params: InnerState, xq, xk, xv, lr, learnable_token_idx, ln_weight, ln_bias):
    """TTT over a sequence in the primal form: a ``lax.scan`` over tokens.

    Same arguments and outputs as ``ttt_dual`` (without remat or a start state); the returned
    state is the start state of the mini-batch that follows the last whole one.
    """
    bsz = xq.shape[0]
    tok = token_weights(learnable_token_idx)
    lnw, lnb = ln_weight[:, None, :], ln_bias[:, None, :]
    state0 = inner.init_state(params, bsz)
    acc = jax.tree.map(jnp.zeros_like, state0)
    xs = (*(jnp.moveaxis(v, 2, 0) for v in (xq, xk, xv)), jnp.moveaxis(lr, 2, 0))  # [L, B, H, .]

    def step(carry, x):
        return primal_token_step(carry, x, tok, lnw, lnb)

    (state0, _, _), z_bar = jax.lax.scan(step, (state0, acc, jnp.int32(0)), xs)
    z_bar = jnp.moveaxis(z_bar, 0, 2)  # [B, H, L, f]
    return xq + layer_norm(z_bar, lnw, lnb), state0
