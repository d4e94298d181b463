"""Export TTT-LM params to the ttt-lm-pytorch format and import them back (DESIGN §4, §8).

``save_torch`` writes a directory that ttt-lm-pytorch's ``TTTForCausalLM.from_pretrained`` loads
with strict keys: ``config.json`` (every reference field, plus a ``ttt_jax`` block that holds our
exact ``ModelConfig``) and ``model.safetensors`` (metadata ``{"format": "pt"}``). ``load_torch``
is its exact inverse and also reads exports made by ttt-lm-pytorch itself.

The mapping is one table with a rule per parameter: the Flax path, the reference key, how the
array is laid out in torch (dense kernels ``[in, out] -> [out, in]``, conv kernels
``[K, C] -> [C, 1, K]``, per-head learning-rate params get the reference's singleton axis) and
which axes index head-dim coordinates.

RoPE layout. The reference always rotates interleaved pairs ``(2k, 2k+1)``. A model trained with
``rope_layout: half`` (pairs ``(k, k + f/2)``) exports exactly through a change of basis inside
every head: the permutation ``[0, f/2, 1, f/2 + 1, ...]`` sends each half pair onto an
interleaved pair. Everything expressed in a head's ``f`` coordinates moves with it, because the
TTT output ``XQ + LN(f(XK))`` and the target ``XV - XK`` add XQ, XK, XV and the inner output
coordinate by coordinate: the q/k/v/g projection outputs and the share_qk convs' channels, the
inner model's input rows (``W1``) and output columns (last ``W``, ``b``), ``ttt_norm``, the
``post_norm`` affine and ``o_proj``'s input rows. LayerNorm statistics and the dual form's
``XQ XK^T`` are invariant under it; the learning-rate gate reads the block input and is untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ttt_jax.config import ModelConfig, TTTConfig, from_dict, to_dict
from ttt_jax.models.ttt_lm import TTTLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
# Version of the ``ttt_jax`` block written into config.json.
FORMAT_VERSION = 1
# DESIGN §8: a "flax" format tag sends from_pretrained down a conversion path that crashes.
SAFETENSORS_METADATA = {"format": "pt"}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}

# ttt-lm-pytorch's TTTConfig defaults: a field missing from a config.json silently takes these.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504,
    "num_hidden_layers": 24, "num_attention_heads": 32, "hidden_act": "silu",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
    "use_cache": False, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "pretraining_tp": 1, "tie_word_embeddings": True, "rope_theta": 10000.0, "use_gate": False,
    "share_qk": False, "ttt_layer_type": "linear", "ttt_base_lr": 1.0, "mini_batch_size": 16,
    "pre_conv": False, "conv_kernel": 4, "scan_checkpoint_group_size": 0,
}


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


def _permuted(cfg: ModelConfig) -> bool:
    """Whether the export changes basis: only a half layout that RoPE actually uses needs it."""
    return cfg.ttt.use_rope and cfg.ttt.rope_layout == "half"


def _take(x: np.ndarray, rule: Rule, perms: dict[str, np.ndarray] | None) -> np.ndarray:
    for axis, kind in (rule.perm if perms else ()):
        x = np.take(x, perms[kind], axis=axis)
    return x


def export_dtype(dtype: Any) -> str:
    """Normalises an export dtype (``float32``/``fp32``, ``bfloat16``/``bf16``, or a dtype)."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for export: expected one of "
                         f"float32 (fp32), bfloat16 (bf16)")
    return name


def check_exportable(cfg: ModelConfig) -> None:
    """Raises for options ttt-lm-pytorch cannot express; warns when its logits would differ."""
    if cfg.ttt.qk_l2_norm:
        raise ValueError("ttt.qk_l2_norm=true cannot be exported: ttt-lm-pytorch has no Q/K L2 "
                         "normalisation, so no ttt-lm-pytorch model computes this one")
    if not cfg.ttt.use_rope:
        warnings.warn("ttt.use_rope=false: ttt-lm-pytorch always applies RoPE, so its logits will "
                      "differ from this model's; the export is still written (config.json records "
                      "use_rope=false and load_torch restores it exactly)", UserWarning,
                      stacklevel=3)


