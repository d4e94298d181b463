"""Long-context evaluation: loss by position and by context length, recall at distance, and the
TTT inner-loss diagnostics, for any training checkpoint.

    python -m ttt_jax.eval_context --checkpoint runs/a --checkpoint runs/b \\
        --lengths 512,1k,2k,4k,8k --out runs/eval

For every checkpoint (a run directory, its ``checkpoints/`` or ``checkpoints/STEP``):

* Language data (``data.source: bytes`` or ``tokens``): ``--num-sequences`` held-out sequences
  of each length, taken at evenly spaced offsets of the validation split (the same offsets for
  every length, so a shorter sequence is a prefix of a longer one). Reports the mean loss per
  length and per position bucket ``[0, 64), [64, 128), [128, 256), ...`` in nats per token
  (and bits per byte for bytes).
* Recall (``data.source: recall``, or ``--recall`` for any model): ``--recall-samples`` planted-key
  sequences (:func:`ttt_jax.data.recall_sequence`) per distance ``D``, each of
  ``max(training length, D + 2)`` tokens with the query last; the accuracy of the argmax
  prediction of the value ``D`` tokens after its key.
* ``--ttt-diagnostics``: per TTT layer, the inner self-supervised loss over positions with the
  initial weights, before and after each mini-batch's update (:mod:`ttt_jax.diagnostics`).

Long sequences are streamed in chunks of ``--chunk`` tokens, so memory does not grow with the
length: a TTT-LM continues its streaming state chunk after chunk (:class:`ttt_jax.decode.Decoder`);
the sliding-window attention baseline scores each chunk from the chunk and the
``num_layers * (window - 1)`` tokens before it, which is exact. ``--chunk 0`` runs each sequence
in one forward pass instead. Writes ``eval_context.json`` and PNG plots under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

DEFAULT_LENGTHS = "512,1k,2k,4k,8k"
DEFAULT_CHUNK = 1024
# The first position bucket is [0, FIRST_BUCKET); then each bucket doubles.
FIRST_BUCKET = 64
LN2 = math.log(2.0)


class EvalError(ValueError):
    """A bad argument, checkpoint or data set, reported in one line by the CLI."""


# ------------------------------------------------------------------------------ arguments


def parse_size(text: str, what: str = "length") -> int:
    """``"512"``, ``"1k"`` (1024), ``"2K"``, ``"1m"`` (2**20) -> an int > 0."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m or int(m.group(1)) == 0:
        raise EvalError(f"{what} {text!r} is invalid: expected a positive integer, optionally "
                        f"with a k (x1024) or m (x2**20) suffix, e.g. 512 or 4k")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20}[m.group(2).lower()]


