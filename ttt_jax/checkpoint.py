"""Orbax checkpoints of a training run: save every N steps, keep K, resume from the latest.

A checkpoint step holds two items: ``state`` (params, optimizer state and step, float32 as in
training) and ``meta`` (JSON: format version, the step, the data position, the seed and the
full config). Orbax writes each step into a temporary directory and renames it when complete,
so a failed or interrupted save never touches the previous checkpoint. On restore, a step that
cannot be read (truncated or corrupted files) is reported and the previous step is tried.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ttt_jax.config import RunConfig, to_dict

# Bumped whenever the layout of ``state`` or ``meta`` changes incompatibly.
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


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
                                             item_names=("state", "meta"))

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
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        errors = []
        for step in reversed(steps):
            try:
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
