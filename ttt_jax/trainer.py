"""The training loop behind ``train.py``: data, model, jitted step, evaluation, outputs.

A run never loses, mixes or silently corrupts work (README "Reliability"):

- Everything that can refuse a run is checked before anything is written (``preflight``: the
  config, ``optim.trainable``, ``checkpoint.init_from``, that ``train.run_dir`` and its
  ``checkpoints/`` are writable directories, and that the directory is not another run's); the
  data is built, the lock taken (``ttt_jax.run_dir.RunLock``), and only then are files written.
- ``checkpoint.overwrite`` (``train --force-new``) moves an old run aside before writing.
- The loss and gradient norm of every step are checked finite, and the state before every
  save: a non-finite value stops the run (``NonFiniteError``, exit status 3) with the last good
  checkpoint left as the latest, or with ``train.skip_nonfinite_steps`` the update is skipped.
- SIGINT/SIGTERM save and stop (``ttt_jax.run_dir.StopSignals``); a resumed run first cuts
  ``metrics.jsonl`` back to the restored step.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from ttt_jax import diagnostics, distributed, flops, registry, sharding, training
from ttt_jax.checkpoint import CHECKPOINT_DIR, Checkpointer, load_saved, merge_params, resolve
from ttt_jax.config import RunConfig, save_config, to_dict
from ttt_jax.logging import Progress, StepClock, plot_losses
from ttt_jax.tracking import RunLog, check_trackers
from ttt_jax.run_dir import (RunLock, StopSignals, check_directory, check_free_space,
                             check_ownership, move_aside)
from ttt_jax.tree import flatten

EXIT_NONFINITE = 3


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or state; nothing non-finite was saved."""

    exit_status = EXIT_NONFINITE


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


def check_trainable(cfg, arch) -> None:
    """``optim.trainable`` must match at least one param path of the model (else nothing would
    train); ``ValueError`` naming the key otherwise."""
    pattern = cfg.optim.trainable
    if pattern is None:
        return
    paths = list(flatten(arch.param_shapes(cfg.model)))
    if not any(re.search(pattern, p) for p in paths):
        raise ValueError(f"optim.trainable={pattern!r} is invalid: it matches none of the "
                         f"model's {len(paths)} param paths (such as {paths[0]}); expected a "
                         f"regular expression that matches at least one")


def preflight(cfg, arch=None) -> None:
    """Every refusal that needs no data and writes nothing: the architecture's features,
    ``optim.trainable``, ``checkpoint.init_from``, the run and checkpoint directories (writable
    directories, or creatable), and the run directory's owner (``checkpoint.resume``)."""
    arch = registry.of(cfg) if arch is None else arch
    arch.check(cfg)
    check_trainable(cfg, arch)
    check_trackers(cfg.train.trackers)
    if cfg.checkpoint.init_from:
        resolve(cfg.checkpoint.init_from)
    run_dir = Path(cfg.train.run_dir)
    check_directory(run_dir, f"train.run_dir {str(run_dir)!r}")
    check_directory(run_dir / CHECKPOINT_DIR,
                    f"the checkpoint directory {str(run_dir / CHECKPOINT_DIR)!r}")
    check_ownership(run_dir, resume=cfg.checkpoint.resume, overwrite=cfg.checkpoint.overwrite)
    # One checkpoint: the params and the optimizer state as the run builds them (no moments
    # for frozen params), from shapes alone.
    optimizer = arch.make_optimizer(cfg)
    shapes = jax.tree.leaves(jax.eval_shape(lambda k: arch.init_state(cfg, optimizer, k),
                                            jax.random.PRNGKey(0)))
    need = sum(x.size * x.dtype.itemsize for x in shapes)
    check_free_space(run_dir / CHECKPOINT_DIR, need,
                     f"the checkpoint directory {str(run_dir / CHECKPOINT_DIR)!r}")


