"""Streaming decode: per-token step latency and memory as the context grows.

For each context length N (default 1k, 8k, 64k) a batch of streams is prefilled to N tokens in
fixed-size chunks (``Decoder.prefill``: the dual form from any phase), then ``Decoder.step`` is
timed for ``--steps`` tokens. The decode state has the same size whatever N (TTT weights, the
gradients accumulated inside the current mini-batch, conv tails), so the step latency and the
memory should be flat: the summary line gives ``latency_ratio_vs_first`` (median step latency at
N / at the first N) and the state bytes.

Memory: ``state_bytes`` (the decode state), ``rss_mb`` (this process's resident set after the
measurement) and ``device_peak_mb`` where the backend reports it (GPU/TPU; ``null`` on CPU).

Timing: the step and the prefill chunk are compiled first (``compile_s``), steps are timed one by
one with ``jax.block_until_ready``; ``step_ms`` is the median, ``step_ms_p90`` the 90th
percentile; ``prefill_tokens_per_s`` is the prefill's throughput at that context.

Usage (from the repository root)::

  python benchmarks/bench_decode.py                          # d=256 H=4 b=16 2 layers, B=1
  python benchmarks/bench_decode.py --quick                  # smoke run, small contexts
  python benchmarks/bench_decode.py --contexts 1024,65536 --type mlp --out /tmp/dec.jsonl
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_layer import emit, header  # noqa: E402
from ttt_jax import ModelConfig, TTTConfig, TTTLM  # noqa: E402
from ttt_jax.decode import Decoder  # noqa: E402

BENCH = "decode"
DEFAULTS = dict(contexts="1024,8192,65536", type="linear", dim=256, heads=4, mini_batch=16,
                layers=2, batch=1, chunk=4096, steps=200)
QUICK = dict(contexts="64,512", dim=32, heads=2, layers=1, chunk=128, steps=20)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--rope", action="store_true", help="bounded RoPE on (off by default)")
    p.add_argument("--quick", action="store_true", help="tiny smoke sizes")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.contexts = [int(c) for c in str(args.contexts).split(",")]
    return args


def _device_peak_mb():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv=None) -> None:
    args = parse_args(argv)
    emit(header(args, BENCH), args.out)
    ttt = TTTConfig(model_dim=args.dim, num_heads=args.heads, mini_batch_size=args.mini_batch,
                    ttt_layer_type=args.type, use_rope=args.rope)
    cfg = ModelConfig(vocab_size=256, num_layers=args.layers, intermediate_size=4 * args.dim,
                      ttt=ttt)
    params = TTTLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, args.mini_batch), jnp.int32))
    dec = Decoder(cfg)
    rng = np.random.default_rng(0)
    chunk = lambda n: rng.integers(0, 256, (args.batch, n), dtype=np.int32)
    token = jnp.zeros((args.batch,), jnp.int32)

    t0 = time.perf_counter()
    state = dec.init_state(params, args.batch)
    for _ in range(2):  # compile, then one warm call
        jax.block_until_ready(dec.prefill(params, chunk(args.chunk), state,
                                          lengths=[1] * args.batch))
        jax.block_until_ready(dec.step(params, state, token))
    compile_s = time.perf_counter() - t0

    first, done = None, 0
    for context in sorted(args.contexts):
        t0 = time.perf_counter()
        fed = 0
        while done < context:  # the stream keeps growing from one context to the next
            n = min(args.chunk, context - done)
            piece = chunk(args.chunk)
            _, state = dec.prefill(params, piece, state, lengths=[n] * args.batch)
            done += n
            fed += n
        jax.block_until_ready(state)
        prefill_s = time.perf_counter() - t0
        times = []
        for _ in range(args.steps):  # steps do not advance `done`: they are measured on a copy
            t = time.perf_counter()
            logits, probe = dec.step(params, state, token)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - t)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        step_ms = 1e3 * statistics.median(times)
        first = first or step_ms
        emit({"bench": BENCH, "kind": "result", "context": context, "type": args.type,
              "batch": args.batch, "step_ms": step_ms,
              "step_ms_p90": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
              "prefill_tokens_per_s": args.batch * fed / prefill_s if fed else None,
              "compile_s": compile_s, "state_bytes": state_bytes, "rss_mb": _rss_mb(),
              "device_peak_mb": _device_peak_mb(), "finite": bool(jnp.all(jnp.isfinite(logits))),
              "latency_ratio_vs_first": step_ms / first}, args.out)


if __name__ == "__main__":
    main()
