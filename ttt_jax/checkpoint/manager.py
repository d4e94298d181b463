"""The writer of a run's checkpoints: save every N steps, keep K, restore the newest good step."""

from __future__ import annotations

import dataclasses
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ttt_jax.checkpoint import integrity
from ttt_jax.config import RunConfig, to_dict
from ttt_jax.tree import flatten

# Bumped whenever the layout of ``state`` or ``meta`` changes incompatibly (the optional
# ``checksums`` entry of ``meta`` is not such a change: steps without it still load).
FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored, or it does not fit the model."""


def item_handlers():
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def stored_tree(state) -> Any:
    """What a checkpoint holds of ``state``: a dataclass state (``TrainState``) as the dict of
    its fields, leaving out a field that is ``None`` (the ``carry`` of a model that carries
    nothing), so such checkpoints keep the layout ``{step, params, opt_state}``."""
    if dataclasses.is_dataclass(state):
        fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        return {k: v for k, v in fields.items() if v is not None}
    return state


def from_stored_tree(target, tree) -> Any:
    """``tree`` (restored in the layout of ``stored_tree(target)``) in ``target``'s type."""
    return target.replace(**tree) if dataclasses.is_dataclass(target) else tree


def shapes(tree) -> dict[str, tuple]:
    """``path -> (shape, dtype)`` of every array leaf."""
    return {k: (tuple(leaf.shape), str(leaf.dtype)) for k, leaf in flatten(tree).items()}


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception in one line: its first line, without tensorstore's
    spec dump, at most ``limit`` characters."""
    text = str(e).strip()
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", text.splitlines()[0] if text else "")
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return f"{type(e).__name__}: {text}"


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
        hint = ""
        if any(p.startswith("carry/") for p in problems):
            hint = ("\n(carry/ is the state carried between steps with ttt.persistent_states, one "
                    "row per data.batch_size row: resume with the checkpoint's data.batch_size "
                    "and ttt.persistent_states, or start a new run with checkpoint.init_from)")
        raise CheckpointError(f"{where} does not fit the model (use checkpoint.init_from for a "
                              f"different model):\n" + "\n".join(problems[:20])
                              + (f"\n... {len(problems) - 20} more" if len(problems) > 20 else "")
                              + hint)


def _primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """All processes of a multi-process job reach this point before any goes on."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


