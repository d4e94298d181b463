"""The evaluations: loss by position bucket and by context length, recall at distance, and the
TTT inner-loss diagnostics. Each returns a JSON-ready dict."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional

import numpy as np

from ttt_jax.evals.options import FIRST_BUCKET
from ttt_jax.evals.scoring import Scorer, score_in_batches

LN2 = math.log(2.0)


def position_buckets(length: int, first: int = FIRST_BUCKET) -> list[tuple[int, int]]:
    """``[(0, first), (first, 2 first), (2 first, 4 first), ...]`` covering ``[0, length)``."""
    edges = [0]
    edge = first
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return list(zip(edges[:-1], edges[1:]))


def evaluate_lm(scorer: Scorer, sequences: np.ndarray, lengths: tuple[int, ...], batch: int,
                bytes_per_token: Optional[float], log: Callable = print) -> dict[str, Any]:
    """Loss per length and per position bucket, and bits per byte when ``bytes_per_token`` is
    known (``bpb = loss / ln 2 / bytes_per_token``: 1 byte per token for the byte corpus, the
    split's UTF-8 bytes over its tokens for a prepared corpus).

    ``sequences`` are the held-out sequences of the longest length (``[N, L + 1]`` or
    ``[N, L + 1, K]``); each length scores their prefixes, so every length reads the same
    offsets. The loss of a position is averaged over the sequences (and over the streams of a
    Moshi frame). A scorer with ``stream_names`` (``moshi_lm``) also gives each stream's loss
    per length and bucket under ``streams``.
    """
    bpb = (lambda x: x / LN2 / bytes_per_token) if bytes_per_token else None
    names = getattr(scorer, "stream_names", None)
    out = {}
    for length in lengths:
        t0 = time.perf_counter()
        loss, _ = score_in_batches(scorer, sequences[:, :length + 1], batch)  # [N, L(, S)]
        streams = None
        if loss.ndim == 3:  # per stream; NaN where a delay leaves no prediction
            streams = {name: _by_bucket(loss[:, :, i], length)
                       for i, name in enumerate(names)}
            loss = np.nanmean(loss, axis=2)
        per_pos = loss.mean(axis=0)  # [L]
        buckets = []
        for s, e in position_buckets(length):
            b = float(per_pos[s:e].mean())
            buckets.append({"start": s, "end": e, "loss": b,
                            **({"bpb": bpb(b)} if bpb else {})})
        mean = float(loss.mean())
        out[str(length)] = {"length": length, "num_sequences": int(loss.shape[0]), "loss": mean,
                            **({"bpb": bpb(mean)} if bpb else {}),
                            "buckets": buckets, "seconds": time.perf_counter() - t0,
                            **({"streams": streams} if streams else {})}
        log(f"  length {length:>7}: loss {mean:.4f}" + (f" ({bpb(mean):.3f} bits/byte)"
                                                       if bpb else ""))
    return out


def _by_bucket(loss: np.ndarray, length: int) -> dict[str, Any]:
    """One stream's mean loss and its loss per position bucket (positions without a
    prediction, NaN, left out)."""
    per_pos = np.nanmean(loss, axis=0)
    return {"loss": float(np.nanmean(loss)),
            "buckets": [float(np.nanmean(per_pos[s:e])) for s, e in position_buckets(length)]}


def default_recall_distances(train_len: int) -> list[int]:
    """Powers of 4 from 4 up to ``16 * train_len`` (and that value itself)."""
    top = 16 * train_len
    out, d = [], 4
    while d < top:
        out.append(d)
        d *= 4
    return out + [top]


def evaluate_recall(scorer: Scorer, distances, samples: int, recall_vocab: int, batch: int,
                    min_len: int, seed: int = 0, log: Callable = print) -> dict[str, Any]:
    """Accuracy of predicting a value planted ``D`` tokens before its query (token LMs).

    The sequences of distance ``D`` hold ``max(min_len, D + 2)`` tokens with the query last:
    up to the training length (``min_len``) only the distance changes; beyond it the sequence
    is just long enough to hold the distance.
    """
    from ttt_jax.data import recall_sequence

    if min(distances) < 2:
        raise ValueError(f"--recall-distances: {min(distances)} is invalid: distances must be "
                         f">= 2 (the value sits between key and query)")
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


def diagnostics_bin_width(length: int, mini_batch_size: int) -> int:
    """About 64 bins over ``length``, each a whole number of mini-batches."""
    width = max(mini_batch_size, length // 64)
    return width - width % mini_batch_size


def evaluate_diagnostics(model, params, tokens: np.ndarray, mini_batch_size: int) -> dict:
    """Inner-loss curves per TTT layer of ``model`` (any Linen model with TTT layers) on its
    inputs ``tokens`` (``[N, L]`` or ``[N, L, K]``, positions from 0; one forward pass),
    averaged over bins of whole mini-batches."""
    import jax

    from ttt_jax.diagnostics import KINDS, binned, model_inner_losses

    curves = jax.device_get(jax.jit(lambda p, t: model_inner_losses(model, p, t))(
        params, tokens))
    length = int(tokens.shape[1])
    out = binned(curves, diagnostics_bin_width(length, mini_batch_size))
    out.update(length=length, num_sequences=int(tokens.shape[0]),
               mini_batch_size=mini_batch_size)
    out["mean"] = [{k: float(np.mean(np.asarray(c[k]))) for k in KINDS} for c in curves]
    return out
