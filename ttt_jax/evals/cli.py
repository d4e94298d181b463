"""Long-context evaluation: loss by position and by context length, recall at distance, and the
TTT inner-loss diagnostics, for any training checkpoint.

    python -m ttt_jax.evals --checkpoint runs/a --checkpoint runs/b \\
        --lengths 512,1k,2k,4k,8k --out runs/eval

For every checkpoint (a run directory, its checkpoints/, checkpoints/STEP or RUN_DIR/STEP):

* Language data (data.source: bytes or tokens): --num-sequences held-out sequences of each
  length, taken at evenly spaced offsets of the validation split (the same offsets for every
  length, so a shorter sequence is a prefix of a longer one). Reports the mean loss per length
  and per position bucket [0, 64), [64, 128), [128, 256), ... in nats per token (and bits per
  byte for bytes).
* Moshi-TTT runs (architecture: moshi_ttt): the same over [B, T, K] frames of the run's own
  validation data (bytes, codebook files, or synthetic streams); lengths and positions count
  frames, and a frame's loss is the mean over its K streams of each stream's cross-entropy.
  Recall does not apply (--recall is refused).
* Recall (data.source: recall, or --recall for any token LM): --recall-samples planted-key
  sequences per distance D, each of max(training length, D + 2) tokens with the query last;
  the accuracy of the argmax prediction of the value D tokens after its key.
* --ttt-diagnostics: per TTT layer, the inner self-supervised loss over positions with the
  initial weights, before and after each mini-batch's update (ttt_jax.diagnostics); skipped
  with a note for a model without TTT layers.

Long sequences are streamed in chunks of --chunk tokens, so memory does not grow with the
length: a TTT-LM continues its streaming state chunk after chunk, a Moshi-TTT model its KV cache
and TTT state; the sliding-window attention baseline scores each chunk from the chunk and the
num_layers * (window - 1) tokens before it, which is exact. --chunk 0 runs each sequence in one
forward pass instead. Writes eval_context.json, eval_context.md and PNG plots under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ttt_jax.evals.evaluate import evaluate_checkpoints
from ttt_jax.evals.options import DEFAULT_CHUNK, DEFAULT_LENGTHS, EvalOptions, parse_size, \
    parse_sizes
from ttt_jax.evals.report import write_report

PROG = "python -m ttt_jax.evals"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    lengths = ",".join(f"{n // 1024}k" if n >= 1024 else str(n) for n in DEFAULT_LENGTHS)
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="RUN_DIR",
                   help="a run directory, its checkpoints/, checkpoints/STEP or RUN_DIR/STEP; "
                        "repeat it to compare models (one line each in the plots)")
    p.add_argument("--lengths", default=lengths,
                   help=f"context lengths, comma-separated, k = 1024 (default {lengths})")
    p.add_argument("--num-sequences", type=int, default=8,
                   help="held-out sequences per length (default 8)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"stream sequences in chunks of this many tokens (default "
                        f"{DEFAULT_CHUNK}; 0: one forward pass per sequence)")
    p.add_argument("--recall", action="store_true",
                   help="also run the recall task on token LMs (always on for checkpoints "
                        "trained on data.source=recall)")
    p.add_argument("--recall-distances", default=None,
                   help="key-to-query distances, comma-separated (default: 4, 16, 64, ... up to "
                        "16x the training length)")
    p.add_argument("--recall-samples", type=int, default=32,
                   help="planted-key sequences per distance (default 32)")
    p.add_argument("--ttt-diagnostics", action="store_true",
                   help="inner self-supervised loss per TTT layer over positions (W0, before "
                        "and after each mini-batch update)")
    p.add_argument("--diagnostics-length", default=None,
                   help="sequence length of the diagnostics (default: min(longest length, 4k))")
    p.add_argument("--diagnostics-sequences", type=int, default=4,
                   help="sequences averaged by the diagnostics (default 4)")
    p.add_argument("--out", default="runs/eval_context",
                   help="output directory for eval_context.json, eval_context.md and the PNGs")
    return p


def _run(argv: Optional[list[str]], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    distances, diag_length = args.recall_distances, args.diagnostics_length
    options = EvalOptions(
        lengths=parse_sizes(args.lengths, "--lengths"),
        num_sequences=args.num_sequences, batch=args.batch, chunk=args.chunk,
        recall=args.recall,
        recall_distances=None if distances is None else parse_sizes(distances,
                                                                     "--recall-distances"),
        recall_samples=args.recall_samples, ttt_diagnostics=args.ttt_diagnostics,
        diagnostics_length=None if diag_length is None else parse_size(
            diag_length, "--diagnostics-length"),
        diagnostics_sequences=args.diagnostics_sequences)
    Path(args.out).mkdir(parents=True, exist_ok=True)  # a bad --out fails before the work
    report = evaluate_checkpoints(args.checkpoint, options)
    written = write_report(report, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: Optional[list[str]] = None, prog: str = PROG) -> int:
    """Runs the evaluation; returns the exit status (2, with one ``error:`` line on stderr, for
    a bad argument, checkpoint or data set). ``prog`` names the command in ``--help``."""
    from ttt_jax.errors import run_command

    return run_command(_run, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
