"""Several hosts: start ``jax.distributed`` when the environment asks for it; per-host data.

``maybe_initialize(os.environ)`` runs first thing in ``train.py`` (and the scaling benchmark),
before JAX touches a device. It calls ``jax.distributed.initialize()`` when the environment
describes a multi-process job (see :func:`distributed_settings`), and does nothing otherwise,
so a single-host run is unchanged. The library itself never reads the environment: callers
pass it in. Every process then sees all devices of the job (``jax.devices()``) and its own
(``jax.local_devices()``); the mesh spans them all.

Each process reads only the rows of a batch that its own devices hold (:func:`read_rows`);
:func:`ttt_jax.sharding.Layout` turns those host-local rows into one global ``jax.Array``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

# Set to 1 to always call jax.distributed.initialize() (its own cluster auto-detection: Cloud
# TPU pods, SLURM, Open MPI, Kubernetes), or to 0 to never call it.
ENV_SWITCH = "TTT_JAX_DISTRIBUTED"
# Explicit launch (any cluster): the coordinator's host:port, the process count and this
# process's id. JAX itself also reads JAX_COORDINATOR_ADDRESS.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: expected an "
                         f"integer") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: expected an "
                         f"integer >= 0")
    return value


def distributed_settings(env: Mapping[str, str]) -> Optional[dict[str, Any]]:
    """The ``jax.distributed.initialize`` arguments the environment asks for, or None.

    In order:

    - ``TTT_JAX_DISTRIBUTED=0``: never (None); ``TTT_JAX_DISTRIBUTED=1``: always, with JAX's
      own auto-detection filling whatever is not given below.
    - ``JAX_COORDINATOR_ADDRESS=host:port`` (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``,
      which must then both be set): an explicit launch, e.g. one process per GPU host.
    - ``SLURM_NTASKS`` > 1 with the SLURM job variables (``srun``), ``OMPI_COMM_WORLD_SIZE`` > 1
      (``mpirun``), or ``TPU_WORKER_HOSTNAMES`` naming more than one host (a TPU pod slice):
      JAX's auto-detection.

    Args:
      env: the environment, e.g. ``os.environ``.

    Returns:
      ``{"coordinator_address", "num_processes", "process_id"}`` (values may be None: JAX
      detects them) or None for a single-process run.
    """
    switch = env.get(ENV_SWITCH, "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"environment variable {ENV_SWITCH}={switch!r} is invalid: expected 0 "
                         f"(never initialise jax.distributed) or 1 (always)")
    if switch == "0":
        return None
    settings = {"coordinator_address": env.get(ENV_COORDINATOR) or None,
                "num_processes": _env_int(env, ENV_NUM_PROCESSES),
                "process_id": _env_int(env, ENV_PROCESS_ID)}
    if settings["coordinator_address"] is not None:
        missing = [name for name, key in ((ENV_NUM_PROCESSES, "num_processes"),
                                          (ENV_PROCESS_ID, "process_id"))
                   if settings[key] is None]
        if missing and switch != "1":
            raise ValueError(f"environment variable {ENV_COORDINATOR} is set but "
                             f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                             f"not: expected all three for an explicit multi-process launch "
                             f"(or {ENV_SWITCH}=1 to let JAX detect the rest)")
        n, pid = settings["num_processes"], settings["process_id"]
        if n is not None and pid is not None and not (n >= 1 and pid < n):
            raise ValueError(f"environment variable {ENV_PROCESS_ID}={pid} is invalid: expected "
                             f"an integer in [0, {ENV_NUM_PROCESSES}={n})")
        return settings
    if switch == "1":
        return settings
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if (_env_int(env, "SLURM_NTASKS") or 0) > 1 and all(k in env for k in slurm):
        return settings
    if (_env_int(env, "OMPI_COMM_WORLD_SIZE") or 0) > 1:
        return settings
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return settings
    return None


def maybe_initialize(env: Mapping[str, str], *, log=print) -> bool:
    """Calls ``jax.distributed.initialize`` if :func:`distributed_settings` asks for it.

    Must run before anything touches a JAX device; a second call is a no-op. Returns whether
    ``jax.distributed`` is running (a multi-process job).
    """
    settings = distributed_settings(env)
    import jax

    if settings is None or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    kwargs = {k: v for k, v in settings.items() if v is not None}
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize({kwargs}) failed: {e}. It must run "
                           f"before any JAX computation in the process") from e
    log(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local of {jax.device_count()} devices")
    return True


def is_primary() -> bool:
    """True on process 0 (the one that prints and writes run outputs)."""
    import jax

    return jax.process_index() == 0


def read_rows(ds, step: int, rows: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Rows ``rows`` of batch ``step`` (and of its loss mask) without building the whole batch.

    Equal to ``ds.batch(step)[rows]`` and ``ds.loss_mask(step)[rows]``. A windowed corpus reads
    only the windows of those rows (a host touches only its slice of the token file); other
    sources are cheap to generate and are sliced.

    Args:
      ds: a :class:`ttt_jax.data.base.Dataset`.
      step: the batch index.
      rows: int indices into the batch, ``[n]``.

    Returns:
      ``(tokens [n, L+1] int32, mask [n, L] float32 or None)``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    from ttt_jax.data.base import WindowDataset

    if isinstance(ds, WindowDataset) and type(ds).batch is WindowDataset.batch:
        starts = ds.window_starts(step)[rows]
        offsets = starts[:, None] + np.arange(ds.seq_len + 1)  # [n, L+1]
        tokens = np.asarray(ds.tokens[offsets], dtype=np.int32)
    else:
        tokens = np.asarray(ds.batch(step))[rows]
    mask = ds.loss_mask(step)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)[rows]
    return tokens, mask
