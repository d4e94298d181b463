"""Long-context evaluation of training checkpoints (``python -m ttt_jax.evals``).

* :mod:`~ttt_jax.evals.options`: ``EvalOptions``, what an evaluation measures.
* :mod:`~ttt_jax.evals.data`: held-out sequences of a checkpoint's own validation data.
* :mod:`~ttt_jax.evals.scoring`: ``Scorer``, per-token loss and argmax over long sequences.
* :mod:`~ttt_jax.evals.tasks`: loss by position and length, recall, inner-loss diagnostics.
* :mod:`~ttt_jax.evals.evaluate`: ``evaluate_checkpoint(path, options)`` and several at once.
* :mod:`~ttt_jax.evals.report`: the JSON, the Markdown tables and the plots.
* :mod:`~ttt_jax.evals.cli`: ``build_parser()`` and ``main(argv) -> exit status``.
"""

from ttt_jax.evals.evaluate import default_label, evaluate_checkpoint, evaluate_checkpoints
from ttt_jax.evals.options import (DEFAULT_CHUNK, DEFAULT_LENGTHS, FIRST_BUCKET, EvalOptions,
                                   parse_size, parse_sizes)
from ttt_jax.evals.report import markdown_report, write_report
from ttt_jax.evals.scoring import Scorer, score_in_batches
from ttt_jax.evals.tasks import (default_recall_distances, evaluate_diagnostics, evaluate_lm,
                                 evaluate_recall, position_buckets)

__all__ = ["DEFAULT_CHUNK", "DEFAULT_LENGTHS", "FIRST_BUCKET", "EvalOptions", "Scorer",
           "default_label", "default_recall_distances", "evaluate_checkpoint",
           "evaluate_checkpoints", "evaluate_diagnostics", "evaluate_lm", "evaluate_recall",
           "main", "markdown_report", "parse_size", "parse_sizes", "position_buckets",
           "score_in_batches", "write_report"]


def main(argv=None) -> int:
    """``ttt_jax.evals.cli.main``: the command line."""
    from ttt_jax.evals.cli import main as cli_main

    return cli_main(argv)