class _FiniteGuard:
    """Checks the loss and gradient norm of the steps since the last check, in one transfer."""

    def __init__(self, limit: int, metrics: RunLog, ckpt: Checkpointer):
        self.limit, self.metrics, self.ckpt = limit, metrics, ckpt
        self.pending: list[tuple[int, dict]] = []
        self.skipped = 0

    def add(self, step: int, m: dict) -> None:
        self.pending.append((step, m))

    def error(self, step: int, what: str) -> NonFiniteError:
        latest = self.ckpt.latest()
        last = (f"the last good checkpoint is step {latest} ({self.ckpt.directory / str(latest)})"
                if latest is not None else "no checkpoint was saved")
        return NonFiniteError(f"training stopped at step {step}: {what}; {last}, and nothing "
                              f"after it was saved")

    def check(self) -> None:
        pending, self.pending = self.pending, []
        for (step, _), m in zip(pending, jax.device_get([m for _, m in pending])):
            bad = [name for name, key in (("loss", "loss"), ("gradient norm", "grad_norm"))
                   if not math.isfinite(float(m[key]))]
            if not bad:
                continue
            what = "non-finite " + " and ".join(
                f"{name} ({float(m[key])})" for name, key in (("loss", "loss"),
                                                              ("gradient norm", "grad_norm"))
                if name in bad)
            if not bool(m.get("skipped", False)):
                raise self.error(step, what)
            self.skipped += 1
            self.metrics.write({"kind": "skipped_step", "step": step, "nonfinite": bad,
                                "skipped_total": self.skipped})
            if self.skipped > self.limit:
                raise self.error(step, f"{what}, more than train.skip_nonfinite_steps="
                                       f"{self.limit} updates skipped")


def run(cfg: RunConfig, *, print_fn=print, stop: Optional[StopSignals] = None) -> dict[str, Any]:
    """Trains ``cfg`` and returns a summary (start/end validation loss, run dir, ``stopped``).

    Writes ``config.yaml``, ``metrics.jsonl``, ``loss.png`` and ``checkpoints/`` under
    ``cfg.train.run_dir``. ``stop``: the signal handling to use (one is installed for the call
    when None). Raises ``NonFiniteError``, or ``ttt_jax.run_dir.Interrupted`` when a signal
    arrives during start-up or a second one while stopping.
    """
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopSignals())
        return _train(cfg, print_fn, stop, stack)


