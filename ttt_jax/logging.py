"""Run outputs: JSON-lines metrics, a one-line progress report, the loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

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
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class Progress:
    """A single updating line: step, loss, tokens/s and ETA."""

    def __init__(self, total_steps: int, tokens_per_step: int, start_step: int = 0,
                 stream=None):
        # sys.stdout is read now, not at import: it may have been replaced since (pytest capture)
        stream = sys.stdout if stream is None else stream
        self.total, self.tokens_per_step, self.stream = total_steps, tokens_per_step, stream
        self.start_step, self.start_time = start_step, time.perf_counter()

    def tokens_per_s(self, step: int) -> float:
        elapsed = max(time.perf_counter() - self.start_time, 1e-9)
        return (step - self.start_step) * self.tokens_per_step / elapsed

    def update(self, step: int, loss: float) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r[{bar}] step {step}/{self.total} loss {loss:.4f} "
                          f"{self.tokens_per_s(step):,.0f} tok/s ETA {eta:,.0f}s ")
        self.stream.flush()

    def close(self) -> None:
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
