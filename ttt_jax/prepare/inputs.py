"""Input documents for ``ttt-jax prepare``, read lazily in a fixed order.

An input is a file, a directory (walked recursively, sorted by path), a glob (``data/*.jsonl``,
``**`` allowed; sorted), or a Hugging Face dataset saved with ``save_to_disk``. By suffix:

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document is its ``--field`` string;
* ``.parquet``: the ``--field`` column (``pyarrow``);
* anything else named directly, and ``.txt``/``.md``/``.rst``/``.text`` (optionally ``.gz``)
  inside a directory: UTF-8 text, one document per file (``--text-unit file``), per blank-line
  separated paragraph (``paragraph``) or per line (``line``).

``Inputs.documents()`` yields ``str`` one at a time; ``done_bytes`` / ``total_bytes`` measure
progress in input-file bytes. Errors name the file (and line) in one line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator

from ttt_jax.prepare.tokenizers import missing

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
TEXT_UNITS = ("file", "paragraph", "line")
# A directory saved by datasets' save_to_disk holds one of these.
HF_MARKERS = ("dataset_dict.json", "state.json")
_PARQUET_BATCH = 1024


def _has_suffix(path: Path, suffixes) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def _in_directory(path: Path) -> bool:
    """Files a directory walk keeps."""
    return (_has_suffix(path, JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)
            or _has_suffix(path, tuple(s + ".gz" for s in TEXT_SUFFIXES)))


def expand(specs: list[str]) -> list[Path]:
    """The input files (and dataset directories) of ``specs``, in order; errors name the spec."""
    if not specs:
        raise ValueError("no inputs: expected text/.jsonl/.parquet files, directories or globs")
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            if is_hf_dataset(path):
                out.append(path)
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file() and _in_directory(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise ValueError(f"input directory {spec!r} holds no text, .jsonl, .jsonl.gz or "
                                 f".parquet files")
            out.extend(found)
        elif path.is_file():
            out.append(path)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            found = [p for p in found if p.is_file() or is_hf_dataset(p)]
            if not found:
                raise FileNotFoundError(f"input glob {spec!r} matches no file")
            out.extend(found)
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist: expected a file, a "
                                    f"directory or a glob")
    return out


def _open_binary(path: Path):
    """``(raw file, decompressed stream)``; the raw file's position measures progress."""
    raw = open(path, "rb")
    if path.name.lower().endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    return raw, raw


class Inputs:
    """The documents of a list of inputs, read lazily."""

    def __init__(self, specs: list[str], *, field: str = "text", text_unit: str = "file"):
        if text_unit not in TEXT_UNITS:
            raise ValueError(f"--text-unit {text_unit!r} is invalid: expected one of "
                             + ", ".join(TEXT_UNITS))
        self.paths = expand(list(specs))
        self.field, self.text_unit = field, text_unit
        self.total_bytes = sum(_size(p) for p in self.paths)
        self.done_bytes = 0

    def documents(self) -> Iterator[str]:
        base = 0
        for path in self.paths:
            try:
                if is_hf_dataset(path):
                    yield from self._hf(path, base)
                elif _has_suffix(path, JSONL_SUFFIXES):
                    yield from self._jsonl(path, base)
                elif _has_suffix(path, PARQUET_SUFFIXES):
                    yield from self._parquet(path, base)
                else:
                    yield from self._text(path, base)
            except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
                raise ValueError(f"input {str(path)!r} is unreadable: {e}") from None
            base += _size(path)
            self.done_bytes = base

    def _jsonl(self, path: Path, base: int) -> Iterator[str]:
        raw, stream = _open_binary(path)
        with raw:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"input {str(path)!r} line {number} is not JSON ({e})") \
                        from None
                text = record.get(self.field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"input {str(path)!r} line {number} has no string field "
                                     f"{self.field!r}: expected a JSON object with it (--field)")
                self.done_bytes = base + raw.tell()
                yield text

    def _text(self, path: Path, base: int) -> Iterator[str]:
        raw, stream = _open_binary(path)
        with raw:
            if self.text_unit == "file":
                text = stream.read().decode("utf-8")
                self.done_bytes = base + raw.tell()
                yield text
                return
            reader = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            paragraph: list[str] = []
            for line in reader:
                self.done_bytes = base + raw.tell()
                if self.text_unit == "line":
                    line = line.rstrip("\r\n")
                    if line:
                        yield line
                elif line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).rstrip("\r\n")
                    paragraph = []
            if paragraph:
                yield "".join(paragraph).rstrip("\r\n")

    def _parquet(self, path: Path, base: int) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise missing("pyarrow", f"input {str(path)!r} (.parquet)") from None
        try:
            f = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 -- pyarrow raises ArrowInvalid and friends
            raise ValueError(f"input {str(path)!r} is not a readable parquet file ({e})") from None
        if self.field not in f.schema_arrow.names:
            raise ValueError(f"input {str(path)!r} has no column {self.field!r} (--field): it has "
                             + ", ".join(f.schema_arrow.names))
        rows, seen, size = max(f.metadata.num_rows, 1), 0, _size(path)
        for batch in f.iter_batches(batch_size=_PARQUET_BATCH, columns=[self.field]):
            for text in batch.column(0).to_pylist():
                if text is not None:
                    yield text
            seen += batch.num_rows
            self.done_bytes = base + size * seen // rows

    def _hf(self, path: Path, base: int) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise missing("datasets", f"input {str(path)!r} (a Hugging Face dataset saved with "
                                      f"save_to_disk)") from None
        loaded = datasets.load_from_disk(str(path))
        parts = ([loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict)
                 else [loaded])
        size = _size(path)
        total = max(sum(len(p) for p in parts), 1)
        seen = 0
        for part in parts:
            if self.field not in part.column_names:
                raise ValueError(f"input {str(path)!r} has no column {self.field!r} (--field): "
                                 f"it has " + ", ".join(part.column_names))
            for batch in part.select_columns([self.field]).iter(batch_size=_PARQUET_BATCH):
                for text in batch[self.field]:
                    if text is not None:
                        yield text
                seen += len(batch[self.field])
                self.done_bytes = base + size * seen // total


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
