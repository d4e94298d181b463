"""``MoshiLM``: Moshi's whole multi-stream language model in Flax (docs/moshi.md, "MoshiLM").

The training forward of ``moshi.models.lm.LMModel`` (moshi 0.2.13), with TTT layers that can be
grafted into the temporal transformer exactly as in Moshi-TTT (docs/architecture.md §2):

1. ``codes [B, K, T]`` (``K = n_q + 1``, text first) are delayed per stream: stream ``k`` is
   shifted right by ``delays[k]`` frames, the first frames filled with the stream's initial
   token (``text_card`` for text, ``card`` for audio); a frame of initial tokens is put in
   front. The temporal input is that sequence without its last frame, the depformer's input the
   delayed codes themselves (one frame later).
2. Temporal path: ``text_emb`` + ``emb[k]`` of every audio stream, summed -> the temporal
   ``StreamingTransformer`` (``hybrid.py``, with the TTT graft) -> ``out_norm`` ->
   ``text_linear``: text logits.
3. Depformer, for every frame independently, over ``dep_q`` steps: step ``s`` reads
   ``depformer_in[s or 0](h) + (depformer_text_emb(text) if s == 0 else
   depformer_emb[s-1](audio codebook s-1))``; its own causal transformer (per-step attention
   and FFN weights with ``weights_per_step``, shared norms; sinusoids, RoPE or nothing for
   positions) -> ``linears[s]``: audio logits of codebook ``s``.
4. Logits are shifted back by the delays (undelayed), so position ``t`` predicts
   ``codes[:, k, t]``; the last ``delays[k]`` positions of a stream are invalid (NaN logits,
   mask false), as are positions whose code is the zero token ``-1``.

Embeddings follow moshi's ``ScaledEmbedding``: ``card + 1`` (``text_card + 1``) rows, the id
``-1`` (``zero_token_id``) gives an exact zero vector, and other negative ids read row 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.moshi.config import MoshiTransformerConfig
from ttt_jax.moshi.hybrid import StreamingTransformer
from ttt_jax.moshi.lm_config import MoshiLMConfig
from ttt_jax.moshi.transformer import (MASK_VALUE, LayerScale, MoshiGating, make_norm,
                                       rope_absolute, window_mask)

ZERO_TOKEN_ID = -1  # no input: the embedding is exactly zero, and no loss at that position
UNGENERATED_TOKEN_ID = -2  # "to be generated" in a prompt (sampling only)


class LMOutput(NamedTuple):
    """moshi's ``LMOutput``: undelayed logits and the masks of the valid positions."""

    logits: jax.Array  # [B, dep_q, T, card] float32 (NaN where invalid)
    mask: jax.Array  # [B, dep_q, T] bool
    text_logits: jax.Array  # [B, 1, T, text_card_out] float32
    text_mask: jax.Array  # [B, 1, T] bool


class ScaledEmbed(nn.Module):
    """moshi's ``ScaledEmbedding``: a table lookup, exactly zero for the id ``-1``."""

    num_embeddings: int
    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.initializers.normal(self.init_std),
                           (self.num_embeddings, self.features), jnp.float32)
        y = jnp.take(table, jnp.maximum(ids, 0), axis=0).astype(self.dtype)
        return jnp.where((ids == ZERO_TOKEN_ID)[..., None], jnp.zeros((), self.dtype), y)


def sin_embedding(length: int, dim: int, max_period: float) -> jax.Array:
    """moshi's sinusoids ``[length, dim]``: ``[cos(p w), sin(p w)]``, ``w_k = P^(-k/(dim/2-1))``."""
    half = dim // 2
    positions = jnp.arange(length, dtype=jnp.float32)[:, None]
    freqs = jnp.float32(max_period) ** (jnp.arange(half, dtype=jnp.float32) / (half - 1))
    phase = positions / freqs
    return jnp.concatenate([jnp.cos(phase), jnp.sin(phase)], axis=-1)


