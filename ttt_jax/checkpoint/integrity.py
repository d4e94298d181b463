"""Checkpoint integrity: a checksum per saved array, corrupt steps moved aside, quiet Orbax.

A bit flipped inside a step's data files is not always an unreadable file: Orbax can read the
array back with a wrong value. So every save records the CRC-32 of the host bytes of every
array (``meta["checksums"]``), and every restore recomputes and compares them. A step that is
unreadable or does not match is *corrupt*: the trainer moves it aside to
``checkpoints/corrupt-STEP`` and restores the previous good step; readers (``load_saved``,
``load_run``: export, generate, eval) fall back to the previous good step without touching the
directory. Steps written before checksums existed are read as before (nothing to compare).

Arrays that this process cannot see whole (sharded over several hosts) get no checksum: each
process would see a different part of them.

Orbax's own noise is kept off the terminal, so a command's error stays one line: the
``absl`` warnings of a read-only manager, its "Failed to json parse" errors (the failure is
reported by us, once), and what a failed read leaves behind while other reads are still in
flight: tensorstore's "Event loop is closed" tracebacks (unraisable exceptions) and asyncio's
"Future exception was never retrieved" records of the other reads' failures.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from ttt_jax.tree import flatten

CHECKSUM_KEY = "checksums"
ALGORITHM = "crc32"
CORRUPT_PREFIX = "corrupt-"


def _host_bytes(leaf) -> Optional[np.ndarray]:
    """The bytes of ``leaf`` as a flat ``uint8`` array, or None when this process cannot see
    all of it (an array sharded over several processes)."""
    if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
        return None
    a = np.ascontiguousarray(np.asarray(leaf))
    return a.reshape(-1).view(np.uint8)


def checksums(tree) -> dict[str, str]:
    """``{path: crc32 hex}`` of every array leaf of ``tree`` this process can see whole."""
    out = {}
    for key, leaf in flatten(tree).items():
        data = _host_bytes(leaf)
        if data is not None:
            out[key] = f"{zlib.crc32(data):08x}"
    return out


def checksum_meta(tree) -> dict[str, Any]:
    """The ``meta["checksums"]`` entry of a save of ``tree``."""
    return {"algorithm": ALGORITHM, "arrays": checksums(tree)}


def stored_checksums(meta: dict) -> Optional[dict[str, str]]:
    """The per-array checksums a step's meta records (None: saved before checksums existed)."""
    entry = meta.get(CHECKSUM_KEY) if isinstance(meta, dict) else None
    if not isinstance(entry, dict) or entry.get("algorithm") != ALGORITHM:
        return None
    return entry.get("arrays")


def mismatches(tree, meta: dict) -> list[str]:
    """Paths of the arrays of ``tree`` whose checksum differs from the one ``meta`` records."""
    expected = stored_checksums(meta)
    if not expected:
        return []
    actual = checksums(tree)
    return [k for k, v in expected.items() if k in actual and actual[k] != v]


def describe_mismatch(bad: list[str]) -> str:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return (f"checksum mismatch in {len(bad)} array{'s' if len(bad) > 1 else ''} "
            f"({', '.join(bad[:3])}{more}): its data changed after it was written")


def move_corrupt(directory: Path, step: int) -> Path:
    """Renames ``directory/STEP`` to ``directory/corrupt-STEP`` (``-1``, ``-2``... if taken)."""
    target = directory / f"{CORRUPT_PREFIX}{step}"
    n = 0
    while target.exists():
        n += 1
        target = directory / f"{CORRUPT_PREFIX}{step}-{n}"
    os.rename(directory / str(step), target)
    return target


# A swap that replaces an existing step: the new step is written under STAGING, the old one is
# renamed to REPLACED_PREFIX + step, the new one renamed into place, the old one deleted.
STAGING = ".staging"
REPLACED_PREFIX = ".replaced-"


def recover_swap(directory: Path) -> None:
    """Finishes (or undoes) a step replacement that a crash interrupted: a step renamed aside
    whose replacement never arrived is put back, and staging leftovers are deleted."""
    if not directory.is_dir():
        return
    for old in directory.glob(f"{REPLACED_PREFIX}*"):
        step = directory / old.name[len(REPLACED_PREFIX):]
        if step.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, step)
    shutil.rmtree(directory / STAGING, ignore_errors=True)


def swap_in(directory: Path, staged: Path, step: int) -> None:
    """Replaces ``directory/STEP`` by the complete step directory ``staged``: two renames, and
    ``recover_swap`` repairs a crash between them."""
    current, old = directory / str(step), directory / f"{REPLACED_PREFIX}{step}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(current, old)
    os.rename(staged, current)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ Orbax's noise

_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
          "Failed to json parse Metadata file")


class _OrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


_FILTER = _OrbaxNoise()

_UNRETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


class _ReadFailures(logging.Filter):
    """asyncio's "exception was never retrieved" records of tensorstore reads: when one read
    of a restore fails, the reads still in flight fail too and are never awaited."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(_UNRETRIEVED) and "tensorstore" in message)


_READS = _ReadFailures()


def _is_loop_closed(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def quiet_orbax() -> None:
    """Drops Orbax's read-only and metadata-parse log lines, tensorstore's "Event loop is
    closed" tracebacks and asyncio's never-retrieved failures of tensorstore reads; every other
    log record and unraisable exception is reported as usual."""
    absl_logger = logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    asyncio_logger = logging.getLogger("asyncio")
    if _READS not in asyncio_logger.filters:
        asyncio_logger.addFilter(_READS)
    if getattr(sys.unraisablehook, "_ttt_jax_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_loop_closed(unraisable.exc_value):
            previous(unraisable)

    hook._ttt_jax_quiet = True
    sys.unraisablehook = hook
