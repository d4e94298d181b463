"""The tokenizers ``ttt-jax prepare`` and ``ttt-jax generate`` use: one small interface.

``--tokenizer`` takes ``bytes`` (UTF-8 bytes, vocab 256), a Hugging Face ``tokenizer.json``
(the ``tokenizers`` package) or a SentencePiece ``.model`` (``sentencepiece``). Each has
``kind``, ``path``, ``vocab_size``, ``eos_id`` (the id put between documents),
``encode_batch(texts) -> list[list[int]]`` and ``decode(ids) -> str``. Encoding adds no special
token (no BOS/EOS): the separator is written by the pipeline.
"""

from __future__ import annotations

import abc
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

# The built-in byte corpus marks document boundaries with the ASCII file separator; a byte-level
# prepare does the same, so a model trained on either sees one separator.
BYTE_SEPARATOR = 0x1C
BYTE_VOCAB = 256
# End-of-document tokens looked up in a tokenizer.json vocabulary, in this order.
_HF_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<|im_end|>")
# The extra each optional package comes from.
EXTRA_HINT = "install it with `pip install 'ttt-jax[data]'`"


def missing(package: str, why: str) -> ValueError:
    """The one-line error for a missing optional package."""
    return ValueError(f"{why} needs the optional package {package!r}, which is not installed: "
                      f"{EXTRA_HINT} (or `pip install {package}`)")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Tokenizer(abc.ABC):
    """Base: a tokenizer that ``prepare`` runs and ``generate`` decodes with."""

    kind = ""
    # The name the tokenizer file is copied to in a prepare output directory.
    file_name: Optional[str] = None

    def __init__(self, path: Optional[str]):
        self.path = path
        self.vocab_size = 0
        self.eos_id: Optional[int] = None

    @property
    def sha256(self) -> str:
        """Fingerprint: the sha256 of the tokenizer file (``bytes``: of the word ``bytes``)."""
        if self.path is None:
            return hashlib.sha256(self.kind.encode()).hexdigest()
        return file_sha256(self.path)

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of every text (no special tokens added)."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""

    def copy_to(self, directory: Path) -> Optional[str]:
        """Copies the tokenizer file into ``directory``; returns its name there (or None)."""
        if self.path is None:
            return None
        shutil.copyfile(self.path, directory / self.file_name)
        return self.file_name

    def describe(self) -> dict:
        path = None if self.path is None else str(Path(self.path).resolve())
        return {"kind": self.kind, "path": path, "vocab_size": self.vocab_size,
                "eos_id": self.eos_id}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes; documents separated by 0x1C, as in the built-in byte corpus."""

    kind = "bytes"

    def __init__(self, path=None):
        super().__init__(None)
        self.vocab_size = BYTE_VOCAB
        self.eos_id = BYTE_SEPARATOR

    def encode_batch(self, texts):
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids):
        data = bytes(int(t) if 0 <= int(t) < BYTE_VOCAB else 0xFF for t in ids)
        return data.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package)."""

    kind = "huggingface"
    file_name = "tokenizer.json"

    def __init__(self, path: str):
        super().__init__(path)
        try:
            from tokenizers import Tokenizer as HF
        except ImportError:
            raise missing("tokenizers", f"--tokenizer {path!r} (a Hugging Face tokenizer.json)") \
                from None
        try:
            self._tok = HF.from_file(str(path))
        except Exception as e:  # noqa: BLE001 -- the Rust library raises its own exception type
            raise ValueError(f"--tokenizer {str(path)!r} is not a readable Hugging Face "
                             f"tokenizer.json ({e})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        for name in _HF_EOS_NAMES:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                self.eos_id = int(token_id)
                break

    def encode_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text):
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` (the ``sentencepiece`` package); EOS is the model's ``</s>``."""

    kind = "sentencepiece"
    file_name = "tokenizer.model"

    def __init__(self, path: str):
        super().__init__(path)
        try:
            import sentencepiece as spm
        except ImportError:
            raise missing("sentencepiece", f"--tokenizer {path!r} (a SentencePiece model)") \
                from None
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001 -- sentencepiece raises OSError/RuntimeError
            raise ValueError(f"--tokenizer {str(path)!r} is not a readable SentencePiece "
                             f"model ({e})") from None
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        self.eos_id = eos if eos >= 0 else None

    def encode_batch(self, texts):
        return self._sp.encode(list(texts), out_type=int)

    def encode(self, text):
        return self._sp.encode(text, out_type=int)

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """``bytes``, a ``tokenizer.json`` (or a directory holding one) or a SentencePiece
    ``.model``; ``ValueError`` / ``FileNotFoundError`` name ``--tokenizer``."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / HFTokenizer.file_name).is_file():
        path = path / HFTokenizer.file_name
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {spec!r} does not exist: expected 'bytes', a "
                                f"Hugging Face tokenizer.json or a SentencePiece .model file")
    if path.suffix == ".json":
        return HFTokenizer(str(path))
    if path.suffix == ".model":
        return SentencePieceTokenizer(str(path))
    raise ValueError(f"--tokenizer {spec!r} is invalid: expected 'bytes', a Hugging Face "
                     f"tokenizer.json (.json) or a SentencePiece model (.model)")


_KINDS = {cls.kind: cls for cls in (ByteTokenizer, HFTokenizer, SentencePieceTokenizer)}


def from_meta(meta: dict, directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer a prepare output recorded: its copy in ``directory`` (checked against the
    recorded sha256), else the original path."""
    info = meta["tokenizer"]
    cls = _KINDS.get(info.get("kind"))
    if cls is None:
        raise ValueError(f"{str(directory)!r}/meta.json names tokenizer kind "
                         f"{info.get('kind')!r}: expected one of {', '.join(_KINDS)}")
    if cls is ByteTokenizer:
        return ByteTokenizer()
    candidates = [Path(directory) / info["file"]] if info.get("file") else []
    candidates += [Path(info["path"])] if info.get("path") else []
    for path in candidates:
        if path.is_file() and file_sha256(path) == info.get("sha256"):
            return cls(str(path))
    raise FileNotFoundError(f"the tokenizer of the prepared data {str(directory)!r} is gone: "
                            f"none of {', '.join(repr(str(p)) for p in candidates)} exists with "
                            f"sha256 {info.get('sha256', '?')[:16]}...")
