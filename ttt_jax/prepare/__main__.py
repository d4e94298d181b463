"""``python -m ttt_jax.prepare``: the same command as ``ttt-jax prepare``."""

import sys


def main(argv=None) -> int:
    from ttt_jax.cli import command_main

    return command_main("prepare", argv, prog="python -m ttt_jax.prepare")


if __name__ == "__main__":
    sys.exit(main())