def _train(cfg: RunConfig, print_fn, stop: StopSignals, stack: contextlib.ExitStack):
    # In a multi-process job (jax.distributed started by train.py) process 0 prints and writes
    # the run's files (and holds the lock); every process trains and checkpoints.
    primary = distributed.is_primary()
    if not primary:
        print_fn = lambda *args, **kwargs: None  # noqa: E731
    t, c = cfg.train, cfg.checkpoint
    run_dir = Path(t.run_dir)
    arch = registry.of(cfg)
    preflight(cfg, arch)
    train_ds, val_ds = arch.build_datasets(cfg)
    stop.check()  # a signal during start-up stops the run here, or at the next check
    if primary:
        stack.enter_context(RunLock(run_dir, log=print_fn))
    model = arch.build_model(cfg.model)
    optimizer = arch.make_optimizer(cfg)
    init = lambda k: arch.init_state(cfg, optimizer, k)  # noqa: E731
    key = jax.random.PRNGKey(t.seed)
    step_fn = training.make_train_step(model, optimizer,
                                       skip_nonfinite=t.skip_nonfinite_steps > 0)
    # cfg.mesh set: state and batches sharded on a device mesh (ttt_jax.sharding).
    layout = sharding.Layout.from_config(cfg) if cfg.mesh is not None else None
    if layout is None:
        state = _place(jax.jit(init)(key), layout)
        train_step = jax.jit(step_fn, donate_argnums=0)
        eval_step = jax.jit(training.make_eval_step(model))
    else:
        state = layout.init_state(init, key)
        train_step = layout.jit_train_step(step_fn, state)
        eval_step = layout.jit_eval_step(training.make_eval_step(model), state.params)
    state_finite = jax.jit(lambda s: training.all_finite((s.params, s.opt_state)))
    stop.check()
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    print_fn(f"model: {n_params:,} params; data: {train_ds.describe()}; run dir: {run_dir}")

    restored = None
    if c.overwrite:
        if c.init_from:  # read before the old run (which it may name) is moved
            state = _place(_init_from(cfg, state, optimizer, print_fn), layout)
        moved = move_aside(run_dir) if primary else None
        if moved is not None:
            print_fn(f"checkpoint.overwrite: moved the previous run in {run_dir} aside to {moved}")
        ckpt = Checkpointer(run_dir, every=c.every, keep=c.keep)
    else:
        ckpt = Checkpointer(run_dir, every=c.every, keep=c.keep)
        with warnings.catch_warnings():  # a fallback is already reported through print_fn
            warnings.simplefilter("ignore", UserWarning)
            restored = ckpt.restore_latest(state, log=print_fn) if c.resume else None
        if restored is not None:
            state, meta = restored
            if layout is None:  # a mesh's restore target already carries its shardings
                state = _place(state, layout)
            for line in _config_differences(meta["config"], to_dict(cfg)):
                print_fn(f"warning: config differs from the checkpoint's: {line}")
            print_fn(f"resumed from step {int(state.step)} (data position "
                     f"{meta['data_position']})")
        elif c.init_from:
            state = _place(_init_from(cfg, state, optimizer, print_fn), layout)
    stack.callback(ckpt.close)
    stop.check()

    # Every check has passed: from here on the run writes into its directory.
    first = int(state.step)
    if primary:
        save_config(cfg, run_dir / "config.yaml")
    metrics = RunLog(run_dir, t.trackers, config=to_dict(cfg), enabled=primary,
                     resume_step=first if restored is not None else None)
    stack.callback(metrics.close)
    # A resumed run validates again at its first step; the trackers other than metrics.jsonl
    # keep what the earlier process logged there (no step is logged twice).
    logged_start_eval = restored is not None and any(
        r.get("kind") == "eval" and r.get("step") == first for r in metrics.read())
    if primary:
        dropped = metrics.metrics.truncate(first)
        if dropped:
            print_fn(f"metrics.jsonl: dropped {dropped} line(s) written after step {first}, "
                     f"the step this run continues from")
        train_ds.record_in_run(run_dir)
    guard = _FiniteGuard(t.skip_nonfinite_steps, metrics, ckpt)
    saved_step = first if restored is not None else None

    def save(state, force: bool = False) -> bool:
        nonlocal saved_step
        step = int(state.step)
        if step == saved_step or not (force or ckpt.due(step)):
            return False
        guard.check()
        if not bool(state_finite(state)):
            raise guard.error(step, "the params or optimizer state hold a non-finite value")
        ckpt.save(state, cfg, force=True)
        saved_step = step
        return True

    bytes_per_token = val_ds.bytes_per_token  # before a sharded view wraps it
    if layout is not None:
        val_ds = layout.eval_view(val_ds)
    start_loss = evaluate(eval_step, state.params, val_ds, t.eval_batches)
    metrics.write(_eval_record(first, start_loss, bytes_per_token),
                  trackers=not logged_start_eval)
    print_fn(f"start validation loss {start_loss:.4f}")
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    progress = Progress(t.steps, tokens_per_step, start_step=first)
    stack.callback(progress.close)
    clock = StepClock(tokens_per_step, _flops_per_token(cfg, arch, model, state.params, print_fn),
                      flops.peak_flops(t.peak_tflops), jax.device_count())
    val_loss = start_loss
    diagnose = (diagnostics.jitted_mean_inner_losses(model) if t.diagnostics_every else None)

    def plot() -> None:
        if primary:
            metrics.flush()
            plot_losses(metrics.read(), run_dir / "loss.png")

    stop.training()
    for step in range(first, t.steps):
        tokens, mask = (_micro_batches(train_ds, step, t.grad_accum) if layout is None
                        else layout.train_batch(train_ds, step, t.grad_accum))
        state, m = train_step(state, tokens, mask)
        done = step + 1
        clock.stepped(m)
        guard.add(done, m)
        if done % t.log_every == 0 or done == t.steps or stop.signal is not None:
            guard.check()
        busy = save(state)
        val_loss, evaluated, diagnosed = _log_and_eval(cfg, done, m, state, metrics, progress,
                                                       clock, eval_step, val_ds, val_loss,
                                                       diagnose, bytes_per_token)
        if evaluated:
            plot()
        if busy or evaluated or diagnosed:
            clock.restart()  # the next steps are timed from here, without that work
        if stop.signal is not None:
            progress.close()
            print_fn(f"{stop.name}: stopping after step {done}, saving a checkpoint (send it "
                     f"again to stop at once, without saving)")
            sys.stdout.flush()
            break
    save(state, force=True)
    progress.close()
    end = {"start_val_loss": start_loss, "end_val_loss": val_loss, "run_dir": str(run_dir),
           "state": state, "stopped": stop.signal is not None, "signal": stop.signal}
    plot()
    if stop.signal is not None:
        print_fn(f"stopped by signal {stop.name} at step {int(state.step)}; checkpoint saved "
                 f"({ckpt.directory / str(int(state.step))})")
        return end
    print_fn(f"end validation loss {val_loss:.4f} (start {start_loss:.4f}, "
             f"ratio {val_loss / start_loss:.3f})")
    return end


