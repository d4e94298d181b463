"""Configuration of the Moshi-TTT hybrid: the Moshi backbone, the TTT fine-tuning block, data.

``MoshiTransformerConfig`` mirrors the keyword arguments of the ``moshi`` package's
``StreamingTransformer`` (``d_model, num_heads, num_layers, dim_feedforward, context,
max_period, norm, layer_scale, gating, positional_embedding``). ``TTTArgs`` is the Moshi-TTT
fine-tuning block (``ttt:`` in the YAML): the public block with ``enable, layers, base_lr,
mini_batch_size, use_rope, rope_theta`` loads unchanged, the rest are ours. A run YAML carries
``architecture: moshi_ttt`` at the top level (see ``ttt_jax.registry``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal, Optional, get_args

from ttt_jax.nn.lora import LoRAConfig
from ttt_jax.config.run import check_run_sections
from ttt_jax.config import (CheckpointConfig, DType, MeshConfig, OptimConfig, RopeLayout, TTTConfig,
                            TTTLayerType, TrainConfig, _check_bools, _check_choice,
                            _check_fraction, _check_int, _check_positive, _fail, from_dict,
                            parse_yaml)

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
class TTTArgs:
    """Where and how TTT layers are grafted into the backbone (the Moshi-TTT ``ttt:`` block).

    Attributes:
      enable: graft TTT layers at all (``false``: the plain backbone).
      layers: ``none``, ``all``, ``middle`` (layers ``N//4 .. 3N//4 - 1``) or a comma-separated
        list of layer indices such as ``"1,5,9"``.
      ttt_base_lr: the inner learning-rate scale (``TTTConfig.ttt_base_lr``); the YAML key
        ``base_lr`` of the public Moshi-TTT block is read as this field.
      mini_batch_size: ``b``, tokens per inner step and the bounded-RoPE table size.
      use_rope: bounded RoPE on the TTT layer's Q and K (positions ``% b``).
      rope_theta: its base.
      rope_bounded: with ``use_rope``, rotate by ``position % mini_batch_size`` (true, the
        Moshi-TTT trick) or by the absolute position (false, the ablation).
      initial_gating_alpha: initial value of the per-channel ``alpha`` in
        ``x += tanh(alpha) * TTT(x)``.
      weight_lr_multiplier: the outer learning rate of the TTT layer's params is the base
        learning rate times this.
      alpha_lr_multiplier: the same for the gating ``alpha``.
      freeze_backbone: train only the TTT params and the alphas.
      layer_type: inner model, ``mlp`` (Moshi-TTT's) or ``linear``.
      num_heads: TTT heads (default: the backbone's).
      qk_l2_norm: L2-normalise Q and K (Moshi-TTT does).
      rope_layout: ``half`` (rotate_half pairs) or ``interleaved``.
      pre_norm: feed ``RMSNorm(x)`` instead of the raw residual stream to the TTT layer.
      noop_init: initialise ``o_proj`` to zero, so a freshly grafted block adds exactly
        nothing (the grafted model equals its base); ``o_proj`` still gets gradient from the
        first step, and every TTT param from the second.
      scan_checkpoint_group: ``TTTConfig.scan_checkpoint_group``.
      persistent_states: train on consecutive windows of each recording in order, carrying
        the temporal transformer's state (every TTT layer's inner state and the attention's
        key/value window) from one window to the next, fresh at the start of a recording
        (``architecture: moshi_lm`` with recordings as data; docs/moshi.md).
    """

    YAML_ALIASES: ClassVar[dict[str, str]] = {"base_lr": "ttt_base_lr"}
    # Keys of the public Moshi-TTT block that this project does not implement: accepted with
    # the value that leaves them off, refused otherwise with the reason (docs/moshi.md has the
    # table of every key).
    YAML_FOREIGN: ClassVar[dict[str, tuple[tuple, str]]] = {
        "override_gating_alpha_on_resume": ((False,), "to restart the gating, start a new run "
                                            "with checkpoint.init_from and "
                                            "optim.trainable / ttt.initial_gating_alpha"),
        "ttt_layer_context": ((None,), "one attention context for every layer: "
                              "model.transformer.context"),
        "non_ttt_layer_context": ((None,), "one attention context for every layer: "
                                  "model.transformer.context"),
        "log_inner_loop_losses": ((False,), "the inner losses are logged by "
                                  "train.diagnostics_every and `ttt-jax eval --diagnostics`"),
        "inner_loop_log_interval": ((1,), "see train.diagnostics_every"),
        "save_inner_loop_plots": ((False,), "`ttt-jax eval --diagnostics` draws them"),
        "inner_loop_plot_dir": (("./evaluation_plots/inner_loop",), "`ttt-jax eval --out DIR`"),
        "enable_training_diagnostics": ((False,), "use train.diagnostics_every"),
        "training_diagnostic_frequency": ((100,), "use train.diagnostics_every"),
        "optimize_chunk_size": ((True, False), "evaluation here streams any length exactly, "
                                "so the chunk size changes nothing"),
        "chunk_size": ((None,), "evaluation here streams any length exactly (`ttt-jax eval "
                       "--lengths`)"),
        "max_chunk_size": ((50,), "evaluation here streams any length exactly"),
        "prefer_efficiency": ((True, False), "evaluation here streams any length exactly"),
        "ttt_mlp_layers": ((2,), "the inner TTT-MLP has two layers (f -> 4f -> f)"),
        "ttt_mlp_hidden_dims": ((None,), "the inner TTT-MLP's hidden width is 4 * head_dim"),
        "ttt_mlp_expansion_factor": ((4.0, 4), "the inner TTT-MLP's hidden width is "
                                     "4 * head_dim"),
        "normalize_ttt_output": ((False,), "output scaling to a target norm is not implemented; "
                                 "the gating alpha and ttt.pre_norm set the TTT output's scale"),
        "target_output_norm": ((25.0, 25), "see normalize_ttt_output"),
        "unfrozen_attention_layers": (("none",), "freeze with ttt.freeze_backbone and choose "
                                      "trained params with optim.trainable (a path regex, e.g. "
                                      "'seq_modeling_block|layers_(3|4)/self_attn')"),
    }

    enable: bool = False
    layers: str = "none"
    ttt_base_lr: float = 1.0
    mini_batch_size: int = 16
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_bounded: bool = True
    initial_gating_alpha: float = 0.1
    weight_lr_multiplier: float = 1.0
    alpha_lr_multiplier: float = 1.0
    freeze_backbone: bool = False
    layer_type: TTTLayerType = "mlp"
    num_heads: Optional[int] = None
    qk_l2_norm: bool = True
    rope_layout: RopeLayout = "half"
    pre_norm: bool = False
    noop_init: bool = False
    scan_checkpoint_group: int = 0
    persistent_states: bool = False

    def __post_init__(self):
        s = "ttt"
        _check_bools(s, self, ("enable", "use_rope", "freeze_backbone", "qk_l2_norm",
                               "pre_norm", "noop_init", "persistent_states", "rope_bounded"))
        if isinstance(self.layers, bool) or not isinstance(self.layers, (str, int)):
            _fail(s, "layers", self.layers, "none, all, middle or indices like \"1,5,9\"")
        _parse_layer_spec(str(self.layers), None)  # syntax now, range once N is known
        for name in ("ttt_base_lr", "rope_theta", "weight_lr_multiplier", "alpha_lr_multiplier"):
            _check_positive(s, name, getattr(self, name))
        value = self.initial_gating_alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(s, "initial_gating_alpha", value, "a number")
        _check_int(s, "mini_batch_size", self.mini_batch_size)
        if self.num_heads is not None:
            _check_int(s, "num_heads", self.num_heads)
        _check_int(s, "scan_checkpoint_group", self.scan_checkpoint_group, minimum=0)
        _check_choice(s, "layer_type", self.layer_type, get_args(TTTLayerType))
        _check_choice(s, "rope_layout", self.rope_layout, get_args(RopeLayout))

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        """The grafted layers of an ``num_layers``-layer backbone (empty when disabled)."""
        if not self.enable:
            return ()
        return _parse_layer_spec(str(self.layers), num_layers)

    def ttt_config(self, d_model: int, backbone_heads: int) -> TTTConfig:
        """The ``TTTConfig`` of every grafted layer."""
        heads = self.num_heads if self.num_heads is not None else backbone_heads
        if d_model % heads:
            _fail("ttt", "num_heads", heads, f"a divisor of d_model={d_model}")
        return TTTConfig(model_dim=d_model, num_heads=heads, mini_batch_size=self.mini_batch_size,
                         ttt_layer_type=self.layer_type, use_rope=self.use_rope,
                         rope_theta=float(self.rope_theta), rope_layout=self.rope_layout,
                         rope_bounded=self.rope_bounded, qk_l2_norm=self.qk_l2_norm,
                         ttt_base_lr=float(self.ttt_base_lr),
                         scan_checkpoint_group=self.scan_checkpoint_group)


def _parse_layer_spec(spec: str, num_layers: Optional[int]) -> tuple[int, ...]:
    """``none | all | middle | "1,5,9"`` -> sorted indices; ``num_layers=None`` checks syntax."""
    allowed = "none, all, middle or comma-separated layer indices like \"1,5,9\""
    word = spec.strip().lower()
    if word in ("none", "all", "middle"):
        if num_layers is None or word == "none":
            return ()
        if word == "all":
            return tuple(range(num_layers))
        return tuple(range(num_layers // 4, 3 * num_layers // 4))
    parts = [p.strip() for p in word.split(",")]
    if not parts or any(not p.lstrip("-").isdigit() for p in parts):
        _fail("ttt", "layers", spec, allowed)
    indices = [int(p) for p in parts]
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        _fail("ttt", "layers", spec, f"distinct layer indices (repeated: {dupes})")
    if num_layers is None:
        if min(indices) < 0:
            _fail("ttt", "layers", spec, "layer indices >= 0")
        return ()
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        _fail("ttt", "layers", spec, f"layer indices in [0, {num_layers - 1}] for "
                                     f"num_layers={num_layers} (out of range: {bad})")
    return tuple(sorted(indices))


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


def load_ttt_args(data) -> TTTArgs:
    """``TTTArgs`` from a mapping (e.g. the ``ttt:`` block of a Moshi-TTT YAML)."""
    return from_dict(TTTArgs, data, "ttt")


def load_ttt_block(path: str | Path) -> TTTArgs:
    """``TTTArgs`` from the top-level ``ttt:`` block of a YAML file (other keys are ignored,
    as a Moshi-TTT fine-tuning YAML holds many); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("ttt"), dict):
        raise ValueError(f"{path}: expected a top-level `ttt:` mapping (the Moshi-TTT block)")
    try:
        return load_ttt_args(data["ttt"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


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
