"""Train: ``python train.py --config configs/X.yaml [--set key=value ...] [--check]``.

The same command as ``ttt-jax train`` (``ttt_jax/cli/train.py``); ``--config`` also takes a
packaged preset name (``tiny``). ``python train.py --help`` lists every config key.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    from ttt_jax.cli import command_main

    return command_main("train", argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
