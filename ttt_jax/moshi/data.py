"""Training data of the Moshi-TTT hybrid: frames of ``K`` token streams, no download.

Every dataset's ``batch(step)`` is int32 ``[B, L + 1, K]`` (frame ``t`` holds one token per
stream; inputs ``[:, :-1]``, targets ``[:, 1:]``), a pure function of ``(seed, split, step)``.

* ``bytes``: the built-in byte corpus as a single stream (``K = 1``).
* ``synthetic``: ``K`` streams that each count up by a per-row stride modulo their vocab from a
  random start: the next frame is predictable from the two before it.
* ``codebooks``: ``.npy`` files shaped ``[K, T]`` (e.g. audio codebooks plus text), one file
  or every ``*.npy`` of a directory; the last ``val_fraction`` of each file's frames is val.
* ``motifs``: generated ``[K, T]`` recordings (``motif_recording``) in which a few random
  motifs recur far apart: a model predicts a recurrence only if it remembers the motif's
  earlier occurrence, which lies beyond a short attention window. Train and val recordings
  are different ones.

``codebooks`` and ``motifs`` are recordings. Cut into independent windows (``Windows``), or,
with ``ttt.persistent_states`` on a ``moshi_lm`` model, read in order as delayed windows of one
recording after another per batch row (``RecordingWindows``), so that the model's carried
state follows each recording.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ttt_jax.data import make_dataset
from ttt_jax.data.base import SPLITS, Dataset, check_step
from ttt_jax.moshi.config import MoshiDataConfig


class _FramesDataset(Dataset):
    """Common part: ``K`` streams with their own vocab sizes."""

    def __init__(self, *, vocab_sizes: tuple[int, ...], seq_len: int, batch_size: int,
                 seed: int, split: str):
        super().__init__(vocab_size=max(vocab_sizes), seq_len=seq_len, batch_size=batch_size,
                         seed=seed, split=split)
        self.vocab_sizes = tuple(vocab_sizes)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "streams": len(self.vocab_sizes),
                "vocab_sizes": list(self.vocab_sizes)}


class SyntheticFrames(_FramesDataset):
    """``tok[k, t] = (start_k + stride * t) % V_k`` with a random start and stride per row."""

    source = "synthetic"

    def batch(self, step: int) -> np.ndarray:
        step = check_step(step)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), step])
        t = np.arange(self.seq_len + 1)
        stride = rng.integers(1, 4, (self.batch_size, 1))
        cols = [(rng.integers(0, v, (self.batch_size, 1)) + stride * t) % v
                for v in self.vocab_sizes]
        return np.stack(cols, axis=-1).astype(np.int32)  # [B, L+1, K]


class ByteFrames(_FramesDataset):
    """The built-in byte corpus as one stream."""

    source = "bytes"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.inner = make_dataset("bytes", seq_len=self.seq_len, batch_size=self.batch_size,
                                  seed=self.seed, split=self.split, vocab_size=self.vocab_size)

    def batch(self, step: int) -> np.ndarray:
        return self.inner.batch(step)[..., None]  # [B, L+1, 1]

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "streams": 1}


def _codebook_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.npy"))
        if not files:
            raise ValueError(f"codebook directory {str(p)!r} has no .npy files: expected "
                             f"arrays shaped [K, T]")
        return files
    if not p.is_file():
        raise FileNotFoundError(f"codebook file {str(p)!r} does not exist: expected a .npy "
                                f"array shaped [K, T] or a directory of them")
    return [p]


def load_codebooks(path: str | Path, vocab_sizes: tuple[int, ...]) -> np.ndarray:
    """Reads one ``[K, T]`` ``.npy`` file and checks it against the model's streams."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 -- a broken file gets one clear line
        raise ValueError(f"codebook file {str(path)!r} is not a readable .npy array: {e}") from e
    k = len(vocab_sizes)
    if arr.ndim != 2 or arr.shape[0] != k:
        raise ValueError(f"codebook file {str(path)!r} has shape {list(arr.shape)}: expected "
                         f"[K, T] with K={k} streams (model.vocab_sizes has {k} entries)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codebook file {str(path)!r} has dtype {arr.dtype}: expected integer "
                         f"token ids")
    if arr.shape[1] == 0:
        raise ValueError(f"codebook file {str(path)!r} is empty (0 frames)")
    for i, v in enumerate(vocab_sizes):
        lo, hi = int(arr[i].min()), int(arr[i].max())
        if lo < 0 or hi >= v:
            bad = lo if lo < 0 else hi
            raise ValueError(f"codebook file {str(path)!r} stream {i} has token id {bad}: "
                             f"expected ids in [0, {v}) (model.vocab_sizes[{i}]={v})")
    return arr


