"""``ttt-jax train`` (and ``python train.py``): train from a run config.

Reads the YAML config (a file, or a packaged preset name such as ``tiny``), applies ``--set``
overrides (e.g. ``--set train.steps=50``), trains on the configured data, and writes
``config.yaml``, ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` to ``train.run_dir``; a
run directory that already holds checkpoints is resumed. The config's ``architecture:`` key
(default ``ttt_lm``) selects the model. ``--check`` only validates the config and its data and
prints the parameter count.
"""

from __future__ import annotations

import argparse
import os
import textwrap

from ttt_jax.cli import presets

DESCRIPTION = __doc__.split("\n\n", 1)[1].strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a YAML file, or a packaged preset name (listed below)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.ttt.use_rope=true "
                             "(repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the data, print the model size, and exit")


def epilog() -> str:
    from ttt_jax.cli.reference import config_reference

    names = textwrap.fill(", ".join(presets.names()), 100, initial_indent="  ",
                          subsequent_indent="  ")
    return f"presets (--config NAME):\n{names}\n\n{config_reference()}"


def run(args: argparse.Namespace) -> int:
    from ttt_jax import registry

    cfg = presets.load(args.config, args.set)
    if args.check:
        arch = registry.of(cfg)
        train_ds, _ = arch.build_datasets(cfg)
        print(f"config {args.config}: {arch.count_params(cfg.model):,} parameters; "
              f"data {train_ds.describe()['source']} ok")
        return 0
    from ttt_jax.distributed import maybe_initialize
    from ttt_jax.trainer import run as train

    # Several hosts: join them first (docs/scaling.md); a single process is unchanged.
    maybe_initialize(os.environ)
    train(cfg)
    return 0
