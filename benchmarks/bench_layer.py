"""Throughput of one TTT layer: the dual form against the per-token primal baseline.

Measures tokens/s of ``TTTLayer`` (float32) forward and forward+backward
(``jax.value_and_grad`` of ``mean(y ** 2)`` w.r.t. the params, jitted) for TTT-Linear and
TTT-MLP, and, in the same run and shapes, of the same layer with the inner loop replaced by
``ttt_jax.math.ttt.ttt_primal`` (a ``lax.scan`` over tokens, docs/architecture.md §1.7), same params.

Timing: each function is lowered and compiled first (reported as ``compile_s``, excluded from
the throughput), run ``--warmup`` times, then ``--repeats`` times with ``jax.block_until_ready``;
``tokens_per_s = B * L / median_s`` and ``us_per_token = 1e6 * median_s / (B * L)`` (flat
across ``L`` means linear cost in the sequence length). ``peak_bytes``: argument + output +
temp bytes from the compiled executable's ``memory_analysis()``.

Output: JSON lines on stdout (and appended to ``--out``): one ``header`` line (versions,
backend, device, CPU count, date), one ``result`` line per (impl, type, mode, L) and one
``summary`` line per (type, mode, L) with ``speedup_vs_primal`` = dual tokens/s / primal
tokens/s (``null`` where the baseline was skipped, see ``--baseline-max-len``) and
``speedup_vs_xla_scan`` = dual tokens/s / the same layer's with the CPU kernel switched off
(impl ``xla_scan``; ``ttt_jax.math.cpu_kernel``; on an accelerator both run the XLA scan), and at the
end one ``scaling`` line per (type, mode) for the dual form: ``per_token_ratio`` (time per
token against L = 2048) and the memory slope ``bytes_per_token`` of ``peak_bytes`` in L.

The primal baseline is slow and memory-hungry in fwd+bwd (its scan keeps per-token residuals of
the inner state: TTT-MLP at L=2048 takes about a minute per run and ~10 GB on a 2-core CPU),
hence ``--baseline-max-len`` (default 2048). The full default run takes ~20 min on 2 cores.

Usage (from the repository root)::

  python benchmarks/bench_layer.py                     # d=512 H=8 b=16 B=2, L 512 2048 8192
  python benchmarks/bench_layer.py --quick             # tiny smoke run (~1 min, mostly compiling)
  python benchmarks/bench_layer.py --types linear --lengths 2048 --out /tmp/bench.jsonl
  python benchmarks/bench_layer.py --impls dual --lengths 512 2048 8192 32768  # scaling
  python benchmarks/bench_layer.py --interleave --lengths 512 2048 8192 32768   # same, in turn
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402

from ttt_jax import SequenceMetadata, TTTConfig, TTTLayer  # noqa: E402
from ttt_jax.math import cpu_kernel  # noqa: E402
from ttt_jax.math.ttt import ttt_primal  # noqa: E402

BENCH = "ttt_layer"
IMPLS = ("dual", "primal", "xla_scan")
MODES = ("fwd", "fwd_bwd")
TYPES = ("linear", "mlp")

# Full-size defaults (d=512, H=8, b=16, B=2) and the --quick smoke sizes (L=13: L % b != 0).
DEFAULTS = dict(lengths=[512, 2048, 8192], types=list(TYPES), batch=2, dim=512, heads=8,
                mini_batch=16, repeats=5, warmup=1, baseline_max_len=2048)
QUICK = dict(lengths=[13], types=list(TYPES), batch=2, dim=32, heads=2, mini_batch=4,
             repeats=2, warmup=1, baseline_max_len=64)


class PrimalTTTLayer(TTTLayer):
    """``TTTLayer`` with the inner loop in the primal form (the baseline); same params."""

    def __call__(self, x, metadata: Optional[SequenceMetadata] = None):
        xq, xk, xv, lr = self.ttt_inputs(x, metadata)
        out, _ = ttt_primal(self.inner_params, xq, xk, xv, lr, self.learnable_token_idx,
                            self.ttt_norm_weight, self.ttt_norm_bias)
        return self.output(out, x)


# "xla_scan": the dual form with the CPU kernel switched off (ttt_jax.math.cpu_kernel), so that
# the kernel's gain is measured in the same run; the same as "dual" on other backends.
LAYERS = {"dual": TTTLayer, "primal": PrimalTTTLayer, "xla_scan": TTTLayer}


def make_fn(layer: TTTLayer, mode: str) -> Callable:
    """The function to time: ``(variables, x) -> y`` or ``-> (loss, grads)``."""
    if mode == "fwd":
        return lambda variables, x: layer.apply(variables, x)

    def loss(params, x):
        y = layer.apply({"params": params}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    grad_fn = jax.value_and_grad(loss)
    return lambda variables, x: grad_fn(variables["params"], x)


def time_fn(fn: Callable, args: tuple, repeats: int, warmup: int):
    """Compiles ``fn`` on ``args`` and times it.

    Returns:
      ``(compile_s, times_s, last_output)``.
    """
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    time_fn.last_peak_bytes = peak_bytes(compiled)
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, times, out


def peak_bytes(compiled) -> Optional[int]:
    """Argument + output + temp bytes that XLA plans for the compiled executable."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def emit(record: dict, out_path: Optional[str]) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out_path:
        with open(out_path, "a") as fh:
            fh.write(line + "\n")


