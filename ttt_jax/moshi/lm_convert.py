"""``MoshiLM`` params <-> moshi ``LMModel`` state dicts (docs/moshi.md, "MoshiLM").

The rules are ``convert.Rule`` s, one per parameter. Keys are ``LMModel.state_dict()``'s, the
layout of the published ``.safetensors`` checkpoints:

- ``text_emb.weight [text_card + 1, d]``, ``emb.{k}.weight [card + 1, d]``;
- ``transformer.`` + the temporal ``StreamingTransformer`` keys (``convert.py``);
- ``out_norm.alpha [1, 1, d]``, ``text_linear.weight [text_card_out, d]`` (``.bias`` with
  ``bias_proj``);
- ``depformer_in.{j}.weight [d', d]``, ``depformer_emb.{k}.weight [card + 1, d']``,
  ``depformer_text_emb.weight [text_card + 1, d']``;
- ``depformer.layers.{i}.`` ``self_attn.in_projs.{j}.weight [3d', d']``,
  ``self_attn.out_projs.{j}.weight``, ``norm{1,2}.alpha``, ``gating.linear_{in,out}.weight``
  (one weight set) or ``gating.{j}.linear_{in,out}.weight`` (``weights_per_step``),
  ``layer_scale_{1,2}.scale``;
- ``linears.{k}.weight [card, d']``
  (``.bias`` with ``bias_proj``).

Grafted TTT layers keep the Moshi-TTT names of ``convert.py`` under ``transformer.``
(``transformer.layers.{i}.seq_modeling_block....``). ``to_lm_state_dicts`` returns them apart
from the moshi keys, so that the moshi keys alone load into ``LMModel`` with ``strict=True``;
``save_lm`` writes them to two files, ``model.safetensors`` and ``ttt.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from ttt_jax.config import from_dict, to_dict
from ttt_jax.moshi.convert import (LEGACY_SUFFIXES, Rule, _numpy, load_safetensors,
                                   read_export_config, rules_from_state, rules_to_state,
                                   save_safetensors, transformer_rules)
from ttt_jax.moshi.lm_config import MoshiLMConfig, moshi_lm_kwargs

MODEL_NAME = "model.safetensors"
TTT_NAME = "ttt.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


def _prefixed(rules: list[Rule], flax_prefix: tuple[str, ...], torch_prefix: str) -> list[Rule]:
    return [dataclasses.replace(r, flax=flax_prefix + r.flax, torch=torch_prefix + r.torch,
                                zero_bias_of=None if r.zero_bias_of is None
                                else flax_prefix + r.zero_bias_of) for r in rules]


def _dense(flax: tuple[str, ...], torch: str, bias: bool) -> list[Rule]:
    rules = [Rule(flax + ("kernel",), torch + ".weight", "dense")]
    if bias:
        rules.append(Rule(flax + ("bias",), torch + ".bias"))
    return rules


def depformer_rules(cfg: MoshiLMConfig) -> list[Rule]:
    """Rules of the depformer transformer (paths under ``depformer``, keys ``depformer.``)."""
    rules = []
    sets = cfg.depformer_weight_sets
    for i in range(cfg.depformer.num_layers):
        p, t = ("depformer", f"layers_{i}"), f"depformer.layers.{i}."
        for j in range(sets):
            rules += [Rule(p + ("self_attn", f"in_projs_{j}", "kernel"),
                           t + f"self_attn.in_projs.{j}.weight", "dense"),
                      Rule(p + ("self_attn", f"out_projs_{j}", "kernel"),
                           t + f"self_attn.out_projs.{j}.weight", "dense")]
        rules += [Rule(p + ("norm1", "alpha"), t + "norm1.alpha", "alpha"),
                  Rule(p + ("norm2", "alpha"), t + "norm2.alpha", "alpha")]
        gates = ([(f"gating_{j}", f"gating.{j}.") for j in range(sets)]
                 if cfg.depformer.weights_per_step else [("gating", "gating.")])
        for ours, theirs in gates:
            rules += [Rule(p + (ours, "linear_in", "kernel"), t + theirs + "linear_in.weight",
                           "dense"),
                      Rule(p + (ours, "linear_out", "kernel"), t + theirs + "linear_out.weight",
                           "dense")]
        if cfg.depformer.layer_scale is not None:
            rules += [Rule(p + (f"layer_scale_{j}", "scale"), t + f"layer_scale_{j}.scale")
                      for j in (1, 2)]
    return rules


def lm_rules(cfg: MoshiLMConfig) -> list[Rule]:
    """Every param of ``MoshiLM`` (TTT rules flagged ``ttt``)."""
    rules = [Rule((f"emb_{k}", "embedding"), f"emb.{k}.weight") for k in range(cfg.n_q)]
    rules.append(Rule(("text_emb", "embedding"), "text_emb.weight"))
    rules += _dense(("text_linear",), "text_linear", cfg.bias_proj)
    rules += _prefixed(transformer_rules(cfg.temporal), ("transformer",), "transformer.")
    rules.append(Rule(("out_norm", "alpha"), "out_norm.alpha", "alpha"))
    rules += [Rule((f"depformer_in_{j}", "kernel"), f"depformer_in.{j}.weight", "dense")
              for j in range(cfg.depformer_in_count)]
    rules += [Rule((f"depformer_emb_{k}", "embedding"), f"depformer_emb.{k}.weight")
              for k in range(cfg.dep_q - 1)]
    rules.append(Rule(("depformer_text_emb", "embedding"), "depformer_text_emb.weight"))
    rules += depformer_rules(cfg)
    for k in range(cfg.dep_q):
        rules += _dense((f"linears_{k}",), f"linears.{k}", cfg.bias_proj)
    return rules


def to_lm_state_dicts(cfg: MoshiLMConfig, params: Mapping,
                      dtype=np.float32) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(moshi, ttt)``: the ``LMModel.state_dict()`` keys, and the grafted TTT layers' keys
    (``transformer.layers.{i}.seq_modeling_block....``; empty without a graft)."""
    state = rules_to_state(lm_rules(cfg), params, dtype=dtype)
    ttt_keys = {r.torch for r in lm_rules(cfg) if r.ttt}
    return ({k: v for k, v in state.items() if k not in ttt_keys},
            {k: v for k, v in state.items() if k in ttt_keys})


