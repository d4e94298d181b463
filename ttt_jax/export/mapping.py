"""The parameter table between our Flax TTT-LM and ttt-lm-pytorch's state dict.

One rule per parameter: the Flax path, the reference key, how the array is laid out in torch
(dense kernels ``[in, out] -> [out, in]``, conv kernels ``[K, C] -> [C, 1, K]``, per-head
learning-rate params get the reference's singleton axis) and which axes index head-dim
coordinates (moved by the half -> interleaved change of basis described in ``torch.py``).
``to_state_dict``/``from_state_dict`` apply the table; file formats live in ``torch.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ttt_jax.config import ModelConfig
from ttt_jax.models.ttt_lm import TTTLM

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}


# layout -> (Flax array to torch array, torch array to Flax array, Flax shape to torch shape).
LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "same": (lambda x: x, lambda x: x, lambda s: tuple(s)),
    "dense": (lambda x: x.T, lambda x: x.T, lambda s: tuple(s)[::-1]),  # [in, out] <-> [out, in]
    "conv": (lambda x: x.T[:, None, :], lambda x: x[:, 0, :].T,  # [K, C] <-> [C, 1, K]
             lambda s: (s[1], 1, s[0])),
    "head_row": (lambda x: x[:, None], lambda x: x[:, 0], lambda s: (s[0], 1) + tuple(s[1:])),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one parameter maps between the two formats.

    Attributes:
      flax: path under ``variables["params"]``.
      torch: the ttt-lm-pytorch state-dict key.
      layout: a key of ``LAYOUTS``.
      perm: ``(axis, "d" | "f")`` pairs: Flax-layout axes that index head-dim coordinates
        (``"d"``: the model width, head by head; ``"f"``: one head's coordinates).
    """

    flax: tuple[str, ...]
    torch: str
    layout: str = "same"
    perm: tuple[tuple[int, str], ...] = ()


def _block_rules(cfg: ModelConfig) -> list[Rule]:
    """Rules of one block, paths relative to ``layers_{i}`` / ``model.layers.{i}.``."""
    t, sm = cfg.ttt, "seq_modeling_block"
    rules = []
    if cfg.pre_conv:
        rules += [Rule(("conv", "norm", "weight"), "conv.norm.weight"),
                  Rule(("conv", "conv", "kernel"), "conv.conv.weight", "conv"),
                  Rule(("conv", "conv", "bias"), "conv.conv.bias")]
    rules.append(Rule(("seq_norm", "weight"), "seq_norm.weight"))
    projections = ["q_proj"] + ([] if t.share_qk else ["k_proj"]) + ["v_proj"]
    projections += ["g_proj"] if t.use_gate else []
    for name in projections:  # heads are chunks of the output columns
        rules.append(Rule((sm, name, "kernel"), f"{sm}.{name}.weight", "dense", ((1, "d"),)))
    rules.append(Rule((sm, "o_proj", "kernel"), f"{sm}.o_proj.weight", "dense", ((0, "d"),)))
    if t.share_qk:  # depthwise convs on the shared projection: channels are head coordinates
        for name in ("conv_q", "conv_k"):
            rules += [Rule((sm, name, "kernel"), f"{sm}.{name}.weight", "conv", ((1, "d"),)),
                      Rule((sm, name, "bias"), f"{sm}.{name}.bias", "same", ((0, "d"),))]
    rules += [Rule((sm, "learnable_ttt_lr_weight"), f"{sm}.learnable_ttt_lr_weight", "head_row"),
              Rule((sm, "learnable_ttt_lr_bias"), f"{sm}.learnable_ttt_lr_bias", "head_row"),
              Rule((sm, "learnable_token_idx"), f"{sm}.learnable_token_idx"),
              Rule((sm, "ttt_norm_weight"), f"{sm}.ttt_norm_weight", "same", ((1, "f"),)),
              Rule((sm, "ttt_norm_bias"), f"{sm}.ttt_norm_bias", "same", ((1, "f"),)),
              Rule((sm, "post_norm", "scale"), f"{sm}.post_norm.weight", "same", ((0, "d"),)),
              Rule((sm, "post_norm", "bias"), f"{sm}.post_norm.bias", "same", ((0, "d"),))]
    n = len(t.inner_widths) - 1
    for i in range(n):  # W: [H, f_in, f_out]; the first reads XK/XQ, the last writes f coords
        w_in = ((1, "f"),) if i == 0 else ()
        out = ((2, "f"),) if i == n - 1 else ()
        rules += [Rule((sm, f"W{i + 1}"), f"{sm}.W{i + 1}", "same", w_in + out),
                  Rule((sm, f"b{i + 1}"), f"{sm}.b{i + 1}", "same", out)]
    rules.append(Rule(("ffn_norm", "weight"), "ffn_norm.weight"))
    rules += [Rule(("mlp", name, "kernel"), f"mlp.{name}.weight", "dense")
              for name in ("gate_proj", "up_proj", "down_proj")]
    return rules