def header(args: argparse.Namespace, bench: str = BENCH) -> dict:
    """The run's first JSON line: date, versions, backend, device and CPU facts, arguments."""
    dev = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "bench": bench, "kind": "header",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "flax": flax.__version__, "python": platform.python_version(),
        "backend": jax.default_backend(), "device_kind": dev.device_kind,
        "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
        "cpu_usable": usable, "machine": platform.machine(), "processor": _cpu_name(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "loadavg_1m": _loadavg(),
        "args": vars(args),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_one(impl: str, cfg: TTTConfig, variables: Any, x: jax.Array, mode: str,
            args: argparse.Namespace):
    """Times one (impl, mode) on ``x``; returns the result record and the output."""
    layer = LAYERS[impl](cfg)
    with cpu_kernel.disabled() if impl == "xla_scan" else contextlib.nullcontext():
        compile_s, times, out = time_fn(make_fn(layer, mode), (variables, x), args.repeats,
                                    args.warmup)
    return result(impl, cfg, x.shape, mode, compile_s, times, time_fn.last_peak_bytes), out


def result(impl: str, cfg: TTTConfig, shape: tuple, mode: str, compile_s: float, times: list,
           peak: Optional[int], **extra) -> dict:
    """The ``result`` line of one (impl, type, mode, L) from its timings."""
    bsz, length = shape[:2]
    med = statistics.median(times)
    return {
        "bench": BENCH, "kind": "result", "impl": impl, "ttt_layer_type": cfg.ttt_layer_type,
        "mode": mode, "B": bsz, "L": length, "d": cfg.model_dim, "H": cfg.num_heads,
        "b": cfg.mini_batch_size, "tokens_per_s": bsz * length / med,
        "us_per_token": 1e6 * med / (bsz * length), "compile_s": compile_s, "median_s": med,
        "min_s": min(times), "max_s": max(times), "repeats": len(times),
        "peak_bytes": peak,
        # Other processes on the machine skew CPU timings: keep the load next to the numbers.
        "loadavg_1m": _loadavg(), **extra,
    }


def bench_interleaved(layer_type: str, args: argparse.Namespace, dual_records: list) -> None:
    """The dual form at every ``--lengths``, the lengths timed in turn (``--interleave``).

    For each mode every length is compiled and warmed up first; then each of the
    ``--repeats`` rounds runs every length once. A drift of the machine's speed during the
    run (other processes, clock changes) then reaches every length alike, so the per-token
    ratios between lengths are steadier than when each length is timed in a block of its own.
    """
    cfg = _config(layer_type, args)
    for mode in args.modes:
        runs = []
        for length in args.lengths:
            variables, x = _inputs(cfg, length, args)
            t0 = time.perf_counter()
            compiled = jax.jit(make_fn(TTTLayer(cfg), mode)).lower(variables, x).compile()
            compile_s = time.perf_counter() - t0
            for _ in range(args.warmup):
                jax.block_until_ready(compiled(variables, x))
            runs.append((compiled, (variables, x), compile_s, peak_bytes(compiled), []))
        for _ in range(args.repeats):
            for compiled, inputs, _, _, times in runs:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*inputs))
                times.append(time.perf_counter() - t0)
        for compiled, (_, x), compile_s, peak, times in runs:
            record = result("dual", cfg, x.shape, mode, compile_s, times, peak, interleaved=True)
            emit(record, args.out)
            dual_records.append(record)


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _max_abs_diff(a: Any, b: Any) -> float:
    diffs = jax.tree.map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b)
    return float(max(jax.tree.leaves(diffs)))


