"""Shared fixtures: tiny configs (B=2, d=16, H=2, b=4) used across the tests."""

import contextlib
import importlib.util
from pathlib import Path

import jax
import pytest

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
def compilation_cache(path):
    """A persistent JAX compilation cache in ``path`` for the block: runs that train the same
    small shapes compile each program once. Yields the settings as environment variables, for
    subprocesses."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    settings = {"jax_compilation_cache_dir": str(path),
                "jax_persistent_cache_min_compile_time_secs": 0,
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
