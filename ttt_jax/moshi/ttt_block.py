"""The Moshi-TTT fine-tuning block (``ttt:``): where and how TTT layers are grafted into a
Moshi backbone (``TTTArgs``), read from a run config's ``model.ttt`` or from the public
Moshi-TTT YAML's top-level ``ttt:`` (``load_ttt_block``). docs/moshi.md has the table of every
key of the public block.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Optional, get_args

from ttt_jax.config import (RopeLayout, TTTConfig, TTTLayerType, _check_bools, _check_choice,
                            _check_int, _check_positive, _fail, from_dict, parse_yaml)


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