def _config(layer_type: str, args: argparse.Namespace) -> TTTConfig:
    return TTTConfig(model_dim=args.dim, num_heads=args.heads, mini_batch_size=args.mini_batch,
                     ttt_layer_type=layer_type)


def _inputs(cfg: TTTConfig, length: int, args: argparse.Namespace):
    """``(variables, x)`` of one length; params do not depend on L, so they are initialised
    on a short slice (the same for every impl)."""
    key_init, key_x = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(args.seed), length))
    x = jax.random.normal(key_x, (args.batch, length, cfg.model_dim), jnp.float32)
    return jax.jit(TTTLayer(cfg).init)(key_init, x[:, : args.mini_batch]), x


def bench_shape(layer_type: str, length: int, args: argparse.Namespace,
                dual_records: Optional[list] = None) -> None:
    """All impls and modes of one (type, L); emits result and summary lines.

    The dual form's result records are appended to ``dual_records`` (for ``scaling``).
    """
    cfg = _config(layer_type, args)
    variables, x = _inputs(cfg, length, args)
    for mode in args.modes:
        records, outs = {}, {}
        for impl in args.impls:
            if impl == "primal" and length > args.baseline_max_len:
                continue
            records[impl], outs[impl] = run_one(impl, cfg, variables, x, mode, args)
            emit(records[impl], args.out)
            if impl == "dual" and dual_records is not None:
                dual_records.append(records[impl])
        summary = {"bench": BENCH, "kind": "summary", "ttt_layer_type": layer_type,
                   "mode": mode, "B": args.batch, "L": length, "d": args.dim, "H": args.heads,
                   "b": args.mini_batch}
        for impl in IMPLS:
            rec = records.get(impl)
            summary[f"{impl}_tokens_per_s"] = rec["tokens_per_s"] if rec else None
            summary[f"{impl}_us_per_token"] = rec["us_per_token"] if rec else None
        both = "dual" in records and "primal" in records
        summary["speedup_vs_primal"] = (records["dual"]["tokens_per_s"]
                                        / records["primal"]["tokens_per_s"] if both else None)
        xla = "dual" in records and "xla_scan" in records
        summary["speedup_vs_xla_scan"] = (records["dual"]["tokens_per_s"]
                                          / records["xla_scan"]["tokens_per_s"] if xla else None)
        # The baseline computes the same function: a cheap check that the comparison is fair.
        summary["max_abs_diff_vs_primal"] = (_max_abs_diff(outs["dual"], outs["primal"])
                                             if both else None)
        if "primal" in args.impls and "primal" not in records:
            summary["primal_skipped"] = f"L={length} > --baseline-max-len={args.baseline_max_len}"
        emit(summary, args.out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths L (8192 default max)")
    p.add_argument("--types", nargs="+", choices=TYPES, help="ttt_layer_type values")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--batch", type=int, help="batch size B (default 2)")
    p.add_argument("--dim", type=int, help="model width d (default 512)")
    p.add_argument("--heads", type=int, help="heads H (default 8)")
    p.add_argument("--mini-batch", type=int, help="TTT mini-batch size b (default 16)")
    p.add_argument("--repeats", type=int, help="timed runs; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, help="untimed runs after compiling (default 1)")
    p.add_argument("--baseline-max-len", type=int,
                   help="run the primal baseline only for L <= this (default 2048)")
    p.add_argument("--interleave", action="store_true",
                   help="dual form only: time the lengths in turn, round by round (steadier "
                        "per-token ratios between lengths; no summary lines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "dim", "heads", "mini_batch", "repeats", "baseline_max_len"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0 or min(args.lengths) <= 0:
        p.error("--warmup must be >= 0 and every --lengths value positive")
    return args


def scaling(records: list, layer_type: str, mode: str, ref_len: int) -> Optional[dict]:
    """Per-token time against ``L = ref_len`` and the memory slope, from the dual results.

    ``per_token_ratio[L] = us_per_token(L) / us_per_token(ref_len)`` (1 = flat: linear cost);
    ``bytes_per_token`` is the least-squares slope of ``peak_bytes`` against ``L`` (per batch
    row and token: divided by ``B``) and ``memory_fit_max_rel_err`` how far the points are
    from that line; the ``_from_ref`` pair is the same fit over ``L >= ref_len`` only (the
    lengths that run in spans by default: ``TTTConfig.span_length``, 1024 or 2048 tokens).
    """
    recs = sorted((r for r in records if r["ttt_layer_type"] == layer_type and r["mode"] == mode),
                  key=lambda r: r["L"])
    ref = next((r for r in recs if r["L"] == ref_len), None)
    if len(recs) < 2:
        return None
    out = {"bench": BENCH, "kind": "scaling", "ttt_layer_type": layer_type, "mode": mode,
           "ref_L": ref_len if ref else None,
           "us_per_token": {str(r["L"]): r["us_per_token"] for r in recs},
           "per_token_ratio": ({str(r["L"]): r["us_per_token"] / ref["us_per_token"] for r in recs}
                               if ref else None)}
    pts = [(r["L"], r["peak_bytes"]) for r in recs if r.get("peak_bytes")]
    if len(pts) >= 2:
        out["peak_bytes"] = {str(length): b for length, b in pts}
        slope, icpt, err = _line(pts)
        out["bytes_per_token"] = slope / recs[0]["B"]
        out["intercept_bytes"] = icpt
        out["memory_fit_max_rel_err"] = err
    # From ref_len up (the layer's span length by default) every length runs in spans.
    long = [p for p in pts if p[0] >= ref_len]
    if len(long) >= 2:
        slope, _, err = _line(long)
        out["bytes_per_token_from_ref"] = slope / recs[0]["B"]
        out["memory_fit_from_ref_max_rel_err"] = err
    return out


def _line(pts: list) -> tuple[float, float, float]:
    """Least-squares ``(slope, intercept, largest relative miss)`` of ``(L, bytes)`` points."""
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    icpt = my - slope * mx
    return slope, icpt, max(abs(b - (icpt + slope * length)) / b for length, b in pts)


def main(argv=None) -> None:
    args = parse_args(argv)
    emit(header(args), args.out)
    dual_records: list = []
    for layer_type in args.types:
        if args.interleave:
            bench_interleaved(layer_type, args, dual_records)
            continue
        for length in args.lengths:
            bench_shape(layer_type, length, args, dual_records)
    for layer_type in args.types:
        for mode in args.modes:
            line = scaling(dual_records, layer_type, mode, 2048)
            if line:
                emit(line, args.out)


if __name__ == "__main__":
    main()
