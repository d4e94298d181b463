"""The training loop behind ``train.py``: data, model, jitted step, evaluation, outputs."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax import diagnostics, distributed, registry, sharding, training
from ttt_jax.checkpoint import Checkpointer, load_saved, merge_params
from ttt_jax.config import RunConfig, save_config, to_dict
from ttt_jax.logging import MetricsWriter, Progress, plot_losses


def _micro_batches(ds, step: int, accum: int):
    """``([k, m, L+1] tokens, [k, m, L] mask or None)`` of one optimizer step."""
    tokens = ds.batch(step)
    mask = ds.loss_mask(step)
    k = accum
    tokens = tokens.reshape(k, tokens.shape[0] // k, *tokens.shape[1:])
    if mask is not None:
        mask = mask.reshape(k, mask.shape[0] // k, mask.shape[1]).astype(np.float32)
    return tokens, mask


def evaluate(eval_step, params, ds, batches: int) -> float:
    """Mean validation loss per counted token over ``batches`` batches."""
    total, count = 0.0, 0.0
    for i in range(batches):
        s, n = eval_step(params, ds.batch(i), ds.loss_mask(i))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _init_from(cfg: RunConfig, state, optimizer, print_fn):
    """Starts from another run's params, loading every matching array (see ``merge_params``)."""
    saved, meta = load_saved(cfg.checkpoint.init_from)
    params, report = merge_params(saved["params"], state.params, strict=cfg.checkpoint.strict)
    print_fn(f"initialised from {cfg.checkpoint.init_from} (step {meta['step']}):\n{report}")
    for line in _config_differences(meta["config"]["model"], to_dict(cfg.model), "model."):
        print_fn(f"warning: model config differs from the source's: {line}")
    return state.replace(params=params, opt_state=optimizer.init(params))


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(cfg: RunConfig, *, print_fn=print) -> dict[str, Any]:
    """Trains ``cfg`` and returns a summary (start/end validation loss, run dir).

    Writes ``config.yaml``, ``metrics.jsonl`` and ``loss.png`` under ``cfg.train.run_dir``.
    """
    # In a multi-process job (jax.distributed started by train.py) process 0 prints and writes
    # the run's files; every process trains and checkpoints.
    primary = distributed.is_primary()
    if not primary:
        print_fn = lambda *args, **kwargs: None  # noqa: E731
    t = cfg.train
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if primary:
        save_config(cfg, run_dir / "config.yaml")
    arch = registry.of(cfg)
    arch.check(cfg)
    train_ds, val_ds = arch.build_datasets(cfg)
    model = arch.build_model(cfg.model)
    optimizer = arch.make_optimizer(cfg)
    init = lambda k: arch.init_state(cfg, optimizer, k)  # noqa: E731
    key = jax.random.PRNGKey(t.seed)
    # cfg.mesh set: state and batches sharded on a device mesh (ttt_jax.sharding).
    layout = sharding.Layout.from_config(cfg) if cfg.mesh is not None else None
    if layout is None:
        state = jax.jit(init)(key)
        train_step = jax.jit(training.make_train_step(model, optimizer), donate_argnums=0)
        eval_step = jax.jit(training.make_eval_step(model))
    else:
        state = layout.init_state(init, key)
        train_step = layout.jit_train_step(training.make_train_step(model, optimizer), state)
        eval_step = layout.jit_eval_step(training.make_eval_step(model), state.params)
        val_ds = layout.eval_view(val_ds)
    metrics = MetricsWriter(run_dir / "metrics.jsonl" if primary else os.devnull)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print_fn(f"model: {n_params:,} params; data: {train_ds.describe()}; run dir: {run_dir}")
    ckpt = Checkpointer(run_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    restored = ckpt.restore_latest(state, log=print_fn) if cfg.checkpoint.resume else None
    if restored is not None:
        state, meta = restored
        for line in _config_differences(meta["config"], to_dict(cfg)):
            print_fn(f"warning: config differs from the checkpoint's: {line}")
        print_fn(f"resumed from step {int(state.step)} (data position {meta['data_position']})")
    elif cfg.checkpoint.init_from:
        state = _init_from(cfg, state, optimizer, print_fn)
        state = layout.place_state(state) if layout is not None else state

    start_loss = evaluate(eval_step, state.params, val_ds, t.eval_batches)
    first = int(state.step)
    metrics.write({"kind": "eval", "step": first, "val_loss": start_loss})
    print_fn(f"start validation loss {start_loss:.4f}")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    progress = Progress(t.steps, tokens_per_step, start_step=first)
    val_loss = start_loss
    diagnose = (diagnostics.jitted_mean_inner_losses(model) if t.diagnostics_every else None)
    with _StopRequest() as stop:
        for step in range(first, t.steps):
            tokens, mask = (_micro_batches(train_ds, step, t.grad_accum) if layout is None
                            else layout.train_batch(train_ds, step, t.grad_accum))
            state, m = train_step(state, tokens, mask)
            done = step + 1
            ckpt.save(state, cfg)
            val_loss = _log_and_eval(cfg, done, m, state, metrics, progress, eval_step, val_ds,
                                     val_loss, diagnose)
            if stop.signal is not None:
                ckpt.save(state, cfg, force=True)
                progress.close()
                print_fn(f"stopped by signal {stop.signal} at step {done}; checkpoint saved")
                ckpt.close()
                return {"start_val_loss": start_loss, "end_val_loss": val_loss,
                        "run_dir": str(run_dir), "state": state, "stopped": True}
    ckpt.save(state, cfg, force=True)
    ckpt.close()
    progress.close()
    print_fn(f"end validation loss {val_loss:.4f} (start {start_loss:.4f}, "
             f"ratio {val_loss / start_loss:.3f})")
    if primary:
        plot_losses(metrics.read(), run_dir / "loss.png")
    return {"start_val_loss": start_loss, "end_val_loss": val_loss, "run_dir": str(run_dir),
            "state": state, "stopped": False}


def _log_and_eval(cfg, done, m, state, metrics, progress, eval_step, val_ds, val_loss, diagnose):
    """Writes the step's metrics and runs validation when due; returns the latest val loss."""
    t = cfg.train
    if done % t.log_every == 0 or done == t.steps:
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {done}")
        metrics.write({"kind": "train", "step": done, "loss": loss,
                       "grad_norm": float(m["grad_norm"]),
                       "tokens_per_s": progress.tokens_per_s(done)})
        progress.update(done, loss)
    if done % t.eval_every == 0 or done == t.steps:
        val_loss = evaluate(eval_step, state.params, val_ds, t.eval_batches)
        metrics.write({"kind": "eval", "step": done, "val_loss": val_loss})
    if diagnose is not None and done % t.diagnostics_every == 0:
        layers = diagnose(state.params, val_ds.batch(0)[:, :-1])
        metrics.write({"kind": "ttt_diagnostics", "step": done, "layers": layers})
    return val_loss
