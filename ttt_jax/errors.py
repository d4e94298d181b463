"""The one user-error type of the commands and the one place that reports it.

Every ``ttt-jax`` subcommand (and ``train.py``) runs through ``run_command``: a bad argument,
config, file or checkpoint becomes one ``error: <message>`` line on stderr and exit status
``EXIT_USAGE`` (2, argparse's own code for a bad command line), never a traceback. Library code
raises ``ValueError`` (or ``FileNotFoundError`` / ``FileExistsError`` /
``ttt_jax.checkpoint.CheckpointError``) naming the key or path; commands raise ``UsageError``
for what only the command line can get wrong.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Optional

EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad command-line argument, reported in one line (no traceback)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix: reported, not raised."""
    from ttt_jax.checkpoint import CheckpointError  # imported late: it pulls in orbax

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError)


def report(message: str, status: int = EXIT_USAGE) -> int:
    """Prints ``error: <message>`` on stderr and returns ``status``: the one place an error
    line is written (a user error: 2; a training run stopped by a non-finite loss: 3, or by a
    signal: 128 + its number, see ``ttt_jax.cli.train``)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def run_command(fn: Callable[..., Optional[int]], *args, **kwargs) -> int:
    """Calls ``fn``; returns its exit status (``None`` means 0), or prints ``error: <message>``
    on stderr and returns ``EXIT_USAGE`` when it raises one of ``user_errors()``."""
    try:
        status = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- narrowed just below; anything else propagates
        if not isinstance(e, user_errors()):
            raise
        return report(str(e))
    return 0 if status is None else int(status)


@contextlib.contextmanager
def optional_dependency():
    """Reports a missing optional dependency (torch, safetensors: ``pip install`` lines in
    their ``ImportError``) as a ``UsageError`` of the command that needs it."""
    try:
        yield
    except ImportError as e:
        raise UsageError(str(e)) from e
