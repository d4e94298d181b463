"""Orbax checkpoints of a training run: save every N steps, keep K, resume from the latest.

A checkpoint step holds two items: ``state`` (params, optimizer state and step, float32 as in
training) and ``meta`` (JSON: format version, the step, the data position, the seed and the
full config). Orbax writes each step into a temporary directory and renames it when complete,
so a failed or interrupted save never touches the previous checkpoint. On restore, a step that
cannot be read (truncated or corrupted files) is reported and the previous step is tried.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ttt_jax.config import RunConfig, to_dict
from ttt_jax.tree import flatten

# Bumped whenever the layout of ``state`` or ``meta`` changes incompatibly.
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored, or it does not fit the model."""


def _item_handlers():
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _shapes(tree) -> dict[str, tuple]:
    """``path -> (shape, dtype)`` of every array leaf."""
    return {k: (tuple(leaf.shape), str(leaf.dtype)) for k, leaf in flatten(tree).items()}


def check_fits(saved: dict[str, tuple], target: dict[str, tuple], where: str) -> None:
    """Raises ``CheckpointError`` naming every key whose shape or dtype (or presence) differs.

    Restoring never casts silently: a float32 model does not load a bfloat16 checkpoint.
    """
    problems = [f"{k}: checkpoint {saved[k][1]}{list(saved[k][0])} vs model "
                f"{target[k][1]}{list(target[k][0])}"
                for k in sorted(set(saved) & set(target)) if saved[k] != target[k]]
    problems += [f"{k}: missing from the checkpoint" for k in sorted(set(target) - set(saved))]
    problems += [f"{k}: not in the model" for k in sorted(set(saved) - set(target))]
    if problems:
        raise CheckpointError(f"{where} does not fit the model (use checkpoint.init_from for a "
                              f"different model):\n" + "\n".join(problems[:20])
                              + (f"\n... {len(problems) - 20} more" if len(problems) > 20 else ""))


class Checkpointer:
    """Saves and restores a run's ``TrainState`` under ``run_dir/checkpoints``.

    Args:
      run_dir: the run directory.
      every: save every this many steps (``save`` with ``force=True`` always saves).
      keep: how many recent steps to keep.
    """

    def __init__(self, run_dir: str | Path, *, every: int, keep: int):
        self.directory = Path(run_dir).resolve() / CHECKPOINT_DIR
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_item_handlers())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state, cfg: RunConfig, *, force: bool = False) -> bool:
        """Saves ``state`` at its step if due (or ``force``); returns whether it saved."""
        step = int(state.step)
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        meta = {"format_version": FORMAT_VERSION, "step": step, "data_position": step,
                "seed": cfg.train.seed, "config": to_dict(cfg)}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()
        return True

    def restore_latest(self, target, *, log=print) -> Optional[tuple[Any, dict]]:
        """Restores the newest readable step into the structure of ``target``.

        Returns ``(state, meta)``, or ``None`` when the directory holds no checkpoint. A step
        that fails to restore is reported through ``log`` and the one before it is tried.
        """
        steps = self.steps()
        if not steps:
            return None
        # The abstract target carries the target's shardings: restore places arrays as the model
        # wants them, never as they were saved.
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        errors = []
        for step in reversed(steps):
            try:
                saved = _shapes(self.manager.item_metadata(step)["state"])
            except Exception as e:  # noqa: BLE001 -- unreadable metadata: a corrupted step
                saved = None
                meta_error = e
            if saved is not None:
                check_fits(saved, _shapes(target), f"checkpoint step {step} in {self.directory}")
            try:
                if saved is None:
                    raise meta_error
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous"
                msg = f"checkpoint step {step} in {self.directory} could not be restored: " \
                      f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(msg)
                errors.append(msg)
                continue
            meta = restored["meta"]
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} has format "
                                      f"version {version}; this code reads {FORMAT_VERSION}")
            if errors:
                warnings.warn(f"restored the previous good step {step}: " + "; ".join(errors))
            return restored["state"], meta
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n"
                              + "\n".join(errors))

    def close(self) -> None:
        self.manager.close()


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
    """A training checkpoint read for inference: its run config, params and step."""

    config: Any
    params: Any
    step: int
    meta: dict

    @property
    def architecture(self):
        from ttt_jax import registry

        return registry.of(self.config)


def load_run(path: str | Path) -> SavedRun:
    """The run config (of its architecture), params and step of any checkpoint path that
    ``resolve`` accepts; errors name the path."""
    from ttt_jax import registry

    directory, step = resolve(path)
    state, meta = load_saved(directory, step)
    if "config" not in meta or "params" not in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a training checkpoint of this "
                              f"project (no config in its meta or no params in its state)")
    try:
        cfg = registry.run_config_from_dict(meta["config"], where=f"checkpoint {str(path)!r}")
    except ValueError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a config this code cannot read: "
                              f"{e}") from None
    return SavedRun(cfg, state["params"], int(meta.get("step", -1)), meta)


def load_saved(run_dir: str | Path, step: Optional[int] = None) -> tuple[dict, dict]:
    """Reads a checkpoint's raw state dict and meta without a target (any model's checkpoint).

    Args:
      run_dir: any path ``resolve`` accepts (a run directory, its ``checkpoints``, or a step).
      step: the step to read; by default the one the path names, else the latest.
    """
    directory, named = resolve(run_dir)
    step = named if step is None else step
    manager = ocp.CheckpointManager(directory, item_handlers=_item_handlers(),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint steps")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{directory} has no step {step}: it has {steps}")
    # Every array onto this process's first device, whatever mesh it was saved from (a
    # checkpoint sharded over 8 devices loads on a 1-device machine).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)["state"])
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    manager.close()
    return restored["state"], restored["meta"]
