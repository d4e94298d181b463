"""``python -m ttt_jax.export``: ``ttt-jax export`` (the default) and ``ttt-jax import``.

  python -m ttt_jax.export [export] --checkpoint RUN_DIR[/STEP] --out DIR [--dtype bf16]
  python -m ttt_jax.export import --in DIR --out FILE.msgpack

The commands live in ``ttt_jax/cli`` (``export.py``, ``import_.py``).
"""

import sys

from ttt_jax.cli import weights_main


def main(argv=None) -> int:
    return weights_main(argv, default="export")


if __name__ == "__main__":
    sys.exit(main())
