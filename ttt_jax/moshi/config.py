"""Configuration of the Moshi-TTT hybrid: the Moshi backbone, the TTT fine-tuning block, data.

``MoshiTransformerConfig`` mirrors the keyword arguments of the ``moshi`` package's
``StreamingTransformer`` (``d_model, num_heads, num_layers, dim_feedforward, context,
max_period, norm, layer_scale, gating, positional_embedding``). ``TTTArgs`` is the Moshi-TTT
fine-tuning block (``ttt:`` in the YAML, ``ttt_block.py``; imported here too): the public block
with ``enable, layers, base_lr, mini_batch_size, use_rope, rope_theta`` loads unchanged, the
rest are ours. A run YAML carries
``architecture: moshi_ttt`` at the top level (see ``ttt_jax.registry``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional, get_args

from ttt_jax.nn.lora import LoRAConfig
from ttt_jax.config.run import check_run_sections
from ttt_jax.moshi.ttt_block import TTTArgs, load_ttt_args, load_ttt_block  # noqa: F401
from ttt_jax.config import (CheckpointConfig, DType, MeshConfig, OptimConfig, TTTConfig,
                            TrainConfig, _check_choice, _check_fraction, _check_int,
                            _check_positive, _fail, from_dict)

ARCHITECTURE = "moshi_ttt"
NormType = Literal["rms_norm", "rms_norm_f32"]
Gating = Literal["silu"]
PositionalEmbedding = Literal["rope", "none"]
MoshiDataSource = Literal["bytes", "codebooks", "synthetic", "motifs"]
# model.remat: keep every activation for the backward pass, or only each backbone layer's
# input (the layer's forward is recomputed in the backward pass).
Remat = Literal["none", "layer"]

# moshi's create_norm_fn: RMSNorm eps 1e-5 ("rms_norm") and 1e-8 in float32 ("rms_norm_f32").
NORM_EPS = {"rms_norm": 1e-5, "rms_norm_f32": 1e-8}


def ffn_hidden_size(d_model: int, dim_feedforward: int) -> int:
    """moshi's gating rule: ``21 d / 8`` when ``dim_feedforward == 4 d``, else ``2 dff / 3``."""
    if dim_feedforward == 4 * d_model:
        return (21 * d_model) // 8
    return (2 * dim_feedforward) // 3


