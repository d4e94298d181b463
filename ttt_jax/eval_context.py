"""``python -m ttt_jax.eval_context``: an alias of ``python -m ttt_jax.evals`` (the long-context
evaluation, :mod:`ttt_jax.evals`), kept for older command lines."""

import sys

from ttt_jax.evals.cli import main

if __name__ == "__main__":
    sys.exit(main())
