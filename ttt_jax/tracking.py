"""Experiment tracking: every metrics record of a run goes to ``metrics.jsonl`` and, as
scalars, to TensorBoard event files (``tensorboardX``, no TensorFlow) and Weights & Biases.

``train.trackers`` chooses them (default ``[jsonl, tensorboard]``); ``jsonl`` is always among
them, since resume, ``loss.png`` and the commands read ``metrics.jsonl``. A record is a dict
with a ``kind`` and a ``step``; its numeric fields become scalars named ``KIND/FIELD``
(``train/loss``, ``train/lr``, ``eval/val_loss``, ...), and the per-layer TTT inner losses of a
``ttt_diagnostics`` record become ``ttt/layer_I/{w0,before,after}``.

Resuming: the run continues from a checkpoint at step ``S``; whatever the earlier process
logged after ``S`` is dropped from ``metrics.jsonl`` (``MetricsWriter.truncate``), hidden from
TensorBoard (the writer is opened with ``purge_step = S + 1``, which TensorBoard's reader
honours) and, for W&B, the run is resumed by its id (kept in ``RUN_DIR/wandb.json``) and logs
only steps after the last one it holds; no step is logged twice.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from ttt_jax.logging import MetricsWriter

TRACKERS = ("jsonl", "tensorboard", "wandb")
DEFAULT_TRACKERS = ("jsonl", "tensorboard")
TENSORBOARD_DIR = "tensorboard"
WANDB_STATE_FILE = "wandb.json"
_INSTALL = {"tensorboard": "pip install tensorboardX==2.6.5",
            "wandb": "pip install 'ttt-jax[wandb]' (and WANDB_MODE=offline without network)"}


def check_trackers(trackers: Iterable[str]) -> None:
    """Refuses unknown trackers, a list without ``jsonl``, and a tracker whose package is not
    installed (``ValueError`` naming ``train.trackers``)."""
    trackers = tuple(trackers)
    unknown = [t for t in trackers if t not in TRACKERS]
    if unknown:
        raise ValueError(f"train.trackers={list(trackers)!r} is invalid: unknown {unknown}; "
                         f"expected a list of {', '.join(TRACKERS)}")
    if "jsonl" not in trackers:
        raise ValueError(f"train.trackers={list(trackers)!r} is invalid: expected a list that "
                         f"contains jsonl (metrics.jsonl is what resume, loss.png and the "
                         f"commands read)")
    for name, module in (("tensorboard", "tensorboardX"), ("wandb", "wandb")):
        if name in trackers:
            try:
                __import__(module)
            except ImportError:
                raise ValueError(f"train.trackers includes {name}, but the {module} package is "
                                 f"not installed: {_INSTALL[name]}, or drop {name} from "
                                 f"train.trackers") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of a record as ``{KIND/FIELD: value}`` (module docstring)."""
    kind = record.get("kind", "metrics")
    out = {}
    if kind == "ttt_diagnostics":
        for i, layer in enumerate(record.get("layers", [])):
            for k, v in layer.items():
                out[f"ttt/layer_{i}/{k}"] = float(v)
        return out
    for key, value in record.items():
        if key in ("kind", "step") or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoard:
    """Scalars as TensorBoard event files under ``RUN_DIR/tensorboard``."""

    def __init__(self, run_dir: Path, resume_step: Optional[int]):
        from tensorboardX import SummaryWriter

        kw = {"purge_step": resume_step + 1} if resume_step is not None else {}
        self.writer = SummaryWriter(logdir=str(run_dir / TENSORBOARD_DIR), **kw)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """A W&B run, resumed by the id kept in ``RUN_DIR/wandb.json``; ``WANDB_MODE=offline``
    works without network (``wandb sync`` uploads it later).

    W&B cannot rewrite a run's history, so a resumed run logs only the steps after the last
    one the earlier process logged there (kept in the same file); between the restored
    checkpoint and that step, W&B keeps the earlier process's values while ``metrics.jsonl``
    and TensorBoard hold the resumed run's.
    """

    def __init__(self, run_dir: Path, config: dict, resume_step: Optional[int]):
        import wandb

        self.state_file = run_dir / WANDB_STATE_FILE
        state = {}
        if self.state_file.is_file():
            try:
                state = json.loads(self.state_file.read_text())
            except ValueError:
                state = {}
        self.run_id = state.get("id") or uuid.uuid4().hex[:12]
        self.last_step = int(state.get("last_step", -1)) if resume_step is not None else -1
        self._save()
        self.run = wandb.init(id=self.run_id, resume="allow", dir=str(run_dir), config=config,
                              name=run_dir.name, project=os.environ.get("WANDB_PROJECT", "ttt-jax"))

    def _save(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps({"id": self.run_id, "last_step": self.last_step}) + "\n")
        os.replace(tmp, self.state_file)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.last_step:
            return  # W&B already holds this step (logged by the earlier process)
        self.run.log(values, step=step)
        self.last_step = step
        self._save()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class RunLog:
    """Writes each record to ``metrics.jsonl`` and to the chosen trackers.

    Args:
      run_dir: the run directory.
      trackers: ``train.trackers``.
      config: the run config as a dict (W&B's run config).
      resume_step: the step a resumed run continues from (``None`` for a new run).
      enabled: false on the non-primary processes of a multi-process job: nothing is written.
    """

    def __init__(self, run_dir: str | Path, trackers: Iterable[str] = DEFAULT_TRACKERS, *,
                 config: Optional[dict] = None, resume_step: Optional[int] = None,
                 enabled: bool = True):
        run_dir = Path(run_dir)
        trackers = tuple(trackers)
        check_trackers(trackers)
        self.metrics = MetricsWriter(run_dir / "metrics.jsonl" if enabled else os.devnull)
        self.sinks: list[Any] = []
        if enabled and "tensorboard" in trackers:
            self.sinks.append(TensorBoard(run_dir, resume_step))
        if enabled and "wandb" in trackers:
            self.sinks.append(Wandb(run_dir, config or {}, resume_step))

    def write(self, record: dict[str, Any], *, trackers: bool = True) -> None:
        """Appends ``record`` to ``metrics.jsonl`` and, unless ``trackers`` is false, logs its
        scalars to the other trackers."""
        self.metrics.write(record)
        values = scalars(record)
        if trackers and values and "step" in record:
            for sink in self.sinks:
                sink.log(int(record["step"]), values)

    def read(self) -> list[dict[str, Any]]:
        return self.metrics.read()

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
