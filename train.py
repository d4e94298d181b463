"""Training entry point: ``python train.py --config configs/X.yaml [--set key=value ...]``.

The trainer (Optax, Orbax checkpoints, built-in data) is not part of this release yet: this
script validates the config and the overrides, prints the model it describes, and exits.
"""

from __future__ import annotations

import argparse
import sys

USAGE_NOTE = ("The training loop is not available in this release: train.py only validates the "
              "config and prints a summary of the model it describes.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__ + "\n" + USAGE_NOTE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.ttt.use_rope=true")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from ttt_jax import TTTLM, apply_overrides, load_config, to_dict

    try:
        cfg = apply_overrides(load_config(args.config), args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = TTTLM(cfg.model)
    tokens = jax.ShapeDtypeStruct((1, cfg.model.ttt.mini_batch_size), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    print(f"config {args.config}: {n_params:,} parameters")
    print(to_dict(cfg))
    print(USAGE_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
