"""Orbax checkpoints of a training run: save every N steps, keep K, resume from the latest.

A checkpoint step holds two items: ``state`` (params, optimizer state and step, float32 as in
training) and ``meta`` (JSON: format version, the step, the data position, the seed, the full
config and a CRC-32 per array). Orbax writes each step into a temporary directory and renames it
when complete, so a failed or interrupted save never touches the previous checkpoint; an
existing step is replaced by a swap, never skipped. On restore, a step that cannot be read or
whose arrays fail their checksums is reported, and the previous good step used (the trainer
moves the corrupt one aside to ``checkpoints/corrupt-STEP``).

- ``manager``: ``Checkpointer`` (the writer), ``CheckpointError``, ``check_fits``.
- ``loading``: ``resolve``, ``load_saved``, ``load_run`` (readers), ``merge_params``.
- ``integrity``: checksums, corrupt steps, the swap, and quiet Orbax logs.
"""

from ttt_jax.checkpoint.loading import (RestoreReport, SavedRun, load_run, load_saved,
                                        merge_params, resolve)
from ttt_jax.checkpoint.manager import (CHECKPOINT_DIR, FORMAT_VERSION, CheckpointError,
                                        Checkpointer, check_fits)

__all__ = ["CHECKPOINT_DIR", "FORMAT_VERSION", "CheckpointError", "Checkpointer", "RestoreReport",
           "SavedRun", "check_fits", "load_run", "load_saved", "merge_params", "resolve"]
