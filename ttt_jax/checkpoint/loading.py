"""Reading checkpoints for inference and grafting: paths, raw states, runs, merging trees."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from ttt_jax.checkpoint import integrity
from ttt_jax.checkpoint.manager import CHECKPOINT_DIR, CheckpointError, first_line, item_handlers
from ttt_jax.tree import flatten


@dataclasses.dataclass
class RestoreReport:
    """How a saved params tree matched the target model's tree (keys are ``a/b/c`` paths)."""

    loaded: list[str]
    missing: list[str]  # in the model, not in the checkpoint: kept at their initial values
    unexpected: list[str]  # in the checkpoint, not in the model: ignored
    mismatched: list[str]  # in both, different shape or dtype: kept at their initial values

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"restored {len(self.loaded)} arrays"]
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            lines.append(f"{name} ({len(keys)}): " + (", ".join(keys) if keys else "none"))
        return "\n".join(lines)


def merge_params(saved, target, *, strict: bool = False):
    """Fills ``target``'s tree with every array of ``saved`` that matches by path, shape, dtype.

    Args:
      saved: a params tree read from a checkpoint (possibly of a different model).
      target: freshly initialised params of the model to restore into.
      strict: refuse (``ValueError`` with the report) unless the trees match exactly.

    Returns:
      ``(params, report)``: ``target``'s structure, saved values where they match.
    """
    saved_flat, target_flat = flatten(saved), flatten(target)
    report = RestoreReport([], [], sorted(set(saved_flat) - set(target_flat)), [])
    merged = {}
    for key, init in target_flat.items():
        value = saved_flat.get(key)
        if value is None:
            report.missing.append(key)
            merged[key] = init
        elif tuple(value.shape) != tuple(init.shape) or value.dtype != init.dtype:
            report.mismatched.append(f"{key} {value.dtype}{list(value.shape)} vs "
                                     f"{init.dtype}{list(init.shape)}")
            merged[key] = init
        else:
            report.loaded.append(key)
            merged[key] = jax.numpy.asarray(value)
    if strict and not report.exact:
        raise ValueError(f"strict restore refused: the checkpoint does not match the model\n{report}")
    leaves = [merged[k] for k in target_flat]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), report


def resolve(path: str | Path) -> tuple[Path, Optional[int]]:
    """``(checkpoints directory, step or None for the latest)`` of a user-given path.

    Accepted: ``RUN_DIR``, ``RUN_DIR/checkpoints``, ``RUN_DIR/checkpoints/STEP`` and
    ``RUN_DIR/STEP`` (a step of ``RUN_DIR``). Raises ``FileNotFoundError`` naming the path and
    the accepted forms otherwise.
    """
    p = Path(path)
    forms = ("expected RUN_DIR, RUN_DIR/checkpoints, RUN_DIR/checkpoints/STEP or RUN_DIR/STEP")
    if p.name.isdigit() and not p.exists() and (p.parent / CHECKPOINT_DIR).is_dir():
        return (p.parent / CHECKPOINT_DIR).resolve(), int(p.name)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist: {forms}")
    if p.is_dir() and p.name.isdigit() and p.parent.name == CHECKPOINT_DIR:
        return p.parent.resolve(), int(p.name)
    if (p / CHECKPOINT_DIR).is_dir():
        return (p / CHECKPOINT_DIR).resolve(), None
    if p.is_dir() and p.name == CHECKPOINT_DIR:
        return p.resolve(), None
    raise FileNotFoundError(f"checkpoint {str(path)!r} is not a recognised checkpoint: {forms}")


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """A training checkpoint read for inference: its run config, params and step, and the run
    directory it belongs to (``None`` when its checkpoints lie outside one)."""

    config: Any
    params: Any
    step: int
    meta: dict
    run_dir: Optional[Path] = None

    @property
    def architecture(self):
        from ttt_jax import registry

        return registry.of(self.config)


def load_run(path: str | Path, *, log: Optional[Callable[[str], None]] = None) -> SavedRun:
    """The run config (of its architecture), params and step of any checkpoint path that
    ``resolve`` accepts; errors name the path. A corrupt latest step falls back to the previous
    good one, as in ``load_saved``."""
    from ttt_jax import registry

    directory, step = resolve(path)
    state, meta = load_saved(directory, step, log=log)
    if "config" not in meta or "params" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a training checkpoint of this "
                              f"project (no config in its meta or no params in its state)")
    try:
        cfg = registry.run_config_from_dict(meta["config"], where=f"checkpoint {str(path)!r}")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a config this code cannot read: "
                              f"{e}") from None
    run_dir = directory.parent if directory.name == CHECKPOINT_DIR else None
    return SavedRun(cfg, state["params"], int(meta.get("step", -1)), meta, run_dir)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _read_step(manager, directory: Path, step: int) -> tuple[dict, dict]:
    """One step's raw state and meta, its checksums verified; ``CheckpointError`` if corrupt."""
    try:
        # Every array onto this process's first device, whatever mesh it was saved from (a
        # checkpoint sharded over 8 devices loads on a 1-device machine).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        bad = integrity.mismatches(restored["state"], restored["meta"])
    except Exception as e:  # noqa: BLE001 -- any read failure: the step is unreadable
        raise CheckpointError(f"checkpoint step {step} in {directory} could not be read: "
                              f"{first_line(e)}") from None
    if bad:
        raise CheckpointError(f"checkpoint step {step} in {directory} is corrupt: "
                              f"{integrity.describe_mismatch(bad)}")
    return restored["state"], restored["meta"]


def load_saved(run_dir: str | Path, step: Optional[int] = None, *,
               log: Optional[Callable[[str], None]] = None) -> tuple[dict, dict]:
    """Reads a checkpoint's raw state dict and meta without a target (any model's checkpoint).

    Args:
      run_dir: any path ``resolve`` accepts (a run directory, its ``checkpoints``, or a step).
      step: the step to read; by default the one the path names, else the latest.
      log: where a fallback is reported (default: a ``warning: ...`` line on stderr).

    Without a named step, a latest step that is unreadable or fails its checksums is reported
    and the previous good one read instead (the directory is left as it is); a named step that
    is corrupt is an error. ``CheckpointError`` (one line) when no step can be read.
    """
    integrity.quiet_orbax()
    log = _warn if log is None else log
    directory, named = resolve(run_dir)
    step = named if step is None else step
    manager = ocp.CheckpointManager(directory, item_handlers=item_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{directory} holds no checkpoint steps")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{directory} has no step {step}: it has {steps}")
        if step is not None:
            return _read_step(manager, directory, step)
        errors = []
        for candidate in reversed(steps):
            try:
                state, meta = _read_step(manager, directory, candidate)
            except CheckpointError as e:
                errors.append(str(e))
                continue
            if errors:
                log(f"{'; '.join(errors)}; using the previous good step {candidate}")
            return state, meta
        raise CheckpointError(f"no checkpoint in {directory} could be read: " + "; ".join(errors))
    finally:
        manager.close()