def param_rules(cfg: ModelConfig) -> list[Rule]:
    """Every rule of the TTT-LM described by ``cfg``, in reference state-dict order."""
    rules = [Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight")]
    for i in range(cfg.num_layers):
        rules += [dataclasses.replace(r, flax=(f"layers_{i}",) + r.flax,
                                      torch=f"model.layers.{i}.{r.torch}")
                  for r in _block_rules(cfg)]
    rules.append(Rule(("norm", "weight"), "model.norm.weight"))
    if not cfg.tie_word_embeddings:  # tied: the reference stores no lm_head.weight
        rules.append(Rule(("lm_head", "kernel"), "lm_head.weight", "dense"))
    return rules


@functools.lru_cache(maxsize=64)
def _shapes(cfg: ModelConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    tree = jax.eval_shape(TTTLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    flat = flatten_dict(flax.core.unfreeze(tree["params"]))
    return tuple((k, tuple(v.shape)) for k, v in flat.items())


def _expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax param shapes of ``TTTLM(cfg)``, from ``jax.eval_shape`` (nothing is allocated)."""
    shapes = dict(_shapes(cfg))
    covered = {r.flax for r in param_rules(cfg)}
    if covered != set(shapes):  # the model's param layout changed: update the table above
        raise RuntimeError(f"export table out of date: untranslated params "
                           f"{sorted(set(shapes) - covered)}, "
                           f"stale rules {sorted(covered - set(shapes))}")
    return shapes


def _head_permutations(cfg: ModelConfig, inverse: bool = False) -> dict[str, np.ndarray]:
    """Index arrays taking half-layout head coordinates to interleaved ones (or back)."""
    f, h = cfg.ttt.head_dim, cfg.ttt.num_heads
    p_f = np.arange(f).reshape(2, f // 2).T.reshape(-1)  # [0, f/2, 1, f/2 + 1, ...]
    perms = {"f": p_f, "d": (np.arange(h)[:, None] * f + p_f).reshape(-1)}  # [d]
    return {k: np.argsort(v) for k, v in perms.items()} if inverse else perms


def needs_basis_change(cfg: ModelConfig) -> bool:
    """Whether the export changes basis: only a half layout that RoPE actually uses needs it."""
    return cfg.ttt.use_rope and cfg.ttt.rope_layout == "half"


def _take(x: np.ndarray, rule: Rule, perms: dict[str, np.ndarray] | None) -> np.ndarray:
    for axis, kind in (rule.perm if perms else ()):
        x = np.take(x, perms[kind], axis=axis)
    return x


def to_state_dict(cfg: ModelConfig, variables: Mapping,
                  dtype: str = "float32") -> dict[str, np.ndarray]:
    """The reference state dict (numpy arrays in ``dtype``) of ``variables``."""
    params = variables["params"] if "params" in variables else variables
    flat = flatten_dict(flax.core.unfreeze(params))
    shapes = _expected_shapes(cfg)
    missing = ["/".join(k) for k in sorted(set(shapes) - set(flat))]
    unexpected = ["/".join(k) for k in sorted(set(flat) - set(shapes))]
    if missing or unexpected:
        raise ValueError(f"variables do not match the model config: missing params {missing}, "
                         f"unexpected params {unexpected}")
    perms = _head_permutations(cfg) if needs_basis_change(cfg) else None
    out = {}
    for rule in param_rules(cfg):
        x = np.asarray(flat[rule.flax])
        if x.shape != shapes[rule.flax]:
            raise ValueError(f"param {'/'.join(rule.flax)} has shape {x.shape}, expected "
                             f"{shapes[rule.flax]} for this model config")
        x = LAYOUTS[rule.layout][0](_take(x, rule, perms))
        out[rule.torch] = np.ascontiguousarray(x.astype(DTYPES[dtype]))
    return out


def from_state_dict(cfg: ModelConfig, state: Mapping[str, Any], permuted: bool = False) -> dict:
    """Flax ``{"params": ...}`` (float32) from a reference state dict; strict keys and shapes."""
    state = dict(state)
    head = state.get("lm_head.weight") if cfg.tie_word_embeddings else None
    if head is not None:  # torch.save of a tied model keeps the (identical) head
        if not np.array_equal(np.asarray(head), np.asarray(state.get("model.embed_tokens.weight"))):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight but the config "
                             "ties them (tie_word_embeddings=true)")
        del state["lm_head.weight"]
    rules, shapes = param_rules(cfg), _expected_shapes(cfg)
    missing = sorted({r.torch for r in rules} - set(state))
    unexpected = sorted(set(state) - {r.torch for r in rules})
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    perms = _head_permutations(cfg, inverse=True) if permuted else None
    flat = {}
    for rule in rules:
        arr, want = np.asarray(state[rule.torch]), LAYOUTS[rule.layout][2](shapes[rule.flax])
        if tuple(arr.shape) != tuple(want):
            raise ValueError(f"{rule.torch} has shape {tuple(arr.shape)}, expected {tuple(want)} "
                             f"for this config")
        x = _take(LAYOUTS[rule.layout][1](arr.astype(np.float32)), rule, perms)
        flat[rule.flax] = jnp.asarray(np.ascontiguousarray(x))
    return {"params": unflatten_dict(flat)}