def parse_sizes(text: str, what: str) -> list[int]:
    """A comma-separated list of :func:`parse_size` values, sorted and without duplicates."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise EvalError(f"--{what} is empty: expected a comma-separated list such as 512,1k,2k")
    return sorted({parse_size(t, what.rstrip("s")) for t in items})


def position_buckets(length: int, first: int = FIRST_BUCKET) -> list[tuple[int, int]]:
    """``[(0, first), (first, 2 first), (2 first, 4 first), ...]`` covering ``[0, length)``."""
    edges = [0]
    edge = first
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


# ------------------------------------------------------------------------------ checkpoints


def load_checkpoint(path: str | Path):
    """``(RunConfig, params, step)`` of a run directory, its ``checkpoints/`` or a step dir."""
    from ttt_jax.checkpoint import load_saved
    from ttt_jax.config import RunConfig, from_dict

    p = Path(path)
    if not p.exists():
        raise EvalError(f"checkpoint {str(path)!r} does not exist: expected a run directory "
                        f"(with checkpoints/), its checkpoints/ or checkpoints/STEP")
    step = None
    if p.name.isdigit() and p.parent.name == "checkpoints":
        step, p = int(p.name), p.parent
    try:
        state, meta = load_saved(p, step)
    except FileNotFoundError as e:
        raise EvalError(f"checkpoint {str(path)!r}: {e}") from None
    if "config" not in meta or "params" not in state:
        raise EvalError(f"checkpoint {str(path)!r} is not a training checkpoint of this project "
                        f"(no config in its meta or no params in its state)")
    try:
        cfg = from_dict(RunConfig, meta["config"])
    except ValueError as e:
        raise EvalError(f"checkpoint {str(path)!r} holds a config this code cannot read: {e}") \
            from None
    return cfg, state["params"], int(meta.get("step", -1))


def default_label(path: str | Path) -> str:
    p = Path(path).resolve()
    while p.name.isdigit() or p.name == "checkpoints":
        p = p.parent
    return p.name


# ------------------------------------------------------------------------------ scoring


class Scorer:
    """Per-token loss and argmax prediction of a model over long sequences.

    ``score(tokens [B, L + 1])`` returns ``(loss [B, L] float32, argmax [B, L] int32)`` for the
    targets ``tokens[:, 1:]``; with ``chunk > 0`` the model sees at most about ``chunk`` tokens
    (plus the attention context) at a time.
    """

    def __init__(self, model_cfg, params, chunk: int = DEFAULT_CHUNK):
        import jax
        import jax.numpy as jnp

        from ttt_jax.models import build_model
        from ttt_jax.types import SequenceMetadata

        self.cfg = model_cfg
        self.params = params
        self.chunk = chunk
        self.model = build_model(model_cfg)
        model = self.model

        def loss_argmax(logits, targets):
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            return loss, jnp.argmax(logits, axis=-1).astype(jnp.int32)

        def full(params, inputs, targets, offset):
            logits = model.apply({"params": params}, inputs, SequenceMetadata(offset=offset))
            return loss_argmax(logits, targets)

        self._full = jax.jit(full)
        self._loss_argmax = jax.jit(loss_argmax)
        self._decoder = None

    @property
    def chunked(self) -> bool:
        return self.chunk > 0

    def score(self, tokens: np.ndarray):
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise EvalError(f"tokens must be [B, L + 1] with L >= 1, got {tokens.shape}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        length = inputs.shape[1]
        if not self.chunked or length <= self.chunk:
            loss, pred = self._full(self.params, inputs, targets, 0)
            return np.asarray(loss), np.asarray(pred)
        if self.cfg.seq_modeling == "swa":
            return self._score_swa(inputs, targets)
        return self._score_stream(inputs, targets)

    def _score_stream(self, inputs, targets):
        """TTT-LM: the streaming state carries everything before the chunk (exact)."""
        if self._decoder is None:
            from ttt_jax.decode import Decoder

            self._decoder = Decoder(self.cfg)
        dec = self._decoder
        state = dec.init_state(self.params, inputs.shape[0])
        losses, preds = [], []
        for s in range(0, inputs.shape[1], self.chunk):
            e = min(s + self.chunk, inputs.shape[1])
            logits, state = dec.prefill(self.params, inputs[:, s:e], state)
            loss, pred = self._loss_argmax(logits, targets[:, s:e])
            losses.append(np.asarray(loss))
            preds.append(np.asarray(pred))
        return np.concatenate(losses, axis=1), np.concatenate(preds, axis=1)

    def _score_swa(self, inputs, targets):
        """Sliding-window attention: chunk ``[s, e)`` from tokens ``[s - context, e)`` (exact).

        The first pass scores ``[0, context + chunk)`` so that every later pass has the same
        shape (``context + chunk`` tokens), and one compilation serves them all.
        """
        from ttt_jax.models.attention_lm import context_needed

        context = context_needed(self.cfg)
        length = inputs.shape[1]
        first = min(length, context + self.chunk)
        losses, preds = [], []
        for s in [0] + list(range(first, length, self.chunk)):
            e = first if s == 0 else min(s + self.chunk, length)
            lo = max(0, s - context)
            loss, pred = self._full(self.params, inputs[:, lo:e], targets[:, lo:e], lo)
            losses.append(np.asarray(loss)[:, s - lo:])
            preds.append(np.asarray(pred)[:, s - lo:])
        return np.concatenate(losses, axis=1), np.concatenate(preds, axis=1)


def score_in_batches(scorer: Scorer, tokens: np.ndarray, batch: int):
    """``scorer.score`` over row batches of at most ``batch`` sequences."""
    out = [scorer.score(tokens[i:i + batch]) for i in range(0, tokens.shape[0], batch)]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


# ------------------------------------------------------------------------------ data


def heldout_tokens(cfg, vocab_size: int) -> np.ndarray:
    """The validation split of a checkpoint's language data as one 1-D token array."""
    from ttt_jax.data import make_dataset

    d = cfg.data
    if d.source not in ("bytes", "tokens"):
        raise EvalError(f"data.source={d.source!r} of the checkpoint is not language data: "
                        f"loss by position needs 'bytes' or 'tokens' (use --recall for recall)")
    kwargs = dict(path=d.path, vocab_size=vocab_size)
    if d.source == "tokens":
        kwargs.update(token_dtype=d.token_dtype, val_fraction=d.val_fraction)
    ds = make_dataset(d.source, seq_len=d.seq_len, batch_size=1, seed=0, split="val", **kwargs)
    return np.asarray(ds.tokens)


