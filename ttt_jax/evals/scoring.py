"""Per-token loss and argmax prediction of a checkpoint's model over long sequences.

``Scorer(arch, model_cfg, params, chunk).score(tokens)`` scores ``tokens[:, 1:]`` from
``tokens[:, :-1]``. With ``chunk > 0`` a sequence longer than ``chunk`` is streamed in chunks of
``chunk`` tokens, so memory does not grow with its length; every path is exact (equal to one
forward pass over the whole sequence):

* ``ttt_lm``: the streaming state carries everything before the chunk
  (:class:`ttt_jax.decode.Decoder`).
* ``attention_lm``: chunk ``[s, e)`` is scored from tokens ``[s - context, e)`` with
  ``context = num_layers * (window - 1)`` (plus the pre-conv), all that can reach it.
* ``moshi_ttt``: ``[B, L + 1, K]`` frames through the model's own streaming cache (KV cache of
  ``transformer.context`` frames, TTT state); the loss of a frame is the mean over its ``K``
  streams of each stream's cross-entropy (its softmax over its own vocabulary).
* ``moshi_lm``: ``[B, L + 1, K]`` frames of one recording from its start (text first), delayed
  as a whole and read in windows of ``chunk`` frames with the carried state
  (``MoshiLM.stream_window``, the persistent-state path); the loss is per stream, ``[B, L, S]``
  for text and the ``dep_q`` predicted codebooks (``stream_names``), NaN at the last positions
  of a stream whose delay leaves them without a prediction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.evals.options import DEFAULT_CHUNK

# Architectures this module can score, and the input rank each takes ([B, L] or [B, L, K]).
INPUT_RANK = {"ttt_lm": 2, "attention_lm": 2, "moshi_ttt": 3, "moshi_lm": 3}
# The Moshi-TTT model's method that continues its streams by a chunk of frames.
MOSHI_STREAM_METHOD = "stream"


def loss_argmax(logits, targets):
    """``(loss, argmax)``: per-target cross-entropy (averaged over the streams of a frame when
    ``targets`` is ``[B, L, K]``) and the argmax prediction of every target."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if loss.ndim == 3:
        loss = jnp.mean(loss, axis=-1)
    return loss, jnp.argmax(logits, axis=-1).astype(jnp.int32)