def _place(state, layout):
    """The state on the mesh, or committed to the one device without a mesh: a fresh, a
    restored and an initialised-from state then reach ``jit`` with the same argument shardings,
    so a resumed run finds its programs in a persistent compilation cache
    (``jax_compilation_cache_dir``) instead of compiling them again."""
    if layout is not None:
        return layout.place_state(state)
    return jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def _eval_record(step: int, val_loss: float, bytes_per_token) -> dict:
    record = {"kind": "eval", "step": step, "val_loss": val_loss}
    if bytes_per_token:
        record["val_bpb"] = val_loss / math.log(2.0) / bytes_per_token
    return record


def _learning_rate(cfg, done: int) -> float:
    """The base learning rate of the update that made step ``done`` (optax counts updates
    from 0, so it is the schedule at ``done - 1``)."""
    return float(training.learning_rate_schedule(cfg.optim, cfg.train.steps)(done - 1))


def _flops_per_token(cfg, arch, model, params, print_fn) -> Optional[float]:
    """Model FLOPs per trained token (``ttt_jax.flops``), counted when MFU can be logged."""
    if flops.peak_flops(cfg.train.peak_tflops) is None:
        return None
    tokens = arch.sample_input(cfg.model, 1, cfg.data.seq_len)
    per_token = flops.train_flops_per_token(
        lambda p, x: model.apply({"params": p}, x), params, tokens)
    print_fn(f"model FLOPs per trained token: {per_token:.4g} (3 forwards)")
    return per_token


def _log_and_eval(cfg, done, m, state, metrics, progress, clock, eval_step, val_ds, val_loss,
                  diagnose, bytes_per_token):
    """Writes the step's metrics and runs validation and diagnostics when due; returns the
    latest val loss, whether it validated and whether it ran the diagnostics."""
    t = cfg.train
    evaluated = diagnosed = False
    if done % t.log_every == 0 or done == t.steps:
        loss = float(m["loss"])
        finite = math.isfinite(loss)  # not finite: a skipped step (train.skip_nonfinite_steps)
        timing = clock.read()
        metrics.write({"kind": "train", "step": done, "loss": loss if finite else None,
                       "grad_norm": float(m["grad_norm"]) if finite else None,
                       "lr": _learning_rate(cfg, done), **timing})
        progress.update(done, loss, timing.get("tokens_per_s"))
    if done % t.eval_every == 0 or done == t.steps:
        val_loss = evaluate(eval_step, state.params, val_ds, t.eval_batches)
        metrics.write(_eval_record(done, val_loss, bytes_per_token))
        evaluated = True
    if diagnose is not None and done % t.diagnostics_every == 0:
        layers = diagnose(state.params, val_ds.batch(0)[:, :-1])
        metrics.write({"kind": "ttt_diagnostics", "step": done, "layers": layers})
        diagnosed = True
    return val_loss, evaluated, diagnosed
