"""Train: ``python train.py --config configs/X.yaml [--set key=value ...] [--check]``.

The same command as ``ttt-jax train`` (``ttt_jax/cli/train.py``); ``--config`` also takes a
packaged preset name (``tiny``). ``python train.py --help`` lists every config key.
"""

from __future__ import annotations

import signal
import sys


def main(argv=None) -> int:
    # Importing the package loads JAX's compiled extensions; an exception raised into that can
    # crash the interpreter, so a signal meanwhile is only noted, and reported right after.
    pending = []
    old = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from ttt_jax.cli import command_main
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    from ttt_jax.errors import report

    startup = "during start-up: nothing was trained or saved"
    if pending:
        return report(f"interrupted by {signal.Signals(pending[0]).name} {startup}",
                      128 + pending[0])
    try:
        return command_main("train", argv, prog="train.py")
    except KeyboardInterrupt:  # in the moment before the command installs its own handlers
        return report(f"interrupted by SIGINT {startup}", 128 + signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
