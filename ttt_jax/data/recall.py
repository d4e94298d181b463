"""Synthetic associative recall: a long-range task whose answers are known (docs/architecture.md §5).

Token ids (``V = recall_vocab``): ``0`` is padding, keys are ``[1, 1 + K)`` and values are
``[1 + K, V)`` with ``K = (V - 1) // 2``, so a key can never be mistaken for a value.
A training sequence of ``L + 1`` tokens is ``P`` key-value pairs with distinct keys, then query
pairs ``q a`` where ``q`` is one of those keys and ``a`` its value, then a pad if ``L + 1`` is odd::

    k1 v1 k2 v2 ... kP vP | q1 a1 q2 a2 ... qQ aQ | [0]      Q = (L + 1 - 2P) // 2

Only the answers ``a`` are predictable, so the loss mask weights just the targets whose input is
a query key.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ttt_jax.data.base import (SPLIT_IDS, Dataset, check_common, check_positive_int,
                               check_step)

PAD_ID = 0
# Folded into the seed so the synthetic tokens never reuse a window permutation's numbers.
_RECALL_STREAM = 0x7EC0
# Fewest ids that hold the pad, one target key, one distractor key and their values.
_MIN_EVAL_VOCAB = 5


def key_value_ranges(recall_vocab: int) -> tuple[range, range]:
    """The key ids and the value ids of a task with ``recall_vocab`` ids (pad 0 excluded)."""
    num_keys = (recall_vocab - 1) // 2
    return range(1, 1 + num_keys), range(1 + num_keys, recall_vocab)


def _check_vocab(recall_vocab: Any, need: int, why: str, vocab_size: int | None) -> None:
    check_positive_int("recall_vocab", recall_vocab)
    if recall_vocab < need:
        raise ValueError(f"data.recall_vocab={recall_vocab} is invalid: expected at least "
                         f"{need} ({why})")
    if vocab_size is not None:
        check_positive_int("vocab_size", vocab_size)
        if recall_vocab > vocab_size:
            raise ValueError(f"recall task uses token ids up to {recall_vocab - 1} "
                             f"(recall_vocab={recall_vocab}) >= vocab_size={vocab_size}: expected "
                             f"recall_vocab <= vocab_size")


class RecallDataset(Dataset):
    """Multi-query associative recall batches, generated from ``(seed, split, step)``."""

    source = "recall"

    def __init__(self, *, seq_len: int, batch_size: int, seed: int, split: str,
                 num_pairs: int, recall_vocab: int, vocab_size: int | None = None):
        """Builds the task.

        Args:
          seq_len, batch_size, seed, split: as in :func:`ttt_jax.data.make_dataset`.
          num_pairs: ``P``, key-value pairs per sequence (distinct keys).
          recall_vocab: ``V``, ids used by the task; the data's ``vocab_size``.
          vocab_size: the model's vocab size, checked to hold every id, or None.
        """
        check_common(seq_len, batch_size, seed, split)
        check_positive_int("recall_num_pairs", num_pairs)
        _check_vocab(recall_vocab, 2 * num_pairs + 1,
                     f"the pad id plus {num_pairs} distinct keys and as many value ids for "
                     f"recall_num_pairs={num_pairs}", vocab_size)
        if seq_len + 1 < 2 * num_pairs + 2:
            raise ValueError(f"data.seq_len={seq_len} is too short for recall_num_pairs="
                             f"{num_pairs}: expected seq_len >= {2 * num_pairs + 1} (the "
                             f"{2 * num_pairs} pair tokens plus at least one query and answer)")
        super().__init__(vocab_size=recall_vocab, seq_len=seq_len, batch_size=batch_size,
                         seed=seed, split=split)
        self.num_pairs = num_pairs
        self.num_queries = (seq_len + 1 - 2 * num_pairs) // 2
        self.keys, self.values = key_value_ranges(recall_vocab)

    def batch(self, step: int) -> np.ndarray:
        step = check_step(step)
        b, p, q = self.batch_size, self.num_pairs, self.num_queries
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], _RECALL_STREAM, step])
        keys = np.stack([rng.choice(len(self.keys), p, replace=False) for _ in range(b)])
        keys = keys + self.keys.start  # [B, P]
        values = rng.integers(self.values.start, self.values.stop, size=(b, p))  # [B, P]
        picks = rng.integers(0, p, size=(b, q))  # [B, Q]
        tokens = np.full((b, self.seq_len + 1), PAD_ID, dtype=np.int32)  # [B, L+1]
        tokens[:, 0:2 * p:2] = keys
        tokens[:, 1:2 * p:2] = values
        tokens[:, 2 * p:2 * (p + q):2] = np.take_along_axis(keys, picks, axis=1)
        tokens[:, 2 * p + 1:2 * (p + q):2] = np.take_along_axis(values, picks, axis=1)
        return tokens

    def answer_positions(self) -> np.ndarray:
        """Target indices (into ``batch[:, 1:]``) of the answers: int64 ``[Q]``, same every row."""
        return 2 * self.num_pairs + 2 * np.arange(self.num_queries)

    def loss_mask(self, step: int) -> np.ndarray:
        check_step(step)
        mask = np.zeros((self.batch_size, self.seq_len), dtype=np.float32)  # [B, L]
        mask[:, self.answer_positions()] = 1.0
        return mask

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_tokens": None, "num_pairs": self.num_pairs,
                "num_queries": self.num_queries}


class RecallExample(NamedTuple):
    """One planted-key sequence from :func:`recall_sequence`.

    Attributes:
      tokens: int32 ``[L + 1]``.
      key_pos: index of the planted key; its value sits at ``key_pos + 1``.
      query_pos: index of the query (``L - 1``); ``query_pos - key_pos`` is the distance.
      answer_pos: index of the answer (``L``), i.e. target index ``query_pos`` of
        ``tokens[1:]``: the logits at input position ``query_pos`` should predict it.
      key, value: the planted pair.
    """

    tokens: np.ndarray
    key_pos: int
    query_pos: int
    answer_pos: int
    key: int
    value: int


def _distractors(rng: np.random.Generator, length: int, keys: np.ndarray,
                 values: range) -> np.ndarray:
    """``length`` tokens of key-value pairs (keys from ``keys``), a leading pad if odd."""
    n = length // 2
    pairs = np.empty(2 * n, dtype=np.int32)
    pairs[0::2] = rng.choice(keys, size=n)
    pairs[1::2] = rng.integers(values.start, values.stop, size=n)
    return np.concatenate([np.full(length % 2, PAD_ID, dtype=np.int32), pairs])


def recall_sequence(rng: np.random.Generator, seq_len: int, distance: int, *,
                    recall_vocab: int = 64, vocab_size: int | None = None) -> RecallExample:
    """A sequence that plants a key ``distance`` tokens before its query, for long-context eval.

    The last two tokens are the query key and its answer; the planted pair sits at
    ``key_pos = L - 1 - distance``; every other position holds distractor pairs whose keys
    differ from the planted key (so the answer is unique), with a pad where a gap is odd.

    Args:
      rng: the numpy generator to draw from.
      seq_len: ``L``; the sequence has ``L + 1`` tokens.
      distance: ``query_pos - key_pos``, in ``[2, L - 1]``.
      recall_vocab: ids used, laid out as in the module docstring; at least 5.
      vocab_size: the model's vocab size, checked to hold every id, or None.

    Returns:
      A :class:`RecallExample`.
    """
    check_positive_int("seq_len", seq_len)
    _check_vocab(recall_vocab, _MIN_EVAL_VOCAB, "the pad id, a key, a distractor key and "
                 "their values", vocab_size)
    if isinstance(distance, bool) or not isinstance(distance, (int, np.integer)) \
            or not 2 <= distance <= seq_len - 1:
        raise ValueError(f"distance={distance!r} is invalid for seq_len={seq_len}: expected an "
                         f"integer in [2, {seq_len - 1}] (the value sits between key and query)")
    keys, values = key_value_ranges(recall_vocab)
    key = int(rng.integers(keys.start, keys.stop))
    value = int(rng.integers(values.start, values.stop))
    others = np.array([k for k in keys if k != key])
    query_pos = seq_len - 1
    key_pos = query_pos - distance
    tokens = np.concatenate([
        _distractors(rng, key_pos, others, values),
        np.array([key, value], dtype=np.int32),
        _distractors(rng, distance - 2, others, values),
        np.array([key, value], dtype=np.int32),
    ])  # [L+1]
    return RecallExample(tokens, key_pos, query_pos, seq_len, key, value)
