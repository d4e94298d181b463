"""``python -m ttt_jax.evals``: the long-context evaluation command line."""

import sys

from ttt_jax.evals.cli import main

sys.exit(main())
