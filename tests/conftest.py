"""Shared fixtures: tiny configs (B=2, d=16, H=2, b=4) used across the tests."""

import contextlib
import importlib.util
import os
from pathlib import Path

# Cheaper compiles: the suite compiles hundreds of small programs that then run for
# milliseconds, so the XLA CPU compiler's optimisations cost more than they save. Its fusion
# emitters compiled a typical test program 2.5x slower than the older emitters, and LLVM at
# -O0 is faster still (the whole suite: 25 -> 19.5 -> 14.5 minutes on 2 cores). Set before
# the first backend starts, and inherited by the subprocesses (``train.py`` runs); flags the
# environment already names are left as they are.
FAST_XLA_FLAGS = {"--xla_cpu_use_fusion_emitters": "false",
                  "--xla_backend_optimization_level": "0"}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f"{k}={v}" for k, v in FAST_XLA_FLAGS.items() if k not in _flags]).strip()
# For subprocesses that set XLA_FLAGS of their own (fake devices).
FAST_XLA = " ".join(["--xla_llvm_disable_expensive_passes=true"]
                    + [f"{k}={v}" for k, v in FAST_XLA_FLAGS.items()])

import jax  # noqa: E402
import pytest  # noqa: E402

from ttt_jax import ModelConfig, TTTConfig

# Shapes used throughout the tests: L=13 covers L % b != 0.
BATCH, DIM, HEADS, MINI_BATCH = 2, 16, 2, 4


@pytest.fixture
def tiny_ttt_config():
    return TTTConfig(model_dim=DIM, num_heads=HEADS, mini_batch_size=MINI_BATCH)


@pytest.fixture
def tiny_model_config(tiny_ttt_config):
    return ModelConfig(vocab_size=32, num_layers=2, intermediate_size=32, ttt=tiny_ttt_config)


@pytest.fixture(scope="session")
def train_main():
    """``train.py``'s ``main(argv) -> exit code``, loaded from the repository root."""
    spec = importlib.util.spec_from_file_location("train_entry",
                                                  Path(__file__).resolve().parents[1] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@contextlib.contextmanager
def compilation_cache(path, min_compile_s=0.0):
    """A persistent JAX compilation cache in ``path`` for the block: runs that train the same
    small shapes compile each program once (every program that took at least
    ``min_compile_s`` to compile is kept). Yields the settings as environment variables, for
    subprocesses."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(path),
                "jax_persistent_cache_min_compile_time_secs": min_compile_s,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    saved = {k: getattr(jax.config, k) for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    cc.reset_cache()
    try:
        yield {k.upper(): str(v) for k, v in settings.items()}
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for the whole test run, fresh each run, shared with
    the subprocesses through the environment: many tests train or apply the same small
    programs from fresh functions (and ``train.py`` runs in subprocesses), so each is compiled
    once. Compiles under half a second are not kept (the eager ops' thousands of tiny ones)."""
    with (compilation_cache(tmp_path_factory.mktemp("jax_cache"), min_compile_s=0.5) as env,
          pytest.MonkeyPatch.context() as mp):
        for k, v in env.items():
            mp.setenv(k, v)
        yield


def save_untrained_run(run_dir, run_cfg, params):
    """A step-0 checkpoint of ``run_cfg`` holding ``params`` (no training), in ``run_dir``."""
    import jax.numpy as jnp
    import optax

    from ttt_jax.checkpoint import Checkpointer
    from ttt_jax.training import TrainState

    state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                       opt_state=optax.sgd(0.1).init(params))
    ckpt = Checkpointer(run_dir, every=1, keep=1)
    assert ckpt.save(state, run_cfg, force=True)
    ckpt.close()
    return run_dir
