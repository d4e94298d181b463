"""Reading a ``ttt-jax prepare`` output directory (``data.prepared``; docs/architecture.md §5).

The directory holds ``train.bin`` and ``val.bin`` (flat ids of ``meta["dtype"]``), ``meta.json``
(tokenizer, vocab size, dtype, token and document counts per split, inputs, split rule) and a
copy of the tokenizer file. ``meta.json`` is written last and the directory renamed into place
when complete, so a directory without it is not a prepare output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

META_NAME = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
FORMAT = "ttt-jax-prepared"
# A model vocabulary this many times the tokenizer's is reported (wasted embedding rows).
VOCAB_WARN_RATIO = 2
# A run's copy of its tokenizer and the prepare meta (RUN_DIR/tokenizer/).
RUN_TOKENIZER_DIR = "tokenizer"
PREPARE_HINT = ("make one with `ttt-jax prepare TEXT_FILES... --tokenizer TOKENIZER --out DIR` "
                "and pass --set data.prepared=DIR")


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a prepare output; errors name ``data.prepared`` and the directory."""
    d = Path(directory)
    where = f"data.prepared={str(directory)!r}"
    if not d.is_dir():
        raise FileNotFoundError(f"{where} does not exist: expected a `ttt-jax prepare` output "
                                f"directory; {PREPARE_HINT}")
    meta_path = d / META_NAME
    if not meta_path.is_file():
        raise ValueError(f"{where} has no {META_NAME}: expected a complete `ttt-jax prepare` "
                         f"output (an interrupted prepare leaves none); run prepare again")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {META_NAME} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {META_NAME} is not a `ttt-jax prepare` meta file "
                         f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def load_split(directory: str | os.PathLike, meta: dict[str, Any], split: str) -> np.ndarray:
    """The ids of one split, memmapped read-only; its length is checked against ``meta``."""
    path = Path(directory) / meta["splits"][split]["file"]
    want = int(meta["splits"][split]["tokens"])
    if not path.is_file():
        raise FileNotFoundError(f"data.prepared={str(directory)!r} has no {path.name}: expected "
                                f"the {split} split written by `ttt-jax prepare`")
    itemsize = np.dtype(meta["dtype"]).itemsize
    have = path.stat().st_size // itemsize
    if have != want or path.stat().st_size % itemsize:
        raise ValueError(f"data.prepared={str(directory)!r}: {path.name} holds {have} "
                         f"{meta['dtype']} ids but meta.json records {want}: the file was changed "
                         f"or truncated; run prepare again")
    if want == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def check_model_vocab(meta: dict[str, Any], model_vocab: Optional[int],
                      directory: str) -> Optional[str]:
    """Refuses a model vocabulary smaller than the tokenizer's (``ValueError`` naming
    ``model.vocab_size``); returns a warning line when it is more than 2x larger, else None."""
    if model_vocab is None:
        return None
    vocab = int(meta["tokenizer"]["vocab_size"])
    kind = meta["tokenizer"]["kind"]
    if model_vocab < vocab:
        raise ValueError(f"model.vocab_size={model_vocab} is invalid: the {kind} tokenizer of "
                         f"data.prepared={directory!r} has {vocab} ids; expected model.vocab_size "
                         f">= {vocab}")
    if model_vocab > VOCAB_WARN_RATIO * vocab:
        return (f"warning: model.vocab_size={model_vocab} is more than {VOCAB_WARN_RATIO}x the "
                f"{vocab} ids of the {kind} tokenizer of data.prepared={directory!r}: most "
                f"embedding rows will never be trained (set model.vocab_size={vocab}, or a "
                f"multiple of 64 just above it)")
    return None


def tokenizer_info(meta: dict[str, Any], directory: str) -> dict[str, Any]:
    """What a run records about its tokenizer (in ``describe()``)."""
    t = meta["tokenizer"]
    return {"prepared": directory, "tokenizer": t["kind"], "tokenizer_sha256": t["sha256"][:16],
            "tokenizer_vocab": t["vocab_size"], "dtype": meta["dtype"]}


def bytes_per_token(meta: dict[str, Any], split: str) -> Optional[float]:
    """UTF-8 bytes of a split's documents over its tokens (separators included), for bits per
    byte; None for an output that did not record its bytes."""
    info = meta["splits"][split]
    if not info.get("bytes") or not info.get("tokens"):
        return None
    return float(info["bytes"]) / float(info["tokens"])


def record_in_run(directory: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Copies the prepare output's ``meta.json`` and tokenizer file to ``RUN_DIR/tokenizer/``
    (``generate`` and ``eval`` read them from there even after the data has moved); returns
    that directory. Written through a temporary directory and a rename."""
    meta = read_meta(directory)
    out = Path(run_dir) / RUN_TOKENIZER_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = meta["tokenizer"].get("file")
    if name:
        shutil.copy2(Path(directory) / name, tmp / name)
    (tmp / META_NAME).write_text(json.dumps({**meta, "prepared": str(Path(directory).resolve())},
                                            indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def run_tokenizer_meta(run_dir: str | os.PathLike) -> Optional[tuple[dict[str, Any], Path]]:
    """``(meta, directory)`` of a run's tokenizer copy, or None when the run has none."""
    d = Path(run_dir) / RUN_TOKENIZER_DIR
    if not (d / META_NAME).is_file():
        return None
    return read_meta(d), d
