"""Moshi / Moshi-TTT PyTorch state dicts <-> our Flax params.

Backbone keys are the ``moshi`` package's ``StreamingTransformer`` names (under a prefix,
``transformer.`` in a whole model): ``layers.{i}.self_attn.in_projs.0.weight [3d, d]``,
``...out_projs.0.weight``, ``layers.{i}.norm{1,2}.alpha [1, 1, d]``,
``layers.{i}.gating.linear_{in,out}.weight``, ``layers.{i}.layer_scale_{1,2}.scale``.
Grafted TTT layers use the Moshi-TTT names under ``layers.{i}.seq_modeling_block.``:
``ttt_layer.ttt.{wq,wk,wv,wo}.{weight,bias}`` (our projections have no bias: zeros are
written, and import refuses non-zero ones), ``ttt_layer.ttt.post_norm.{weight,bias}``,
``ttt_layer.ttt.ttt_norm_{weight,bias} [H, f]``, ``ttt_layer.ttt.learnable_ttt_lr_weight
[H, 1, d]``, ``ttt_layer.ttt.learnable_ttt_lr_bias [H, 1]``, ``ttt_layer.ttt.{W1,b1,W2,b2}``,
``ttt_layer.ttt.learnable_token_idx [b]`` (ours; Moshi-TTT has no such param) and
``forward_ssm_gating.gating_alpha [d]``. The streams' embeddings and heads are
``emb.{k}.weight``, ``linears.{k}.weight`` and ``out_norm.alpha``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import flax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ttt_jax.moshi.config import MoshiTTTConfig
from ttt_jax.nn.lora import is_lora_path

# layout -> (ours -> torch, torch -> ours).
LAYOUTS = {
    "same": (lambda x: x, lambda x: x),
    "dense": (lambda x: x.T, lambda x: x.T),  # Flax [in, out] <-> torch [out, in]
    "alpha": (lambda x: x[None, None, :], lambda x: x.reshape(-1)),  # [d] <-> [1, 1, d]
    "head_row": (lambda x: x[:, None], lambda x: x[:, 0]),  # [H, ...] <-> [H, 1, ...]
}
# Moshi-TTT's projection names for ours.
TTT_PROJECTIONS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parameter: our path under ``params``, the torch key, the layout, and whether it is TTT."""

    flax: tuple[str, ...]
    torch: str
    layout: str = "same"
    ttt: bool = False
    zero_bias_of: Optional[tuple[str, ...]] = None  # a torch-only zero bias beside this kernel


def _layer_rules(cfg: MoshiTTTConfig, i: int, grafted: bool) -> list[Rule]:
    p, t = (f"layers_{i}",), f"layers.{i}."
    rules = [Rule(p + ("self_attn", "in_proj", "kernel"), t + "self_attn.in_projs.0.weight", "dense"),
             Rule(p + ("self_attn", "out_proj", "kernel"), t + "self_attn.out_projs.0.weight", "dense"),
             Rule(p + ("norm1", "alpha"), t + "norm1.alpha", "alpha"),
             Rule(p + ("norm2", "alpha"), t + "norm2.alpha", "alpha"),
             Rule(p + ("gating", "linear_in", "kernel"), t + "gating.linear_in.weight", "dense"),
             Rule(p + ("gating", "linear_out", "kernel"), t + "gating.linear_out.weight", "dense")]
    if cfg.transformer.layer_scale is not None:
        rules += [Rule(p + (f"layer_scale_{j}", "scale"), t + f"layer_scale_{j}.scale")
                  for j in (1, 2)]
    if not grafted:
        return rules
    sp, st = p + ("seq_modeling_block",), t + "seq_modeling_block."
    lp, lt = sp + ("ttt_layer",), st + "ttt_layer.ttt."
    for ours, theirs in TTT_PROJECTIONS.items():
        rules.append(Rule(lp + (ours, "kernel"), lt + f"{theirs}.weight", "dense", True))
        rules.append(Rule(lp + (ours, "kernel"), lt + f"{theirs}.bias", "same", True,
                          zero_bias_of=lp + (ours, "kernel")))
    rules += [Rule(lp + ("post_norm", "scale"), lt + "post_norm.weight", ttt=True),
              Rule(lp + ("post_norm", "bias"), lt + "post_norm.bias", ttt=True),
              Rule(lp + ("ttt_norm_weight",), lt + "ttt_norm_weight", ttt=True),
              Rule(lp + ("ttt_norm_bias",), lt + "ttt_norm_bias", ttt=True),
              Rule(lp + ("learnable_ttt_lr_weight",), lt + "learnable_ttt_lr_weight", "head_row", True),
              Rule(lp + ("learnable_ttt_lr_bias",), lt + "learnable_ttt_lr_bias", "head_row", True),
              Rule(lp + ("learnable_token_idx",), lt + "learnable_token_idx", ttt=True)]
    for j in range(1, len(cfg.ttt_config.inner_widths)):
        rules += [Rule(lp + (f"W{j}",), lt + f"W{j}", ttt=True),
                  Rule(lp + (f"b{j}",), lt + f"b{j}", ttt=True)]
    rules.append(Rule(sp + ("forward_ssm_gating", "gating_alpha"),
                      st + "forward_ssm_gating.gating_alpha", ttt=True))
    if cfg.ttt.pre_norm:
        rules.append(Rule(sp + ("ttt_norm", "alpha"), st + "ttt_norm.alpha", "alpha", True))
    return rules


