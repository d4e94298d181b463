"""Held-out sequences of a checkpoint's own validation data, for the loss by position.

Token LMs (``ttt_lm``, ``attention_lm``): windows of the validation split of ``data.source:
bytes``, ``tokens`` or ``prepared`` (int32 ``[N, L + 1]``). The Moshi models (``moshi_ttt``,
``moshi_lm``): frames of ``K`` token streams (int32 ``[N, L + 1, K]``): windows of the
validation bytes or of the held-out tail of every codebook file (concatenated in file order),
or, for ``synthetic``, validation rows generated at the requested length, and for ``motifs``
validation recordings generated at the requested length (each read from its start). Windows sit at evenly spaced offsets that depend only on the
split, the length and the count, so a shorter sequence is a prefix of a longer one when both are
cut from the longest (what :func:`ttt_jax.evals.tasks.evaluate_lm` does).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from ttt_jax import registry

LANGUAGE_SOURCES = ("bytes", "tokens", "prepared")


def evenly_spaced_windows(stream: np.ndarray, length: int, count: int, what: str) -> np.ndarray:
    """``count`` windows of ``length + 1`` items of ``stream`` (``[T, ...]``) at evenly spaced
    offsets: int32 ``[N, L + 1, ...]``."""
    need = length + 1
    if stream.shape[0] < need:
        raise ValueError(f"--lengths: {length} is too long for {what}, which holds "
                         f"{stream.shape[0]} positions, fewer than one sequence of {length} + 1: "
                         f"lower --lengths")
    starts = np.linspace(0, stream.shape[0] - need, count).astype(np.int64)
    return np.stack([np.asarray(stream[s:s + need], np.int32) for s in starts])


def _lm_stream(cfg) -> tuple[np.ndarray, str]:
    d = cfg.data
    if d.source not in LANGUAGE_SOURCES:
        raise ValueError(f"data.source={d.source!r} of the checkpoint is not language data: loss "
                         f"by position needs one of {', '.join(LANGUAGE_SOURCES)} (use --recall "
                         f"for recall)")
    _, val = registry.of(cfg).build_datasets(cfg)  # the run's own validation split
    return np.asarray(val.tokens), f"the {d.source} validation split"


def frames_vocab_sizes(cfg) -> tuple[int, ...]:
    """The token range of every stream of a Moshi run's data (text first for ``moshi_lm``)."""
    if registry.of(cfg).name == "moshi_lm":
        from ttt_jax.moshi.registration import lm_vocab_sizes

        return lm_vocab_sizes(cfg.model)
    return tuple(cfg.model.vocab_sizes)


def _moshi_stream(cfg) -> tuple[Optional[np.ndarray], str]:
    """``[T, K]`` held-out frames, or ``None`` for generated (``synthetic``, ``motifs``) data."""
    from ttt_jax.moshi.data import make_frames_dataset

    d = cfg.data
    if d.source in ("synthetic", "motifs"):
        return None, f"the {d.source} validation split"
    ds = make_frames_dataset(d, frames_vocab_sizes(cfg), seed=cfg.train.seed, split="val")
    if d.source == "bytes":
        return np.asarray(ds.inner.tokens)[:, None], "the bytes validation split"
    # codebooks: each file's held-out tail (as the run split it), in file order
    parts = [np.asarray(arr).T for arr in ds.arrays]
    return np.concatenate(parts), f"the held-out frames of the codebooks at {d.path!r}"


@dataclasses.dataclass
class HeldOut:
    """The held-out data of one run config; ``sequences(length, count)`` cuts windows."""

    cfg: object
    _stream: Optional[np.ndarray] = None
    _what: str = ""
    _read: bool = False

    def _load(self):
        if not self._read:
            arch = registry.of(self.cfg).name
            read = _moshi_stream if arch in ("moshi_ttt", "moshi_lm") else _lm_stream
            self._stream, self._what = read(self.cfg)
            self._read = True

    @property
    def bytes_per_token(self) -> Optional[float]:
        """UTF-8 bytes per token of the held-out text, for bits per byte: 1 for the byte
        corpus, the validation split's bytes over its tokens for a prepared corpus that
        recorded them, else None (no bits per byte)."""
        d = self.cfg.data
        if d.source == "bytes":
            return 1.0
        if d.source == "prepared" and d.prepared:
            from ttt_jax.data.prepared import bytes_per_token, read_meta

            return bytes_per_token(read_meta(d.prepared), "val")
        return None

    def sequences(self, length: int, count: int) -> np.ndarray:
        """``count`` held-out sequences of ``length`` inputs and their next tokens:
        int32 ``[N, L + 1]`` (``[N, L + 1, K]`` for Moshi-TTT)."""
        self._load()
        if self._stream is not None:
            return evenly_spaced_windows(self._stream, length, count, self._what)
        from ttt_jax.moshi.data import make_frames_dataset, motif_recording

        vocab, seed = frames_vocab_sizes(self.cfg), self.cfg.train.seed
        if self.cfg.data.source == "motifs":  # whole recordings of the length, from the start
            return np.stack([motif_recording(vocab, length + 1, seed=seed, split="val",
                                             index=i).T for i in range(count)])
        d = dataclasses.replace(self.cfg.data, seq_len=length, batch_size=count)
        ds = make_frames_dataset(d, vocab, seed=seed, split="val")
        return np.asarray(ds.batch(0), np.int32)
