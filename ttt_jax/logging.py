"""Run outputs: JSON-lines metrics, a one-line progress report, the loss-curve PNG."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np


class MetricsWriter:
    """Appends one JSON object per line to ``path`` (``metrics.jsonl``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, (float, np.number, np.ndarray, jax.Array)) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """Every record; a line that is not JSON (cut short by a kill) is passed over."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def truncate(self, step: int, rewritten: tuple[str, ...] = ("eval",)) -> int:
        """Keeps only what a run restored at ``step`` accounts for; returns the lines dropped.

        Dropped: every line of a later step, the lines at ``step`` whose kind the resumed run
        writes again (``rewritten``: its start-of-run validation), and any line that is not
        JSON (one cut short by a kill). The file is rewritten through a temporary file and a
        rename, so a crash leaves either the old or the new file.
        """
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                s = int(record.get("step", -1))
            except (ValueError, TypeError, AttributeError):
                dropped += 1
                continue
            if s > step or (s == step and record.get("kind") in rewritten):
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)
        return dropped


class StepClock:
    """Step time, tokens/s and MFU of training, without compile time or evaluation.

    The first step of a process (which compiles) is timed on its own and reported once as
    ``compile_s``; later steps are timed in intervals that start after the first step, or
    after work that is not training (validation, a checkpoint save: ``restart``), and end at
    ``read`` (called after the metrics were fetched, so the device has finished them).

    Args:
      tokens_per_step: tokens of one optimizer step (all devices).
      flops_per_token: model FLOPs per trained token, or None (no ``mfu``).
      peak_flops: one device's peak FLOP/s, or None (no ``mfu``).
      devices: devices the step runs on.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: Optional[float] = None,
                 peak_flops: Optional[float] = None, devices: int = 1):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak_flops, devices
        self.start = time.perf_counter()
        self.compile_s: Optional[float] = None
        self.compile_reported = False
        self.steps = 0

    def stepped(self, metrics) -> None:
        """Counts one step; after the first, waits for it and starts the timed intervals."""
        if self.compile_s is None:
            jax.block_until_ready(metrics)
            self.compile_s = time.perf_counter() - self.start
            self.restart()
        else:
            self.steps += 1

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def read(self) -> dict[str, float]:
        """``step_time_s``, ``tokens_per_s`` and ``mfu`` of the steps since the interval began
        (none yet: nothing), and ``compile_s`` the first time; restarts the interval."""
        out: dict[str, float] = {}
        if not self.compile_reported and self.compile_s is not None:
            out["compile_s"] = self.compile_s
            self.compile_reported = True
        if self.steps:
            step_time = (time.perf_counter() - self.start) / self.steps
            out["step_time_s"] = step_time
            out["tokens_per_s"] = self.tokens_per_step / step_time
            if self.flops_per_token and self.peak:
                out["mfu"] = (out["tokens_per_s"] * self.flops_per_token
                              / (self.peak * self.devices))
        self.restart()
        return out


class Progress:
    """A single updating line: step, loss, tokens/s and ETA."""

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0,
                 stream=None):
        # sys.stdout is read now, not at import: it may have been replaced since (pytest capture)
        stream = sys.stdout if stream is None else stream
        self.total, self.tokens_per_step, self.stream = total_steps, tokens_per_step, stream
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.closed = False

    def tokens_per_s(self, step: int) -> float:
        elapsed = max(time.perf_counter() - self.start_time, 1e-9)
        return (step - self.start_step) * self.tokens_per_step / elapsed

    def update(self, step: int, loss: float, tokens_per_s: Optional[float] = None) -> None:
        """Redraws the line; ``tokens_per_s``: the latest measured rate (else the average
        since the start, compile time included)."""
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        rate = self.tokens_per_s(step) if tokens_per_s is None else tokens_per_s
        eta = (elapsed / max(done, 1) * (self.total - step) if tokens_per_s is None
               else (self.total - step) * self.tokens_per_step / max(tokens_per_s, 1e-9))
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] step {step}/{self.total} loss {loss:.4f} "
                          f"{rate:,.0f} tok/s ETA {eta:,.0f}s ")
        self.stream.flush()

    def close(self) -> None:
        """Ends the progress line (once; later calls do nothing)."""
        if self.closed:
            return
        self.closed = True
        self.stream.write("\n")
        self.stream.flush()


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> None:
    """Writes train and validation loss against step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
