"""Train a TTT-LM: ``python train.py --config configs/X.yaml [--set key=value ...]``.

Reads the YAML config, applies ``--set`` overrides (e.g. ``--set train.steps=50``), trains on
the configured data, and writes ``config.yaml``, ``metrics.jsonl`` and ``loss.png`` to
``train.run_dir``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.ttt.use_rope=true")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, print the model size, and exit")
    args = parser.parse_args(argv)

    from ttt_jax import apply_overrides, load_config

    try:
        cfg = apply_overrides(load_config(args.config), args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        import jax
        import jax.numpy as jnp

        from ttt_jax import TTTLM

        tokens = jax.ShapeDtypeStruct((1, cfg.model.ttt.mini_batch_size), jnp.int32)
        shapes = jax.eval_shape(TTTLM(cfg.model).init, jax.random.PRNGKey(0), tokens)
        print(f"config {args.config}: {sum(x.size for x in jax.tree.leaves(shapes)):,} parameters")
        return 0

    from ttt_jax.trainer import run

    try:
        run(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