def transformer_rules(cfg: MoshiTTTConfig) -> list[Rule]:
    """Rules of the ``StreamingTransformer`` (paths relative to ``transformer``, keys unprefixed)."""
    grafted = set(cfg.ttt_layers)
    return [r for i in range(cfg.transformer.num_layers) for r in _layer_rules(cfg, i, i in grafted)]


def model_rules(cfg: MoshiTTTConfig) -> list[Rule]:
    """Rules of the whole ``MoshiTTTLM``: streams, ``transformer.``-prefixed backbone, heads."""
    rules = [Rule((f"emb_{k}", "embedding"), f"emb.{k}.weight") for k in range(cfg.num_streams)]
    rules += [dataclasses.replace(r, flax=("transformer",) + r.flax, torch="transformer." + r.torch,
                                  zero_bias_of=None if r.zero_bias_of is None
                                  else ("transformer",) + r.zero_bias_of)
              for r in transformer_rules(cfg)]
    rules.append(Rule(("out_norm", "alpha"), "out_norm.alpha", "alpha"))
    rules += [Rule((f"linears_{k}", "kernel"), f"linears.{k}.weight", "dense")
              for k in range(cfg.num_streams)]
    return rules


def _rules(cfg: MoshiTTTConfig, scope: str) -> list[Rule]:
    if scope not in ("model", "transformer"):
        raise ValueError(f"scope={scope!r} is invalid: expected 'model' or 'transformer'")
    return model_rules(cfg) if scope == "model" else transformer_rules(cfg)


def to_state_dict(cfg: MoshiTTTConfig, params: Mapping, *, scope: str = "model",
                  prefix: str = "", dtype=np.float32) -> dict[str, np.ndarray]:
    """Our params (``variables["params"]`` of ``MoshiTTTLM``, or of its ``transformer`` with
    ``scope="transformer"``) as a torch-named dict of numpy arrays."""
    return rules_to_state(_rules(cfg, scope), params, prefix=prefix, dtype=dtype)


def rules_to_state(rules: list[Rule], params: Mapping, *, prefix: str = "",
                   dtype=np.float32) -> dict[str, np.ndarray]:
    """Applies ``rules`` to ``params``: a torch-named dict; every param must have a rule."""
    params = params.get("params", params)
    flat = flatten_dict(flax.core.unfreeze(params))
    wanted = {r.flax for r in rules}
    missing, unexpected = sorted(wanted - set(flat)), sorted(set(flat) - wanted)
    if missing or unexpected:
        raise ValueError(f"params do not match the config: missing {['/'.join(k) for k in missing]}, "
                         f"unexpected {['/'.join(k) for k in unexpected]}")
    out = {}
    for r in rules:
        x = np.asarray(flat[r.flax], np.float32)
        if r.zero_bias_of is not None:
            x = np.zeros((x.shape[1],), np.float32)
        else:
            x = LAYOUTS[r.layout][0](x)
        out[prefix + r.torch] = np.ascontiguousarray(x.astype(dtype))
    return out


