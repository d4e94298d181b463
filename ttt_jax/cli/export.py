"""``ttt-jax export``: a checkpoint (or a params file) to PyTorch names, by architecture.

  ttt-jax export --checkpoint RUN_DIR[/STEP] --out DIR [--dtype bf16] [--force] [--allow-inexact]
  ttt-jax export --params FILE.msgpack --config CONFIG --out DIR

The checkpoint's run config (or ``--config``: a YAML file or preset name) gives the
architecture: ``ttt_lm`` writes a ttt-lm-pytorch directory (``config.json`` +
``model.safetensors``, ``ttt_jax.export``); ``moshi_ttt`` writes moshi's names for the backbone
and the Moshi-TTT names for the TTT layers (``ttt_jax.moshi.export``). An architecture without
the ``export`` feature is refused, and so is a TTT-LM without RoPE unless ``--allow-inexact``
(ttt-lm-pytorch always applies RoPE: its logits would differ). Files get the mode of any new
file (0644 under umask 022). ``--params`` is a ``flax.serialization.msgpack_serialize``
of the variables (or of the params tree alone). Needs the torch extra (see the README).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ttt_jax.cli import presets
from ttt_jax.errors import UsageError, optional_dependency

DESCRIPTION = __doc__.split(": ", 1)[1]


def load_params_file(path: str | Path) -> dict:
    """The params tree of a Flax msgpack file (``{"params": ...}`` or a bare params tree)."""
    import flax.serialization

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    try:
        tree = flax.serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # noqa: BLE001 -- msgpack raises several unrelated types on garbage
        raise UsageError(f"{path} is not a Flax msgpack params file: {e}") from e
    if not isinstance(tree, dict):
        raise UsageError(f"{path} does not hold a params tree (got {type(tree).__name__})")
    return tree.get("params", tree)


def normal_permissions(out: Path, names) -> None:
    """Gives the files an export wrote the mode of any new file (0644 under umask 022)."""
    from ttt_jax.export.torch import file_mode

    for name in names:
        if (out / name).is_file():
            os.chmod(out / name, file_mode())


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="RUN_DIR (latest step), RUN_DIR/STEP or "
                     "RUN_DIR/checkpoints/STEP")
    src.add_argument("--params", help="Flax msgpack of the variables (needs --config)")
    p.add_argument("--config", help="run config (YAML file or preset name): required with "
                   "--params; with --checkpoint it replaces the stored one")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", help="ttt_lm: float32 (default) or bfloat16/bf16")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--allow-inexact", action="store_true",
                   help="ttt_lm: export a model without RoPE even though ttt-lm-pytorch (which "
                        "always applies RoPE) will compute different logits")


def run(args: argparse.Namespace) -> int:
    from ttt_jax import checkpoint, registry

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"output directory {out} exists: pass --force to overwrite it")
    if args.params is not None:
        if args.config is None:
            raise UsageError("--config is required with --params (a checkpoint carries its own)")
        cfg, params, key = presets.load(args.config), load_params_file(args.params), "--config"
    else:
        saved = checkpoint.load_run(args.checkpoint)
        cfg, params, key = saved.config, saved.params, "--checkpoint"
        if args.config is not None:
            cfg, key = presets.load(args.config), "--config"
    arch = registry.of(cfg)
    arch.require("export", key)
    with optional_dependency(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)  # e.g. use_rope=false, allowed: said once
        done = arch.export(cfg, params, out, dtype=args.dtype, force=args.force,
                           allow_inexact=args.allow_inexact, key=key)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(done)
    normal_permissions(out, ("config.json", "model.safetensors"))
    return 0
