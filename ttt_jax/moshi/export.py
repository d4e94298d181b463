"""Moshi-TTT checkpoints to PyTorch names and back, and Moshi weights into a run.

``save_torch(cfg, params, out_dir)`` writes ``config.json`` (our ``MoshiTTTConfig`` plus the
moshi ``StreamingTransformer`` keyword arguments) and ``model.safetensors`` with the backbone in
moshi's key names and the TTT layers in the Moshi-TTT names (see ``convert.py``);
``load_torch(in_dir)`` is its exact inverse.

CLI (``ttt_jax/cli``; ``python -m ttt_jax.moshi.export`` is the same)::

    ttt-jax export --checkpoint RUN_DIR --out DIR [--force]
    ttt-jax import --in moshi.safetensors --config CFG.yaml --out RUN_DIR \\
        [--prefix transformer.] [--seed 0]

``import`` (``import_moshi``) writes a run directory (step 0) holding the imported backbone with
the TTT layers of ``CFG.yaml`` grafted at their init (no-ops with ``ttt.noop_init``); a
training config then starts from it with ``checkpoint.init_from: RUN_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ttt_jax import registry
from ttt_jax.config import from_dict, to_dict
from ttt_jax.moshi.config import MoshiRunConfig, MoshiTTTConfig
from ttt_jax.moshi.convert import (from_state_dict, load_safetensors, read_export_config,
                                   save_safetensors, to_state_dict)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def moshi_kwargs(cfg: MoshiTTTConfig) -> dict[str, Any]:
    """Keyword arguments of the matching ``moshi.modules.transformer.StreamingTransformer``."""
    t = cfg.transformer
    return {"d_model": t.d_model, "num_heads": t.num_heads, "num_layers": t.num_layers,
            "dim_feedforward": t.dim_feedforward, "causal": True, "context": t.context,
            "max_period": t.max_period, "norm": t.norm, "layer_scale": t.layer_scale,
            "gating": t.gating, "positional_embedding": t.positional_embedding}


def save_torch(cfg: MoshiTTTConfig, params: Mapping, out_dir: str | Path, *,
               force: bool = False) -> Path:
    """Writes ``out_dir/{config.json, model.safetensors}``; returns the directory."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output directory {out} exists and is not empty: pass force=True "
                              f"(--force) to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    state = to_state_dict(cfg, params)
    meta = {"ttt_jax_moshi": {"format_version": FORMAT_VERSION, "config": to_dict(cfg)},
            "moshi_transformer_kwargs": moshi_kwargs(cfg),
            "ttt_layers": list(cfg.ttt_layers)}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    save_safetensors(state, out / WEIGHTS_NAME)
    return out


def load_torch(in_dir: str | Path) -> tuple[MoshiTTTConfig, dict]:
    """``(config, params)`` from a ``save_torch`` directory (strict keys and shapes)."""
    d = Path(in_dir)
    meta = read_export_config(d, "ttt_jax_moshi", "save_torch", FORMAT_VERSION)
    cfg = from_dict(MoshiTTTConfig, meta["config"], "model")
    target = registry.get("moshi_ttt").param_shapes(cfg)
    target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), target)
    params, _ = from_state_dict(cfg, load_safetensors(d / WEIGHTS_NAME), target)
    return cfg, params


def import_moshi(weights: str | Path, run_cfg: MoshiRunConfig, out_run_dir: str | Path, *,
                 prefix: str = "", seed: int = 0, print_fn=print) -> Path:
    """A run directory (step 0) whose params are ``weights``' backbone plus new TTT layers."""
    from ttt_jax.checkpoint import Checkpointer

    cfg = run_cfg.model
    arch = registry.of(run_cfg)
    optimizer = arch.make_optimizer(run_cfg)
    state = jax.jit(lambda k: arch.init_state(run_cfg, optimizer, k))(jax.random.PRNGKey(seed))
    transformer, kept = from_state_dict(cfg, load_safetensors(weights), state.params["transformer"],
                                        scope="transformer", prefix=prefix, require_ttt=False)
    params = {**state.params, "transformer": transformer}
    state = state.replace(params=params, opt_state=jax.jit(optimizer.init)(params))
    ckpt = Checkpointer(out_run_dir, every=1, keep=1)
    ckpt.save(state, run_cfg, force=True)
    ckpt.close()
    print_fn(f"imported the backbone of {weights} into {out_run_dir} "
             f"({len(kept)} TTT arrays at their init)")
    return Path(out_run_dir)


def main(argv=None) -> int:
    """``python -m ttt_jax.moshi.export export|import ...``: ``ttt-jax export|import``."""
    from ttt_jax.cli import weights_main

    return weights_main(argv)


if __name__ == "__main__":
    sys.exit(main())