class Checkpointer:
    """Saves and restores a run's ``TrainState`` under ``run_dir/checkpoints``.

    A save writes the state and its meta (with a checksum per array) into a temporary
    directory that Orbax renames when complete. A step that already exists is replaced, never
    skipped: the new step is written under ``checkpoints/.staging`` and swapped in by two
    renames (a crash between them is repaired when the directory is next opened); saving the
    very state a step already holds (same checksums) leaves it as it is.

    Args:
      run_dir: the run directory.
      every: save every this many steps (``save`` with ``force=True`` always saves).
      keep: how many recent steps to keep.
    """

    def __init__(self, run_dir: str | Path, *, every: int, keep: int):
        integrity.quiet_orbax()
        self.directory = Path(run_dir).resolve() / CHECKPOINT_DIR
        self.every = every
        if _primary():
            integrity.recover_swap(self.directory)
        _sync("ttt_jax_checkpoint_open")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=item_handlers())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest(self) -> Optional[int]:
        """The newest step on disk, or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def due(self, step: int) -> bool:
        """Whether ``step`` is one that ``save`` writes without ``force``."""
        return step % self.every == 0

    def save(self, state, cfg: RunConfig, *, force: bool = False) -> bool:
        """Saves ``state`` at its step if due (or ``force``); returns whether that step now
        holds ``state`` (False only when the step was not due)."""
        step = int(state.step)
        if not force and not self.due(step):
            return False
        meta = {"format_version": FORMAT_VERSION, "step": step, "data_position": step,
                "seed": cfg.train.seed, "config": to_dict(cfg),
                integrity.CHECKSUM_KEY: integrity.checksum_meta(state)}
        if step not in self.manager.all_steps():
            self._write(self.manager, step, state, meta)
            return True
        on_disk = self._stored_meta(step)
        if on_disk is not None and integrity.stored_checksums(on_disk) == \
                meta[integrity.CHECKSUM_KEY]["arrays"]:
            return True  # this very state is already there
        self._replace(step, state, meta)
        return True

    @staticmethod
    def _write(manager, step: int, state, meta: dict) -> None:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(stored_tree(state)), meta=ocp.args.JsonSave(meta)),
            force=True)
        manager.wait_until_finished()

    def _stored_meta(self, step: int) -> Optional[dict]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 -- an unreadable step is simply replaced
            return None

    def _replace(self, step: int, state, meta: dict) -> None:
        """Writes ``step`` anew under ``.staging``, then swaps it in for the existing one."""
        staging = self.directory / integrity.STAGING
        if _primary():
            shutil.rmtree(staging, ignore_errors=True)
        _sync("ttt_jax_checkpoint_stage")
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        staged = ocp.CheckpointManager(staging, options=options, item_handlers=item_handlers())
        try:
            self._write(staged, step, state, meta)
        finally:
            staged.close()
        _sync("ttt_jax_checkpoint_staged")
        if _primary():
            integrity.swap_in(self.directory, staging / str(step), step)
            shutil.rmtree(staging, ignore_errors=True)
        _sync("ttt_jax_checkpoint_swapped")
        self.manager.reload()

    def restore_latest(self, target, *, log=print) -> Optional[tuple[Any, dict]]:
        """Restores the newest good step into the structure of ``target``.

        Returns ``(state, meta)``, or ``None`` when the directory holds no checkpoint. A step
        that cannot be read, or whose arrays do not match their checksums, is reported through
        ``log`` and the one before it is tried; once a good step is restored, the corrupt newer
        ones are moved aside to ``checkpoints/corrupt-STEP`` (so the next save is the latest).
        When no step is good, nothing is moved and ``CheckpointError`` is raised.
        """
        steps = self.steps()
        if not steps:
            return None
        # The abstract target carries the target's shardings: restore places arrays as the model
        # wants them, never as they were saved.
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, stored_tree(target))
        errors, corrupt = [], []
        for step in reversed(steps):
            where = f"checkpoint step {step} in {self.directory}"
            try:
                saved = shapes(self.manager.item_metadata(step)["state"])
            except Exception as e:  # noqa: BLE001 -- unreadable metadata: a corrupted step
                saved, meta_error = None, e
            if saved is not None:
                check_fits(saved, shapes(target), where)
            try:
                if saved is None:
                    raise meta_error
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                bad = integrity.mismatches(restored["state"], restored["meta"])
                if bad:
                    raise CheckpointError(integrity.describe_mismatch(bad))
            except Exception as e:  # noqa: BLE001 -- any read failure means "try the previous"
                msg = f"{where} could not be restored: {first_line(e)}"
                log(msg)
                errors.append(msg)
                corrupt.append(step)
                continue
            meta = restored["meta"]
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise CheckpointError(f"{where} has format version {version}; this code reads "
                                      f"{FORMAT_VERSION}")
            if corrupt:
                moved = self._move_corrupt(corrupt)
                log(f"moved the corrupt step(s) aside: {', '.join(moved)}")
                warnings.warn(f"restored the previous good step {step}: " + "; ".join(errors))
            return from_stored_tree(target, restored["state"]), meta
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored: "
                              + "; ".join(errors))

    def _move_corrupt(self, steps: list[int]) -> list[str]:
        moved = []
        if _primary():
            moved = [str(integrity.move_corrupt(self.directory, s)) for s in steps]
        _sync("ttt_jax_checkpoint_corrupt")
        self.manager.reload()
        return moved or [f"{self.directory}/{integrity.CORRUPT_PREFIX}{s}" for s in steps]

    def close(self) -> None:
        self.manager.close()
