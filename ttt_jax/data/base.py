"""The dataset interface and the windowed loader shared by the corpus sources (docs/architecture.md §5).

A dataset is a pure function of ``(seed, split, step)``: ``batch(step)`` always returns the same
array for the same step, so the "data position" a checkpoint stores is just the step, and a
resumed run asks for step ``k`` and gets exactly the batch a straight run got (docs/architecture.md §4).
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import numpy as np

SPLITS = ("train", "val")
# Folded into every seed so that the train and val streams never share random numbers.
SPLIT_IDS = {"train": 0, "val": 1}
# Largest slice scanned at once when looking for the maximum token id of a memmapped file.
_MAX_SCAN_CHUNK = 1 << 24
# Window permutations kept per dataset: the current epoch and the one a batch may straddle into.
_PERM_CACHE_SIZE = 2


def check_positive_int(field: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is an int > 0 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"data.{field}={value!r} is invalid: expected a positive integer")


def check_common(seq_len: Any, batch_size: Any, seed: Any, split: Any) -> None:
    """Validates the arguments every source takes, naming the bad field and value."""
    check_positive_int("seq_len", seq_len)
    check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"data.seed={seed!r} is invalid: expected an integer >= 0")
    if split not in SPLITS:
        raise ValueError(f"data.split={split!r} is invalid: expected one of "
                         + ", ".join(repr(s) for s in SPLITS))


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step={step!r} is invalid: expected an integer >= 0")
    return int(step)


def max_token_id(tokens: np.ndarray) -> int:
    """The largest id in a 1-D (possibly memmapped) array, read in bounded chunks."""
    top = 0
    for start in range(0, tokens.shape[0], _MAX_SCAN_CHUNK):
        top = max(top, int(tokens[start:start + _MAX_SCAN_CHUNK].max()))
    return top


def check_ids_in_vocab(what: str, max_id: int, vocab_size: int | None) -> None:
    """Raises ``ValueError`` naming the largest id found when it does not fit the model's vocab.

    Args:
      what: names the data, e.g. ``"token file 'a.npy'"``.
      max_id: the largest token id in the data.
      vocab_size: the model's vocab size, or None to skip the check.
    """
    if vocab_size is None:
        return
    check_positive_int("vocab_size", vocab_size)
    if max_id >= vocab_size:
        raise ValueError(f"{what} has token id {max_id} >= vocab_size={vocab_size}: "
                         f"expected every id in [0, {vocab_size}); raise model.vocab_size to at "
                         f"least {max_id + 1} or re-tokenize")


class Dataset(abc.ABC):
    """A deterministic, resumable stream of training batches.

    Attributes:
      vocab_size: number of token ids the data can contain (256 for bytes).
      seq_len: ``L``; a batch holds ``L + 1`` tokens per row (inputs ``[:, :-1]``,
        targets ``[:, 1:]``).
      batch_size: ``B``, rows per batch.
      seed: the seed of the order (and of the synthetic tokens).
      split: ``"train"`` or ``"val"``.
    """

    source: str = ""
    # UTF-8 bytes per token of the text behind the ids (for bits per byte); None: unknown.
    bytes_per_token: Optional[float] = None

    def __init__(self, *, vocab_size: int, seq_len: int, batch_size: int, seed: int,
                 split: str):
        check_common(seq_len, batch_size, seed, split)
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.split = split

    @abc.abstractmethod
    def batch(self, step: int) -> np.ndarray:
        """The batch at ``step``: int32 ``[B, L + 1]``, a pure function of (seed, split, step)."""

    def loss_mask(self, step: int) -> np.ndarray | None:
        """Weights of the targets ``batch(step)[:, 1:]``: None (all count) or float32 ``[B, L]``."""
        check_step(step)
        return None

    def record_in_run(self, run_dir) -> None:
        """Keeps in ``run_dir`` what a run must know of its data later (a prepared corpus's
        tokenizer); nothing by default."""

    def describe(self) -> dict[str, Any]:
        """A short JSON-serialisable summary for logs."""
        return {"source": self.source, "split": self.split, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed,
                "vocab_size": self.vocab_size}


class WindowDataset(Dataset):
    """Non-overlapping windows of ``L + 1`` tokens from a 1-D token array, in seeded epochs.

    Window ``i`` covers ``tokens[i*(L+1) : (i+1)*(L+1)]``; the tail shorter than a window is
    never read. Row ``r`` of batch ``step`` is global sample ``g = step*B + r``; it lies in
    epoch ``g // W`` (``W`` windows) at position ``g % W`` of that epoch's permutation, seeded by
    ``(seed, split, epoch)``. When ``W`` is a multiple of ``B`` this is exactly
    ``epoch = step // batches_per_epoch``; otherwise no window is dropped and a batch may
    straddle two epochs. Each epoch visits every window once.
    """

    def __init__(self, tokens: np.ndarray, *, source: str, name: str, vocab_size: int,
                 seq_len: int, batch_size: int, seed: int, split: str,
                 info: dict[str, Any] | None = None, bytes_per_token: Optional[float] = None):
        """Builds the loader.

        Args:
          tokens: 1-D array (uint8/uint16/uint32, possibly a read-only memmap) of this split.
          source: the source name for logs.
          name: names the data in errors, e.g. ``"bytes corpus"``.
          vocab_size: the data's vocab size.
          seq_len, batch_size, seed, split: as in :func:`ttt_jax.data.make_dataset`.
          info: extra entries for :meth:`describe`.
          bytes_per_token: UTF-8 bytes per token of the text behind the ids, if known.
        """
        super().__init__(vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size,
                         seed=seed, split=split)
        self.source = source
        self.tokens = tokens
        window = self.seq_len + 1
        if tokens.shape[0] < window:
            raise ValueError(f"{name} ({split} split) has {tokens.shape[0]} tokens, shorter than "
                             f"one sequence of seq_len+1={window} tokens: expected at least "
                             f"{window}; lower seq_len or use more data")
        self.num_windows = tokens.shape[0] // window
        self._info = dict(info or {})
        self.bytes_per_token = bytes_per_token
        self._perms: dict[int, np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> float:
        """Batches per pass over every window (fractional when ``W % B != 0``)."""
        return self.num_windows / self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], epoch])
            perm = rng.permutation(self.num_windows)
            if len(self._perms) >= _PERM_CACHE_SIZE:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def window_starts(self, step: int) -> np.ndarray:
        """Token offsets of the ``B`` windows of batch ``step``: int64 ``[B]``."""
        step = check_step(step)
        g = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)  # [B]
        epochs, pos = np.divmod(g, self.num_windows)
        index = np.empty_like(g)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            index[rows] = self._permutation(int(epoch))[pos[rows]]
        return index * (self.seq_len + 1)

    def batch(self, step: int) -> np.ndarray:
        starts = self.window_starts(step)
        offsets = starts[:, None] + np.arange(self.seq_len + 1)  # [B, L+1]
        return np.asarray(self.tokens[offsets], dtype=np.int32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_tokens": int(self.tokens.shape[0]),
                "num_windows": int(self.num_windows), **self._info}
