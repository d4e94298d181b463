"""Train a TTT-LM: ``python train.py --config configs/X.yaml [--set key=value ...]``.

Reads the YAML config, applies ``--set`` overrides (e.g. ``--set train.steps=50``), trains on
the configured data, and writes ``config.yaml``, ``metrics.jsonl`` and ``loss.png`` to
``train.run_dir``.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.ttt.use_rope=true")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and the data, print the model size, and exit")
    args = parser.parse_args(argv)

    from ttt_jax import registry

    try:  # the YAML's `architecture:` (default ttt_lm) selects the registered architecture
        cfg = registry.load_run(args.config, args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ttt_jax.checkpoint import CheckpointError
    from ttt_jax.distributed import maybe_initialize
    from ttt_jax.trainer import run

    try:
        if args.check:
            arch = registry.of(cfg)
            train_ds, _ = arch.build_datasets(cfg)
            print(f"config {args.config}: {arch.count_params(cfg.model):,} parameters; "
                  f"data {train_ds.describe()['source']} ok")
            return 0
        # Several hosts: join them first (docs/scaling.md); a single process is unchanged.
        maybe_initialize(os.environ)
        run(cfg)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