def heldout_sequences(val: np.ndarray, length: int, count: int, source: str) -> np.ndarray:
    """``count`` windows of ``length + 1`` tokens at evenly spaced offsets: int32 ``[N, L + 1]``.

    The offsets depend only on ``len(val)``, ``length`` and ``count``; :func:`evaluate_lm` takes
    them for the longest length and uses prefixes for the shorter ones.
    """
    need = length + 1
    if val.shape[0] < need:
        raise EvalError(f"the {source} validation split has {val.shape[0]} tokens, fewer than "
                        f"one sequence of length {length} + 1: lower --lengths")
    starts = np.linspace(0, val.shape[0] - need, count).astype(np.int64)
    return np.stack([np.asarray(val[s:s + need], np.int32) for s in starts])


# ------------------------------------------------------------------------------ evaluations


def evaluate_lm(scorer: Scorer, val: np.ndarray, lengths: list[int], count: int, batch: int,
                bits_per_token: bool, source: str, log: Callable = print) -> dict[str, Any]:
    """Loss per length and per position bucket; every length reads the same offsets."""
    span = max(lengths) + 1
    base = heldout_sequences(val, span - 1, count, source)  # the longest; shorter = prefixes
    out = {}
    for length in lengths:
        t0 = time.perf_counter()
        loss, _ = score_in_batches(scorer, base[:, :length + 1], batch)  # [N, L]
        per_pos = loss.mean(axis=0)  # [L]
        buckets = []
        for s, e in position_buckets(length):
            b = float(per_pos[s:e].mean())
            buckets.append({"start": s, "end": e, "loss": b,
                            **({"bpb": b / LN2} if bits_per_token else {})})
        mean = float(loss.mean())
        out[str(length)] = {"length": length, "num_sequences": int(loss.shape[0]), "loss": mean,
                            **({"bpb": mean / LN2} if bits_per_token else {}),
                            "buckets": buckets, "seconds": time.perf_counter() - t0}
        log(f"  length {length:>7}: loss {mean:.4f}" + (f" ({mean / LN2:.3f} bits/byte)"
                                                       if bits_per_token else ""))
    return out


def default_recall_distances(train_len: int) -> list[int]:
    """Powers of 4 from 4 up to ``16 * train_len`` (and that value itself)."""
    top = 16 * train_len
    out, d = [], 4
    while d < top:
        out.append(d)
        d *= 4
    return out + [top]