@dataclasses.dataclass(frozen=True)
class MoshiTransformerConfig:
    """Moshi's ``StreamingTransformer`` (causal, gated SiLU FFN, RMSNorm, RoPE).

    Attributes:
      d_model: width ``d``.
      num_heads: attention heads; ``d_model`` must be a multiple.
      num_layers: number of layers.
      dim_feedforward: moshi's nominal FFN width; the gate's hidden size follows
        ``ffn_hidden_size`` (Moshi-7B: ``4.125 * 4096 = 16896`` -> 11264).
      context: each frame attends to itself and the ``context - 1`` frames before it; ``None``
        is unbounded (streaming then needs a bound, as in moshi).
      max_period: RoPE base period.
      norm: ``rms_norm`` (eps 1e-5, input dtype) or ``rms_norm_f32`` (eps 1e-8, float32).
      layer_scale: initial LayerScale value, or ``None`` for none (Moshi-7B: none).
      gating: the FFN activation gate (``silu``).
      positional_embedding: ``rope`` (interleaved pairs over absolute positions) or ``none``.
    """

    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: Optional[int] = None
    max_period: float = 10000.0
    norm: NormType = "rms_norm_f32"
    layer_scale: Optional[float] = None
    gating: Gating = "silu"
    positional_embedding: PositionalEmbedding = "rope"

    def __post_init__(self):
        s = "transformer"
        for name in ("d_model", "num_heads", "num_layers", "dim_feedforward"):
            _check_int(s, name, getattr(self, name))
        if self.d_model % self.num_heads:
            _fail(s, "num_heads", self.num_heads, f"a divisor of d_model={self.d_model}")
        if self.context is not None:
            _check_int(s, "context", self.context)
        _check_positive(s, "max_period", self.max_period)
        _check_choice(s, "norm", self.norm, get_args(NormType))
        _check_choice(s, "gating", self.gating, get_args(Gating))
        _check_choice(s, "positional_embedding", self.positional_embedding,
                      get_args(PositionalEmbedding))
        if self.layer_scale is not None:
            _check_positive(s, "layer_scale", self.layer_scale)
        if self.positional_embedding == "rope" and self.head_dim % 2:
            _fail(s, "num_heads", self.num_heads,
                  f"a value giving an even head_dim with rope (head_dim={self.head_dim})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def hidden_size(self) -> int:
        return ffn_hidden_size(self.d_model, self.dim_feedforward)

    @property
    def norm_eps(self) -> float:
        return NORM_EPS[self.norm]


@dataclasses.dataclass(frozen=True)
class MoshiTTTConfig:
    """The whole hybrid model: token streams -> summed embeddings -> backbone -> heads.

    Attributes:
      transformer: the Moshi backbone.
      ttt: the grafted TTT layers.
      vocab_sizes: one vocabulary per token stream (e.g. ``[256]`` for bytes, or ``[32000,
        2048, ...]`` for text plus audio codebooks); one embedding and one output head each.
      init_std: std of the normal initialiser of embeddings, projections and heads.
      dtype: compute dtype of the backbone (params stay float32; TTT math runs in float32).
      lora: low-rank adapters on the backbone's attention and FFN projections
        (``ttt_jax.nn.lora``; off by default), merged into the weights on export.
      remat: ``none`` or ``layer`` (each backbone layer is rematerialised: its forward is
        recomputed in the backward pass and only its input is kept); same params and values.
    """

    transformer: MoshiTransformerConfig
    ttt: TTTArgs = TTTArgs()
    vocab_sizes: tuple[int, ...] = (256,)
    init_std: float = 0.02
    dtype: DType = "float32"
    lora: LoRAConfig = LoRAConfig()
    remat: Remat = "none"

    def __post_init__(self):
        if not isinstance(self.transformer, MoshiTransformerConfig):
            _fail("model", "transformer", self.transformer, "a MoshiTransformerConfig")
        _check_choice("model", "remat", self.remat, get_args(Remat))
        if not isinstance(self.ttt, TTTArgs):
            _fail("model", "ttt", self.ttt, "a TTTArgs")
        if not isinstance(self.lora, LoRAConfig):
            _fail("model", "lora", self.lora, "a LoRAConfig")
        if not isinstance(self.vocab_sizes, tuple) or not self.vocab_sizes or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.vocab_sizes):
            _fail("model", "vocab_sizes", self.vocab_sizes, "a non-empty list of positive integers")
        _check_positive("model", "init_std", self.init_std)
        _check_choice("model", "dtype", self.dtype, get_args(DType))
        self.ttt_layers  # range-checks ttt.layers against num_layers
        if self.ttt_layers:
            self.ttt_config  # heads must divide the width

    @property
    def ttt_layers(self) -> tuple[int, ...]:
        return self.ttt.layer_indices(self.transformer.num_layers)

    @property
    def ttt_config(self) -> TTTConfig:
        t = self.transformer
        return self.ttt.ttt_config(t.d_model, t.num_heads)

    @property
    def num_streams(self) -> int:
        return len(self.vocab_sizes)