class StepKernel(nn.Module):
    """One weight set's ``kernel [in, out]`` (the param path of a bias-free ``nn.Dense``)."""

    features_in: int
    features_out: int

    @nn.compact
    def __call__(self):
        return self.param("kernel", nn.initializers.normal(0.02),
                          (self.features_in, self.features_out), jnp.float32)


def per_step(x, kernels, weight_index, dtype):
    """``x [N, S, in]`` times the kernel of each step's weight set: ``[N, S, out]``.

    ``kernels`` holds every weight set's ``[in, out]`` kernel; ``weight_index[s]`` is step
    ``s``'s set. One set: a plain product; several: one batched product over the steps."""
    x = x.astype(dtype)
    if len(kernels) == 1:
        return x @ kernels[0].astype(dtype)
    stacked = jnp.stack([kernels[w] for w in weight_index[:x.shape[1]]]).astype(dtype)
    return jnp.einsum("nsi,sio->nso", x, stacked)


class DepformerAttention(nn.Module):
    """Causal self-attention over the depformer steps with one weight set per step.

    Attributes:
      config: the depformer block (width, heads, positional embedding).
      weight_index: the weight set of every step.
      dtype: compute dtype.
    """

    config: MoshiTransformerConfig
    weight_index: tuple[int, ...]
    dtype: Any = jnp.float32

    def setup(self):
        d = self.config.d_model
        sets = max(self.weight_index) + 1
        self.in_projs = [StepKernel(d, 3 * d) for _ in range(sets)]
        self.out_projs = [StepKernel(d, d) for _ in range(sets)]

    def __call__(self, x):
        cfg = self.config
        bsz, steps, _ = x.shape
        qkv = per_step(x, [k() for k in self.in_projs], self.weight_index, self.dtype)
        qkv = qkv.reshape(bsz, steps, 3, cfg.num_heads, cfg.head_dim)
        q, k, v = (jnp.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))  # [N, H, S, f]
        positions = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (bsz, steps))
        if cfg.positional_embedding == "rope":
            q = rope_absolute(q, positions, cfg.max_period)
            k = rope_absolute(k, positions, cfg.max_period)
        scale = 1.0 / jnp.sqrt(jnp.float32(cfg.head_dim))
        scores = jnp.einsum("bhqf,bhkf->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        mask = window_mask(positions, positions, None)
        scores = jnp.where(mask[:, None], scores * scale, MASK_VALUE)
        out = jnp.einsum("bhqk,bhkf->bhqf", jax.nn.softmax(scores, axis=-1),
                         v.astype(jnp.float32))
        out = jnp.transpose(out, (0, 2, 1, 3)).reshape(bsz, steps, cfg.d_model)
        return per_step(out, [k() for k in self.out_projs], self.weight_index, self.dtype)


class StepGating(nn.Module):
    """One weight set of the gated FFN: ``linear_in/kernel [d, 2h]``, ``linear_out/kernel
    [h, d]`` (``h`` from the set's ``dim_feedforward``, ``MoshiTransformerConfig.hidden_size``)."""

    config: MoshiTransformerConfig

    def setup(self):
        d, hidden = self.config.d_model, self.config.hidden_size
        self.linear_in = StepKernel(d, 2 * hidden)
        self.linear_out = StepKernel(hidden, d)

    def __call__(self):
        return self.linear_in(), self.linear_out()


def gated_ffn(x, w_in, w_out, weight_index, dtype):
    """``linear_out(silu(a) * b)``, ``[a, b] = linear_in(x)``, with per-step weight sets."""
    h = per_step(x, w_in, weight_index, dtype)
    hidden = h.shape[-1] // 2
    return per_step(nn.silu(h[..., :hidden]) * h[..., hidden:], w_out, weight_index, dtype)


class DepformerLayer(nn.Module):
    """``x += ls1(attn(norm1(x)))``, ``x += ls2(gating[w](norm2(x)))`` with per-step weights.

    Param names: ``norm1 norm2 self_attn/{in_projs,out_projs}_{j}/kernel`` and
    ``gating/linear_{in,out}/kernel`` (one weight set) or ``gating_{j}/...``
    (``weights_per_step``), ``layer_scale_{1,2}``.
    """

    config: MoshiLMConfig

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        block = cfg.depformer_block()
        self.index = tuple(cfg.depformer_weight_index(s) for s in range(cfg.dep_q))
        self.norm1 = make_norm(block)
        self.self_attn = DepformerAttention(block, self.index, dtype)
        self.norm2 = make_norm(block)
        if cfg.depformer.weights_per_step:
            self.gating = [StepGating(cfg.depformer_block(j))
                           for j in range(cfg.depformer_weight_sets)]
        else:
            self.gating = MoshiGating(block, dtype)
        if block.layer_scale is not None:
            self.layer_scale_1 = LayerScale(block.layer_scale)
            self.layer_scale_2 = LayerScale(block.layer_scale)

    def _scale(self, which: int, x):
        if self.config.depformer.layer_scale is None:
            return x
        return (self.layer_scale_1 if which == 1 else self.layer_scale_2)(x)

    def _ffn(self, x):
        if not self.config.depformer.weights_per_step:
            return self.gating(x)
        dtype = jnp.dtype(self.config.dtype)
        sets = [g() for g in self.gating]
        w_in, w_out = [w for w, _ in sets], [w for _, w in sets]
        if len({w.shape for w in w_in}) == 1:  # equal widths: one batched product
            return gated_ffn(x, w_in, w_out, self.index, dtype)
        steps = enumerate(self.index[:x.shape[1]])  # the widths differ: step by step
        return jnp.concatenate([gated_ffn(x[:, s:s + 1], [w_in[w]], [w_out[w]], (0,), dtype)
                                for s, w in steps], axis=1)

    def __call__(self, x):
        x = x + self._scale(1, self.self_attn(self.norm1(x)))
        return x + self._scale(2, self._ffn(self.norm2(x)))


class Depformer(nn.Module):
    """The depformer transformer: ``[N, S, d'] -> [N, S, d']`` over ``S <= dep_q`` steps."""

    config: MoshiLMConfig

    def setup(self):
        layer = nn.remat(DepformerLayer) if self.config.remat == "layer" else DepformerLayer
        self.layers = [layer(self.config) for _ in range(self.config.depformer.num_layers)]

    def __call__(self, x):
        dep = self.config.depformer
        if dep.pos_emb == "sin":
            x = x + sin_embedding(x.shape[1], x.shape[2], dep.max_period).astype(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return x


def delay_codes(codes, delays, initial):
    """``codes [B, K, T]`` shifted right by ``delays[k]`` per stream, ``initial[k]`` in front."""
    length = codes.shape[-1]
    lines = []
    for k, delay in enumerate(delays):
        d = min(delay, length)
        pad = jnp.full(codes.shape[:1] + (d,), initial[k], codes.dtype)
        lines.append(jnp.concatenate([pad, codes[:, k, :length - d]], axis=1))
    return jnp.stack(lines, axis=1)


def undelay(x, delays):
    """``x [B, K, T, ...]`` shifted left by ``delays[k]``: ``(values, mask [B, K, T])``; the
    last ``delays[k]`` positions of a stream are NaN and masked out."""
    length = x.shape[2]
    lines, masks = [], []
    for k, delay in enumerate(delays):
        d = min(delay, length)
        line = x[:, k, d:]
        fill = jnp.full(line.shape[:1] + (d,) + line.shape[2:], jnp.nan, x.dtype)
        lines.append(jnp.concatenate([line, fill], axis=1))
        masks.append(jnp.arange(length) < length - d)
    mask = jnp.broadcast_to(jnp.stack(masks)[None], x.shape[:3])
    return jnp.stack(lines, axis=1), mask


class MoshiLM(nn.Module):
    """Moshi's ``LMModel`` (training forward), with an optional TTT graft in the temporal
    transformer. ``__call__(codes [B, K, T] int) -> LMOutput``."""

    config: MoshiLMConfig

    def setup(self):
        cfg = self.config
        dtype, std = jnp.dtype(cfg.dtype), cfg.init_std
        init = nn.initializers.normal(std)
        d, dd = cfg.transformer.d_model, cfg.depformer.d_model
        self.emb = [ScaledEmbed(cfg.card + 1, d, std, dtype) for _ in range(cfg.n_q)]
        self.text_emb = ScaledEmbed(cfg.text_card + 1, d, std, dtype)
        self.transformer = StreamingTransformer(cfg.temporal)
        self.out_norm = make_norm(cfg.transformer)
        self.text_linear = nn.Dense(cfg.text_vocab_out, use_bias=cfg.bias_proj, dtype=dtype,
                                    kernel_init=init)
        self.depformer_in = [nn.Dense(dd, use_bias=False, dtype=dtype, kernel_init=init)
                             for _ in range(cfg.depformer_in_count)]
        self.depformer_emb = [ScaledEmbed(cfg.card + 1, dd, std, dtype)
                              for _ in range(cfg.dep_q - 1)]
        self.depformer_text_emb = ScaledEmbed(cfg.text_card + 1, dd, std, dtype)
        self.depformer = Depformer(cfg)
        self.linears = [nn.Dense(cfg.card, use_bias=cfg.bias_proj, dtype=dtype, kernel_init=init)
                        for _ in range(cfg.dep_q)]

    @property
    def initial_ids(self) -> tuple[int, ...]:
        """The initial token of every stream (``MoshiLMConfig.initial_ids``)."""
        return self.config.initial_ids

    def _check(self, codes):
        k = self.config.num_codebooks
        if not jnp.issubdtype(codes.dtype, jnp.integer) or codes.ndim != 3 or codes.shape[1] != k:
            raise ValueError(f"MoshiLM expects integer codes of shape [B, K, T] with K = n_q + 1 "
                             f"= {k} (text first), got {codes.dtype}{list(codes.shape)}")

    def embed(self, inputs):
        """The temporal transformer's input: the sum of every stream's embedding ``[B, T, d]``
        of delayed ``inputs [B, K, T]``."""
        x = None
        for k, emb in enumerate(self.emb):
            e = emb(inputs[:, k + 1])
            x = e if x is None else x + e
        return x + self.text_emb(inputs[:, 0])

    def temporal(self, inputs):
        """Temporal path on delayed ``inputs [B, K, T]``: ``(h [B, T, d], text logits)``."""
        h = self.out_norm(self.transformer(self.embed(inputs)))
        return h, self.text_linear(h).astype(jnp.float32)

    def depformer_logits(self, sequence, h):
        """Depformer on the delayed codes ``sequence [B, K, T]`` and ``h [B, T, d]``:
        audio logits ``[B, dep_q, T, card]`` (still delayed)."""
        cfg = self.config
        bsz, length = h.shape[:2]
        if self.is_initializing():  # every projection moshi has, even one the schedule skips
            for linear in self.depformer_in:
                linear(h[:, :1])
        steps = []
        for s in range(cfg.dep_q):
            h_in = self.depformer_in[cfg.depformer_in_index(s)](h)
            if s == 0:
                token = self.depformer_text_emb(sequence[:, 0])
            else:
                token = self.depformer_emb[s - 1](sequence[:, s])
            steps.append(token + h_in)
        x = jnp.stack(steps, axis=2).reshape(bsz * length, cfg.dep_q, -1)
        out = self.depformer(x)
        logits = []
        for s in range(cfg.dep_q):
            logits.append(self.linears[s](out[:, s]).astype(jnp.float32).reshape(bsz, length, -1))
        return jnp.stack(logits, axis=1)

    def __call__(self, codes) -> LMOutput:
        self._check(codes)
        cfg = self.config
        bsz = codes.shape[0]
        initial = jnp.broadcast_to(jnp.asarray(self.initial_ids, codes.dtype)[None, :, None],
                                   (bsz, cfg.num_codebooks, 1))
        delayed = delay_codes(codes, cfg.delays, self.initial_ids)
        h, text_logits = self.temporal(jnp.concatenate([initial, delayed[:, :, :-1]], axis=2))
        audio = self.depformer_logits(delayed, h)
        logits, mask = undelay(audio, cfg.delays[1:1 + cfg.dep_q])
        mask = mask & (codes[:, 1:1 + cfg.dep_q] != ZERO_TOKEN_ID)
        text_logits, text_mask = undelay(text_logits[:, None], cfg.delays[:1])
        text_mask = text_mask & (codes[:, :1] != ZERO_TOKEN_ID)
        return LMOutput(logits, mask, text_logits, text_mask)

    # --- Persistent states: a long recording in consecutive windows (docs/moshi.md) ---------

    def init_carry(self, batch: int):
        """The state carried between windows of ``batch`` streams: the temporal transformer's
        streaming cache (the attention's last ``context`` keys and values, every grafted
        layer's TTT state, the stream position), fresh."""
        return self.transformer.init_cache(batch)

    def starts_stream(self, window):
        """``[B]`` bool: the window begins with the frame of initial tokens, i.e. at the start
        of a recording (with a stream of delay 0, no later frame is all initial tokens)."""
        initial = jnp.asarray(self.initial_ids, window.dtype)
        return jnp.all(window[:, :, 0] == initial[None, :], axis=1)

    def stream_window(self, window, carry):
        """One window of a delayed recording, continuing the streams in ``carry``.

        A recording of ``N`` frames is delayed once as a whole: ``D = [initial frame,
        delay_codes(codes)]`` (``N + 1`` frames). Window ``c`` is ``D[:, :, cT : cT + T + 1]``;
        consecutive windows overlap by one frame. The temporal transformer reads the window's
        first ``T`` frames from the carried state, the depformer and the targets are its last
        ``T``, so the logits of all windows together are those of one forward over the whole
        recording, in delayed coordinates (``undelay`` maps them back). A window that starts a
        recording (``starts_stream``) starts from a fresh state instead of the carried one.

        Args:
          window: delayed codes ``[B, K, T + 1]``.
          carry: from ``init_carry`` or the previous window.

        Returns:
          ``(text_logits [B, 1, T, V], audio_logits [B, dep_q, T, card], carry')``, float32,
          delayed: position ``j`` predicts ``window[:, :, j + 1]``.
        """
        self._check(window)
        fresh = self.init_carry(window.shape[0])
        start = self.starts_stream(window)
        carry = jax.tree.map(
            lambda a, b: jnp.where(start.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
            fresh, carry)
        h, carry = self.transformer.stream(self.embed(window[:, :, :-1]), carry)
        h = self.out_norm(h)
        text = self.text_linear(h).astype(jnp.float32)[:, None]
        return text, self.depformer_logits(window[:, :, 1:], h), carry


def delayed_recording(codes, delays, initial, start: int = 0, length=None):
    """Frames ``[start, start + length)`` (default: all ``N + 1``) of a whole recording
    ``codes [K, N]`` delayed, with the frame of initial tokens in front, as numpy ``[K,
    length]``: the sequence ``MoshiLM.stream_window`` reads in windows. Frame ``j`` of stream
    ``k`` is ``codes[k, j - 1 - delays[k]]``, or ``initial[k]`` before the stream begins."""
    codes = np.asarray(codes)
    n = codes.shape[1]
    length = n + 1 - start if length is None else length
    if start < 0 or start + length > n + 1:
        raise ValueError(f"frames [{start}, {start + length}) are outside the delayed recording "
                         f"of {n + 1} frames")
    frames = np.arange(start, start + length)
    lines = []
    for k, delay in enumerate(delays):
        src = frames - 1 - delay
        lines.append(np.where(src >= 0, codes[k, np.clip(src, 0, n - 1)], initial[k]))
    return np.stack(lines).astype(codes.dtype)
