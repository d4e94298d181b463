"""Scaling of one training step over device-mesh shapes, at a fixed global batch.

For each mesh shape (``data x fsdp x tensor``, see ``ttt_jax.sharding``) the script builds the
sharded train state of a config, jits the full train step (forward, backward, AdamW) with the
mesh's in/out shardings, and reports:

- ``step_s`` (median of ``--repeats`` timed steps after ``--warmup``; compile excluded and
  reported as ``compile_s``), ``tokens_per_s`` (global) and ``tokens_per_s_per_device``;
- memory per device: ``state_bytes_per_device`` (params + optimizer state actually resident on
  the first device), XLA's compiled-program figures for one device (``argument_bytes``,
  ``output_bytes``, ``temp_bytes``: activations and other scratch), and on GPU/TPU the runtime's
  ``peak_bytes_in_use`` (``null`` where the backend does not report it, e.g. CPU);
- ``loss`` of the first step: the same number on every mesh (a cheap sharding check).

Output: JSON lines on stdout (and appended to ``--out``): one ``header`` line, one ``result``
line per mesh. With several hosts, start the same command on every host (see docs/scaling.md);
only process 0 prints.

Usage (from the repository root)::

  python benchmarks/bench_scaling.py --config configs/ttt_linear_125m.yaml --batch 64 \\
      --seq-len 2048 --meshes data=-1 fsdp=-1 data=2,fsdp=-1 data=-1,tensor=2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_scaling.py --quick

Mesh specs are ``axis=size`` pairs joined by commas (axes ``data``, ``fsdp``, ``tensor``; one
axis may be -1: all remaining devices). The default list is every power-of-two split of the
devices between ``data`` and ``fsdp`` plus the single-device run when it fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttt_jax import distributed  # noqa: E402

BENCH = "train_step_scaling"
QUICK_OVERRIDES = ["model.vocab_size=256", "model.num_layers=2", "model.intermediate_size=128",
                   "model.ttt.model_dim=64", "model.ttt.num_heads=4",
                   "model.ttt.mini_batch_size=8"]


def parse_mesh(spec: str):
    """``"data=2,fsdp=4"`` -> ``MeshConfig(data=2, fsdp=4, tensor=1)``; errors name the spec."""
    from ttt_jax.config import MESH_AXES, MeshConfig

    if spec in ("single", "1"):
        return None
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"--meshes entry {spec!r} is invalid: expected axis=size pairs "
                             f"joined by commas, axes {', '.join(MESH_AXES)} (or 'single')")
        sizes[name] = int(value)
    return MeshConfig(**sizes)


def default_meshes(n: int) -> list[str]:
    """``single`` plus every ``data=a,fsdp=b`` with ``a * b = n``, ``a`` a power of two."""
    out = ["single"] if n > 1 else []
    a = n
    while a >= 1:
        if n % a == 0:
            out.append(f"data={a},fsdp={n // a}")
        if a == 1:
            break
        a //= 2
    return out


class RandomTokens:
    """Uniform random token batches (no data loading in the timed loop)."""

    def __init__(self, vocab: int, batch_size: int, seq_len: int, seed: int):
        import numpy as np

        self.batch_size, self.seq_len, self.split = batch_size, seq_len, "train"
        self._tokens = np.random.default_rng(seed).integers(
            0, vocab, (batch_size, seq_len + 1)).astype(np.int32)

    def batch(self, step: int):
        return self._tokens

    def loss_mask(self, step: int) -> None:
        return None


def _bytes_on_first_device(tree) -> int:
    import jax

    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.size * shard.data.dtype.itemsize
    return total


def bench_mesh(spec: str, cfg, args) -> dict[str, Any]:
    import jax
    import numpy as np

    from ttt_jax import registry, training
    from ttt_jax.models import build_model
    from ttt_jax.sharding import Layout
    from ttt_jax.trainer import _micro_batches

    mesh_cfg = parse_mesh(spec)
    if mesh_cfg is None and jax.process_count() > 1:
        raise ValueError("a single-device run needs a single process")
    run_cfg = dataclasses.replace(cfg, mesh=mesh_cfg)
    model = build_model(cfg.model)
    optimizer = training.make_optimizer(cfg.optim, 1000)
    init = lambda k: registry.of(run_cfg).init_state(run_cfg, optimizer, k)  # noqa: E731
    key = jax.random.PRNGKey(args.seed)
    ds = RandomTokens(cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len, args.seed)
    step_fn = training.make_train_step(model, optimizer)
    accum = cfg.train.grad_accum
    if mesh_cfg is None:
        state = jax.jit(init)(key)
        jitted = jax.jit(step_fn, donate_argnums=0)
        tokens, mask = _micro_batches(ds, 0, accum)
        tokens = jax.device_put(tokens)
        mesh_shape = {"data": 1, "fsdp": 1, "tensor": 1}
    else:
        layout = Layout.from_config(run_cfg)
        state = layout.init_state(init, key)
        jitted = layout.jit_train_step(step_fn, state)
        tokens, mask = layout.train_batch(ds, 0, accum)
        mesh_shape = dict(layout.mesh.shape)
    devices = int(np.prod(list(mesh_shape.values())))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, tokens, mask).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, tokens, mask)
    loss = float(metrics["loss"])
    for _ in range(args.warmup):
        state, metrics = compiled(state, tokens, mask)
    jax.block_until_ready(state)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = compiled(state, tokens, mask)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    stats = jax.local_devices()[0].memory_stats() or {}
    return {
        "bench": BENCH, "kind": "result", "mesh": spec, "mesh_shape": mesh_shape,
        "devices": devices, "global_batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum": accum, "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "step_s": med, "min_s": min(times), "max_s": max(times), "repeats": len(times),
        "compile_s": compile_s, "tokens_per_s": tokens_per_step / med,
        "tokens_per_s_per_device": tokens_per_step / med / devices,
        "state_bytes_per_device": _bytes_on_first_device((state.params, state.opt_state)),
        "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
        "output_bytes": getattr(memory, "output_size_in_bytes", None),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "loss": loss,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ttt_linear_125m.yaml", help="a YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as in train.py")
    p.add_argument("--meshes", nargs="+", help="mesh specs, e.g. data=8 data=2,fsdp=4 single")
    p.add_argument("--batch", type=int, help="global batch (sequences per step)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="append the JSON lines to this file")
    p.add_argument("--quick", action="store_true",
                   help="a small model (d=64, 2 layers), batch 16, L=64: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.set = QUICK_OVERRIDES + args.set
        args.batch = args.batch or 16
        args.seq_len = args.seq_len or 64
        args.repeats = min(args.repeats, 3)
    if args.repeats <= 0 or args.warmup < 0:
        p.error("--repeats must be positive and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed.maybe_initialize(os.environ, log=lambda *a: None)
    import jax

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_layer import emit, header

    from ttt_jax import apply_overrides, load_config

    overrides = list(args.set)
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    try:
        cfg = apply_overrides(load_config(args.config), overrides)
        meshes = args.meshes or default_meshes(jax.device_count())
        for spec in meshes:
            parse_mesh(spec)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    primary = jax.process_index() == 0
    out: Optional[str] = args.out if primary else None
    if primary:
        emit({**header(args, BENCH), "process_count": jax.process_count()}, out)
    for spec in meshes:
        try:
            record = bench_mesh(spec, cfg, args)
        except ValueError as e:  # a mesh that does not fit this device count or batch
            record = {"bench": BENCH, "kind": "skipped", "mesh": spec, "reason": str(e)}
        if primary:
            emit(record, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
