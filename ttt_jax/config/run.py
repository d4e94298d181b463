"""The training sections of a run config and the run config of the causal LMs."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional, get_args

from ttt_jax.config.checks import (_check_bools, _check_choice, _check_fraction, _check_positive,
                                   _check_positive_ints, _fail)
from ttt_jax.config.model import ModelConfig

DataSource = Literal["bytes", "recall", "tokens", "prepared"]
TokenDType = Literal["uint16", "uint32"]


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
    """Training data: a built-in source (no download), a user token file or a prepared corpus.

    Attributes:
      source: ``bytes`` (the Python standard library's source as bytes), ``recall`` (synthetic
        associative recall), ``tokens`` (a user ``.npy``/raw token file at ``path``) or
        ``prepared`` (a ``ttt-jax prepare`` output directory at ``prepared``).
      path: the token file for ``source: tokens``.
      val_path: ``source: tokens``: a separate validation token file (same dtype); without it
        the last ``val_fraction`` of ``path`` is the validation split.
      prepared: a ``ttt-jax prepare`` output directory: its ``train.bin`` and ``val.bin``, dtype
        and tokenizer (``meta.json``). Setting it implies ``source: prepared``. A config with
        ``source: prepared`` and no ``prepared`` (the standard presets) loads, but ``--check``
        and training stop and name the prepare command.
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
    val_path: Optional[str] = None
    prepared: Optional[str] = None
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
        for name in ("val_path", "prepared"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail("data", name, value, "a non-empty path or null")
        if self.prepared is not None:
            if self.source == "bytes":  # the default: data.prepared alone selects it
                object.__setattr__(self, "source", "prepared")
            if self.source != "prepared":
                _fail("data", "source", self.source, "'prepared' (or unset) with data.prepared")
            if self.path is not None or self.val_path is not None:
                _fail("data", "path" if self.path is not None else "val_path",
                      self.path if self.path is not None else self.val_path,
                      "null with data.prepared (the prepared directory names its files)")
        if self.val_path is not None and self.source != "tokens":
            _fail("data", "val_path", self.val_path, "null unless source=tokens")
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
      skip_nonfinite_steps: how many updates with a non-finite loss or gradient may be skipped
        (the step's batch is consumed, params and optimizer state stay as they were, and a
        ``skipped_step`` metrics line is written); one more stops the run. 0 (the default):
        the first one stops the run (exit status 3), keeping the last good checkpoint.
      trackers: where metrics go: ``jsonl`` (``metrics.jsonl``, always on), ``tensorboard``
        (event files under ``RUN_DIR/tensorboard``, via tensorboardX) and ``wandb`` (Weights &
        Biases when installed; ``WANDB_MODE=offline`` needs no network).
      peak_tflops: the peak TFLOP/s of one device, for the model-FLOPs utilisation (``mfu``)
        logged with each train line; unset: the dense bf16 peak of a known accelerator
        (``ttt_jax.flops.PEAK_TFLOPS``), and no ``mfu`` on CPUs and unknown devices.
    """

    steps: int = 200
    seed: int = 0
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    run_dir: str = "runs/default"
    diagnostics_every: int = 0
    skip_nonfinite_steps: int = 0
    trackers: tuple[str, ...] = ("jsonl", "tensorboard")
    peak_tflops: Optional[float] = None

    def __post_init__(self):
        _check_positive_ints("train", self, ("steps", "grad_accum", "eval_every", "eval_batches",
                                             "log_every"))
        known = ("jsonl", "tensorboard", "wandb")
        trackers = tuple(self.trackers) if isinstance(self.trackers, (list, tuple)) else None
        if (trackers is None or "jsonl" not in trackers
                or any(t not in known for t in trackers) or len(set(trackers)) < len(trackers)):
            _fail("train", "trackers", self.trackers,
                  f"a list of distinct names from {', '.join(known)} that contains jsonl "
                  f"(metrics.jsonl is what resume, loss.png and the commands read)")
        object.__setattr__(self, "trackers", trackers)
        if self.peak_tflops is not None:
            _check_positive("train", "peak_tflops", self.peak_tflops)
        _check_positive_ints("train", self, ("seed", "diagnostics_every", "skip_nonfinite_steps"),
                             minimum=0)
        if not isinstance(self.run_dir, str) or not self.run_dir:
            _fail("train", "run_dir", self.run_dir, "a non-empty directory path")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``train.run_dir/checkpoints``.

    Attributes:
      every: save every this many steps (and at the end, and on SIGINT/SIGTERM).
      keep: how many recent checkpoints to keep.
      resume: continue from the latest checkpoint when the run directory has one; false
        refuses a run directory that holds checkpoints (unless ``overwrite``).
      overwrite: start a new run even if the run directory holds one: the old run's files are
        first moved aside to ``RUN_DIR.old-YYYYmmdd-HHMMSS/`` (``train --force-new`` sets it).
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
    overwrite: bool = False

    def __post_init__(self):
        _check_positive_ints("checkpoint", self, ("every", "keep"))
        _check_bools("checkpoint", self, ("resume", "strict", "overwrite"))


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


LMArchitecture = Literal["ttt_lm", "attention_lm"]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole YAML file of a causal LM run: the model and how to train it.

    Attributes:
      model: the LM.
      architecture: ``ttt_lm`` (the default) or ``attention_lm``, the sliding-window attention
        baseline; its model has ``model.seq_modeling: swa``, and a config that sets only that
        key (as files written before the key existed do) is read as ``attention_lm``.
      optim, data, train, checkpoint: how to train it.
      mesh: the device mesh of a sharded run (``None``: one device).
    """

    model: ModelConfig
    architecture: LMArchitecture = "ttt_lm"
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: Optional[MeshConfig] = None

    def __post_init__(self):
        _check_choice("run", "architecture", self.architecture, get_args(LMArchitecture))
        if self.model.seq_modeling == "swa" and self.architecture == "ttt_lm":
            object.__setattr__(self, "architecture", "attention_lm")
        if self.architecture == "attention_lm" and self.model.seq_modeling != "swa":
            _fail("model", "seq_modeling", self.model.seq_modeling,
                  "'swa' with architecture: attention_lm (or architecture: ttt_lm)")
        check_run_sections(self)


def check_run_sections(cfg) -> None:
    """Checks across the sections every run config has (``data``, ``train``, ``mesh``)."""
    if cfg.data.batch_size % cfg.train.grad_accum:
        _fail("train", "grad_accum", cfg.train.grad_accum,
              f"a divisor of data.batch_size={cfg.data.batch_size}")
    if cfg.mesh is not None:
        if not isinstance(cfg.mesh, MeshConfig):
            _fail("run", "mesh", cfg.mesh, "a MeshConfig or None")
        check_batch_fits_mesh(cfg, cfg.mesh.data, cfg.mesh.fsdp)


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
