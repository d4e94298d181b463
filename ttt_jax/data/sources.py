"""Built-in data sources, none of which downloads anything (docs/architecture.md §5).

* ``bytes``: a byte-level corpus made from the Python standard library's own source files.
* ``recall``: synthetic multi-query associative recall (see :mod:`ttt_jax.data.recall`).
* ``tokens``: a user token file, ``.npy`` or a raw binary memmap of ``uint16``/``uint32`` ids,
  with an optional separate validation file.
* ``prepared``: a ``ttt-jax prepare`` output directory (``train.bin``, ``val.bin``,
  ``meta.json``; see :mod:`ttt_jax.data.prepared`).

:func:`make_dataset` picks the builder from a registry and returns a :class:`Dataset` whose
``batch(step)`` is a pure function of ``(seed, split, step)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ttt_jax.data.base import (Dataset, WindowDataset, check_common, check_ids_in_vocab,
                               check_positive_int, max_token_id)
from ttt_jax.data.prepared import (PREPARE_HINT, check_model_vocab, load_split, read_meta,
                                   bytes_per_token, record_in_run, tokenizer_info)
from ttt_jax.data.recall import RecallDataset

BYTE_VOCAB_SIZE = 256
# ASCII "file separator": marks file boundaries and never occurs in Python source text.
FILE_SEPARATOR = 0x1C
# The corpus keeps the first files (sorted by name) that fit in this many bytes: fast to build.
DEFAULT_MAX_BYTES = 4 * 2**20
# Every 20th candidate file (by sorted position) goes to the val split.
DEFAULT_VAL_EVERY = 20
DEFAULT_BYTES_PATTERN = "*.py"
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_RECALL_NUM_PAIRS = 8
DEFAULT_RECALL_VOCAB = 64
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# Hex digits of the sha256 shown in logs; enough to tell two corpora apart.
_FINGERPRINT_CHARS = 16


def stdlib_dir() -> Path:
    """The directory of the standard library's ``os`` module: text present on every machine."""
    return Path(os.__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class ByteCorpus:
    """A byte corpus split by file.

    Attributes:
      root: the directory the files came from.
      train, val: uint8 arrays; each file's bytes followed by ``FILE_SEPARATOR``.
      train_files, val_files: names of the files in each split, in corpus order.
    """

    root: str
    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]


def build_byte_corpus(root: str | os.PathLike | None = None, *,
                      max_bytes: int = DEFAULT_MAX_BYTES, val_every: int = DEFAULT_VAL_EVERY,
                      pattern: str = DEFAULT_BYTES_PATTERN) -> ByteCorpus:
    """Reads a deterministic list of files into a train/val byte corpus.

    Candidates are the regular files directly in ``root`` matching ``pattern``, sorted by name.
    They are read in that order until the next one would push the total past ``max_bytes``;
    files that cannot be read or are empty are skipped. Candidate ``i`` goes to val when
    ``i % val_every == val_every - 1`` (positions, not contents, so the split is stable); if
    that leaves val empty, the last file read goes to val.

    Args:
      root: the directory; defaults to :func:`stdlib_dir`.
      max_bytes: cap on the corpus size (train + val, separators included).
      val_every: one file in this many goes to val; at least 2.
      pattern: glob pattern of the files to read.

    Returns:
      A :class:`ByteCorpus` whose splits share no file.
    """
    check_positive_int("max_bytes", max_bytes)
    if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"data.val_every={val_every!r} is invalid: expected an integer >= 2")
    root = stdlib_dir() if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"bytes corpus directory {str(root)!r} does not exist: expected "
                                f"a directory of {pattern!r} text files")
    kept: list[tuple[int, str, bytes]] = []
    total = 0
    for i, file in enumerate(sorted(p for p in root.glob(pattern) if p.is_file())):
        try:
            data = file.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        if total + len(data) + 1 > max_bytes:
            break
        kept.append((i, file.name, data))
        total += len(data) + 1
    if len(kept) < 2:
        raise ValueError(f"bytes corpus directory {str(root)!r} has {len(kept)} readable "
                         f"non-empty {pattern!r} files within max_bytes={max_bytes}: expected at "
                         f"least 2 (one for train, one for val)")
    is_val = [i % val_every == val_every - 1 for i, _, _ in kept]
    if not any(is_val):
        is_val[-1] = True
    sep = bytes([FILE_SEPARATOR])

    def join(want_val: bool) -> tuple[np.ndarray, tuple[str, ...]]:
        chosen = [(name, data) for (_, name, data), v in zip(kept, is_val) if v == want_val]
        blob = b"".join(data + sep for _, data in chosen)
        return np.frombuffer(blob, dtype=np.uint8), tuple(name for name, _ in chosen)

    train, train_files = join(False)
    val, val_files = join(True)
    return ByteCorpus(str(root), train, val, train_files, val_files)