# The motif generator: MOTIFS motifs of MOTIF_FRAMES frames per recording; a recording is a
# sequence of MOTIF_FRAMES-frame segments, each one of the motifs (probability 1/2, uniform
# among them) or random noise.
MOTIFS = 4
MOTIF_FRAMES = 8


def motif_recording(vocab_sizes: tuple[int, ...], frames: int, *, seed: int, split: str,
                    index: int) -> np.ndarray:
    """Recording ``index`` of ``split``: int32 ``[K, frames]``, a pure function of its args.

    Every stream of a segment is drawn together: a motif is ``[K, MOTIF_FRAMES]`` random ids
    fixed for the recording; noise is fresh random ids. Within a recurring motif every frame
    after the first is predictable from the motif's earlier occurrence (on average
    ``2 * MOTIFS * MOTIF_FRAMES`` frames before) and from nothing else.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), 0x6D6F7469, index])
    k, segments = len(vocab_sizes), -(-frames // MOTIF_FRAMES)
    high = np.asarray(vocab_sizes)[:, None]
    motifs = rng.integers(0, high[None], (MOTIFS, k, MOTIF_FRAMES))
    noise = rng.integers(0, high[None], (segments, k, MOTIF_FRAMES))
    which = rng.integers(0, MOTIFS, segments)
    use_motif = rng.random(segments) < 0.5
    blocks = np.where(use_motif[:, None, None], motifs[which], noise)  # [S, K, m]
    return np.concatenate(list(blocks), axis=1)[:, :frames].astype(np.int32)


def recordings(cfg: MoshiDataConfig, vocab_sizes: tuple[int, ...], *, seed: int,
               split: str) -> tuple[list[np.ndarray], int]:
    """The split's recordings ``[K, N]`` (memory-mapped for files) and the frames a window
    needs from each to be used at all (errors name the files' shortfall)."""
    if cfg.source == "motifs":
        return [motif_recording(vocab_sizes, cfg.recording_frames, seed=seed, split=split,
                                index=i) for i in range(cfg.recordings)], 0
    window = cfg.seq_len + 1
    out = []
    for f in _codebook_files(cfg.path):
        arr = load_codebooks(f, vocab_sizes)
        n = arr.shape[1]
        cut = n - max(window, int(round(n * cfg.val_fraction)))
        if cut > 0:
            out.append(arr[:, :cut] if split == "train" else arr[:, cut:])
    return out, 2 * window


class Windows(_FramesDataset):
    """Non-overlapping windows of ``L + 1`` frames from recordings, in seeded epochs."""

    source = "codebooks"

    def __init__(self, *, cfg: MoshiDataConfig, **kw):
        super().__init__(**kw)
        self.source = cfg.source
        window = self.seq_len + 1
        self.arrays, need = recordings(cfg, self.vocab_sizes, seed=self.seed, split=self.split)
        self.windows = [(i, s) for i, arr in enumerate(self.arrays)
                        for s in range(0, arr.shape[1] - window + 1, window)]
        if not self.windows:
            what = (f"files with at least {need} frames (a train and a val window)"
                    if cfg.source == "codebooks" else "data.recording_frames > seq_len")
            raise ValueError(f"{cfg.source} data {cfg.path or ''!s} ({self.split} split) has no "
                             f"window of seq_len+1={window} frames: expected {what}; lower "
                             f"seq_len")
        self.windows = np.asarray(self.windows)

    def batch(self, step: int) -> np.ndarray:
        step = check_step(step)
        g = step * self.batch_size + np.arange(self.batch_size)
        out = []
        for epoch, pos in zip(*np.divmod(g, len(self.windows))):
            rng = np.random.default_rng([self.seed, SPLITS.index(self.split), int(epoch)])
            f, s = self.windows[rng.permutation(len(self.windows))[pos]]
            out.append(np.asarray(self.arrays[f][:, s:s + self.seq_len + 1]).T)  # [L+1, K]
        return np.stack(out).astype(np.int32)

    def describe(self) -> dict[str, Any]:
        key = "files" if self.source == "codebooks" else "recordings"
        return {**super().describe(), key: len(self.arrays), "windows": len(self.windows)}


class RecordingWindows(_FramesDataset):
    """Recordings read in order, one delayed window per batch row and step (persistent states).

    Row ``r`` reads, epoch after epoch, the recordings ``permutation_e[r::B]`` one after the
    other, each as windows ``c = 0, 1, ...`` of its delayed frames ``[cL, cL + L + 1)``
    (``ttt_jax.moshi.lm.delayed_recording``; consecutive windows overlap by one frame and the
    first starts with the frame of initial tokens, where the model starts a fresh state). A
    recording's last partial window is dropped. ``batch(step)`` is ``[B, L + 1, K]``, a pure
    function of ``(seed, step)``: a resumed run reads exactly what it would have.
    """

    def __init__(self, *, cfg: MoshiDataConfig, delays: tuple[int, ...],
                 initial: tuple[int, ...], **kw):
        super().__init__(**kw)
        self.source = cfg.source
        self.delays, self.initial = tuple(delays), tuple(initial)
        arrays, _ = recordings(cfg, self.vocab_sizes, seed=self.seed, split=self.split)
        counts = [arr.shape[1] // self.seq_len for arr in arrays]
        self.arrays = [a for a, c in zip(arrays, counts) if c > 0]
        self.counts = np.asarray([c for c in counts if c > 0])
        if len(self.arrays) < self.batch_size:
            raise ValueError(
                f"ttt.persistent_states needs at least data.batch_size={self.batch_size} "
                f"recordings of at least seq_len={self.seq_len} frames (one per batch row), but "
                f"{self.source} data ({self.split} split) has {len(self.arrays)}: add "
                f"recordings or lower data.batch_size")
        self._starts: dict[int, list[int]] = {}  # row -> first window index of each epoch

    def _epoch(self, epoch: int, row: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), epoch])
        return rng.permutation(len(self.arrays))[row::self.batch_size]

    def locate(self, row: int, index: int) -> tuple[int, int]:
        """``(recording, window)`` of row ``row``'s ``index``-th window."""
        starts = self._starts.setdefault(row, [0])
        while starts[-1] <= index:
            starts.append(starts[-1] + int(self.counts[self._epoch(len(starts) - 1, row)].sum()))
        epoch = int(np.searchsorted(starts, index, side="right")) - 1
        offset = index - starts[epoch]
        for rec in self._epoch(epoch, row):
            if offset < self.counts[rec]:
                return int(rec), offset
            offset -= int(self.counts[rec])
        raise AssertionError("unreachable: the epoch holds the window")

    def batch(self, step: int) -> np.ndarray:
        from ttt_jax.moshi.lm import delayed_recording

        step = check_step(step)
        out = []
        for row in range(self.batch_size):
            rec, c = self.locate(row, step)
            out.append(delayed_recording(self.arrays[rec], self.delays, self.initial,
                                         c * self.seq_len, self.seq_len + 1).T)
        return np.stack(out).astype(np.int32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "recordings": len(self.arrays),
                "windows": int(self.counts.sum()), "persistent_states": True}


