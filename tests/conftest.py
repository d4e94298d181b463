"""Shared fixtures: tiny configs (B=2, d=16, H=2, b=4) used across the tests."""

import importlib.util
from pathlib import Path

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
