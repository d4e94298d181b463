"""``python -m ttt_jax.export``: TTT-LM params to a ttt-lm-pytorch directory and back.

  python -m ttt_jax.export [export] --checkpoint RUN_DIR[/STEP] --out DIR [--dtype bf16] [--force]
  python -m ttt_jax.export export --params FILE.msgpack --config CONFIG.yaml --out DIR
  python -m ttt_jax.export import --in DIR --out FILE.msgpack [--config-out FILE.yaml] [--force]

``--params`` is a ``flax.serialization.msgpack_serialize`` of the variables (or of the params
tree alone). ``import`` writes the params the same way and the model config as YAML
(``model:`` section, readable by ``--config``). Errors print one ``error: ...`` line on stderr
and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import yaml

from ttt_jax.config import ModelConfig, from_dict, load_config, to_dict
from ttt_jax.export.torch import export_dtype, load_torch, save_torch

# Exit status of a usage error (argparse's own convention).
USAGE_ERROR = 2


class CLIError(Exception):
    """A user-facing error: printed without a traceback."""


def load_params_file(path: str | Path) -> dict:
    """Reads Flax msgpack variables (``{"params": ...}`` or a bare params tree)."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"params file {path} does not exist")
    try:
        tree = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CLIError(f"{path} is not a Flax msgpack params file: {e}") from e
    if not isinstance(tree, dict):
        raise CLIError(f"{path} does not hold a params tree (got {type(tree).__name__})")
    return tree if "params" in tree else {"params": tree}


def load_checkpoint_params(path: str | Path) -> tuple[dict, ModelConfig]:
    """Params and model config of a training checkpoint.

    ``path`` is a run directory (its latest step), its ``checkpoints/`` directory, one step
    directory ``RUN_DIR/checkpoints/STEP``, or ``RUN_DIR/STEP``.
    """
    from ttt_jax.checkpoint import load_saved

    path = Path(path)
    step = None
    if path.name.isdigit() and not path.exists() and (path.parent / "checkpoints").is_dir():
        step, root = int(path.name), path.parent  # RUN_DIR/STEP names a step of RUN_DIR
    elif not path.exists():
        raise CLIError(f"checkpoint {path} does not exist")
    elif path.name.isdigit() and path.parent.name == "checkpoints":
        step, root = int(path.name), path.parent
    else:
        root = path
    if not (root / "checkpoints").is_dir() and root.name != "checkpoints":
        raise CLIError(f"{path} is not a recognised checkpoint: expected a run directory with "
                       f"checkpoints/, its checkpoints/ directory, or checkpoints/STEP")
    try:
        state, meta = load_saved(root, step)
    except FileNotFoundError as e:
        raise CLIError(f"{path} is not a recognised checkpoint: {e}") from e
    cfg = from_dict(ModelConfig, meta["config"]["model"], "model")
    return {"params": state["params"]}, cfg


def _model_config(path: str) -> ModelConfig:
    return load_config(path).model


def run_export(args: argparse.Namespace) -> None:
    dtype = export_dtype(args.dtype)  # fail before any loading
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"output directory {out} exists: pass --force to overwrite it")
    if args.params is not None:
        if args.config is None:
            raise CLIError("--config is required with --params (a checkpoint carries its own)")
        cfg, variables = _model_config(args.config), load_params_file(args.params)
    else:
        variables, cfg = load_checkpoint_params(args.checkpoint)
        if args.config is not None:
            cfg = _model_config(args.config)
    save_torch(cfg, variables, out, dtype=dtype, force=args.force)
    print(f"wrote {out}/config.json and {out}/model.safetensors ({dtype})")


def run_import(args: argparse.Namespace) -> None:
    out = Path(args.out)
    config_out = Path(args.config_out) if args.config_out else out.with_suffix(".yaml")
    if config_out == out:
        raise CLIError(f"--out and --config-out are the same file {out}")
    for path in (out, config_out):
        if path.exists() and not args.force:
            raise FileExistsError(f"output file {path} exists: pass --force to overwrite it")
    cfg, variables = load_torch(args.in_dir, config=args.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
    config_out.write_text(yaml.safe_dump({"model": to_dict(cfg)}, sort_keys=False))
    print(f"wrote {out} (params) and {config_out} (model config)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ttt_jax.export",
                                     description="TTT-LM params <-> ttt-lm-pytorch directories")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write config.json + model.safetensors")
    src = exp.add_mutually_exclusive_group(required=True)
    src.add_argument("--params", help="Flax msgpack of the variables")
    src.add_argument("--checkpoint", help="a training run directory (latest step) or "
                     "RUN_DIR/checkpoints/STEP")
    exp.add_argument("--config", help="YAML run config (its model: section); required with "
                     "--params, optional with --checkpoint (which stores its config)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16/bf16")
    exp.add_argument("--force", action="store_true", help="overwrite an existing output")
    exp.set_defaults(func=run_export)
    imp = sub.add_parser("import", help="read an export (ours or ttt-lm-pytorch's) back")
    imp.add_argument("--in", dest="in_dir", required=True,
                     help="export directory, or a .safetensors/.bin state dict")
    imp.add_argument("--config", help="config.json if not next to the weights")
    imp.add_argument("--out", required=True, help="output Flax msgpack file")
    imp.add_argument("--config-out", help="output YAML config (default: --out with .yaml)")
    imp.add_argument("--force", action="store_true", help="overwrite existing outputs")
    imp.set_defaults(func=run_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0, or 2 on a user error).

    ``export`` is the default command: ``python -m ttt_jax.export --checkpoint RUN_DIR --out DIR``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("export", "import", "-h", "--help"):
        argv = ["export"] + argv
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CLIError, ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