def _reference_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields that ``cfg`` determines."""
    t = cfg.ttt
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": t.model_dim,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": t.num_heads, "initializer_range": t.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": float(t.rope_theta), "use_gate": t.use_gate, "share_qk": t.share_qk,
        "ttt_layer_type": t.ttt_layer_type, "ttt_base_lr": float(t.ttt_base_lr),
        "mini_batch_size": t.mini_batch_size, "pre_conv": cfg.pre_conv,
        "conv_kernel": t.conv_kernel, "scan_checkpoint_group_size": t.scan_checkpoint_group,
    }


def reference_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ttt-lm-pytorch ``config.json`` for ``cfg`` (every field) plus a ``ttt_jax`` block."""
    out = {"architectures": ["TTTForCausalLM"], "model_type": "ttt",
           **{**REFERENCE_DEFAULTS, **_reference_fields(cfg)}, "torch_dtype": dtype}
    out["ttt_jax"] = {"format_version": FORMAT_VERSION, "model_config": to_dict(cfg),
                      "rope_half_to_interleaved": _permuted(cfg)}
    return out


def _config_from_reference(data: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig for a config.json written by ttt-lm-pytorch (RoPE on, interleaved)."""
    d = {**REFERENCE_DEFAULTS, **data}
    if d["hidden_act"] != "silu":
        raise ValueError(f"config.json hidden_act={d['hidden_act']!r} is not supported: "
                         f"the TTT-LM's SwiGLU uses 'silu'")
    ttt = TTTConfig(model_dim=d["hidden_size"], num_heads=d["num_attention_heads"],
                    mini_batch_size=d["mini_batch_size"], ttt_layer_type=d["ttt_layer_type"],
                    use_rope=True, rope_theta=float(d["rope_theta"]), rope_layout="interleaved",
                    ttt_base_lr=float(d["ttt_base_lr"]), share_qk=d["share_qk"],
                    conv_kernel=d["conv_kernel"], use_gate=d["use_gate"],
                    scan_checkpoint_group=d["scan_checkpoint_group_size"],
                    initializer_range=float(d["initializer_range"]))
    return ModelConfig(vocab_size=d["vocab_size"], num_layers=d["num_hidden_layers"],
                       intermediate_size=d["intermediate_size"], ttt=ttt, pre_conv=d["pre_conv"],
                       tie_word_embeddings=d["tie_word_embeddings"],
                       rms_norm_eps=float(d["rms_norm_eps"]))


def parse_config(data: Mapping[str, Any]) -> tuple[ModelConfig, bool]:
    """Reads a config.json mapping.

    Returns:
      ``(model_config, permuted)``: ``permuted`` says whether the stored weights are in the
      interleaved basis of a half-layout model (undone on import).
    """
    if data.get("model_type", "ttt") != "ttt":
        raise ValueError(f"config.json model_type={data['model_type']!r}: expected 'ttt'")
    block = data.get("ttt_jax")
    if block is None:
        return _config_from_reference(data), False
    if block.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"config.json ttt_jax.format_version={block.get('format_version')!r}: "
                         f"this version of ttt_jax reads {FORMAT_VERSION}")
    cfg = from_dict(ModelConfig, block["model_config"], "ttt_jax.model_config")
    for key, value in _reference_fields(cfg).items():  # a hand edit must not silently lose
        if key in data and data[key] != value:
            raise ValueError(f"config.json {key}={data[key]!r} disagrees with its "
                             f"ttt_jax.model_config (which gives {value!r})")
    return cfg, bool(block.get("rope_half_to_interleaved", _permuted(cfg)))


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
    perms = _head_permutations(cfg) if _permuted(cfg) else None
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


def save_torch(model_config: ModelConfig, variables: Mapping, out_dir: str | os.PathLike, *,
               dtype: str = "float32", force: bool = False) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` loadable by ttt-lm-pytorch.

    Args:
      model_config: the TTT-LM's config.
      variables: its Flax variables, ``{"params": ...}`` (a bare params tree also works).
      out_dir: directory to create.
      dtype: ``float32`` or ``bfloat16`` (``fp32``/``bf16`` accepted).
      force: overwrite the two files if ``out_dir`` exists.

    Returns:
      ``out_dir`` as a Path.
    """
    dtype = export_dtype(dtype)
    check_exportable(model_config)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.exists() and not force:
        raise FileExistsError(f"output directory {out} exists: pass force=True (CLI: --force) "
                              f"to overwrite it")
    safetensors_numpy = _import("safetensors.numpy")
    state = to_state_dict(model_config, variables, dtype)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (INDEX_NAME, BIN_NAME):  # would shadow or contradict the new weights
        (out / stale).unlink(missing_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    safetensors_numpy.save_file(state, str(tmp), metadata=dict(SAFETENSORS_METADATA))
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(reference_config(model_config, dtype), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out


def _import(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{module} is needed for PyTorch export/import: pip install "
                          f"'ttt-jax[torch]' (torch==2.13.0, safetensors==0.8.0)") from e


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from ``.safetensors``, a safetensors index ``.json`` or a torch ``.bin``."""
    path = Path(path)
    read = lambda p: _import("safetensors.numpy").load_file(str(p))  # noqa: E731
    if path.name.endswith(".safetensors"):
        return dict(read(path))
    if path.name.endswith(".safetensors.index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in read(path.parent / s).items()}
    if path.suffix in (".bin", ".pt", ".pth"):
        torch = _import("torch")
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach()).numpy()
                for k, v in state.items()}
    raise ValueError(f"{path} is not a recognised weights file: expected .safetensors, "
                     f".safetensors.index.json or a torch .bin")


def _locate(path: Path) -> tuple[Path, Path]:
    """``(config.json path, weights path)`` for a directory or a weights file."""
    if path.is_dir():
        for name in (WEIGHTS_NAME, INDEX_NAME, BIN_NAME):
            if (path / name).is_file():
                return path / CONFIG_NAME, path / name
        raise FileNotFoundError(f"{path} holds none of {WEIGHTS_NAME}, {INDEX_NAME}, {BIN_NAME}")
    if path.is_file():
        return path.parent / CONFIG_NAME, path
    raise FileNotFoundError(f"{path} does not exist")


def load_torch(in_dir: str | os.PathLike, *,
               config: str | os.PathLike | Mapping | ModelConfig | None = None
               ) -> tuple[ModelConfig, dict]:
    """Reads an export (ours or ttt-lm-pytorch's) back into a ModelConfig and Flax variables.

    Args:
      in_dir: an export directory, or a ``.safetensors``/``.bin`` state-dict file.
      config: the config if not the ``config.json`` next to the weights: a path to a config.json,
        its parsed mapping, or a ``ModelConfig`` (weights then in the reference's basis).

    Returns:
      ``(model_config, {"params": ...})`` with float32 params. An export of ours comes back
      exactly (config included); a ttt-lm-pytorch export gives RoPE on, interleaved layout.
    """
    config_path, weights_path = _locate(Path(in_dir))
    if isinstance(config, ModelConfig):
        cfg, permuted = config, _permuted(config)
    else:
        if config is None or isinstance(config, (str, os.PathLike)):
            config_path = Path(config) if config is not None else config_path
            if not config_path.is_file():
                raise FileNotFoundError(f"no config file {config_path} for {weights_path}: "
                                        f"pass config= explicitly")
            config = json.loads(config_path.read_text())
        cfg, permuted = parse_config(config)
    return cfg, from_state_dict(cfg, read_state_dict(weights_path), permuted)
