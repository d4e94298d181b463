"""``ttt-jax train`` (and ``python train.py``): train from a run config.

Reads the YAML config (a file, or a packaged preset name such as ``tiny``), applies ``--set``
overrides (e.g. ``--set train.steps=50``), trains on the configured data, and writes
``config.yaml``, ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` to ``train.run_dir``; a
run directory that already holds checkpoints is resumed (``--force-new`` moves it aside and
starts anew). The config's ``architecture:`` key (default ``ttt_lm``) selects the model.
``--check`` only validates the config, its data and the run directory, and prints the
parameter count (and, for an architecture that runs on a mesh, the per-device memory estimate
of ``ttt_jax.memory.memory_estimate``). Exit status: 0 done, 2 a bad config or input (one ``error:`` line), 3 a
non-finite loss or gradient, 130 / 143 stopped by SIGINT / SIGTERM (after saving a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from ttt_jax.cli import presets
from ttt_jax.errors import UsageError, report

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a YAML file, or a packaged preset name (listed below)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.ttt.use_rope=true "
                             "(repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, the data and the run directory, print the "
                             "model size, and exit")
    parser.add_argument("--force-new", action="store_true",
                        help="start a new run even if train.run_dir holds one: the old run is "
                             "moved aside first (checkpoint.overwrite=true)")


def epilog() -> str:
    from ttt_jax.cli.reference import config_reference

    names = textwrap.fill(", ".join(presets.names()), 100, initial_indent="  ",
                          subsequent_indent="  ")
    return f"presets (--config NAME):\n{names}\n\n{config_reference()}"


def _load(args: argparse.Namespace):
    overrides = list(args.set) + (["checkpoint.overwrite=true"] if args.force_new else [])
    return presets.load(args.config, overrides)


def _train(args: argparse.Namespace, stop) -> int:
    from ttt_jax import registry

    cfg = _load(args)
    stop.check()
    if args.check:
        from ttt_jax.trainer import preflight

        arch = registry.of(cfg)
        preflight(cfg, arch)
        train_ds, _ = arch.build_datasets(cfg)
        print(f"config {args.config}: {arch.count_params(cfg.model):,} parameters; "
              f"data {train_ds.describe()['source']} ok")
        if arch.supports("mesh"):  # per device under the sharding rules (docs/scaling.md)
            from ttt_jax.memory import describe_memory

            print(describe_memory(cfg, arch))
        return 0
    from ttt_jax.distributed import maybe_initialize
    from ttt_jax.trainer import run as train

    # Several hosts: join them first (docs/scaling.md); a single process is unchanged.
    maybe_initialize(os.environ)
    result = train(cfg, stop=stop)
    return 128 + result["signal"] if result["stopped"] else 0


def run(args: argparse.Namespace) -> int:
    """Trains; a signal, a non-finite loss and Ctrl-C during start-up are one ``error:`` line
    and their own exit status (see the module docstring)."""
    from ttt_jax.run_dir import Interrupted, StopSignals

    try:
        with StopSignals() as stop:  # installed first: covers the imports and the compile
            return _train(args, stop)
    except Interrupted as e:
        return report(str(e), e.exit_status)
    except Exception as e:  # noqa: BLE001 -- only the trainer's NonFiniteError is handled here
        trainer = sys.modules.get("ttt_jax.trainer")  # not imported: it cannot have raised
        if trainer is None or not isinstance(e, trainer.NonFiniteError):
            raise
        return report(str(e), e.exit_status)
