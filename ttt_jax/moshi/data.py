"""Training data of the Moshi-TTT hybrid: frames of ``K`` token streams, no download.

Every dataset's ``batch(step)`` is int32 ``[B, L + 1, K]`` (frame ``t`` holds one token per
stream; inputs ``[:, :-1]``, targets ``[:, 1:]``), a pure function of ``(seed, split, step)``.

* ``bytes``: the built-in byte corpus as a single stream (``K = 1``).
* ``synthetic``: ``K`` streams that each count up by a per-row stride modulo their vocab from a
  random start: the next frame is predictable from the two before it.
* ``codebooks``: ``.npy`` files shaped ``[K, T]`` (e.g. audio codebooks plus text), one file
  or every ``*.npy`` of a directory; the last ``val_fraction`` of each file's frames is val.
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


class CodebookFrames(_FramesDataset):
    """Non-overlapping windows of ``L + 1`` frames from ``[K, T]`` files, in seeded epochs."""

    source = "codebooks"

    def __init__(self, *, path: str, val_fraction: float, **kw):
        super().__init__(**kw)
        window = self.seq_len + 1
        self.arrays, self.windows = [], []
        for f in _codebook_files(path):
            arr = load_codebooks(f, self.vocab_sizes)
            n = arr.shape[1]
            cut = n - max(window, int(round(n * val_fraction)))
            lo, hi = (0, cut) if self.split == "train" else (cut, n)
            starts = range(lo, hi - window + 1, window) if cut > 0 else range(0)
            self.windows += [(len(self.arrays), s) for s in starts]
            self.arrays.append(arr)
        if not self.windows:
            raise ValueError(f"codebook data {path!r} ({self.split} split) has no window of "
                             f"seq_len+1={window} frames: expected files with at least "
                             f"{2 * window} frames (a train and a val window); lower seq_len")
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
        return {**super().describe(), "files": len(self.arrays), "windows": len(self.windows)}


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
    return CodebookFrames(path=cfg.path, val_fraction=cfg.val_fraction, **common)