class Scorer:
    """Per-token loss and argmax of one model over long sequences.

    Args:
      arch: the checkpoint's :class:`ttt_jax.registry.Architecture`.
      model_cfg: its model config.
      params: its params.
      chunk: stream sequences longer than this in chunks of this many tokens (0: never).

    ``score(tokens)`` takes int ``[B, L + 1]`` (``[B, L + 1, K]`` for the Moshi models) and
    returns ``(loss [B, L] float32, argmax [B, L] or [B, L, K] int32)``; for ``moshi_lm`` the
    loss and argmax are per stream, ``[B, L, S]`` (``stream_names``).
    """

    def __init__(self, arch, model_cfg, params, chunk: int = DEFAULT_CHUNK):
        if arch.name not in INPUT_RANK:
            raise ValueError(f"--checkpoint: architecture {arch.name!r} has no scorer: expected "
                             f"one of {', '.join(sorted(INPUT_RANK))}")
        self.arch = arch
        self.cfg = model_cfg
        self.params = params
        self.chunk = chunk
        self.model = model = arch.build_model(model_cfg)
        frames = arch.name == "moshi_ttt"

        def full(params, inputs, targets, offset):
            if frames:
                logits = model.apply({"params": params}, inputs, offset)
            else:
                from ttt_jax.types import SequenceMetadata

                logits = model.apply({"params": params}, inputs, SequenceMetadata(offset=offset))
            return loss_argmax(logits, targets)

        self._full = jax.jit(full)
        self._loss_argmax = jax.jit(loss_argmax)
        self._decoder = None
        self._chunked = {"ttt_lm": self._score_stream, "attention_lm": self._score_window,
                         "moshi_ttt": self._score_frames,
                         "moshi_lm": self._score_recording}[arch.name]
        self.stream_names = None
        if arch.name == "moshi_lm":
            self.stream_names = ["text"] + [f"audio{q}" for q in range(model_cfg.dep_q)]

    @property
    def chunked(self) -> bool:
        return self.chunk > 0

    def score(self, tokens: np.ndarray):
        tokens = np.asarray(tokens, np.int32)
        rank = INPUT_RANK[self.arch.name]
        if tokens.ndim != rank or tokens.shape[1] < 2:
            want = "[B, L + 1]" if rank == 2 else "[B, L + 1, K]"
            raise ValueError(f"tokens must be {want} with L >= 1 for {self.arch.name}, got "
                             f"{list(tokens.shape)}")
        if self.arch.name == "moshi_lm":
            return self._score_recording(tokens)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        length = inputs.shape[1]
        if not self.chunked or length <= self.chunk:
            loss, pred = self._full(self.params, inputs, targets, 0)
            return np.asarray(loss), np.asarray(pred)
        return self._chunked(inputs, targets)

    def _score_stream(self, inputs, targets):
        """TTT-LM: the streaming state carries everything before the chunk (exact)."""
        if self._decoder is None:
            from ttt_jax.decode import Decoder

            self._decoder = Decoder(self.cfg)
        dec = self._decoder
        state = dec.init_state(self.params, inputs.shape[0])
        losses, preds = [], []
        for s in range(0, inputs.shape[1], self.chunk):
            e = min(s + self.chunk, inputs.shape[1])
            logits, state = dec.prefill(self.params, inputs[:, s:e], state)
            loss, pred = self._loss_argmax(logits, targets[:, s:e])
            losses.append(np.asarray(loss))
            preds.append(np.asarray(pred))
        return np.concatenate(losses, axis=1), np.concatenate(preds, axis=1)

    def _score_window(self, inputs, targets):
        """Sliding-window attention: chunk ``[s, e)`` from tokens ``[s - context, e)`` (exact).

        The first pass scores ``[0, context + chunk)`` so that every later pass has the same
        shape (``context + chunk`` tokens), and one compilation serves them all.
        """
        from ttt_jax.models.attention_lm import context_needed

        context = context_needed(self.cfg)
        length = inputs.shape[1]
        first = min(length, context + self.chunk)
        losses, preds = [], []
        for s in [0] + list(range(first, length, self.chunk)):
            e = first if s == 0 else min(s + self.chunk, length)
            lo = max(0, s - context)
            loss, pred = self._full(self.params, inputs[:, lo:e], targets[:, lo:e], lo)
            losses.append(np.asarray(loss)[:, s - lo:])
            preds.append(np.asarray(pred)[:, s - lo:])
        return np.concatenate(losses, axis=1), np.concatenate(preds, axis=1)

    @functools.cached_property
    def _frames_fns(self):
        model = self.model

        def init(params, batch):
            return model.apply({"params": params}, batch, method="init_cache")

        def chunk(params, inputs, targets, cache):
            logits, cache = model.apply({"params": params}, inputs, cache,
                                        method=MOSHI_STREAM_METHOD)
            return (*loss_argmax(logits, targets), cache)

        return jax.jit(init, static_argnums=1), jax.jit(chunk)

    def _score_frames(self, inputs, targets):
        """Moshi-TTT: the KV cache and the TTT state carry everything before the chunk."""
        if self.cfg.transformer.context is None:
            raise ValueError(f"--chunk={self.chunk} is invalid for this moshi_ttt checkpoint: "
                             f"its transformer.context is None (unbounded attention cannot be "
                             f"streamed); use --chunk 0 (one forward pass per sequence)")
        init, step = self._frames_fns
        cache = init(self.params, inputs.shape[0])
        losses, preds = [], []
        for s in range(0, inputs.shape[1], self.chunk):
            e = min(s + self.chunk, inputs.shape[1])
            loss, pred, cache = step(self.params, inputs[:, s:e], targets[:, s:e], cache)
            losses.append(np.asarray(loss))
            preds.append(np.asarray(pred))
        return np.concatenate(losses, axis=1), np.concatenate(preds, axis=1)


    @functools.cached_property
    def _recording_fns(self):
        model = self.model

        def init(params, batch):
            return model.apply({"params": params}, batch, method="init_carry")

        def window(params, w, carry):
            text, audio, carry = model.apply({"params": params}, w, carry,
                                             method="stream_window")
            target = w[:, :, 1:]
            losses, preds = [], []
            for logits, tgt in ((text, target[:, :1]), (audio, target[:, 1:1 + audio.shape[1]])):
                valid = (tgt >= 0) & (tgt < logits.shape[-1])  # initial and zero tokens: none
                logp = jax.nn.log_softmax(logits, axis=-1)
                loss = -jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None],
                                            axis=-1)[..., 0]
                losses.append(jnp.where(valid, loss, jnp.nan))
                preds.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
            return jnp.concatenate(losses, axis=1), jnp.concatenate(preds, axis=1), carry

        return jax.jit(init, static_argnums=1), jax.jit(window)

    def _score_recording(self, tokens):
        """MoshiLM: the recording delayed once, windows of ``chunk`` frames with the carried
        state (exact: equal to one forward over the whole recording); the last window is
        padded with zero-token frames, so one compilation serves every window."""
        from ttt_jax.moshi.lm import ZERO_TOKEN_ID, delayed_recording

        cfg = self.cfg
        codes = np.swapaxes(tokens, 1, 2)  # [B, K, n]
        bsz, _, n = codes.shape
        delayed = np.stack([delayed_recording(c, cfg.delays, cfg.initial_ids)
                            for c in codes])
        # Predictions of delayed positions [0, n - 1 + max delay) place every frame but the
        # last (the positions past the recording read the zero-token padding: not counted).
        positions = n - 1 + max(max(cfg.delays), 1)
        chunk = self.chunk if self.chunked else positions
        windows = -(-positions // chunk)
        pad = np.full((bsz, codes.shape[1], windows * chunk + 1 - delayed.shape[2]),
                      ZERO_TOKEN_ID, delayed.dtype)
        delayed = np.concatenate([delayed, pad], axis=2)
        init, step = self._recording_fns
        carry = init(self.params, bsz)
        losses, preds = [], []
        for c in range(windows):
            loss, pred, carry = step(self.params, delayed[:, :, c * chunk:(c + 1) * chunk + 1],
                                     carry)
            losses.append(np.asarray(loss))
            preds.append(np.asarray(pred))
        loss, pred = np.concatenate(losses, axis=2), np.concatenate(preds, axis=2)
        # Delayed position t + delays[k] of stream k predicts frame t: back to frame order.
        length = n - 1
        out_loss = np.full((bsz, length, loss.shape[1]), np.nan, np.float32)
        out_pred = np.zeros((bsz, length, loss.shape[1]), np.int32)
        for k in range(loss.shape[1]):
            d = cfg.delays[k]
            out_loss[:, :, k] = loss[:, k, d:d + length]
            out_pred[:, :, k] = pred[:, k, d:d + length]
        return out_loss, out_pred


def score_in_batches(scorer: Scorer, tokens: np.ndarray, batch: int):
    """``scorer.score`` over row batches of at most ``batch`` sequences."""
    out = [scorer.score(tokens[i:i + batch]) for i in range(0, tokens.shape[0], batch)]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
