"""Bounded-position rotary embeddings (docs/architecture.md §1.3). Pure functions, no Flax.

The table has exactly ``mini_batch_size`` rows: positions are reduced ``% mini_batch_size``
before the lookup, so a rotation never extrapolates past what training saw, whatever the stream
length. Two layouts pair the head dims differently:

* ``interleaved``: ``(x[2k], x[2k+1])`` rotate by ``p * inv_freq[k]`` (ttt-lm-jax's layout).
* ``half``: ``(x[k], x[k + f/2])`` rotate by ``p * inv_freq[k]`` (HF ``rotate_half``).

``bounded=False`` is the ablation: angles are computed for the actual absolute positions (plain
RoPE, which extrapolates to angles never seen in training on longer streams).
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def inv_frequencies(head_dim: int, theta: float) -> Float[Array, "f2"]:
    """``inv_freq[k] = 1 / theta ** (2k / f)`` for ``k < f/2``, float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    k = jnp.arange(0, head_dim, 2, dtype=jnp.float32)
    return 1.0 / (theta ** (k / head_dim))


def rope_table(num_positions: int, head_dim: int, theta: float):
    """``(cos, sin)``, each ``[num_positions, f/2]`` float32, for positions ``0..num_positions-1``."""
    angles = jnp.arange(num_positions, dtype=jnp.float32)[:, None] * inv_frequencies(head_dim, theta)
    return jnp.cos(angles), jnp.sin(angles)  # [P, f/2] each


def position_angles(position_ids: Int[Array, "*S"], head_dim: int, theta: float):
    """``(cos, sin)``, each ``[*S, f/2]`` float32, of the plain (unbounded) positions given.

    The angle ``p * inv_freq[k]`` is formed in float32 from the integer position, as a table
    lookup of row ``p`` would be.
    """
    angles = position_ids.astype(jnp.float32)[..., None] * inv_frequencies(head_dim, theta)
    return jnp.cos(angles), jnp.sin(angles)


def bounded_positions(position_ids: Int[Array, "*S"], mini_batch_size: int) -> Int[Array, "*S"]:
    """``position_ids % mini_batch_size``: the only positions the table ever sees."""
    return jnp.mod(position_ids, mini_batch_size)


def _split_interleaved(x):
    return x[..., 0::2], x[..., 1::2]


def _merge_interleaved(a, b):
    return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def _split_half(x):
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def _merge_half(a, b):
    return jnp.concatenate([a, b], axis=-1)


def _partner_interleaved(x):
    """``x[2k] <-> x[2k+1]``: a reversal of every pair (no concatenation)."""
    return x.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)


def _partner_half(x):
    """``x[k] <-> x[k + f/2]``."""
    return jnp.roll(x, x.shape[-1] // 2, axis=-1)


# layout -> x with the two members of every rotated pair swapped.
PARTNERS: dict[str, Callable] = {"interleaved": _partner_interleaved, "half": _partner_half}

# layout -> (split into the two members of each rotated pair, merge back).
LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "interleaved": (_split_interleaved, _merge_interleaved),
    "half": (_split_half, _merge_half),
}


def _rotate_merged(x, cos, sin, layout, head_axis=1):
    """``rotate`` via split and merge: each pair ``(a, b) -> (a cos - b sin, a sin + b cos)``."""
    split, merge = LAYOUTS[layout]
    a, b = split(x.astype(jnp.float32))  # [B, H, L, f/2] each
    c, s = jnp.expand_dims(cos, head_axis), jnp.expand_dims(sin, head_axis)  # [B, 1, L, f/2]
    return merge(a * c - b * s, a * s + b * c).astype(x.dtype)


def _spread(t, layout):
    """``merge(t, t)`` as a broadcast and a reshape (no concatenation, so XLA fuses it into its
    consumers instead of storing a full-width table): ``[..., f/2] -> [..., f]``."""
    axis = -1 if layout == "interleaved" else -2
    wide = jnp.broadcast_to(jnp.expand_dims(t, axis), t.shape + (2,) if axis == -1
                            else t.shape[:-1] + (2, t.shape[-1]))
    return wide.reshape(*t.shape[:-1], 2 * t.shape[-1])