def load_token_file(path: str | os.PathLike, token_dtype: str | None = None) -> np.ndarray:
    """Opens a token file read-only without loading it into memory.

    Args:
      path: a ``.npy`` file holding a 1-D ``uint16``/``uint32`` array, or any other file read
        as raw ids of ``token_dtype``.
      token_dtype: ``"uint16"`` or ``"uint32"``; required for raw files. A ``.npy`` header
        names its own dtype, so there it is only validated, never applied (a config default
        of ``"uint16"`` must not break a ``uint32`` ``.npy``).

    Returns:
      A 1-D read-only memmap.
    """
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"token file {name} does not exist: expected a .npy file or a "
                                f"raw binary file of uint16/uint32 token ids")
    if token_dtype is not None and token_dtype not in TOKEN_DTYPES:
        raise ValueError(f"data.token_dtype={token_dtype!r} is invalid: expected one of "
                         + ", ".join(repr(d) for d in TOKEN_DTYPES))
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"token file {name} is empty (0 bytes): expected a 1-D array of "
                         f"uint16 or uint32 token ids")
    if path.suffix == ".npy":
        tokens = _load_npy(path, name)
    else:
        if token_dtype is None:
            raise ValueError(f"data.token_dtype=None is invalid for raw token file {name}: "
                             f"expected one of " + ", ".join(repr(d) for d in TOKEN_DTYPES))
        itemsize = np.dtype(TOKEN_DTYPES[token_dtype]).itemsize
        if size % itemsize:
            raise ValueError(f"token file {name} has {size} bytes, not a multiple of the "
                             f"{itemsize}-byte {token_dtype}: expected a raw array of "
                             f"{token_dtype} ids (is token_dtype right?)")
        tokens = np.memmap(path, dtype=TOKEN_DTYPES[token_dtype], mode="r")
    if tokens.shape[0] == 0:
        raise ValueError(f"token file {name} is empty (0 tokens): expected at least one "
                         f"sequence of token ids")
    return tokens


def _load_npy(path: Path, name: str) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"token file {name} is not a readable .npy array ({err}): expected a "
                         f"1-D uint16 or uint32 array saved with numpy.save") from None
    allowed = [np.dtype(d) for d in TOKEN_DTYPES.values()]
    if tokens.dtype.newbyteorder("=") not in allowed:
        raise ValueError(f"token file {name} has dtype {tokens.dtype}: expected uint16 or "
                         f"uint32 token ids (convert with arr.astype(np.uint32))")
    if tokens.ndim != 1:
        raise ValueError(f"token file {name} has shape {tokens.shape}: expected a 1-D array "
                         f"of token ids (flatten it first)")
    return tokens


