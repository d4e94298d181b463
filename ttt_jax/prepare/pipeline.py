"""``prepare()``: documents -> tokenizer -> train.bin / val.bin, streamed with bounded memory.

Documents are read lazily and grouped into batches (at most ``BATCH_DOCS`` documents or
``BATCH_BYTES`` of text); each batch is encoded and split by a hash of each document, in this
process (``workers=1``) or in ``workers`` processes (``multiprocessing`` ``imap``, which keeps
the order, with at most ``2 * workers + 2`` batches in flight), and written at once. The output
is the same byte for byte whatever the number of workers.

Split rule: a document goes to val when the first 8 bytes of
``sha256(f"{seed}:".encode() + text.encode("utf-8"))``, read as a big-endian integer, are below
``val_fraction * 2**64``; identical documents always land in the same split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ttt_jax.data.prepared import FORMAT, SPLIT_FILES
from ttt_jax.prepare.inputs import Inputs
from ttt_jax.prepare.progress import ProgressLine
from ttt_jax.prepare.tokenizers import Tokenizer, load_tokenizer
from ttt_jax.prepare.writer import StagedOutput, choose_dtype

BATCH_DOCS = 256
BATCH_BYTES = 1 << 20
SPLIT_RULE = ('val iff int.from_bytes(sha256(f"{seed}:".encode() + text.encode("utf-8"))'
              '.digest()[:8], "big") < val_fraction * 2**64')


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What ``ttt-jax prepare`` does; the fields are its flags."""

    inputs: tuple[str, ...]
    out: str
    tokenizer: str = "bytes"
    field: str = "text"
    text_unit: str = "file"
    val_fraction: float = 0.01
    seed: int = 0
    separator: Optional[int] = None
    dtype: str = "auto"
    workers: int = 1
    force: bool = False
    progress: bool = True


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """The split rule (module docstring)."""
    digest = hashlib.sha256(f"{seed}:".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0 ** 64


def encode_batch(tokenizer: Tokenizer, texts: list[str], seed: int, val_fraction: float,
                 separator: int, dtype: str):
    """One batch -> ``{split: (ids, documents)}``; each document's ids are preceded by the
    separator. Documents without tokens are skipped (counted in ``"skipped"``)."""
    parts: dict[str, list[list[int]]] = {"train": [], "val": []}
    nbytes = {"train": 0, "val": 0}
    skipped = total = 0
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        size = len(text.encode("utf-8"))
        total += size
        if not ids:
            skipped += 1
            continue
        split = "val" if is_val(text, seed, val_fraction) else "train"
        parts[split].append([separator, *ids])
        nbytes[split] += size
    out = {}
    for split, docs in parts.items():
        flat = np.fromiter((i for doc in docs for i in doc), dtype=np.int64)
        out[split] = (flat.astype(dtype), len(docs), nbytes[split])
    return out, skipped, total


_WORKER: dict = {}


def _init_worker(spec: str, args: tuple) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _WORKER["tokenizer"] = load_tokenizer(spec)
    _WORKER["args"] = args


def _work(texts: list[str]):
    return encode_batch(_WORKER["tokenizer"], texts, *_WORKER["args"])


def batches(documents: Iterator[str]) -> Iterator[list[str]]:
    """Groups documents into lists of at most ``BATCH_DOCS`` or about ``BATCH_BYTES``."""
    batch, size = [], 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _bounded(source: Iterator[list[str]], slots: threading.Semaphore):
    for item in source:
        slots.acquire()
        yield item


def _context():
    # spawn: the parent may hold threads (JAX's, when imported), which fork must not copy; a
    # worker imports only this module and the tokenizer (a fraction of a second).
    return multiprocessing.get_context("spawn")


def prepare(opts: PrepareOptions, stream=None) -> dict:
    """Runs a prepare; returns its ``meta.json`` contents. Errors are ``ValueError`` /
    ``FileNotFoundError`` / ``FileExistsError`` in one line naming the flag or file."""
    stream = sys.stderr if stream is None else stream
    if isinstance(opts.workers, bool) or not isinstance(opts.workers, int) or opts.workers < 1:
        raise ValueError(f"--workers {opts.workers!r} is invalid: expected an integer >= 1")
    if not 0 <= opts.val_fraction < 1:
        raise ValueError(f"--val-fraction {opts.val_fraction!r} is invalid: expected a number "
                         f"in [0, 1)")
    tokenizer = load_tokenizer(opts.tokenizer)
    separator = tokenizer.eos_id if opts.separator is None else opts.separator
    if separator is None:
        raise ValueError(f"--tokenizer {opts.tokenizer!r} has no end-of-document token: pass "
                         f"--separator ID")
    if not 0 <= separator < tokenizer.vocab_size:
        raise ValueError(f"--separator {separator} is invalid: expected an id in [0, "
                         f"{tokenizer.vocab_size}) of the tokenizer's vocabulary")
    dtype = choose_dtype(tokenizer.vocab_size, opts.dtype)
    inputs = Inputs(list(opts.inputs), field=opts.field, text_unit=opts.text_unit)
    out = Path(opts.out)
    staged = StagedOutput(out, opts.force, dtype)
    progress = ProgressLine(inputs.total_bytes, stream, enabled=opts.progress)
    args = (opts.seed, opts.val_fraction, separator, dtype)
    skipped = text_bytes = 0
    try:
        source = batches(inputs.documents())
        if opts.workers == 1:
            results = (encode_batch(tokenizer, texts, *args) for texts in source)
            pool, slots = None, None
        else:
            slots = threading.Semaphore(2 * opts.workers + 2)
            pool = _context().Pool(opts.workers, _init_worker, (opts.tokenizer, args))
            results = pool.imap(_work, _bounded(source, slots))
        try:
            for parts, skip, nbytes in results:
                if slots is not None:
                    slots.release()
                for split, (ids, docs, size) in parts.items():
                    staged.splits[split].write(ids, docs, size)
                skipped += skip
                text_bytes += nbytes
                progress.update(inputs.done_bytes, staged.splits["train"].documents
                                + staged.splits["val"].documents,
                                sum(w.tokens for w in staged.splits.values()))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        progress.close()
        counts = {s: (w.tokens, w.documents, w.bytes) for s, w in staged.splits.items()}
        if sum(c[0] for c in counts.values()) == 0:
            raise ValueError(f"the inputs {', '.join(repr(s) for s in opts.inputs)} hold no "
                             f"document with text: nothing to write (is --field right?)")
        meta = {
            "format": FORMAT, "version": 1,
            "tokenizer": {**tokenizer.describe(), "sha256": tokenizer.sha256,
                          "file": tokenizer.copy_to(staged.tmp)},
            "vocab_size": tokenizer.vocab_size, "separator": separator, "dtype": dtype,
            "splits": {s: {"file": SPLIT_FILES[s], "tokens": t, "documents": d, "bytes": b}
                       for s, (t, d, b) in counts.items()},
            "documents_skipped": skipped, "text_bytes": text_bytes,
            "inputs": [str(p.resolve()) for p in inputs.paths], "field": opts.field,
            "text_unit": opts.text_unit,
            "split": {"rule": SPLIT_RULE, "val_fraction": opts.val_fraction, "seed": opts.seed},
        }
        staged.commit(meta)
    except BaseException:
        progress.close(complete=False)
        staged.abort()
        raise
    return meta