# layout -> signs of S = merge(-sin, sin) over the head dim, for f/2 pairs.
_PAIR_SIGNS: dict[str, Callable] = {
    "interleaved": lambda half: jnp.tile(jnp.array([-1.0, 1.0], jnp.float32), half),
    "half": lambda half: jnp.repeat(jnp.array([-1.0, 1.0], jnp.float32), half),
}


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _rotate(x, cos, sin, layout, head_axis=1):
    # Elementwise as x * C + partner(x) * S, with C = (cos, cos) and S = (-sin, sin) merged into
    # the layout and partner(x) = x with the two members of every pair swapped: the same
    # products and sums as (a cos - b sin, a sin + b cos) (up to the rounding of a fused
    # multiply-add), but no concatenation of [B, H, L, f] arrays, so XLA fuses the rotation
    # into its consumers instead of materialising it (less memory at the forward's peak).
    c = jnp.expand_dims(_spread(cos, layout), head_axis)  # [B, 1, L, f]
    s = jnp.expand_dims(_spread(sin, layout) * _PAIR_SIGNS[layout](cos.shape[-1]), head_axis)
    x32 = x.astype(jnp.float32)
    return (x32 * c + PARTNERS[layout](x32) * s).astype(x.dtype)


@_rotate.defjvp
def _rotate_jvp(layout, head_axis, primals, tangents):
    # Linear in x: the tangent is the same rotation, in the split/merge form, whose transpose
    # (the backward pass) keeps only the half-width tables and measured faster than the
    # transpose of the elementwise form. The angles come from integer positions: no tangent.
    x, cos, sin = primals
    return (_rotate(x, cos, sin, layout, head_axis),
            _rotate_merged(tangents[0], cos, sin, layout, head_axis))


def rotate(x: Float[Array, "B H L f"], cos: Float[Array, "B L f2"], sin: Float[Array, "B L f2"],
           layout: str, head_axis: int = 1) -> Float[Array, "B H L f"]:
    """Rotates each pair ``(a, b)`` of ``x`` to ``(a cos - b sin, a sin + b cos)``.

    Computes in float32 and returns ``x.dtype``. Differentiable in ``x`` only (``cos, sin``
    come from integer positions and get no derivative).

    Args:
      x: ``[B, H, L, f]`` queries or keys.
      cos, sin: ``[B, L, f/2]`` angles per token, float32.
      layout: a key of ``LAYOUTS``.
      head_axis: where ``x`` has its head axis: 1 (``[B, H, L, f]``) or 2 (``[B, L, H, f]``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"rope_layout={layout!r} is invalid: expected one of {', '.join(LAYOUTS)}")
    return _rotate(x, cos, sin, layout, head_axis)


def apply_bounded_rope(xq: Float[Array, "B H L f"], xk: Float[Array, "B H L f"],
                       position_ids: Int[Array, "B L"], *, mini_batch_size: int, theta: float,
                       layout: str, bounded: bool = True, head_axis: int = 1):
    """Rotates queries and keys by ``position_ids % mini_batch_size``; values are not touched.

    With ``bounded=False`` they are rotated by ``position_ids`` themselves (plain RoPE).

    Args:
      xq, xk: ``[B, H, L, f]``.
      position_ids: absolute positions ``[B, L]``.
      mini_batch_size: ``b``: the table has ``b`` rows.
      theta: RoPE base.
      layout: ``interleaved`` or ``half``.
      bounded: reduce positions ``% mini_batch_size`` (the default) or use them as they are.
      head_axis: 1 for ``xq, xk: [B, H, L, f]``, 2 for ``[B, L, H, f]``.

    Returns:
      ``(xq, xk)`` rotated, in their input dtypes.
    """
    if not bounded:
        cos, sin = position_angles(position_ids, xq.shape[-1], theta)  # [B, L, f/2]
        return (rotate(xq, cos, sin, layout, head_axis), rotate(xk, cos, sin, layout, head_axis))
    cos, sin = rope_table(mini_batch_size, xq.shape[-1], theta)  # [b, f/2]
    pos = bounded_positions(position_ids, mini_batch_size)  # [B, L]
    cos, sin = cos[pos], sin[pos]  # [B, L, f/2]
    return rotate(xq, cos, sin, layout, head_axis), rotate(xk, cos, sin, layout, head_axis)