def _split_legacy(cfg: MoshiLMConfig, state: Mapping[str, Any]) -> dict[str, Any]:
    """Older checkpoints store all attention weight sets of a layer stacked under one key
    (``self_attn.in_proj_weight``, ``...in_proj.weight``, ``...out_proj.weight``); moshi's load
    hook splits them into ``in_projs.{j}`` / ``out_projs.{j}``, and so does this."""
    out = {}
    for key, value in state.items():
        suffix = next((s for s in LEGACY_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            out[key] = value
            continue
        sets = cfg.depformer_weight_sets if key.startswith("depformer.") else 1
        base, modern = key[: -len(suffix)], LEGACY_SUFFIXES[suffix]
        arr = np.asarray(_numpy(value))
        if arr.ndim != 2 or arr.shape[0] % sets:
            raise ValueError(f"{key} has shape {tuple(arr.shape)}: expected [{sets} * out, in] "
                             f"(stacked weight sets of this layer)")
        for j, chunk in enumerate(np.split(arr, sets, axis=0)):
            out[base + modern.replace(".0.", f".{j}.")] = chunk
    return out


def from_lm_state_dict(cfg: MoshiLMConfig, state: Mapping[str, Any], target: Mapping, *,
                       ttt_state: Optional[Mapping[str, Any]] = None,
                       require_ttt: bool = True) -> tuple[dict, list[str]]:
    """Fills ``target`` (``MoshiLM`` params, e.g. a fresh init) from an ``LMModel`` state dict.

    Strict: every key of ``state`` (and ``ttt_state``) must be read and every param filled; one
    ``ValueError`` names the missing keys, the keys no parameter reads and the shape
    mismatches. ``ttt_state``: the grafted TTT layers' keys (``save_lm``'s ``ttt.safetensors``;
    they may also sit in ``state``). ``require_ttt=False`` grafts: TTT params absent from both
    keep ``target``'s values (e.g. a no-op graft onto a published Moshi).

    Returns:
      ``(params, kept)``: the params and the paths that kept ``target``'s values.
    """
    arrays = _split_legacy(cfg, state)
    if ttt_state:
        clash = sorted(set(arrays) & set(ttt_state))
        if clash:
            raise ValueError(f"keys in both the model and the TTT state dicts: {clash[:20]}")
        arrays.update(ttt_state)
    return rules_from_state(lm_rules(cfg), arrays, target, require_ttt=require_ttt)


def save_lm(cfg: MoshiLMConfig, params: Mapping, out_dir: str | Path, *,
            force: bool = False) -> Path:
    """``out_dir/model.safetensors`` (loads into ``LMModel(**moshi_lm_kwargs(cfg))`` with
    ``strict=True``), ``ttt.safetensors`` (only with a graft) and ``config.json`` (the
    ``LMModel`` keyword arguments under ``lm_kwargs``, our exact config under ``ttt_jax``)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output directory {out} exists and is not empty: pass force=True "
                              f"(--force) to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    moshi, ttt = to_lm_state_dicts(cfg, params)
    save_safetensors(moshi, out / MODEL_NAME)
    if ttt:
        save_safetensors(ttt, out / TTT_NAME)
    elif (out / TTT_NAME).exists():
        (out / TTT_NAME).unlink()
    meta = {"lm_kwargs": moshi_lm_kwargs(cfg), "ttt_layers": list(cfg.temporal.ttt_layers),
            "ttt_jax": {"format_version": FORMAT_VERSION, "config": to_dict(cfg)}}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return out


def load_lm(in_dir: str | Path, target: Optional[Mapping] = None) -> tuple[MoshiLMConfig, dict]:
    """``(config, params)`` from a ``save_lm`` directory (strict keys and shapes)."""
    import jax
    import jax.numpy as jnp

    from ttt_jax.moshi.lm import MoshiLM

    d = Path(in_dir)
    meta = read_export_config(d, "ttt_jax", "save_lm", FORMAT_VERSION)
    cfg = from_dict(MoshiLMConfig, meta["config"], "model")
    if target is None:
        codes = jnp.zeros((1, cfg.num_codebooks, 2), jnp.int32)
        shapes = jax.eval_shape(MoshiLM(cfg).init, jax.random.PRNGKey(0), codes)["params"]
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    ttt = load_safetensors(d / TTT_NAME) if (d / TTT_NAME).is_file() else None
    params, _ = from_lm_state_dict(cfg, load_safetensors(d / MODEL_NAME), target, ttt_state=ttt)
    return cfg, params


def read_lm_weights(path: str | Path) -> tuple[dict, Optional[dict]]:
    """``(moshi state dict, TTT state dict or None)`` from an ``LMModel`` ``.safetensors`` file
    or a ``save_lm`` directory (``model.safetensors`` and, if present, ``ttt.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        ttt = load_safetensors(path / TTT_NAME) if (path / TTT_NAME).is_file() else None
        return load_safetensors(path / MODEL_NAME), ttt
    return load_safetensors(path), None


def import_lm(weights: str | Path, run_cfg, out_run_dir: str | Path, *, seed: int = 0,
              print_fn=print) -> Path:
    """A run directory (step 0) holding ``weights`` (``read_lm_weights``) in ``run_cfg``'s
    ``MoshiLM``; TTT layers the weights do not have stay at their init (no-ops with
    ``ttt.noop_init``). A training config starts from it with ``checkpoint.init_from``."""
    import jax

    from ttt_jax import registry
    from ttt_jax.checkpoint import Checkpointer

    model_sd, ttt_sd = read_lm_weights(weights)
    arch = registry.of(run_cfg)
    optimizer = arch.make_optimizer(run_cfg)
    state = jax.jit(lambda k: arch.init_state(run_cfg, optimizer, k))(jax.random.PRNGKey(seed))
    params, kept = from_lm_state_dict(run_cfg.model, model_sd, state.params, ttt_state=ttt_sd,
                                      require_ttt=False)
    state = state.replace(params=params, opt_state=jax.jit(optimizer.init)(params))
    ckpt = Checkpointer(out_run_dir, every=1, keep=1)
    ckpt.save(state, run_cfg, force=True)
    ckpt.close()
    print_fn(f"imported {weights} into {out_run_dir} ({len(kept)} TTT arrays at their init)")
    return Path(out_run_dir)