@dataclasses.dataclass(frozen=True)
class MoshiDataConfig:
    """Training data of the hybrid: ``[K, T]`` frames of ``K`` token streams.

    Attributes:
      source: ``bytes`` (the built-in byte corpus as one stream), ``synthetic`` (``K``
        periodic streams, learnable from context) or ``codebooks`` (``.npy`` files shaped
        ``[K, T]`` at ``path``: one file or a directory of them).
      path: the file or directory for ``codebooks``.
      seq_len: frames per training sequence.
      batch_size: sequences per optimizer step.
      val_fraction: ``codebooks``: the last this fraction of every file's frames is val.
      recordings: ``motifs``: generated recordings per split (``motifs``: ``[K, T]`` streams
        in which random motifs recur far apart, so that predicting them needs a memory longer
        than attention's window; ``ttt_jax/moshi/data.py``).
      recording_frames: ``motifs``: frames per generated recording.
    """

    source: MoshiDataSource = "synthetic"
    path: Optional[str] = None
    seq_len: int = 64
    batch_size: int = 8
    val_fraction: float = 0.1
    recordings: int = 32
    recording_frames: int = 1024

    def __post_init__(self):
        _check_choice("data", "source", self.source, get_args(MoshiDataSource))
        _check_int("data", "seq_len", self.seq_len)
        _check_int("data", "batch_size", self.batch_size)
        _check_int("data", "recordings", self.recordings)
        _check_int("data", "recording_frames", self.recording_frames)
        if self.source == "codebooks" and not self.path:
            _fail("data", "path", self.path, "a .npy file or directory when source=codebooks")
        _check_fraction("data", "val_fraction", self.val_fraction)


@dataclasses.dataclass(frozen=True)
class MoshiRunConfig:
    """A Moshi-TTT run YAML (``architecture: moshi_ttt``).

    Attributes:
      architecture: always ``moshi_ttt`` (the registry entry of the hybrid).
      model, optim, data, train, checkpoint: as in a TTT-LM run (``checkpoint.init_from``
        also starts a run from Moshi weights imported with ``ttt-jax import --config
        moshi_ttt_tiny --in WEIGHTS.safetensors --out RUN_DIR``).
      mesh: the device mesh of a sharded run (docs/scaling.md; the Moshi rules in
        ``ttt_jax/moshi/sharding.py``), or None for one device.
    """

    model: MoshiTTTConfig
    architecture: Literal["moshi_ttt"] = ARCHITECTURE
    optim: OptimConfig = OptimConfig()
    data: MoshiDataConfig = MoshiDataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: Optional[MeshConfig] = None

    def __post_init__(self):
        _check_choice("run", "architecture", self.architecture, (ARCHITECTURE,))
        check_run_sections(self)
        if self.model.ttt.persistent_states:
            _fail("ttt", "persistent_states", True,
                  "false for architecture moshi_ttt (its streams carry no start-of-recording "
                  "marker); carrying the state between windows is a feature of "
                  "architecture: moshi_lm (docs/moshi.md)")


# The preset a YAML holding only the public ``ttt:`` block trains (run_from_ttt_block).
TTT_BLOCK_PRESET = "moshi_ttt_tiny"


def run_from_ttt_block(data: dict, path: str | Path) -> MoshiRunConfig:
    """The run of a YAML whose only section is a public Moshi-TTT ``ttt:`` block: the
    ``moshi_ttt_tiny`` preset (a CPU-sized backbone on synthetic streams) with that block as
    ``model.ttt``, into ``runs/<file name>``. The block's keys replace the preset's; the keys
    of the public block this project does not implement are accepted with the value that
    leaves them off and refused otherwise (``TTTArgs.YAML_FOREIGN``). Any other top-level key
    is refused: a whole run is written as a run config (``architecture: moshi_ttt``)."""
    from ttt_jax.cli.presets import PRESET_DIR
    from ttt_jax.config.yaml_io import read_yaml

    others = sorted(set(data) - {"ttt"})
    if others:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(others)} beside the "
                         f"Moshi-TTT `ttt:` block: a file with a top-level `ttt:` trains the "
                         f"{TTT_BLOCK_PRESET} preset with that block; for anything else write a "
                         f"run config (architecture: moshi_ttt, the block under model.ttt)")
    if not isinstance(data["ttt"], dict):
        raise ValueError(f"{path}: ttt must be a mapping of the Moshi-TTT block's keys")
    preset = read_yaml(PRESET_DIR / f"{TTT_BLOCK_PRESET}.yaml")
    preset["model"]["ttt"] = {**preset["model"]["ttt"], **data["ttt"]}
    preset["train"]["run_dir"] = f"runs/{Path(path).stem}"
    try:
        return from_dict(MoshiRunConfig, preset)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
