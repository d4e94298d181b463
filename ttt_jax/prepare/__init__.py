"""``ttt-jax prepare``: text files, JSON lines, parquet or a saved Hugging Face dataset to the
``train.bin`` / ``val.bin`` / ``meta.json`` directory that ``data.prepared`` trains on.

In Python: ``prepare(PrepareOptions(inputs=("docs/",), out="data/mine",
tokenizer="tokenizer.json"))``; ``python -m ttt_jax.prepare`` is the command.
"""

from ttt_jax.prepare.pipeline import SPLIT_RULE, PrepareOptions, is_val, prepare
from ttt_jax.prepare.tokenizers import Tokenizer, from_meta, load_tokenizer

__all__ = ["SPLIT_RULE", "PrepareOptions", "Tokenizer", "from_meta", "is_val", "load_tokenizer",
           "prepare"]
