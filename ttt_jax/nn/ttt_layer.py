"""The TTT layer in Linen: parameters and projections; the math lives in ``ttt_jax.math``.

Parameter names and shapes mirror ttt-lm-pytorch's ``TTTLinear``/``TTTMLP`` so that export is a
mechanical mapping: ``q_proj k_proj v_proj o_proj g_proj`` (Dense kernels ``[in, out]``),
``conv_q conv_k`` (``kernel [K, d]``, ``bias [d]``), ``learnable_ttt_lr_weight [H, d]``,
``learnable_ttt_lr_bias [H]``, ``learnable_token_idx [b]``, ``ttt_norm_weight/bias [H, f]``,
``W1 [H, f, F] b1 [H, 1, F]`` (and ``W2 [H, F, f] b2 [H, 1, f]`` for TTT-MLP), ``post_norm``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt_jax.config import TTTConfig
from ttt_jax.math.inner import gelu_tanh
from ttt_jax.math.rope import apply_bounded_rope
from ttt_jax.math import inner
from ttt_jax.math.dense import dense_dot
from ttt_jax.math.ttt import ttt_dual_tokens
from ttt_jax.math.ttt_stream import ttt_stream, ttt_token
from ttt_jax.nn.layers import CausalDepthwiseConv, LayerNorm, last_inputs
from ttt_jax.types import SequenceMetadata

# Smallest norm divided by in the Q/K L2 normalisation (torch.nn.functional.normalize's eps).
QK_L2_NORM_EPS = 1e-12
# eps of the output LayerNorm over the model width.
POST_NORM_EPS = 1e-6


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / max(||x||, eps)`` over the last axis."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, QK_L2_NORM_EPS)


def _heads_first(xq, xk, xv, lr):
    """Token-major ``[B, L, H, f]`` (``lr: [B, L, H]``) -> ``[B, H, L, f]`` (``[B, H, L]``)."""
    return (*(jnp.swapaxes(v, 1, 2) for v in (xq, xk, xv)), jnp.swapaxes(lr, 1, 2))


class TTTLayer(nn.Module):
    """A TTT-Linear or TTT-MLP layer (docs/architecture.md §1): ``[B, L, d] -> [B, L, d]``.

    Attributes:
      config: the layer's ``TTTConfig``.
      dtype: compute dtype of the projections; the inner loop always runs in float32.
      noop_init: initialise the ``o_proj`` kernel to zeros (instead of the normal initialiser),
        so that the freshly initialised layer outputs exactly zero.
    """

    config: TTTConfig
    dtype: Any = jnp.float32
    noop_init: bool = False

    def setup(self):
        cfg = self.config
        d, h, f, b = cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.mini_batch_size
        normal = nn.initializers.normal(cfg.initializer_range)
        dense = lambda name, init=normal: nn.Dense(d, use_bias=False, dtype=self.dtype,
                                                   kernel_init=init, name=name,
                                                   dot_general=dense_dot)
        self.q_proj = dense("q_proj")
        if cfg.share_qk:
            self.conv_q = CausalDepthwiseConv(cfg.conv_kernel, self.dtype)
            self.conv_k = CausalDepthwiseConv(cfg.conv_kernel, self.dtype)
        else:
            self.k_proj = dense("k_proj")
        self.v_proj = dense("v_proj")
        self.o_proj = dense("o_proj", nn.initializers.zeros if self.noop_init else normal)
        if cfg.use_gate:
            self.g_proj = dense("g_proj")
        self.post_norm = LayerNorm(d, epsilon=POST_NORM_EPS)
        self.learnable_ttt_lr_weight = self.param("learnable_ttt_lr_weight", normal, (h, d))
        self.learnable_ttt_lr_bias = self.param("learnable_ttt_lr_bias", nn.initializers.zeros, (h,))
        self.learnable_token_idx = self.param("learnable_token_idx", nn.initializers.zeros, (b,))
        self.ttt_norm_weight = self.param("ttt_norm_weight", nn.initializers.ones, (h, f))
        self.ttt_norm_bias = self.param("ttt_norm_bias", nn.initializers.zeros, (h, f))
        widths = cfg.inner_widths
        self.inner_params = tuple(
            (self.param(f"W{i + 1}", normal, (h, widths[i], widths[i + 1])),
             self.param(f"b{i + 1}", nn.initializers.zeros, (h, 1, widths[i + 1])))
            for i in range(len(widths) - 1))

    def _check_input(self, x):
        d = self.config.model_dim
        if x.ndim != 3 or x.shape[-1] != d:
            raise ValueError(f"TTTLayer expects x of shape [B, L, model_dim={d}], got {x.shape}: "
                             f"the input width does not match TTTConfig.model_dim")

    def _heads(self, x):
        """``[B, L, d] -> [B, L, H, f]`` in float32 (a reshape: no transpose)."""
        bsz, length, _ = x.shape
        x = x.reshape(bsz, length, self.config.num_heads, self.config.head_dim)
        return x.astype(jnp.float32)

    def ttt_inputs(self, x, metadata: Optional[SequenceMetadata] = None, qk_tail=None):
        """Projections, L2 norm, RoPE and learning rates: the inputs of the inner loop.

        Args:
          x: ``[B, L, model_dim]``.
          metadata: positions (read only with RoPE).
          qk_tail: with ``share_qk``, the ``K-1`` shared projections preceding ``x`` (a stream's
            conv state); zeros if None.

        Returns:
          ``(xq, xk, xv, lr)``: ``[B, H, L, f]`` float32 each and ``lr: [B, H, L]``.
        """
        return _heads_first(*self._inputs(x, metadata, qk_tail)[:4])

    def _inputs(self, x, metadata, qk_tail):
        """``ttt_inputs`` token-major plus the shared Q/K projection (the conv's input) or None.

        Returns ``(xq, xk, xv, lr, shared)``: ``[B, L, H, f]`` float32 each and ``lr: [B, L, H]``.
        """
        cfg = self.config
        self._check_input(x)
        xq = shared = self.q_proj(x)
        if cfg.share_qk:  # Mamba-style: the two convs read the shared projection
            xk = self.conv_k(shared, qk_tail)
            xq = self.conv_q(shared, qk_tail)
        else:
            shared = None
            xk = self.k_proj(x)
        xq, xk, xv = self._heads(xq), self._heads(xk), self._heads(self.v_proj(x))
        if cfg.qk_l2_norm:
            xq, xk = l2_normalize(xq), l2_normalize(xk)
        if cfg.use_rope:  # a static switch: off means no rotation in the traced program
            meta = metadata if metadata is not None else SequenceMetadata()
            pos = meta.positions(x.shape[0], x.shape[1])
            xq, xk = apply_bounded_rope(xq, xk, pos, mini_batch_size=cfg.mini_batch_size,
                                        theta=cfg.rope_theta, layout=cfg.rope_layout,
                                        bounded=cfg.rope_bounded, head_axis=2)
        logits = jnp.einsum("bld,hd->blh", x.astype(jnp.float32), self.learnable_ttt_lr_weight)
        logits = logits + self.learnable_ttt_lr_bias  # [B, L, H]
        lr = cfg.ttt_base_lr * jax.nn.sigmoid(logits) / cfg.head_dim
        return xq, xk, xv, lr, shared

    def output(self, ttt_out, x):
        """Merge heads -> post_norm -> optional gate -> o_proj (docs/architecture.md §1.8).

        ``ttt_out``: ``[B, H, L, f]``.
        """
        bsz, _, length, _ = ttt_out.shape
        out = jnp.swapaxes(ttt_out, 1, 2).reshape(bsz, length, self.config.model_dim)
        out = self.post_norm(out)
        if self.config.use_gate:
            out = gelu_tanh(self.g_proj(x).astype(jnp.float32)) * out
        return self.o_proj(out.astype(self.dtype))

    def __call__(self, x, metadata: Optional[SequenceMetadata] = None):
        """Args: x ``[B, L, model_dim]``; metadata positions (needed only with RoPE).

        Returns: ``[B, L, model_dim]`` in the compute dtype.
        """
        chunk, length = self.config.span_length, x.shape[1]
        # Kept only when the caller makes `intermediates` mutable (ttt_jax.diagnostics); the
        # whole sequence then goes at once, as the sown inputs are the whole sequence's.
        sow = self.is_mutable_collection("intermediates")
        if chunk and length > chunk and not sow and not self.is_initializing():
            return self._spans(x, metadata, chunk)
        y, _, _ = self._span(x, metadata, None, None, sow=sow)
        return y

    def _span(self, x, metadata, state, qk_tail, sow=False):
        """The layer on ``x`` continued from an inner ``state`` (fresh if None) and conv tail.

        Returns ``(y, state', shared)``: ``shared`` is the shared Q/K projection (None
        without ``share_qk``), whose last ``K-1`` rows are the next span's ``qk_tail``.
        """
        xq, xk, xv, lr, shared = self._inputs(x, metadata, qk_tail)  # token-major [B, L, H, f]
        if sow:
            self.sow("intermediates", "ttt_inputs", _heads_first(xq, xk, xv, lr))
        out, state = ttt_dual_tokens(self.inner_params, xq, xk, xv, lr, self.learnable_token_idx,
                                     self.ttt_norm_weight, self.ttt_norm_bias,
                                     checkpoint_group=self.config.scan_checkpoint_group,
                                     initial_state=state)
        # Heads first for `output`'s contract; XLA cancels the two transposes.
        return self.output(jnp.swapaxes(out, 1, 2), x), state, shared

    def _spans(self, x, metadata, chunk: int):
        """``__call__`` as a scan over spans of ``chunk`` tokens (``TTTConfig.span_length``).

        Each span starts from the inner state the previous one ended in, and its Q/K convs
        read the previous span's last ``K-1`` shared projections: the outputs are those of the
        whole sequence at once. A final span shorter than ``chunk`` runs after the scan.
        """
        cfg = self.config
        bsz, length, d = x.shape
        n, rest = divmod(length, chunk)
        meta = metadata if metadata is not None else SequenceMetadata()
        pos = meta.positions(bsz, length)
        keep = cfg.conv_kernel - 1

        def carry_on(mdl, xc, pc, state, tail):
            y, state, shared = mdl._span(xc, SequenceMetadata(position_ids=pc), state, tail)
            if shared is not None:
                tail = shared[:, shared.shape[1] - keep:]
            return y, state, tail

        def step(mdl, carry, i, x, pos):
            state, tail, out = carry
            span = lambda v: jax.lax.dynamic_slice_in_dim(v, i * chunk, chunk, axis=1)
            y, state, tail = carry_on(mdl, span(x), span(pos), state, tail)
            out = jax.lax.dynamic_update_slice_in_dim(out, y, i * chunk, axis=1)
            return (state, tail, out), None

        state = inner.init_state(self.inner_params, bsz)
        tail = jnp.zeros((bsz, keep, d), self.dtype) if cfg.share_qk else None
        out = jnp.zeros((bsz, n * chunk, d), self.dtype)
        # Each span reads its slice of x and writes its slice of the output in place: stacking
        # the spans along a new axis instead would transpose the whole input and output.
        scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(0, nn.broadcast, nn.broadcast))
        (state, tail, y), _ = scan(self, (state, tail, out), jnp.arange(n), x, pos)
        if rest:
            y_rest, _, _ = carry_on(self, x[:, n * chunk:], pos[:, n * chunk:], state, tail)
            y = jnp.concatenate([y, y_rest], axis=1)
        return y

    # --- Streaming ---------------------------------------------------------------------------

    def init_cache(self, batch_size: int, start_position=0):
        """The state of ``batch_size`` fresh streams (a pytree whose leaves lead with ``B``).

        Keys: ``state0`` the inner weights at the last mini-batch boundary, ``acc`` the
        lr-weighted gradients accumulated since, ``phase`` tokens seen since the boundary,
        ``position`` the absolute position of the next token (what RoPE reads), and with
        ``share_qk`` ``qk_tail``, the last ``K-1`` shared projections (the convs' state).

        Args:
          batch_size: number of independent streams.
          start_position: absolute position of each stream's first token (int or ``[B]``).
        """
        cfg = self.config
        state0 = inner.init_state(self.inner_params, batch_size)
        cache = {
            "state0": state0,
            "acc": jax.tree.map(jnp.zeros_like, state0),
            "phase": jnp.zeros((batch_size,), jnp.int32),
            "position": jnp.broadcast_to(jnp.asarray(start_position, jnp.int32), (batch_size,)),
        }
        if cfg.share_qk:
            cache["qk_tail"] = jnp.zeros((batch_size, cfg.conv_kernel - 1, cfg.model_dim),
                                         self.dtype)
        return cache

    def stream(self, x, cache, lengths=None):
        """Continues each stream of the batch by a chunk of inputs, exactly as one long forward.

        Args:
          x: ``[B, n, model_dim]``, any ``n >= 1``.
          cache: from ``init_cache`` or a previous ``stream``.
          lengths: ``[B]`` number of valid inputs per element (the rest are ignored and leave
            the state untouched); all ``n`` if None. A single input with ``lengths=None`` takes
            the per-token primal path, anything else the dual form.

        Returns:
          ``(y [B, n, model_dim], cache')``; ``y`` is meaningless past an element's length.
        """
        cfg = self.config
        bsz, n, _ = x.shape
        meta = SequenceMetadata(offset=cache["position"])
        xq, xk, xv, lr, shared = self._inputs(x, meta, cache.get("qk_tail"))
        xq, xk, xv, lr = _heads_first(xq, xk, xv, lr)
        args = (self.learnable_token_idx, self.ttt_norm_weight, self.ttt_norm_bias)
        if n == 1 and lengths is None:
            out, (state0, acc, phase) = ttt_token(
                cache["state0"], cache["acc"], cache["phase"],
                xq[:, :, 0], xk[:, :, 0], xv[:, :, 0], lr[:, :, 0], *args)
            out = out[:, :, None]
            lengths = jnp.ones((bsz,), jnp.int32)
        else:
            lengths = (jnp.full((bsz,), n, jnp.int32) if lengths is None
                       else jnp.asarray(lengths, jnp.int32))
            out, (state0, acc, phase) = ttt_stream(
                cache["state0"], cache["acc"], cache["phase"], xq, xk, xv, lr, lengths, *args)
        new = {"state0": state0, "acc": acc, "phase": phase,
               "position": cache["position"] + lengths}
        if cfg.share_qk:
            new["qk_tail"] = last_inputs(cache["qk_tail"], shared, lengths)
        return self.output(out, x), new