def evaluate_recall(scorer: Scorer, distances: list[int], samples: int, recall_vocab: int,
                    batch: int, min_len: int, seed: int = 0,
                    log: Callable = print) -> dict[str, Any]:
    """Accuracy of predicting a value planted ``D`` tokens before its query.

    The sequences of distance ``D`` hold ``max(min_len, D + 2)`` tokens with the query last:
    up to the training length (``min_len``) only the distance changes; beyond it the sequence
    is just long enough to hold the distance.
    """
    from ttt_jax.data import recall_sequence

    if min(distances) < 2:
        raise EvalError(f"recall distances must be >= 2 (the value sits between key and query), "
                        f"got {min(distances)}")
    rng = np.random.default_rng(seed)
    out = {}
    for dist in distances:
        seq_len = max(min_len, dist + 2)
        examples = [recall_sequence(rng, seq_len, dist, recall_vocab=recall_vocab,
                                    vocab_size=scorer.cfg.vocab_size) for _ in range(samples)]
        tokens = np.stack([ex.tokens for ex in examples])  # [N, L + 1]
        loss, pred = score_in_batches(scorer, tokens, batch)
        q = examples[0].query_pos
        values = np.array([ex.value for ex in examples])
        acc = float(np.mean(pred[:, q] == values))
        out[str(dist)] = {"distance": dist, "accuracy": acc, "samples": samples,
                          "answer_loss": float(loss[:, q].mean()), "seq_len": seq_len}
        log(f"  recall distance {dist:>7}: accuracy {acc:.3f}")
    return out


def evaluate_diagnostics(model_cfg, params, tokens: np.ndarray, bin_width: int) -> dict:
    """Inner-loss curves per TTT layer on ``tokens [N, L]`` (one forward pass)."""
    import jax

    from ttt_jax.diagnostics import binned, model_inner_losses

    curves = jax.jit(lambda p, t: model_inner_losses(model_cfg, p, t))(params, tokens)
    out = binned(jax.device_get(curves), bin_width)
    out.update(length=int(tokens.shape[1]), num_sequences=int(tokens.shape[0]),
               mini_batch_size=model_cfg.ttt.mini_batch_size)
    out["mean"] = [{k: float(np.mean(np.asarray(c[k]))) for k in ("w0", "before", "after")}
                   for c in jax.device_get(curves)]
    return out


# ------------------------------------------------------------------------------ plots


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


# ------------------------------------------------------------------------------ tables


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
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main


