"""``ttt-jax``: the command line (``python -m ttt_jax`` is the same).

  ttt-jax train    --config CONFIG [--set KEY=VALUE ...] [--check]
  ttt-jax export   --checkpoint RUN_DIR[/STEP] --out DIR         (or --params FILE --config CONFIG)
  ttt-jax import   --in WEIGHTS --out OUT [--config CONFIG]
  ttt-jax generate --checkpoint RUN_DIR[/STEP] --prompt TEXT [-n 200] [--temperature 0.8]
  ttt-jax generate --checkpoint MOSHI_LM_RUN --input-codes FILE.npy | --input-wav FILE.wav --out F
  ttt-jax eval     --checkpoint RUN_DIR [--checkpoint RUN_DIR ...] [--lengths 512,1k,...]

CONFIG is a YAML file or the name of a packaged preset (``tiny``, ``experiments/bytes_swa``;
``ttt-jax train --help`` lists them and every config key). Every command reports a bad
argument, config, file or checkpoint as one ``error: ...`` line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ttt_jax.errors import run_command

PROG = "ttt-jax"
# A command module has DESCRIPTION, add_arguments(parser) and run(args) -> exit status or None,
# and may have epilog() (help text built only when --help asks for it); errors go through
# ttt_jax.errors.run_command.
# name -> (command module, one line for the command list); eval parses its own arguments.
COMMANDS = {
    "train": ("ttt_jax.cli.train", "train a model from a run config (a YAML file or a preset)"),
    "export": ("ttt_jax.cli.export", "a checkpoint or params file to PyTorch names"),
    "import": ("ttt_jax.cli.import_", "PyTorch / Moshi weights into this project"),
    "generate": ("ttt_jax.generate", "sample text from a text checkpoint, or stream-generate "
                                     "a moshi_lm run's text and audio codes against a user's"),
    "eval": (None, "long-context evaluation of checkpoints (loss by position, recall)"),
    "prepare": ("ttt_jax.cli.prepare", "tokenize text files into train.bin / val.bin"),
}


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose epilog may be a callable, called only when help is shown."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _module(name: str):
    return importlib.import_module(COMMANDS[name][0])


def _eval_main(argv: Sequence[str]) -> int:
    """``eval``: ``ttt_jax.evals.cli.main``, which parses its own arguments and reports errors
    through ``run_command`` itself."""
    from ttt_jax.evals.cli import main as eval_main

    return eval_main(list(argv), prog="ttt-jax eval")


def _plain(text: str) -> str:
    return text.replace("``", "")


def _configure(parser: argparse.ArgumentParser, name: str) -> None:
    module = _module(name)
    parser.description = _plain(module.DESCRIPTION)
    parser.epilog = getattr(module, "epilog", None)
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)


def command_parser(name: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser of one command on its own (``train.py`` is ``train``'s)."""
    parser = Parser(prog=prog or f"{PROG} {name}",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(parser, name)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=_plain(__doc__.split("\n\n", 1)[1]),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, line) in COMMANDS.items():
        command = sub.add_parser(name, help=line, add_help=module is not None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        if module is not None:
            _configure(command, name)
    return parser


def command_main(name: str, argv: Optional[Sequence[str]] = None,
                 prog: Optional[str] = None) -> int:
    """Runs one command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = command_parser(name, prog).parse_args(argv)
    return run_command(args.run, args)


def weights_main(argv: Optional[Sequence[str]] = None, default: Optional[str] = None) -> int:
    """``python -m ttt_jax.export`` and ``python -m ttt_jax.moshi.export``: ``export`` or
    ``import`` (``default`` when the first argument is neither)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] not in (["export"], ["import"]) and default is not None:
        argv = [default] + argv
    if argv[:1] not in (["export"], ["import"]):
        build_parser().error("expected the command export or import")
    return main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ttt-jax COMMAND ...``; returns the exit status (0, or 2 on a user error; 130 for a
    Ctrl-C before the command took over its signals, reported in one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["eval"]:  # its own parser reads the rest, --help included
            return _eval_main(argv[1:])
        args = build_parser().parse_args(argv)
        return run_command(args.run, args)
    except KeyboardInterrupt:  # while the commands' modules (and JAX) are being imported
        from ttt_jax.errors import report

        return report("interrupted by SIGINT during start-up: nothing was trained or saved",
                      128 + 2)
