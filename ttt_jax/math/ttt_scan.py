"""The dual form scanned over whole mini-batches, token-major, differentiated by hand.

``scan_tokens`` runs ``dual_step`` (``ttt_step.py``) over the ``n`` whole mini-batches of
token-major inputs ``[B, n, b, H, f]``: each step reads its mini-batch with a dynamic slice and
writes its outputs in place; for TTT-Linear each step's update is applied at the start of the
next (``deferred_update``). Its derivative keeps the carried state every ``group``
mini-batches and runs ``_dual_step_bwd`` backwards. ``lanes`` split the heads into independent
chains inside each step (``auto_lanes``). ``ttt.py``'s ``ttt_dual_tokens`` is the entry point
(docs/architecture.md §1.6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ttt_jax.math import inner
from ttt_jax.math.ttt_step import _dual_step_bwd, _keys, dual_delta


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


def auto_group(state, frame_shape: tuple[int, ...], ln_weight, ln_bias, n: int) -> int:
    """Mini-batches per checkpoint group of the hand-differentiated scan (``scan_tokens``).

    The backward pass holds the start state of every group (``n / g`` states of ``S`` floats)
    and, for the group it is in, each mini-batch's recomputed keys (``g`` times ``K`` floats,
    ``_keys``); the recomputation is the same for every ``g``. ``g0 = sqrt(n S / K)`` balances
    the two; the divisor of ``n`` nearest to it (by ratio) is taken when one lies within a
    factor 2, since a shorter last group is a second loop with buffers of its own (TTT-MLP at
    L=2048: 187 MiB with 15, 165 MiB with 16); otherwise ``g0`` rounded, within ``[1, n]``.
    At 128 mini-batches of f = 64 and b = 16 that is 16 for both inner models
    (benchmarks/README.md).

    Args:
      state: the carried inner state ``[B, H, ...]`` (arrays or shapes).
      frame_shape: one mini-batch of keys, ``[B, H, b, f]``.
      ln_weight, ln_bias: ``[H, 1, f]``.
      n: whole mini-batches in the scan.
    """
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    state = jax.tree.map(spec, state)
    frame = jax.ShapeDtypeStruct(tuple(frame_shape), jnp.float32)
    keys = jax.eval_shape(_keys, state, frame, frame, spec(ln_weight), spec(ln_bias))
    size = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))  # noqa: E731
    g0 = math.sqrt(n * size(state) / size(keys))
    near = [g for g in range(1, n + 1) if n % g == 0 and g0 / 2 <= g <= 2 * g0]
    if near:
        return min(near, key=lambda g: abs(math.log(g / g0)))
    return max(1, min(n, round(g0)))


def lane_slices(heads: int, lanes: int) -> list[slice]:
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


def deferred_update(state) -> bool:
    """Whether the scans apply each mini-batch's update at the start of the next step.

    Applied within its own step, the update overwrites weights that the step's queries still
    read, and XLA copies the weights at every step to keep both; applied at the start of the
    next step, after every read, it is done in place. On the CPU that ran TTT-Linear's forward
    1.13-1.14x faster and its recomputation in the backward pass about 1.06x, but TTT-MLP's
    forward 1.7x slower: there the copy of the old weights runs beside the queries' products,
    while the deferred update sits in front of the next step's first product
    (benchmarks/README.md). So: one inner layer, deferred; more, within the step.
    """
    return len(state) == 1


def _pending(states, deltas):
    """The states with the updates the previous step left applied (``deferred_update``);
    ``deltas`` is None when every step applies its own."""
    if deltas is None:
        return states
    return tuple(inner.apply_update(s, d) for s, d in zip(states, deltas))


def _keep(states, deltas, deferred):
    """A step's ``(states, deltas)`` carry from its start states and its updates: the updates
    left for the next step when ``deferred``, applied now otherwise."""
    if deferred:
        return tuple(states), tuple(deltas)
    return _pending(states, deltas), None


def _forward_step(lanes, tok, ln_weight, ln_bias, xs, deferred):
    """The scan step of the forward pass: every lane's ``dual_delta``, outputs written in place.

    The carry is ``(states, deltas, z_bar)``, the state after a step being ``states - deltas``;
    ``deferred`` (``deferred_update``): each step first applies the update the previous one
    left and leaves its own, otherwise ``deltas`` is None and each step applies its own.
    """
    def step(carry, i):
        states, deltas, z_bar = carry
        states = _pending(states, deltas)
        out = [dual_delta(state, *_frame(xs, i, sl), tok, ln_weight[sl], ln_bias[sl])
               for sl, state in zip(lanes, states)]
        deltas, zs = zip(*out)
        return (*_keep(states, deltas, deferred), _put(z_bar, _merge(zs), i)), None

    return step


def _run(step, carry, idx, deferred):
    """``step`` over the mini-batches ``idx`` from ``carry = (states, z_bar)``; the end states
    come back with their last update applied."""
    states, z_bar = carry
    deltas = jax.tree.map(jnp.zeros_like, states) if deferred else None
    (states, deltas, z_bar), _ = jax.lax.scan(step, (states, deltas, z_bar), idx)
    return _pending(states, deltas), z_bar


def _scan_tokens_plain(state, xs, tok, ln_weight, ln_bias, group, lanes):
    """``n`` mini-batches in the dual form, read from and written to the token-major layout."""
    del group  # used by the derivative only
    deferred = deferred_update(state)
    lanes = lane_slices(xs[0].shape[3], lanes)
    step = _forward_step(lanes, tok, ln_weight, ln_bias, xs, deferred)
    z_bar = jnp.zeros(xs[0].shape, xs[0].dtype)
    states, z_bar = _run(step, (_split(state, lanes), z_bar), jnp.arange(xs[0].shape[1]),
                         deferred)
    return _merge(states), z_bar


def _scan_tokens_fwd(state, xs, tok, ln_weight, ln_bias, group, lanes):
    """The forward pass, keeping the start state of every ``group``-th mini-batch only."""
    deferred = deferred_update(state)
    lanes = lane_slices(xs[0].shape[3], lanes)
    step = _forward_step(lanes, tok, ln_weight, ln_bias, xs, deferred)
    carry = (_split(state, lanes), jnp.zeros(xs[0].shape, xs[0].dtype))
    starts = []
    for first, count, size in _groups(xs[0].shape[1], group):
        def run_group(carry, k, first=first, size=size):
            return _run(step, carry, first + k * size + jnp.arange(size), deferred), carry[0]

        carry, group_starts = jax.lax.scan(run_group, carry, jnp.arange(count))
        starts.append(group_starts)
    states, z_bar = carry
    return (_merge(states), z_bar), (starts, xs, tok, ln_weight, ln_bias)


def _scan_tokens_bwd(group, lanes, res, cts):
    """Groups last first: recompute the group's start states and inner gradients from the kept
    state, then run ``_dual_step_bwd`` from the group's last mini-batch to its first."""
    starts, xs, tok, ln_weight, ln_bias = res
    d_state, d_zbar = cts
    lanes = lane_slices(xs[0].shape[3], lanes)

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

    deferred = deferred_update(d_state)

    def advance(carry, i):  # a mini-batch's start state and its inner gradients, every lane
        states, deltas = carry
        states = _pending(states, deltas)  # the update the previous mini-batch left, if any
        deltas, keys = [], []
        for sl, state in zip(lanes, states):
            _, xk, xv, lr = _frame(xs, i, sl)
            key = _keys(state, xk, xv, ln_weight[sl], ln_bias[sl])
            acts, _, gs, _ = key
            deltas.append(inner.weighted_grad_sums(acts, gs, tok[-1] * lr))
            keys.append(key)
        return _keep(states, deltas, deferred), (states, tuple(keys))

    d_consts = (jnp.zeros_like(tok), jnp.zeros_like(ln_weight), jnp.zeros_like(ln_bias))
    carry = (_split(d_state, lanes), d_consts, tuple(jnp.zeros_like(x) for x in xs))
    for (first, _, size), group_starts in reversed(list(zip(_groups(xs[0].shape[1], group),
                                                            starts))):
        def group_back(carry, inp, first=first, size=size):
            k, start = inp
            idx = first + k * size + jnp.arange(size)
            init = (start, jax.tree.map(jnp.zeros_like, start) if deferred else None)
            _, (states, keys) = jax.lax.scan(advance, init, idx)
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
