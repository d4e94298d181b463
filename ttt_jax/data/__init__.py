"""Built-in training data, no download (docs/architecture.md §5): bytes corpus, associative recall, token files.

``make_dataset`` returns a :class:`Dataset` whose ``batch(step)`` is a pure function of
``(seed, split, step)``, so resuming at step ``k`` replays exactly the batches of a straight run.
"""

from ttt_jax.data.base import SPLITS, Dataset, WindowDataset
from ttt_jax.data.recall import (PAD_ID, RecallDataset, RecallExample, key_value_ranges,
                                 recall_sequence)
from ttt_jax.data.sources import (BYTE_VOCAB_SIZE, FILE_SEPARATOR, SOURCES, TOKEN_DTYPES,
                                  ByteCorpus, build_byte_corpus, load_token_file, make_dataset,
                                  stdlib_dir)

__all__ = [
    "BYTE_VOCAB_SIZE", "FILE_SEPARATOR", "PAD_ID", "SOURCES", "SPLITS", "TOKEN_DTYPES",
    "ByteCorpus", "Dataset", "RecallDataset", "RecallExample", "WindowDataset",
    "build_byte_corpus", "key_value_ranges", "load_token_file", "make_dataset",
    "recall_sequence", "stdlib_dir",
]
