"""``python -m ttt_jax COMMAND ...``: the ``ttt-jax`` command line (``ttt_jax.cli``)."""

import sys

from ttt_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