def from_state_dict(cfg: MoshiTTTConfig, state: Mapping[str, Any], target: Mapping, *,
                    scope: str = "model", prefix: str = "", require_ttt: bool = True,
                    strict: bool = True) -> tuple[dict, list[str]]:
    """Fills ``target`` params (same scope) from a torch state dict.

    Args:
      cfg: the model config.
      state: torch-named arrays (torch tensors or numpy).
      target: params of the model to fill (e.g. a fresh init); its shapes are checked.
      scope: ``model`` (a whole ``MoshiTTTLM``) or ``transformer`` (only the backbone).
      prefix: key prefix in ``state`` (``transformer.`` to read an ``LMModel``'s backbone with
        ``scope="transformer"``).
      require_ttt: refuse if the TTT keys are absent; ``False`` grafts: TTT params missing
        from ``state`` keep ``target``'s values (a plain Moshi backbone plus new TTT layers).
      strict: refuse keys under ``prefix`` that no rule reads.

    Returns:
      ``(params, kept)``: the filled params and the paths that kept ``target``'s values.
    """
    arrays = {_modern_key(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
    return rules_from_state(_rules(cfg, scope), arrays, target, prefix=prefix,
                            require_ttt=require_ttt, strict=strict)


def rules_from_state(rules: list[Rule], arrays: Mapping[str, Any], target: Mapping, *,
                     prefix: str = "", require_ttt: bool = True,
                     strict: bool = True) -> tuple[dict, list[str]]:
    """Applies ``rules`` to torch-named ``arrays`` (keys without ``prefix``) to fill ``target``.

    Every problem is collected first and reported in one ``ValueError`` naming the keys:
    missing keys, keys no rule reads (with ``strict``), and shape mismatches.
    """
    target = target.get("params", target)
    flat = dict(flatten_dict(flax.core.unfreeze(target)))
    absent = sorted("/".join(r.flax) for r in rules if r.flax not in flat)
    if absent:
        raise ValueError(f"target params do not match the config: they lack {absent[:20]}")
    known = {r.torch for r in rules}
    unexpected = sorted(prefix + k for k in set(arrays) - known) if strict else []
    kept, missing, mismatched = [], [], []
    for r in rules:
        if r.torch not in arrays:
            if r.ttt and not require_ttt:
                kept.append("/".join(r.flax))
            else:
                missing.append(prefix + r.torch)
            continue
        x = np.asarray(_numpy(arrays[r.torch]), np.float32)
        if r.zero_bias_of is not None:
            if np.any(x != 0):
                raise ValueError(f"{prefix + r.torch} is non-zero: our TTT projections have no "
                                 f"bias, so this checkpoint cannot be represented exactly")
            continue
        want = tuple(flat[r.flax].shape)
        theirs = LAYOUTS[r.layout][0](np.broadcast_to(np.float32(0), want)).shape
        if tuple(x.shape) != tuple(theirs):
            mismatched.append(f"{prefix + r.torch} has shape {tuple(x.shape)}, expected "
                              f"{tuple(theirs)}")
            continue
        x = LAYOUTS[r.layout][1](x)
        flat[r.flax] = jnp.asarray(x, flat[r.flax].dtype)
    # Params no rule fills: LoRA adapters are new (kept at the target's values, like a graft's
    # TTT layers); anything else means the rules do not cover the model.
    covered = {r.flax for r in rules}
    uncovered = sorted("/".join(k) for k in flat if k not in covered)
    kept += [k for k in uncovered if is_lora_path(k)]
    unfilled = [k for k in uncovered if not is_lora_path(k)]
    problems = []
    if unfilled:
        problems.append(f"no key of the state dict fills the params {unfilled[:20]}")
    if missing:
        problems.append(f"state dict lacks {len(missing)} keys for this config, e.g. "
                        f"{missing[:20]} (with TTT layers grafted onto a plain Moshi backbone, "
                        f"pass require_ttt=False)")
    if unexpected:
        problems.append(f"state dict has keys no parameter reads: {unexpected[:20]}")
    if mismatched:
        problems.append(f"shape mismatches for this config: {mismatched[:20]}")
    if problems:
        raise ValueError("; ".join(problems))
    return unflatten_dict(flat), sorted(set(kept))


# Older moshi checkpoints store the attention projections under these names; moshi's own
# load hook renames them (a single set of weights: in_projs.0 / out_projs.0).
LEGACY_SUFFIXES = {"self_attn.in_proj_weight": "self_attn.in_projs.0.weight",
                   "self_attn.in_proj.weight": "self_attn.in_projs.0.weight",
                   "self_attn.out_proj.weight": "self_attn.out_projs.0.weight"}


def _modern_key(key: str) -> str:
    for old, new in LEGACY_SUFFIXES.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def _numpy(x):
    if type(x).__module__.startswith("torch"):  # a torch tensor
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def read_export_config(directory: str | Path, block: str, writer: str, version: int) -> dict:
    """The ``block`` entry of ``DIRECTORY/config.json`` written by ``writer``; errors name the
    file (absent, or without that block in format version ``version``)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: expected a directory written by "
                                f"{writer}")
    meta = json.loads(path.read_text()).get(block)
    if not meta or meta.get("format_version") != version:
        raise ValueError(f"{path} has no {block} block of format version {version}")
    return meta


def save_safetensors(state: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Writes a torch-named dict as safetensors (``{"format": "pt"}``)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a safetensors file as numpy arrays (bfloat16 is widened to float32)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: expected a .safetensors "
                                f"state dict of a moshi StreamingTransformer or LMModel")
    try:  # torch reads bfloat16; plain numpy cannot
        import torch  # noqa: F401
        framework = "pt"
    except ImportError:
        framework = "numpy"
    out = {}
    with safe_open(str(path), framework=framework) as f:
        for k in f.keys():
            out[k] = _numpy(f.get_tensor(k))
    return out
