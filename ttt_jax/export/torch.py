"""Export TTT-LM params to the ttt-lm-pytorch format and import them back (docs/architecture.md §4, §8).

``save_torch`` writes a directory that ttt-lm-pytorch's ``TTTForCausalLM.from_pretrained`` loads
with strict keys: ``config.json`` (every reference field, plus a ``ttt_jax`` block that holds our
exact ``ModelConfig``) and ``model.safetensors`` (metadata ``{"format": "pt"}``). ``load_torch``
is its exact inverse and also reads exports made by ttt-lm-pytorch itself.

The parameter table (one rule per parameter) and its application live in ``mapping.py``.

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

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ttt_jax.config import ModelConfig, TTTConfig, from_dict, to_dict
from ttt_jax.export.mapping import DTYPES, needs_basis_change, from_state_dict, to_state_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
# Version of the ``ttt_jax`` block written into config.json.
FORMAT_VERSION = 1
# docs/architecture.md §8: a "flax" format tag sends from_pretrained down a conversion path that crashes.
SAFETENSORS_METADATA = {"format": "pt"}
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
    if cfg.seq_modeling != "ttt":
        raise ValueError(f"model.seq_modeling={cfg.seq_modeling!r} cannot be exported: "
                         f"ttt-lm-pytorch has TTT layers only (expected 'ttt')")
    if cfg.ttt.use_rope and not cfg.ttt.rope_bounded:
        raise ValueError("ttt.rope_bounded=false cannot be exported: ttt-lm-pytorch always "
                         "rotates by position % mini_batch_size, so no ttt-lm-pytorch model "
                         "computes this one")
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
        "conv_kernel": t.conv_kernel, # ours unset (auto) as the reference's default, 0
        "scan_checkpoint_group_size": t.scan_checkpoint_group or 0,
    }


def reference_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """The ttt-lm-pytorch ``config.json`` for ``cfg`` (every field) plus a ``ttt_jax`` block."""
    out = {"architectures": ["TTTForCausalLM"], "model_type": "ttt",
           **{**REFERENCE_DEFAULTS, **_reference_fields(cfg)}, "torch_dtype": dtype}
    out["ttt_jax"] = {"format_version": FORMAT_VERSION, "model_config": to_dict(cfg),
                      "rope_half_to_interleaved": needs_basis_change(cfg)}
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
                    # a memory setting only: the reference's default 0 reads as ours (auto)
                    scan_checkpoint_group=d["scan_checkpoint_group_size"] or None,
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
    return cfg, bool(block.get("rope_half_to_interleaved", needs_basis_change(cfg)))


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
    os.chmod(tmp, file_mode())  # safetensors writes through a private (0600) temporary file
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(reference_config(model_config, dtype), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_NAME)
    return out


def file_mode() -> int:
    """The mode a new file gets here: ``0o666`` less the umask (0644 under the usual 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


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
        cfg, permuted = config, needs_basis_change(config)
    else:
        if config is None or isinstance(config, (str, os.PathLike)):
            config_path = Path(config) if config is not None else config_path
            if not config_path.is_file():
                raise FileNotFoundError(f"no config file {config_path} for {weights_path}: "
                                        f"pass config= explicitly")
            config = json.loads(config_path.read_text())
        cfg, permuted = parse_config(config)
    return cfg, from_state_dict(cfg, read_state_dict(weights_path), permuted)