def make_frames_dataset(cfg: MoshiDataConfig, vocab_sizes: tuple[int, ...], *, seed: int,
                        split: str) -> Dataset:
    """The dataset ``cfg.source`` names, for a model with streams ``vocab_sizes``."""
    common = dict(vocab_sizes=tuple(vocab_sizes), seq_len=cfg.seq_len,
                  batch_size=cfg.batch_size, seed=seed, split=split)
    if cfg.source == "bytes":
        if len(vocab_sizes) != 1 or vocab_sizes[0] < 256:
            raise ValueError(f"data.source='bytes' is invalid for model.vocab_sizes="
                             f"{list(vocab_sizes)}: expected one stream of at least 256 ids")
        return ByteFrames(**common)
    if cfg.source == "synthetic":
        return SyntheticFrames(**common)
    return Windows(cfg=cfg, **common)


def make_recording_windows(cfg: MoshiDataConfig, vocab_sizes: tuple[int, ...], *, seed: int,
                           split: str, delays: tuple[int, ...],
                           initial: tuple[int, ...]) -> RecordingWindows:
    """Persistent-state windows of the recordings of ``cfg`` (``codebooks`` or ``motifs``)."""
    if cfg.source not in ("codebooks", "motifs"):
        raise ValueError(f"data.source={cfg.source!r} is invalid with ttt.persistent_states: "
                         f"expected recordings, 'codebooks' or 'motifs'")
    return RecordingWindows(cfg=cfg, delays=delays, initial=initial,
                            vocab_sizes=tuple(vocab_sizes), seq_len=cfg.seq_len,
                            batch_size=cfg.batch_size, seed=seed, split=split)