def evaluate_checkpoint(path: str, args, log: Callable = print) -> dict[str, Any]:
    """Everything the CLI asks for, for one checkpoint."""
    cfg, params, step = load_checkpoint(path)
    label = default_label(path)
    m = cfg.model
    log(f"{label}: step {step}, seq_modeling={m.seq_modeling}, use_rope={m.ttt.use_rope}, "
        f"rope_bounded={m.ttt.rope_bounded}, trained at {cfg.data.seq_len} on {cfg.data.source}")
    scorer = Scorer(m, params, args.chunk)
    result: dict[str, Any] = {
        "label": label, "checkpoint": str(path), "step": step, "train_seq_len": cfg.data.seq_len,
        "data_source": cfg.data.source, "chunk": args.chunk,
        "model": {"seq_modeling": m.seq_modeling, "use_rope": m.ttt.use_rope,
                  "rope_bounded": m.ttt.rope_bounded, "attention_window": m.attention_window,
                  "mini_batch_size": m.ttt.mini_batch_size, "num_layers": m.num_layers,
                  "model_dim": m.model_dim}}
    is_recall = cfg.data.source == "recall"
    val = None
    if not is_recall:
        val = heldout_tokens(cfg, m.vocab_size)
        result["lm"] = evaluate_lm(scorer, val, args.lengths, args.num_sequences, args.batch,
                                   cfg.data.source == "bytes", cfg.data.source, log)
    if is_recall or args.recall:
        distances = args.recall_distances or default_recall_distances(cfg.data.seq_len)
        vocab = cfg.data.recall_vocab if is_recall else min(64, m.vocab_size)
        result["recall"] = evaluate_recall(scorer, distances, args.recall_samples, vocab,
                                           args.batch, cfg.data.seq_len, log=log)
    if args.ttt_diagnostics:
        if m.seq_modeling != "ttt":
            log(f"  {label}: no TTT layers, no inner-loss diagnostics")
        else:
            length = args.diagnostics_length or min(max(args.lengths), 4096)
            if val is not None:
                tokens = heldout_sequences(val, length, args.diagnostics_sequences,
                                           cfg.data.source)[:, :-1]
            else:
                from ttt_jax.data import recall_sequence

                rng = np.random.default_rng(1)
                tokens = np.stack([recall_sequence(rng, length, length - 1,
                                                   recall_vocab=cfg.data.recall_vocab).tokens[:-1]
                                   for _ in range(args.diagnostics_sequences)])
            width = max(m.ttt.mini_batch_size, length // 64)
            width -= width % m.ttt.mini_batch_size
            result["ttt_diagnostics"] = evaluate_diagnostics(m, params, tokens, width)
            log(f"  inner loss (w0 / before / after): " + "; ".join(
                f"layer {i} {d['w0']:.3f} / {d['before']:.3f} / {d['after']:.3f}"
                for i, d in enumerate(result["ttt_diagnostics"]["mean"])))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ttt_jax.eval_context", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="RUN_DIR",
                   help="a run directory, its checkpoints/ or checkpoints/STEP; repeat it to "
                        "compare models (one line each in the plots)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help=f"context lengths, comma-separated, k = 1024 (default {DEFAULT_LENGTHS})")
    p.add_argument("--num-sequences", type=int, default=8,
                   help="held-out sequences per length (default 8)")
    p.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                   help=f"stream sequences in chunks of this many tokens (default "
                        f"{DEFAULT_CHUNK}; 0: one forward pass per sequence)")
    p.add_argument("--recall", action="store_true",
                   help="also run the recall task on language models (always on for "
                        "checkpoints trained on data.source=recall)")
    p.add_argument("--recall-distances", default=None,
                   help="key-to-query distances, comma-separated (default: 4, 16, 64, ... up to "
                        "16x the training length)")
    p.add_argument("--recall-samples", type=int, default=32,
                   help="planted-key sequences per distance (default 32)")
    p.add_argument("--ttt-diagnostics", action="store_true",
                   help="inner self-supervised loss per TTT layer over positions (W0, before "
                        "and after each mini-batch update)")
    p.add_argument("--diagnostics-length", default=None,
                   help="sequence length of the diagnostics (default: min(longest length, 4k))")
    p.add_argument("--diagnostics-sequences", type=int, default=4,
                   help="sequences averaged by the diagnostics (default 4)")
    p.add_argument("--out", default="runs/eval_context",
                   help="output directory for eval_context.json and the PNGs")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.lengths = parse_sizes(args.lengths, "lengths")
        if args.recall_distances is not None:
            args.recall_distances = parse_sizes(args.recall_distances, "recall-distances")
        if args.diagnostics_length is not None:
            args.diagnostics_length = parse_size(args.diagnostics_length, "diagnostics-length")
        for name in ("num_sequences", "batch", "recall_samples", "diagnostics_sequences"):
            if getattr(args, name) < 1:
                raise EvalError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: "
                                f"expected an integer >= 1")
        if args.chunk < 0:
            raise EvalError(f"--chunk={args.chunk} is invalid: expected 0 (no chunking) or a "
                            f"positive number of tokens")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = [evaluate_checkpoint(c, args) for c in args.checkpoint]
    except (EvalError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = [r["label"] for r in results]
    if len(set(labels)) != len(labels):  # two checkpoints of one run: tell them apart
        for r in results:
            r["label"] = f"{r['label']}@{r['step']}"
    report = {"lengths": args.lengths, "num_sequences": args.num_sequences,
              "chunk": args.chunk, "models": results}
    (out / "eval_context.json").write_text(json.dumps(report, indent=1))
    (out / "eval_context.md").write_text(markdown_report(report))
    written = [out / "eval_context.json", out / "eval_context.md"]
    if any(r.get("lm") for r in results):
        plot_lm(results, out / "loss_by_position.png")
        written.append(out / "loss_by_position.png")
    if any(r.get("recall") for r in results):
        plot_recall(results, out / "recall.png")
        written.append(out / "recall.png")
    for r in results:
        if r.get("ttt_diagnostics"):
            path = out / f"ttt_diagnostics_{r['label'].replace('@', '_')}.png"
            plot_diagnostics(r, path)
            written.append(path)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
