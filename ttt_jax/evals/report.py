"""The report of an evaluation: ``eval_context.json``, ``eval_context.md`` (Markdown tables)
and PNG plots (loss by position and length, recall by distance, inner loss per TTT layer)."""

from __future__ import annotations

import json
import math
from pathlib import Path

JSON_NAME = "eval_context.json"
MARKDOWN_NAME = "eval_context.md"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lm(results: list[dict], path: Path) -> None:
    """Left: loss by position bucket at the longest length; right: mean loss by length."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    train_lens = set()
    for r in results:
        lm = r.get("lm")
        if not lm:
            continue
        longest = lm[max(lm, key=int)]
        unit = "bpb" if "bpb" in longest else "loss"
        mids = [math.sqrt(max(b["start"], 1) * b["end"]) for b in longest["buckets"]]
        ax1.plot(mids, [b[unit] for b in longest["buckets"]], marker="o", label=r["label"])
        lens = sorted(lm, key=int)
        ax2.plot([int(k) for k in lens], [lm[k][unit] for k in lens], marker="o",
                 label=r["label"])
        train_lens.add(r["train_seq_len"])
    ylabel = "bits per byte" if any("bpb" in next(iter(r["lm"].values()))
                                     for r in results if r.get("lm")) else "loss (nats/token)"
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        for t in train_lens:
            ax.axvline(t, color="grey", ls="--", lw=0.8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax1.set_xlabel("position in the sequence (bucket, log scale)")
    ax1.set_title("held-out loss by position (longest length)")
    ax2.set_xlabel("context length")
    ax2.set_title("mean held-out loss by context length")
    ax1.legend(fontsize=8)
    fig.text(0.5, 0.005, "dashed: training context length", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_recall(results: list[dict], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        rec = r.get("recall")
        if not rec:
            continue
        ds = sorted(rec, key=int)
        ax.plot([int(d) for d in ds], [rec[d]["accuracy"] for d in ds], marker="o",
                label=r["label"])
        ax.axvline(r["train_seq_len"], color="grey", ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("distance between key and query (tokens; dashed: training length)")
    ax.set_ylabel("recall accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_diagnostics(result: dict, path: Path) -> None:
    plt = _plt()
    diag = result["ttt_diagnostics"]
    n = len(diag["layers"])
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    mids = [(s + e) / 2 for s, e in zip(diag["bin_start"], diag["bin_end"])]
    names = {"w0": "initial weights W0", "before": "before the mini-batch's update",
             "after": "after it"}
    for i, (ax, layer) in enumerate(zip(axes[0], diag["layers"])):
        for k, label in names.items():
            ax.plot(mids, layer[k], label=label)
        ax.set_title(f"{result['label']}: layer {i}")
        ax.set_xlabel("position")
        ax.set_ylabel("inner self-supervised loss")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def markdown_report(report: dict) -> str:
    """The results as Markdown tables (what ``eval_context.md`` holds)."""
    lines = []
    models = report["models"]
    lm = [m for m in models if m.get("lm")]
    if lm:
        unit = "bpb" if "bpb" in next(iter(lm[0]["lm"].values())) else "loss"
        name = "bits per byte" if unit == "bpb" else "loss (nats/token)"
        lengths = sorted({int(k) for m in lm for k in m["lm"]})
        lines += [f"Mean held-out {name} over the whole sequence, by context length:", "",
                  "| model | trained at | " + " | ".join(_fmt_len(n) for n in lengths) + " |",
                  "|---|---|" + "---|" * len(lengths)]
        for m in lm:
            cells = [f"{m['lm'][str(n)][unit]:.3f}" if str(n) in m["lm"] else "" for n in lengths]
            lines.append(f"| {m['label']} | {m['train_seq_len']} | " + " | ".join(cells) + " |")
        longest = max(lengths)
        buckets = [(b["start"], b["end"]) for b in lm[0]["lm"][str(longest)]["buckets"]]
        lines += ["", f"Held-out {name} by position at length {_fmt_len(longest)}:", "",
                  "| model | " + " | ".join(f"{_fmt_len(s)}-{_fmt_len(e)}" for s, e in buckets)
                  + " |", "|---|" + "---|" * len(buckets)]
        for m in lm:
            row = m["lm"].get(str(longest))
            if row:
                lines.append(f"| {m['label']} | " + " | ".join(f"{b[unit]:.3f}"
                                                               for b in row["buckets"]) + " |")
        streams = [m for m in lm if m["lm"].get(str(longest), {}).get("streams")]
        if streams:
            lines += ["", f"Per stream, loss by position at length {_fmt_len(longest)}:", "",
                      "| model | stream | all | " + " | ".join(
                          f"{_fmt_len(s)}-{_fmt_len(e)}" for s, e in buckets) + " |",
                      "|---|---|---|" + "---|" * len(buckets)]
            for m in streams:
                for name, row in m["lm"][str(longest)]["streams"].items():
                    lines.append(f"| {m['label']} | {name} | {row['loss']:.3f} | "
                                 + " | ".join(f"{b:.3f}" for b in row["buckets"]) + " |")
        if any(m.get("architecture") in ("moshi_ttt", "moshi_lm") for m in lm):
            lines += ["", "Moshi models: lengths and positions count frames; a frame's loss is "
                          "the mean over its streams of each stream's cross-entropy."]
        lines.append("")
    rec = [m for m in models if m.get("recall")]
    if rec:
        dists = sorted({int(k) for m in rec for k in m["recall"]})
        samples = next(iter(rec[0]["recall"].values()))["samples"]
        lines += [f"Recall accuracy by key-to-query distance ({samples} sequences each):", "",
                  "| model | trained at | " + " | ".join(_fmt_len(d) for d in dists) + " |",
                  "|---|---|" + "---|" * len(dists)]
        for m in rec:
            cells = [f"{m['recall'][str(d)]['accuracy']:.2f}" if str(d) in m["recall"] else ""
                     for d in dists]
            lines.append(f"| {m['label']} | {m['train_seq_len']} | " + " | ".join(cells) + " |")
        lines.append("")
    diag = [m for m in models if m.get("ttt_diagnostics")]
    if diag:
        lines += ["TTT inner self-supervised loss, mean over positions (W0 / before / after the "
                  "mini-batch update):", "", "| model | layer | W0 | before | after |",
                  "|---|---|---|---|---|"]
        for m in diag:
            for i, d in enumerate(m["ttt_diagnostics"]["mean"]):
                lines.append(f"| {m['label']} | {i} | {d['w0']:.3f} | {d['before']:.3f} | "
                             f"{d['after']:.3f} |")
        lines.append("")
    notes = [(m["label"], n) for m in models for n in m.get("notes", [])]
    if notes:
        lines += ["Notes:", ""] + [f"- {label}: {n}" for label, n in notes] + [""]
    return "\n".join(lines)


def diagnostics_plot_name(label: str) -> str:
    return f"ttt_diagnostics_{label.replace('@', '_')}.png"


def write_report(report: dict, out: str | Path) -> list[Path]:
    """Writes the JSON, the Markdown tables and every plot that has data under ``out``;
    returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = report["models"]
    (out / JSON_NAME).write_text(json.dumps(report, indent=1))
    (out / MARKDOWN_NAME).write_text(markdown_report(report))
    written = [out / JSON_NAME, out / MARKDOWN_NAME]
    if any(r.get("lm") for r in results):
        plot_lm(results, out / "loss_by_position.png")
        written.append(out / "loss_by_position.png")
    if any(r.get("recall") for r in results):
        plot_recall(results, out / "recall.png")
        written.append(out / "recall.png")
    for r in results:
        if r.get("ttt_diagnostics"):
            path = out / diagnostics_plot_name(r["label"])
            plot_diagnostics(r, path)
            written.append(path)
    return written
