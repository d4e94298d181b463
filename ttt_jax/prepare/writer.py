"""The output of ``ttt-jax prepare``: a staged directory renamed into place when complete.

``train.bin`` / ``val.bin`` hold flat token ids (``uint16`` when the vocabulary fits, else
``uint32``; the nanoGPT / ttt-lm-jax layout), documents separated by one separator id;
``meta.json`` is written last. Everything goes to a hidden sibling ``.NAME.partial-PID`` first
and is renamed to ``NAME`` only at the end, so an interrupted run never leaves a directory that
looks complete (a killed one leaves only the hidden partial directory).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from ttt_jax.data.prepared import META_NAME, SPLIT_FILES

UINT16_VOCAB = 1 << 16


def choose_dtype(vocab_size: int, requested: Optional[str] = None) -> str:
    """``uint16`` when every id fits, else ``uint32``; a requested dtype too small is refused."""
    if requested not in (None, "auto", "uint16", "uint32"):
        raise ValueError(f"--dtype {requested!r} is invalid: expected auto, uint16 or uint32")
    if requested in (None, "auto"):
        return "uint16" if vocab_size <= UINT16_VOCAB else "uint32"
    if requested == "uint16" and vocab_size > UINT16_VOCAB:
        raise ValueError(f"--dtype uint16 cannot hold the tokenizer's vocabulary of {vocab_size} "
                         f"ids (uint16 holds ids below {UINT16_VOCAB}): use --dtype uint32 or auto")
    return requested


def check_output(out: Path, force: bool) -> None:
    """Refuses an existing output unless ``force``; a file in the way is always refused."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a directory")
    if out.exists() and not force:
        raise FileExistsError(f"--out {str(out)!r} already exists: pass --force to replace it")


class SplitWriter:
    """Appends chunks of ids to one split file; documents are separated by ``separator``."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "wb")
        self.tokens = 0
        self.documents = 0
        self.bytes = 0

    def write(self, chunk: np.ndarray, documents: int, nbytes: int = 0) -> None:
        """``chunk``: the ids of ``documents`` documents, each *preceded* by the separator;
        the split's very first separator is dropped, so separators lie only between documents.
        ``nbytes``: the UTF-8 bytes of those documents (for bits per byte)."""
        if documents == 0:
            return
        self.bytes += int(nbytes)
        if self.documents == 0:
            chunk = chunk[1:]
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        self.file.write(memoryview(chunk).cast("B"))
        self.tokens += int(chunk.shape[0])
        self.documents += documents

    def close(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


class StagedOutput:
    """A hidden sibling directory that becomes ``out`` on :meth:`commit`, or is removed on
    :meth:`abort`."""

    def __init__(self, out: Path, force: bool, dtype: str):
        check_output(out, force)
        self.out, self.force = out, force
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.splits = {split: SplitWriter(self.tmp / name, dtype)
                       for split, name in SPLIT_FILES.items()}

    def commit(self, meta: dict) -> None:
        """Closes the splits, writes ``meta.json`` last, and renames the directory into place."""
        for writer in self.splits.values():
            writer.close()
        with open(self.tmp / META_NAME, "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        check_output(self.out, self.force)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        for writer in self.splits.values():
            writer.file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
