"""What an evaluation measures: ``EvalOptions`` (frozen, validated) and the size parsers.

Every bad value raises ``ValueError`` naming the option (its field and its command-line flag)
and the value, so the library and the CLI report the same line.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192)
DEFAULT_CHUNK = 1024
# The first position bucket is [0, FIRST_BUCKET); then each bucket doubles.
FIRST_BUCKET = 64


def flag(name: str) -> str:
    """``num_sequences`` -> ``--num-sequences``."""
    return "--" + name.replace("_", "-")


def _invalid(name: str, value, expected: str) -> ValueError:
    return ValueError(f"{name}={value!r} ({flag(name)}) is invalid: expected {expected}")


def parse_size(text: str, what: str = "length") -> int:
    """``"512"``, ``"1k"`` (1024), ``"2K"``, ``"1m"`` (2**20) -> an int > 0."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"{what} {text!r} is invalid: expected a positive integer, optionally "
                         f"with a k (x1024) or m (x2**20) suffix, e.g. 512 or 4k")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m.group(2).lower()]


def parse_sizes(text: str, what: str) -> tuple[int, ...]:
    """A comma-separated list of :func:`parse_size` values, sorted and without duplicates;
    ``what`` names the option in errors (e.g. ``"--lengths"``)."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} is empty: expected a comma-separated list such as 512,1k,2k")
    return tuple(sorted({parse_size(t, f"{what}: entry") for t in items}))


def _sizes(name: str, value, minimum: int = 1) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise _invalid(name, value, "a list of integers")
    items = tuple(value)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum
                        for v in items):
        raise _invalid(name, value, f"a non-empty list of integers >= {minimum}")
    return tuple(sorted(set(items)))


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What :func:`ttt_jax.evals.evaluate_checkpoint` measures.

    Attributes:
      lengths: context lengths of the loss by position (tokens, or frames for Moshi-TTT);
        stored sorted and without duplicates.
      num_sequences: held-out sequences per length (the same offsets for every length).
      batch: sequences per forward pass.
      chunk: stream sequences in chunks of this many tokens; 0 runs each sequence in one
        forward pass.
      recall: also run the recall task on a language model (always on for checkpoints
        trained on ``data.source: recall``).
      recall_distances: key-to-query distances (``None``: 4, 16, 64, ... up to 16x the
        training length).
      recall_samples: planted-key sequences per distance.
      ttt_diagnostics: the inner self-supervised loss per TTT layer over positions.
      diagnostics_length: their sequence length (``None``: min(longest length, 4096)).
      diagnostics_sequences: sequences they average.
    """

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    num_sequences: int = 8
    batch: int = 8
    chunk: int = DEFAULT_CHUNK
    recall: bool = False
    recall_distances: Optional[tuple[int, ...]] = None
    recall_samples: int = 32
    ttt_diagnostics: bool = False
    diagnostics_length: Optional[int] = None
    diagnostics_sequences: int = 4

    def __post_init__(self):
        object.__setattr__(self, "lengths", _sizes("lengths", self.lengths))
        if self.recall_distances is not None:
            # the value sits between key and query: a distance is at least 2
            object.__setattr__(self, "recall_distances",
                               _sizes("recall_distances", self.recall_distances, minimum=2))
        for name in ("num_sequences", "batch", "recall_samples", "diagnostics_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _invalid(name, value, "an integer >= 1")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
            raise _invalid("chunk", self.chunk,
                           "0 (no chunking) or a positive number of tokens")
        for name in ("recall", "ttt_diagnostics"):
            if not isinstance(getattr(self, name), bool):
                raise _invalid(name, getattr(self, name), "true or false")
        length = self.diagnostics_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                                   or length < 1):
            raise _invalid("diagnostics_length", length, "an integer >= 1 or None")

    @property
    def longest(self) -> int:
        return self.lengths[-1]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}
