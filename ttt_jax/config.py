"""Configuration: frozen dataclasses validated at construction, loaded from and saved to YAML.

Every section is a frozen dataclass whose ``__post_init__`` raises ``ValueError`` naming the
field, the bad value and what is allowed. ``from_dict`` builds a dataclass from a plain mapping,
rejecting unknown keys and wrong types with the dotted path of the offending key, so a YAML file
round-trips exactly: ``from_dict(cls, to_dict(cfg)) == cfg``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, TypeVar, get_args, get_origin

import yaml

TTTLayerType = Literal["linear", "mlp"]
RopeLayout = Literal["interleaved", "half"]
DType = Literal["float32", "bfloat16"]
SeqModeling = Literal["ttt", "swa"]

# The width of TTT-MLP's hidden layer, in multiples of the head dim (DESIGN §1.5).
MLP_EXPANSION = 4


def _fail(section: str, field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{section}.{field}={value!r} is invalid: expected {allowed}")


def _check_choice(section: str, field: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(section, field, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_bools(section: str, cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            _fail(section, name, value, "true or false")


def _check_positive(section: str, field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _fail(section, field, value, "a positive number")


@dataclasses.dataclass(frozen=True)
class TTTConfig:
    """The TTT layer (DESIGN §1).

    Attributes:
      model_dim: width ``d`` of the layer's input and output.
      num_heads: number of heads ``H``; ``head_dim = model_dim // num_heads``.
      mini_batch_size: ``b``, tokens per inner gradient step (also the RoPE table size).
      ttt_layer_type: inner model, ``linear`` (TTT-Linear) or ``mlp`` (TTT-MLP, hidden 4f).
      use_rope: rotate XQ and XK by ``position % mini_batch_size``. Off by default.
      rope_theta: RoPE base period.
      rope_layout: ``interleaved`` pairs ``(2k, 2k+1)`` or ``half`` pairs ``(k, k + f/2)``.
      rope_bounded: with ``use_rope``, rotate by ``position % mini_batch_size`` (true, the
        default) or by the plain absolute position (false: an ablation that lets RoPE
        extrapolate past the training length; ttt-lm-pytorch always bounds).
      qk_l2_norm: L2-normalise XQ and XK over the head dim before RoPE.
      ttt_base_lr: the inner learning-rate scale.
      share_qk: one shared Q/K projection followed by two causal depthwise convs.
      conv_kernel: kernel size of those convs (and of the model's pre-conv).
      use_gate: multiply the output by ``gelu_tanh(x Wg)`` before ``o_proj``.
      scan_checkpoint_group: in the backward pass keep the inner state only every this many
        mini-batches and recompute the rest (0 or 1: keep it at every mini-batch). Each
        mini-batch step is always recomputed rather than stored.
      initializer_range: std of the normal initialiser of projections and inner weights.
    """

    model_dim: int
    num_heads: int
    mini_batch_size: int = 16
    ttt_layer_type: TTTLayerType = "linear"
    use_rope: bool = False
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = "interleaved"
    rope_bounded: bool = True
    qk_l2_norm: bool = False
    ttt_base_lr: float = 1.0
    share_qk: bool = False
    conv_kernel: int = 4
    use_gate: bool = False
    scan_checkpoint_group: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        s = "ttt"
        for name in ("model_dim", "num_heads", "mini_batch_size", "conv_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail(s, name, value, "a positive integer")
        if self.model_dim % self.num_heads:
            _fail(s, "num_heads", self.num_heads, f"a divisor of model_dim={self.model_dim}")
        _check_bools(s, self, ("use_rope", "rope_bounded", "qk_l2_norm", "share_qk", "use_gate"))
        _check_choice(s, "ttt_layer_type", self.ttt_layer_type, get_args(TTTLayerType))
        _check_choice(s, "rope_layout", self.rope_layout, get_args(RopeLayout))
        _check_positive(s, "rope_theta", self.rope_theta)
        _check_positive(s, "ttt_base_lr", self.ttt_base_lr)
        _check_positive(s, "initializer_range", self.initializer_range)
        if self.use_rope and self.head_dim % 2:
            _fail(s, "num_heads", self.num_heads,
                  f"a value giving an even head_dim when use_rope=true (head_dim={self.head_dim})")
        g = self.scan_checkpoint_group
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            _fail(s, "scan_checkpoint_group", g, "an integer >= 0 (0: keep every state)")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def inner_widths(self) -> tuple[int, ...]:
        """Widths of the inner model's layers, input first: ``(f, f)`` or ``(f, 4f, f)``."""
        f = self.head_dim
        return (f, f) if self.ttt_layer_type == "linear" else (f, MLP_EXPANSION * f, f)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The TTT-LM (DESIGN §2): embed -> blocks -> RMSNorm -> lm_head.

    Attributes:
      vocab_size: number of token ids.
      num_layers: number of blocks.
      intermediate_size: hidden width of the SwiGLU feed-forward.
      ttt: the TTT layer of every block; ``ttt.model_dim`` is the model width.
      pre_conv: add ``x += Conv(RMSNorm(x))`` before the TTT sub-block.
      tie_word_embeddings: the LM head reuses the embedding matrix.
      rms_norm_eps: epsilon of every RMSNorm.
      dtype: compute dtype of embeddings and projections (params stay float32; the inner TTT
        math always runs in float32).
      seq_modeling: the sequence layer of every block: ``ttt`` (the TTT layer) or ``swa``
        (a causal sliding-window attention baseline with RoPE over absolute positions; it reuses
        ``ttt.model_dim``, ``ttt.num_heads``, ``ttt.rope_theta`` and ``ttt.rope_layout``).
      attention_window: with ``seq_modeling: swa``, each token attends to itself and the
        ``attention_window - 1`` tokens before it.
    """

    vocab_size: int
    num_layers: int
    intermediate_size: int
    ttt: TTTConfig
    pre_conv: bool = False
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    dtype: DType = "float32"
    seq_modeling: SeqModeling = "ttt"
    attention_window: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "intermediate_size", "attention_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                _fail("model", name, value, "a positive integer")
        _check_bools("model", self, ("pre_conv", "tie_word_embeddings"))
        if not isinstance(self.ttt, TTTConfig):
            _fail("model", "ttt", self.ttt, "a TTTConfig")
        _check_positive("model", "rms_norm_eps", self.rms_norm_eps)
        _check_choice("model", "dtype", self.dtype, get_args(DType))
        _check_choice("model", "seq_modeling", self.seq_modeling, get_args(SeqModeling))
        if self.seq_modeling == "swa" and self.ttt.head_dim % 2:
            _fail("model", "seq_modeling", self.seq_modeling,
                  f"'ttt' when ttt.head_dim={self.ttt.head_dim} is odd (attention uses RoPE)")

    @property
    def model_dim(self) -> int:
        return self.ttt.model_dim


DataSource = Literal["bytes", "recall", "tokens"]
TokenDType = Literal["uint16", "uint32"]


def _check_fraction(section: str, field: str, value: Any) -> None:
    """A number strictly between 0 and 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        _fail(section, field, value, "a number in (0, 1)")


def _check_positive_ints(section: str, cfg: Any, names: tuple[str, ...], minimum: int = 1):
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(section, name, value, f"an integer >= {minimum}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping (all from optax).

    Attributes:
      learning_rate: peak learning rate.
      warmup_steps: linear warmup from 0 to the peak.
      min_lr_ratio: the cosine decays to ``learning_rate * min_lr_ratio`` at the last step.
      weight_decay: decoupled weight decay, applied to matrices only (not norms, biases, or
        the per-head TTT vectors).
      b1, b2, eps: Adam moments.
      grad_clip: global-norm clipping threshold (0 disables clipping).
      trainable: a regular expression over parameter paths such as
        ``layers_0/seq_modeling_block/W1``; when set, only matching params are updated (the rest
        are frozen through ``optax.multi_transform``), e.g. ``seq_modeling_block`` trains only the
        TTT layers of a grafted model.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    trainable: Optional[str] = None

    def __post_init__(self):
        _check_positive("optim", "learning_rate", self.learning_rate)
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except (re.error, TypeError) as e:
                _fail("optim", "trainable", self.trainable, f"a regular expression ({e})")
        _check_positive_ints("optim", self, ("warmup_steps",), minimum=0)
        for name, lo, hi in (("min_lr_ratio", 0.0, 1.0), ("b1", 0.0, 1.0), ("b2", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                _fail("optim", name, value, f"a number in [{lo}, {hi}]")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                _fail("optim", name, value, "a number >= 0")
        _check_positive("optim", "eps", self.eps)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training data: a built-in source (no download) or a user token file.

    Attributes:
      source: ``bytes`` (the Python standard library's source as bytes), ``recall`` (synthetic
        associative recall) or ``tokens`` (a user ``.npy``/raw token file at ``path``).
      path: the token file for ``source: tokens``.
      token_dtype: dtype of a raw token file (``uint16`` or ``uint32``); a ``.npy`` file names
        its own dtype.
      seq_len: tokens per training sequence.
      batch_size: sequences per optimizer step (split into ``train.grad_accum`` micro-batches).
      val_fraction: share of a token file kept for validation.
      recall_num_pairs: key-value pairs per sequence of the recall task.
      recall_vocab: token ids used by the recall task (keys and values; at most the model's
        vocab_size).
    """

    source: DataSource = "bytes"
    path: Optional[str] = None
    token_dtype: Optional[TokenDType] = None
    seq_len: int = 128
    batch_size: int = 16
    val_fraction: float = 0.01
    recall_num_pairs: int = 8
    recall_vocab: int = 64

    def __post_init__(self):
        _check_choice("data", "source", self.source, get_args(DataSource))
        if self.token_dtype is not None:
            _check_choice("data", "token_dtype", self.token_dtype, get_args(TokenDType))
        _check_positive_ints("data", self, ("seq_len", "batch_size", "recall_num_pairs",
                                            "recall_vocab"))
        if self.source == "tokens" and not self.path:
            _fail("data", "path", self.path, "the path of a .npy or .bin token file when source=tokens")
        _check_fraction("data", "val_fraction", self.val_fraction)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
      steps: optimizer steps.
      seed: seeds parameter init and the data order.
      grad_accum: micro-batches per step (a ``lax.scan``); must divide ``data.batch_size``.
      eval_every: validate every this many steps (and at the start and the end).
      eval_batches: validation batches per evaluation.
      log_every: write a metrics line every this many steps.
      run_dir: where metrics, checkpoints and the loss plot go.
      diagnostics_every: every this many steps, log the TTT inner self-supervised loss per layer
        (with ``W0``, before and after each mini-batch update, on the first validation batch) as
        a ``ttt_diagnostics`` metrics line; 0 (the default) turns it off.
    """

    steps: int = 200
    seed: int = 0
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    run_dir: str = "runs/default"
    diagnostics_every: int = 0

    def __post_init__(self):
        _check_positive_ints("train", self, ("steps", "grad_accum", "eval_every", "eval_batches",
                                             "log_every"))
        _check_positive_ints("train", self, ("seed", "diagnostics_every"), minimum=0)
        if not isinstance(self.run_dir, str) or not self.run_dir:
            _fail("train", "run_dir", self.run_dir, "a non-empty directory path")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``train.run_dir/checkpoints``.

    Attributes:
      every: save every this many steps (and at the end, and on SIGINT/SIGTERM).
      keep: how many recent checkpoints to keep.
      resume: continue from the latest checkpoint when the run directory has one.
      init_from: a run directory (or its ``checkpoints/``) whose latest params start a new run,
        even of a different model: every array that matches by path, shape and dtype is loaded,
        the rest keep their initial values (e.g. TTT layers grafted onto a smaller model), and
        a report of missing / unexpected / mismatched keys is printed.
      strict: with ``init_from``, refuse unless the trees match exactly.
    """

    every: int = 100
    keep: int = 3
    resume: bool = True
    init_from: Optional[str] = None
    strict: bool = False

    def __post_init__(self):
        _check_positive_ints("checkpoint", self, ("every", "keep"))
        _check_bools("checkpoint", self, ("resume", "strict"))


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh of a sharded run (``jax.sharding.Mesh`` with axes data, fsdp, tensor).

    The batch is split over ``data`` x ``fsdp``; large matrices (and their optimizer moments)
    are split over ``fsdp``; heads and projection widths over ``tensor``. The product of the
    three sizes is the number of devices used. One axis may be ``-1``: it takes every device
    the other two leave (``data: -1`` is plain data parallelism over all devices).

    Attributes:
      data: data-parallel replicas (params replicated across them).
      fsdp: devices that split the batch *and* shard params and optimizer state.
      tensor: devices that split heads and projection widths (same batch rows).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):
                _fail("mesh", name, value, "a positive integer, or -1 for the remaining devices")
        free = [name for name in MESH_AXES if getattr(self, name) == -1]
        if len(free) > 1:
            _fail("mesh", free[1], -1, f"a positive integer (only one axis may be -1, and "
                                       f"mesh.{free[0]} already is)")

    @property
    def fixed_size(self) -> int:
        """Product of the axis sizes that are not ``-1``."""
        return math.prod(v for v in (self.data, self.fsdp, self.tensor) if v != -1)

    def resolve(self, device_count: int) -> dict[str, int]:
        """Axis sizes for ``device_count`` devices: ``{"data": .., "fsdp": .., "tensor": ..}``.

        The product of the sizes must divide ``device_count`` (and equal it when an axis is -1).
        """
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        fixed = self.fixed_size
        if device_count % fixed:
            which = "*".join(f"mesh.{n}={v}" for n, v in sizes.items() if v != -1)
            raise ValueError(f"{which} is invalid: expected a product ({fixed}) that divides the "
                             f"device count {device_count}")
        for name, value in sizes.items():
            if value == -1:
                sizes[name] = device_count // fixed
        return sizes


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole YAML file: the model and how to train it."""

    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: Optional[MeshConfig] = None

    def __post_init__(self):
        if self.data.batch_size % self.train.grad_accum:
            _fail("train", "grad_accum", self.train.grad_accum,
                  f"a divisor of data.batch_size={self.data.batch_size}")
        if self.mesh is not None:
            if not isinstance(self.mesh, MeshConfig):
                _fail("run", "mesh", self.mesh, "a MeshConfig or None")
            check_batch_fits_mesh(self, self.mesh.data, self.mesh.fsdp)


def check_batch_fits_mesh(cfg: "RunConfig", data: int, fsdp: int) -> None:
    """Each micro-batch (``batch_size / grad_accum`` rows) must split evenly over data x fsdp.

    An axis given as -1 is skipped here and checked once the device count is known.
    """
    split = math.prod(v for v in (data, fsdp) if v != -1)
    micro = cfg.data.batch_size // cfg.train.grad_accum
    if micro % split:
        _fail("data", "batch_size", cfg.data.batch_size,
              f"a multiple of mesh.data*mesh.fsdp={split} per micro-batch (batch_size / "
              f"train.grad_accum = {micro} rows are split over the data and fsdp devices)")


T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` (no dot) as a float, as users write it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` with exponent-only floats (``1e-5``) read as floats."""
    return yaml.load(text, Loader=_Loader)


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Checks and converts one YAML value to the annotated type ``tp``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ValueError(f"{path}={value!r} is invalid: expected one of {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} is invalid: expected a list")
        (item,) = get_args(tp)[:1]
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} is invalid: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r} is invalid: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} is invalid: expected a string")
        return value
    return value


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Builds the dataclass ``cls`` from a mapping, rejecting unknown keys and bad types.

    Args:
      cls: a config dataclass.
      data: a mapping (for example parsed YAML).
      path: dotted prefix used in error messages.

    Returns:
      The validated, frozen config.
    """
    where = path or cls.__name__
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}: "
                         f"allowed keys are {', '.join(fields)}")
    kwargs = {}
    for name, field in fields.items():
        key = f"{path}.{name}" if path else name
        if name not in data:
            no_default = (field.default is dataclasses.MISSING
                          and field.default_factory is dataclasses.MISSING)
            if no_default:
                raise ValueError(f"missing required key {key} in {where}")
            continue
        kwargs[name] = _convert(hints[name], data[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A config dataclass as nested plain dicts (tuples become lists), ready for YAML/JSON."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def load_config(path: str | Path, cls: type[T] = RunConfig) -> T:
    """Reads a YAML file into ``cls``; errors name the file and the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    try:
        return from_dict(cls, data if data is not None else {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def save_config(cfg: Any, path: str | Path) -> None:
    """Writes ``cfg`` as YAML; ``load_config`` reads back an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _section_type(cls: Any, name: str) -> Any:
    """The dataclass type of field ``name`` of ``cls`` (unwrapping Optional), else None."""
    if not dataclasses.is_dataclass(cls):
        return None
    tp = typing.get_type_hints(cls).get(name)
    if get_origin(tp) in (typing.Union, types.UnionType):
        tp = next((a for a in get_args(tp) if a is not type(None)), None)
    return tp if dataclasses.is_dataclass(tp) else None


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Applies ``key.sub=value`` overrides (values parsed as YAML) and re-validates.

    Example: ``apply_overrides(cfg, ["model.ttt.use_rope=true", "model.num_layers=2"])``.
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        section = type(cfg)
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {item!r}: unknown key {key!r}")
            section = _section_type(section, part)
            if node[part] is None and section is not None:
                node[part] = to_dict(section())  # an optional section left out (e.g. mesh)
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {key!r}")
        node[parts[-1]] = parse_yaml(raw)
    return from_dict(type(cfg), data)
