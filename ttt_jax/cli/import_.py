"""``ttt-jax import``: PyTorch weights into this project, by architecture.

  ttt-jax import --in EXPORT_DIR --out FILE.msgpack [--config-out FILE.yaml] [--force]
  ttt-jax import --in moshi.safetensors --config moshi_ttt_tiny --out RUN_DIR \\
      [--prefix transformer.] [--seed 0]
  ttt-jax import --in moshi.safetensors --config moshi_lm_tiny --out RUN_DIR [--seed 0]

``--config`` says what the weights are and selects the architecture. Without it (or with a
ttt-lm-pytorch ``config.json``) they are a ``ttt_lm`` export, ours or ttt-lm-pytorch's: the
params are written as a Flax msgpack file and the model config as YAML (a ``model:`` section
that ``--config`` of other commands reads). With a run config of ``architecture: moshi_ttt``
(a YAML file or preset name) they are a moshi state dict: a new run directory (step 0) is
written holding its backbone plus the config's TTT layers at their init (no-ops with
``ttt.noop_init``); a training config then starts from it with ``checkpoint.init_from``.
With ``architecture: moshi_lm`` they are a whole moshi ``LMModel`` state dict (a published
``.safetensors`` file, or a ``moshi_lm`` export directory with its ``ttt.safetensors``),
written the same way into a new run directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ttt_jax.cli import presets
from ttt_jax.errors import UsageError, optional_dependency

DESCRIPTION = __doc__.split(": ", 1)[1]


def _ttt_lm(args: argparse.Namespace, run_cfg) -> None:
    import flax.serialization
    import jax
    import numpy as np
    import yaml

    from ttt_jax.config import to_dict
    from ttt_jax.export.torch import load_torch

    out = Path(args.out)
    config_out = Path(args.config_out) if args.config_out else out.with_suffix(".yaml")
    if config_out == out:
        raise UsageError(f"--out and --config-out are the same file {out}")
    for path in (out, config_out):
        if path.exists() and not args.force:
            raise FileExistsError(f"output file {path} exists: pass --force to overwrite it")
    with optional_dependency():
        cfg, variables = load_torch(args.source,
                                    config=run_cfg.model if run_cfg is not None else args.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
    config_out.write_text(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False))
    print(f"wrote {out} (params) and {config_out} (model config)")


def _moshi_ttt(args: argparse.Namespace, run_cfg) -> None:
    from ttt_jax.moshi.export import import_moshi

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"run directory {out} exists and is not empty: a moshi_ttt import "
                              f"writes a new run directory")
    with optional_dependency():
        import_moshi(args.source, run_cfg, out, prefix=args.prefix or "", seed=args.seed or 0)


def _moshi_lm(args: argparse.Namespace, run_cfg) -> None:
    from ttt_jax.moshi.lm_convert import import_lm

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"run directory {out} exists and is not empty: a moshi_lm import "
                              f"writes a new run directory")
    source = Path(args.source)
    if not source.exists():
        raise FileNotFoundError(f"weights {source} do not exist: expected an LMModel "
                                f".safetensors file or a moshi_lm export directory")
    with optional_dependency():
        import_lm(source, run_cfg, out, seed=args.seed or 0)


# architecture -> (importer, the architecture-specific options it reads)
IMPORTERS = {"ttt_lm": (_ttt_lm, ("config_out", "force")),
             "moshi_ttt": (_moshi_ttt, ("prefix", "seed")),
             "moshi_lm": (_moshi_lm, ("seed",))}
SPECIFIC = ("config_out", "force", "prefix", "seed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in", "--weights", dest="source", required=True,
                   help="the weights: a ttt_lm export directory or .safetensors/.bin state "
                        "dict, or a moshi .safetensors")
    p.add_argument("--config", help="what the weights are: a run config (YAML file or preset "
                   "name; required for moshi_ttt), or a ttt-lm-pytorch config.json (default: "
                   "the one next to the weights)")
    p.add_argument("--out", required=True,
                   help="ttt_lm: the Flax msgpack file to write; moshi_ttt: the run directory")
    p.add_argument("--config-out", help="ttt_lm: the YAML model config to write (default: "
                   "--out with .yaml)")
    p.add_argument("--force", action="store_true", help="ttt_lm: overwrite existing outputs")
    p.add_argument("--prefix", help="moshi_ttt: key prefix of the backbone (transformer.)")
    p.add_argument("--seed", type=int, help="moshi_ttt, moshi_lm: seed of the new TTT layers "
                   "(default 0)")


def run(args: argparse.Namespace) -> int:
    run_cfg = None
    if args.config is None or args.config.endswith(".json"):
        name = "ttt_lm"
    else:
        run_cfg = presets.load(args.config)
        name = run_cfg.architecture
    if name not in IMPORTERS:
        raise UsageError(f"--config is invalid: ttt-jax import has no importer for architecture "
                         f"{name!r} (it has: {', '.join(IMPORTERS)})")
    importer, options = IMPORTERS[name]
    for dest in SPECIFIC:
        if dest not in options and getattr(args, dest) not in (None, False):
            raise UsageError(f"--{dest.replace('_', '-')} does not apply to a {name} import")
    importer(args, run_cfg)
    return 0