def split_tokens(tokens: np.ndarray, name: str, seq_len: int, split: str,
                 val_fraction: float) -> np.ndarray:
    """The train or val part of a token array: val is the last ``val_fraction`` of it.

    Val holds at least one window of ``seq_len + 1`` tokens, and train must hold at least one
    window too; otherwise ``ValueError`` names the lengths.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction!r} is invalid: expected a number "
                         f"in (0, 1)")
    n, window = tokens.shape[0], seq_len + 1
    if n < window:
        raise ValueError(f"{name} has {n} tokens, shorter than one sequence of seq_len+1="
                         f"{window} tokens: expected at least {2 * window} (a train and a val "
                         f"sequence); lower seq_len or use more data")
    num_val = max(math.ceil(n * val_fraction), window)
    if n - num_val < window:
        raise ValueError(f"{name} has {n} tokens: too few for one train sequence of seq_len+1="
                         f"{window} tokens after the val split of {num_val} tokens "
                         f"(val_fraction={val_fraction}); expected at least {window + num_val}")
    return tokens[n - num_val:] if split == "val" else tokens[:n - num_val]


def _fingerprint(tokens: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(tokens))).hexdigest()[
        :_FINGERPRINT_CHARS]


def _make_bytes(common: dict[str, Any], path, vocab_size, *, max_bytes=DEFAULT_MAX_BYTES,
                val_every=DEFAULT_VAL_EVERY, bytes_pattern=DEFAULT_BYTES_PATTERN,
                **_) -> Dataset:
    corpus = build_byte_corpus(path, max_bytes=max_bytes, val_every=val_every,
                               pattern=bytes_pattern)
    check_ids_in_vocab(f"bytes corpus {corpus.root!r}",
                       max(max_token_id(corpus.train), max_token_id(corpus.val)), vocab_size)
    split = common["split"]
    tokens = corpus.val if split == "val" else corpus.train
    files = corpus.val_files if split == "val" else corpus.train_files
    info = {"root": corpus.root, "num_files": len(files), "sha256": _fingerprint(tokens),
            "python": platform.python_version()}
    return WindowDataset(tokens, source="bytes", name=f"bytes corpus {corpus.root!r}",
                         vocab_size=BYTE_VOCAB_SIZE, info=info, bytes_per_token=1.0, **common)


def _make_recall(common: dict[str, Any], path, vocab_size, *,
                 recall_num_pairs=DEFAULT_RECALL_NUM_PAIRS,
                 recall_vocab=DEFAULT_RECALL_VOCAB, **_) -> Dataset:
    if path is not None:
        raise ValueError(f"data.path={str(path)!r} is invalid for source 'recall': expected "
                         f"None (the task is synthetic; use source 'tokens' for a file)")
    return RecallDataset(num_pairs=recall_num_pairs, recall_vocab=recall_vocab,
                         vocab_size=vocab_size, **common)


def _make_tokens(common: dict[str, Any], path, vocab_size, *, token_dtype=None,
                 val_fraction=DEFAULT_VAL_FRACTION, val_path=None, **_) -> Dataset:
    if path is None:
        raise ValueError("data.path=None is invalid for source 'tokens': expected a .npy file "
                         "or a raw binary token file")
    if val_path is not None and common["split"] == "val":
        path = val_path  # a separate validation file, read whole
    tokens = load_token_file(path, token_dtype)
    name = f"token file {str(path)!r}"
    max_id = max_token_id(tokens)
    check_ids_in_vocab(name, max_id, vocab_size)
    if val_path is None:
        part = split_tokens(tokens, name, common["seq_len"], common["split"], val_fraction)
    else:
        part = tokens
    info = {"path": str(path), "dtype": tokens.dtype.name, "file_tokens": int(tokens.shape[0])}
    return WindowDataset(part, source="tokens", name=name,
                         vocab_size=vocab_size if vocab_size is not None else max_id + 1,
                         info=info, **common)


def _make_prepared(common: dict[str, Any], path, vocab_size, **_) -> Dataset:
    if path is None:
        raise ValueError(f"data.prepared is not set: this config (data.source: prepared) trains "
                         f"on a prepared corpus; {PREPARE_HINT}")
    directory = str(path)
    meta = read_meta(directory)
    check_model_vocab(meta, vocab_size, directory)
    # meta's tokenizer vocab bounds every id, so the files need no scan for their largest id.
    tokens = load_split(directory, meta, common["split"])
    name = f"prepared data {directory!r}"
    if tokens.shape[0] < common["seq_len"] + 1:
        raise ValueError(f"data.prepared={directory!r}: {meta['splits'][common['split']]['file']} "
                         f"holds {tokens.shape[0]} tokens, fewer than one sequence of "
                         f"data.seq_len+1={common['seq_len'] + 1}: prepare it again with more "
                         f"text or a larger --val-fraction, or lower data.seq_len")
    info = {**tokenizer_info(meta, directory), "documents":
            int(meta["splits"][common["split"]]["documents"])}
    return PreparedDataset(tokens, directory=directory, source="prepared", name=name,
                           vocab_size=int(meta["tokenizer"]["vocab_size"]), info=info,
                           bytes_per_token=bytes_per_token(meta, common["split"]), **common)


class PreparedDataset(WindowDataset):
    """Windows of a prepare output's split; a run keeps a copy of its tokenizer."""

    def __init__(self, tokens, *, directory: str, **kw):
        super().__init__(tokens, **kw)
        self.directory = directory

    def record_in_run(self, run_dir) -> None:
        record_in_run(self.directory, run_dir)


