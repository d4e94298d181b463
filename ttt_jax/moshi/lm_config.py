"""Configuration of ``MoshiLM``, Moshi's whole multi-stream language model (docs/moshi.md).

``MoshiLMConfig`` holds what ``moshi.models.lm.LMModel`` takes as keyword arguments: the
temporal transformer (a ``MoshiTransformerConfig``, into which TTT layers can be grafted with
the same ``ttt:`` block as Moshi-TTT), the depformer (``DepformerConfig``), the streams
(``n_q`` audio codebooks of ``card`` tokens, ``dep_q`` of them predicted, one text stream of
``text_card`` tokens), the per-stream ``delays`` and the special token ids.
``moshi_lm_kwargs(cfg)`` gives the keyword arguments of the equal ``LMModel`` and
``from_moshi_lm_kwargs(kwargs)`` reads them back (e.g. a published model's ``config.json``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping, Optional, get_args

from ttt_jax.nn.lora import LoRAConfig
from ttt_jax.config import (CheckpointConfig, DType, MeshConfig, OptimConfig, TrainConfig,
                            _check_bools, _check_choice, _check_int, _check_positive, _fail)
from ttt_jax.config.run import check_run_sections
from ttt_jax.moshi.config import (Gating, MoshiDataConfig, MoshiTTTConfig,
                                  MoshiTransformerConfig, Remat, TTTArgs)

ARCHITECTURE = "moshi_lm"

DepformerPosEmb = Literal["sin", "rope", "none"]


@dataclasses.dataclass(frozen=True)
class DepformerConfig:
    """The depformer: a small transformer over the ``dep_q`` codebooks of one frame.

    Attributes:
      d_model: its width (moshi's ``depformer_dim``).
      num_heads: its attention heads.
      num_layers: its layers.
      dim_feedforward: moshi's nominal FFN width: one value, or one per weight set when
        ``weights_per_step`` (the gate's hidden size follows ``ffn_hidden_size``).
      multi_linear: one ``depformer_in`` projection per step (or per scheduled weight set)
        instead of one shared projection.
      weights_per_step: each step (codebook) has its own attention projections and FFN (the
        norms stay shared), as moshi's ``weights_per_step``.
      weights_per_step_schedule: step -> weight set (``dep_q`` entries); steps may share a set.
      pos_emb: ``sin`` (sinusoids added to the input), ``rope`` or ``none``.
      max_period: period of the sinusoids / RoPE.
      layer_scale: initial LayerScale value, or ``None`` for none.
      gating: the FFN gate (``silu``).
    """

    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: tuple[int, ...]
    multi_linear: bool = False
    weights_per_step: bool = False
    weights_per_step_schedule: Optional[tuple[int, ...]] = None
    pos_emb: DepformerPosEmb = "sin"
    max_period: float = 10000.0
    layer_scale: Optional[float] = None
    gating: Gating = "silu"

    def __post_init__(self):
        s = "depformer"
        for name in ("d_model", "num_heads", "num_layers"):
            _check_int(s, name, getattr(self, name))
        if self.d_model % self.num_heads:
            _fail(s, "num_heads", self.num_heads, f"a divisor of d_model={self.d_model}")
        if not isinstance(self.dim_feedforward, tuple) or not self.dim_feedforward or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1
                for v in self.dim_feedforward):
            _fail(s, "dim_feedforward", self.dim_feedforward,
                  "a non-empty list of positive integers")
        _check_bools(s, self, ("multi_linear", "weights_per_step"))
        if self.weights_per_step_schedule is not None:
            sched = self.weights_per_step_schedule
            if not isinstance(sched, tuple) or not sched or any(
                    isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in sched):
                _fail(s, "weights_per_step_schedule", sched,
                      "null or a list of weight-set indices >= 0")
        _check_choice(s, "pos_emb", self.pos_emb, get_args(DepformerPosEmb))
        _check_positive(s, "max_period", self.max_period)
        if self.layer_scale is not None:
            _check_positive(s, "layer_scale", self.layer_scale)
        _check_choice(s, "gating", self.gating, get_args(Gating))
        if self.pos_emb == "rope" and (self.d_model // self.num_heads) % 2:
            _fail(s, "num_heads", self.num_heads, "a value giving an even head_dim with rope")
        if self.pos_emb == "sin" and self.d_model % 2:
            _fail(s, "d_model", self.d_model, "an even width with sin embeddings")


@dataclasses.dataclass(frozen=True)
class MoshiLMConfig:
    """Moshi's ``LMModel``: text + ``n_q`` audio streams, temporal transformer, depformer.

    Attributes:
      transformer: the temporal transformer (``dim``, ``num_heads``, ``num_layers``,
        ``dim_feedforward = int(hidden_scale * dim)``, ``context``, ``norm``, ...).
      depformer: the depformer.
      ttt: TTT layers grafted into the temporal transformer (``x += tanh(alpha) * TTT(x)``).
      n_q: audio codebooks in the input.
      dep_q: audio codebooks the depformer predicts (the first ``dep_q``; ``<= n_q``).
      card: audio vocabulary (``card`` itself is the initial token, so embeddings have
        ``card + 1`` rows).
      text_card: text vocabulary (``text_card`` is the text initial token).
      text_card_out: text logits (default ``text_card``).
      delays: ``n_q + 1`` delays in frames, text first.
      existing_text_padding_id: the text padding token.
      existing_text_end_padding_id: the token marking the last padding step of a word.
      bias_proj: biases in ``text_linear`` and ``linears``.
      init_std: std of the normal initialiser.
      dtype: compute dtype (params stay float32).
      text_padding_weight: the fine-tuning loss's weight of text targets that are padding
        (``lm_loss.py``); not an ``LMModel`` argument.
      first_codebook_weight_multiplier: the fine-tuning loss's weight of the first audio
        codebook; not an ``LMModel`` argument.
      lora: low-rank adapters on the temporal transformer's attention and FFN projections
        (``ttt_jax.nn.lora``); merged into the weights on export.
      remat: ``none`` or ``layer`` (every temporal and depformer layer is rematerialised: its
        forward is recomputed in the backward pass); same params and values.
    """

    transformer: MoshiTransformerConfig
    depformer: DepformerConfig
    delays: tuple[int, ...]
    ttt: TTTArgs = TTTArgs()
    n_q: int = 8
    dep_q: int = 8
    card: int = 2048
    text_card: int = 32000
    text_card_out: Optional[int] = None
    existing_text_padding_id: int = 3
    existing_text_end_padding_id: int = 0
    bias_proj: bool = False
    init_std: float = 0.02
    dtype: DType = "float32"
    text_padding_weight: float = 0.5
    first_codebook_weight_multiplier: float = 1.0
    lora: LoRAConfig = LoRAConfig()
    remat: Remat = "none"

    def __post_init__(self):
        s = "model"
        _check_choice(s, "remat", self.remat, get_args(Remat))
        if not isinstance(self.transformer, MoshiTransformerConfig):
            _fail(s, "transformer", self.transformer, "a MoshiTransformerConfig")
        if not isinstance(self.depformer, DepformerConfig):
            _fail(s, "depformer", self.depformer, "a DepformerConfig")
        if not isinstance(self.ttt, TTTArgs):
            _fail(s, "ttt", self.ttt, "a TTTArgs")
        for name in ("n_q", "dep_q", "card", "text_card"):
            _check_int(s, name, getattr(self, name))
        if self.dep_q > self.n_q:
            _fail(s, "dep_q", self.dep_q, f"at most n_q={self.n_q}")
        if self.text_card_out is not None:
            _check_int(s, "text_card_out", self.text_card_out)
        for name in ("existing_text_padding_id", "existing_text_end_padding_id"):
            _check_int(s, name, getattr(self, name), minimum=0)
        if not isinstance(self.delays, tuple) or len(self.delays) != self.n_q + 1 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.delays):
            _fail(s, "delays", self.delays, f"n_q + 1 = {self.n_q + 1} integers >= 0 (text first)")
        _check_bools(s, self, ("bias_proj",))
        _check_positive(s, "init_std", self.init_std)
        _check_choice(s, "dtype", self.dtype, get_args(DType))
        for name in ("text_padding_weight", "first_codebook_weight_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                _fail(s, name, value, "a number >= 0")
        dep = self.depformer
        sched = dep.weights_per_step_schedule
        if sched is not None and len(sched) != self.dep_q:
            _fail("depformer", "weights_per_step_schedule", sched,
                  f"dep_q={self.dep_q} entries")
        if len(dep.dim_feedforward) not in (1, self.depformer_weight_sets):
            _fail("depformer", "dim_feedforward", dep.dim_feedforward,
                  f"one value or one per weight set ({self.depformer_weight_sets})")
        self.temporal.ttt_layers  # range-checks ttt.layers against num_layers
        if self.temporal.ttt_layers:
            self.temporal.ttt_config  # heads must divide the width

    @property
    def num_codebooks(self) -> int:
        """Streams in the input: text + ``n_q`` audio codebooks."""
        return self.n_q + 1

    @property
    def initial_ids(self) -> tuple[int, ...]:
        """The initial token of every stream: ``text_card`` for text, ``card`` for audio."""
        return (self.text_card,) + (self.card,) * self.n_q

    @property
    def text_vocab_out(self) -> int:
        return self.text_card if self.text_card_out is None else self.text_card_out

    @property
    def temporal(self) -> MoshiTTTConfig:
        """The temporal transformer as a Moshi-TTT model config (backbone + graft)."""
        return MoshiTTTConfig(transformer=self.transformer, ttt=self.ttt,
                              vocab_sizes=(self.text_card + 1,), init_std=self.init_std,
                              dtype=self.dtype, lora=self.lora, remat=self.remat)

    @property
    def depformer_weight_sets(self) -> int:
        """Weight sets of each depformer layer (1 unless ``weights_per_step``)."""
        dep = self.depformer
        if not dep.weights_per_step:
            return 1
        if dep.weights_per_step_schedule is not None:
            return max(dep.weights_per_step_schedule) + 1
        return self.dep_q

    def depformer_weight_index(self, step: int) -> int:
        """The weight set of depformer step ``step`` (codebook ``step``)."""
        dep = self.depformer
        if not dep.weights_per_step:
            return 0
        if dep.weights_per_step_schedule is not None:
            return dep.weights_per_step_schedule[step]
        return step

    @property
    def depformer_in_count(self) -> int:
        """How many ``depformer_in`` projections (moshi: ``dep_q``, or the scheduled sets)."""
        dep = self.depformer
        if not dep.multi_linear:
            return 1
        if dep.weights_per_step_schedule is not None:
            return max(dep.weights_per_step_schedule) + 1
        return self.dep_q

    def depformer_in_index(self, step: int) -> int:
        dep = self.depformer
        if not dep.multi_linear:
            return 0
        if dep.weights_per_step_schedule is not None:
            return dep.weights_per_step_schedule[step]
        return step

    def depformer_block(self, weight_set: int = 0) -> MoshiTransformerConfig:
        """The depformer as a ``MoshiTransformerConfig`` (FFN width of ``weight_set``)."""
        dep = self.depformer
        dff = dep.dim_feedforward
        return MoshiTransformerConfig(
            d_model=dep.d_model, num_heads=dep.num_heads, num_layers=dep.num_layers,
            dim_feedforward=dff[weight_set] if len(dff) > 1 else dff[0], context=None,
            max_period=dep.max_period, norm=self.transformer.norm, layer_scale=dep.layer_scale,
            gating=dep.gating,
            positional_embedding="rope" if dep.pos_emb == "rope" else "none")


def moshi_lm_kwargs(cfg: MoshiLMConfig) -> dict[str, Any]:
    """Keyword arguments of the ``moshi.models.lm.LMModel`` equal to ``cfg``'s backbone."""
    t, dep = cfg.transformer, cfg.depformer
    if t.dim_feedforward % t.d_model:
        hidden_scale = t.dim_feedforward / t.d_model
    else:
        hidden_scale = t.dim_feedforward // t.d_model
    if int(hidden_scale * t.d_model) != t.dim_feedforward:
        raise ValueError(f"transformer.dim_feedforward={t.dim_feedforward} is invalid for "
                         f"moshi: expected int(hidden_scale * d_model) for some hidden_scale")
    dff = list(dep.dim_feedforward)
    return {
        "delays": list(cfg.delays), "n_q": cfg.n_q, "dep_q": cfg.dep_q, "card": cfg.card,
        "text_card": cfg.text_card, "text_card_out": cfg.text_card_out,
        "dim": t.d_model, "num_heads": t.num_heads, "num_layers": t.num_layers,
        "hidden_scale": hidden_scale, "causal": True, "context": t.context,
        "max_period": t.max_period, "norm": t.norm, "layer_scale": t.layer_scale,
        "gating": t.gating, "positional_embedding": t.positional_embedding,
        "bias_proj": cfg.bias_proj,
        "existing_text_padding_id": cfg.existing_text_padding_id,
        "existing_text_end_padding_id": cfg.existing_text_end_padding_id,
        "depformer_dim": dep.d_model, "depformer_num_heads": dep.num_heads,
        "depformer_num_layers": dep.num_layers,
        "depformer_dim_feedforward": dff[0] if len(dff) == 1 else dff,
        "depformer_multi_linear": dep.multi_linear,
        "depformer_weights_per_step": dep.weights_per_step,
        "depformer_weights_per_step_schedule": (None if dep.weights_per_step_schedule is None
                                                else list(dep.weights_per_step_schedule)),
        "depformer_pos_emb": dep.pos_emb, "depformer_max_period": dep.max_period,
        "depformer_layer_scale": dep.layer_scale, "depformer_gating": dep.gating,
    }


# LMModel keyword arguments that carry no weights and change nothing in the forward pass here.
_IGNORED = {"causal", "quantize", "device", "dtype", "gradient_checkpointing", "lora",
            "lora_rank", "lora_scaling", "depformer_causal", "depformer_context",
            "model_id", "model_type", "lm_gen_config", "stt_config", "tokenizer_name",
            "moshi_name", "mimi_name"}
# Keyword arguments we do not implement: only these values (moshi's defaults) are accepted.
_FIXED = {"norm_emb": (False,), "demux_second_text_stream": (False,),
          "demux_second_stream": (False,), "depformer_low_rank_embeddings": (None,),
          "depformer_norm": (None,), "extra_heads_num_heads": (0,),
          "condition_provider": (None,), "fuser": (None, {}), "conditioners": (None, {}),
          "cross_attention": (False,), "kv_repeat": (1,), "depformer_kv_repeat": (1,),
          "positional_scale": (1.0,), "depformer_positional_scale": (1.0,)}


def from_moshi_lm_kwargs(kwargs: Mapping[str, Any], ttt: TTTArgs = TTTArgs(),
                         **overrides) -> MoshiLMConfig:
    """``MoshiLMConfig`` from ``LMModel`` keyword arguments (moshi's defaults for absent keys);
    a value we do not implement is refused naming its key. ``overrides``: our own fields
    (``init_std``, ``dtype``)."""
    kw = dict(kwargs)
    for key, allowed in _FIXED.items():
        if key in kw and not any(kw[key] == a and type(kw[key]) is type(a) or
                                 isinstance(a, float) and isinstance(kw[key], int) and
                                 kw[key] == a for a in allowed):
            raise ValueError(f"{key}={kw[key]!r} is not supported by MoshiLM: expected "
                             f"{' or '.join(repr(a) for a in allowed)}")
    known = {"delays", "n_q", "dep_q", "card", "text_card", "text_card_out", "dim",
             "num_heads", "num_layers", "hidden_scale", "context", "max_period", "norm",
             "layer_scale", "gating", "positional_embedding", "bias_proj",
             "existing_text_padding_id", "existing_text_end_padding_id", "depformer_dim",
             "depformer_num_heads", "depformer_num_layers", "depformer_dim_feedforward",
             "depformer_multi_linear", "depformer_weights_per_step",
             "depformer_weights_per_step_schedule", "depformer_pos_emb",
             "depformer_max_period", "depformer_layer_scale", "depformer_gating",
             "extra_heads_dim"}
    unknown = sorted(set(kw) - known - _IGNORED - set(_FIXED))
    if unknown:
        raise ValueError(f"LMModel keyword arguments not understood by MoshiLM: {unknown}")
    dim = kw.get("dim", 128)
    hidden_scale = kw.get("hidden_scale", 4)
    transformer = MoshiTransformerConfig(
        d_model=dim, num_heads=kw.get("num_heads", 8), num_layers=kw["num_layers"],
        dim_feedforward=int(hidden_scale * dim), context=kw.get("context"),
        max_period=float(kw.get("max_period", 10000.0)), norm=kw.get("norm", "layer_norm"),
        layer_scale=kw.get("layer_scale"), gating=kw.get("gating", "none"),
        positional_embedding=kw.get("positional_embedding", "sin"))
    ddim = kw.get("depformer_dim", 256)
    dff = kw.get("depformer_dim_feedforward")
    if dff is None:
        dff = int(hidden_scale * ddim)
    depformer = DepformerConfig(
        d_model=ddim, num_heads=kw.get("depformer_num_heads", transformer.num_heads),
        num_layers=kw.get("depformer_num_layers", transformer.num_layers),
        dim_feedforward=tuple(dff) if isinstance(dff, (list, tuple)) else (dff,),
        multi_linear=kw.get("depformer_multi_linear", False),
        weights_per_step=kw.get("depformer_weights_per_step", False),
        weights_per_step_schedule=(None if kw.get("depformer_weights_per_step_schedule") is None
                                   else tuple(kw["depformer_weights_per_step_schedule"])),
        pos_emb=kw.get("depformer_pos_emb", "sin"),
        max_period=float(kw.get("depformer_max_period", transformer.max_period)),
        layer_scale=kw.get("depformer_layer_scale", transformer.layer_scale),
        gating=kw.get("depformer_gating", transformer.gating))
    return MoshiLMConfig(
        transformer=transformer, depformer=depformer, ttt=ttt,
        delays=tuple(kw.get("delays", [0])), n_q=kw.get("n_q", 8), dep_q=kw.get("dep_q", 8),
        card=kw.get("card", 1024), text_card=kw.get("text_card", 32000),
        text_card_out=kw.get("text_card_out"),
        existing_text_padding_id=kw.get("existing_text_padding_id", 3),
        existing_text_end_padding_id=kw.get("existing_text_end_padding_id", 0),
        bias_proj=kw.get("bias_proj", False), **overrides)


@dataclasses.dataclass(frozen=True)
class MoshiLMRunConfig:
    """A MoshiLM run YAML (``architecture: moshi_lm``).

    Attributes:
      architecture: always ``moshi_lm``.
      model: the model (and the weights of its fine-tuning loss).
      optim, train, checkpoint: as in every run.
      data: frames of ``n_q + 1`` streams (text first), as Moshi-TTT's data
        (``MoshiDataConfig``); a batch ``[B, seq_len + 1, K]`` is used whole as the codes.
      mesh: the device mesh of a sharded run (docs/scaling.md; the Moshi rules in
        ``ttt_jax/moshi/sharding.py``), or None for one device.
    """

    model: MoshiLMConfig
    architecture: Literal["moshi_lm"] = ARCHITECTURE
    optim: OptimConfig = OptimConfig()
    data: MoshiDataConfig = MoshiDataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: Optional[MeshConfig] = None

    def __post_init__(self):
        _check_choice("run", "architecture", self.architecture, (ARCHITECTURE,))
        check_run_sections(self)
        if self.model.ttt.persistent_states:
            self._check_persistent()

    def _check_persistent(self) -> None:
        """``ttt.persistent_states`` reads recordings in order, starting each from its frame of
        initial tokens."""
        if self.data.source not in ("codebooks", "motifs"):
            _fail("data", "source", self.data.source,
                  "'codebooks' or 'motifs' with ttt.persistent_states (recordings read in "
                  "order)")
        if min(self.model.delays) != 0:
            _fail("model", "delays", self.model.delays,
                  "a stream with delay 0 with ttt.persistent_states (it marks where a "
                  "recording starts)")
