"""Held-out sequences of a checkpoint's own validation data, for the loss by position.

Token LMs (``ttt_lm``, ``attention_lm``): windows of the validation split of ``data.source:
bytes``, ``tokens`` or ``prepared`` (int32 ``[N, L + 1]``). Moshi-TTT (``moshi_ttt``): frames of ``K`` token
streams (int32 ``[N, L + 1, K]``): windows of the validation bytes or of the held-out tail of
every codebook file (concatenated in file order), or, for ``synthetic``, validation rows
generated at the requested length. Windows sit at evenly spaced offsets that depend only on the
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


def _moshi_stream(cfg) -> tuple[Optional[np.ndarray], str]:
    """``[T, K]`` held-out frames, or ``None`` for generated (``synthetic``) data."""
    from ttt_jax.moshi.data import make_frames_dataset

    d = cfg.data
    if d.source == "synthetic":
        return None, "the synthetic validation split"
    ds = make_frames_dataset(d, cfg.model.vocab_sizes, seed=cfg.train.seed, split="val")
    if d.source == "bytes":
        return np.asarray(ds.inner.tokens)[:, None], "the bytes validation split"
    # codebooks: each file's validation windows are consecutive from its held-out cut to its
    # end; that tail (as the run split it, at its own seq_len) is the file's held-out part
    parts = []
    for f, arr in enumerate(ds.arrays):
        starts = ds.windows[ds.windows[:, 0] == f, 1]
        if starts.size:
            parts.append(np.asarray(arr[:, int(starts.min()):]).T)
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
            read = _moshi_stream if arch == "moshi_ttt" else _lm_stream
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
        from ttt_jax.moshi.data import make_frames_dataset

        d = dataclasses.replace(self.cfg.data, seq_len=length, batch_size=count)
        ds = make_frames_dataset(d, self.cfg.model.vocab_sizes, seed=self.cfg.train.seed,
                                 split="val")
        return np.asarray(ds.batch(0), np.int32)