# source name -> builder(common kwargs, path, vocab_size, **options).
_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "bytes": _make_bytes, "recall": _make_recall, "tokens": _make_tokens,
    "prepared": _make_prepared}
SOURCES = tuple(_BUILDERS)


def make_dataset(source: str, *, seq_len: int, batch_size: int, seed: int,
                 split: str = "train", path: str | os.PathLike | None = None,
                 vocab_size: int | None = None,
                 recall_num_pairs: int = DEFAULT_RECALL_NUM_PAIRS,
                 recall_vocab: int = DEFAULT_RECALL_VOCAB, token_dtype: str | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION,
                 val_path: str | os.PathLike | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, val_every: int = DEFAULT_VAL_EVERY,
                 bytes_pattern: str = DEFAULT_BYTES_PATTERN) -> Dataset:
    """Builds a built-in data source (docs/architecture.md §5); nothing is downloaded.

    Args:
      source: ``"bytes"``, ``"recall"``, ``"tokens"`` or ``"prepared"``.
      seq_len: ``L``; ``batch(step)`` rows hold ``L + 1`` tokens.
      batch_size: ``B``, rows per batch.
      seed: seeds the order (and the synthetic tokens); an integer >= 0.
      split: ``"train"`` or ``"val"``.
      path: ``tokens``: the token file (required). ``prepared``: the prepare output
        directory (required; its ``meta.json`` names the dtype and the tokenizer). ``bytes``: a directory to read instead of
        the standard library. ``recall``: must be None.
      vocab_size: the model's vocab size; every id in the data must be below it. None skips
        the check (``tokens`` then reports ``max id + 1`` as its vocab size).
      recall_num_pairs: ``recall``: key-value pairs per sequence.
      recall_vocab: ``recall``: ids the task uses (pad, keys, values); its vocab size.
      token_dtype: ``tokens``: ``"uint16"``/``"uint32"`` of a raw (non-``.npy``) file, where it
        is required; ignored for ``.npy``, whose header holds the dtype.
      val_fraction: ``tokens``: the last this fraction of the file is val (>= one sequence).
      val_path: ``tokens``: a separate val file (read whole); ``val_fraction`` is then unused.
      max_bytes: ``bytes``: cap on the corpus size.
      val_every: ``bytes``: one file in this many goes to val.
      bytes_pattern: ``bytes``: glob of the files read from the directory.

    Returns:
      A :class:`Dataset`: ``batch(step)`` int32 ``[B, L + 1]``, ``loss_mask(step)`` None or
      float32 ``[B, L]``, ``vocab_size``, ``describe()``.
    """
    if source not in _BUILDERS:
        raise ValueError(f"data.source={source!r} is invalid: expected one of "
                         + ", ".join(repr(s) for s in SOURCES))
    check_common(seq_len, batch_size, seed, split)
    common = dict(seq_len=seq_len, batch_size=batch_size, seed=seed, split=split)
    return _BUILDERS[source](
        common, path, vocab_size, recall_num_pairs=recall_num_pairs, recall_vocab=recall_vocab,
        token_dtype=token_dtype, val_fraction=val_fraction, val_path=val_path, max_bytes=max_bytes,
        val_every=val_every, bytes_pattern=bytes_pattern)
