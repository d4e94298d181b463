"""Checkpoints: exact resume after SIGKILL, fallback past a corrupted latest step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ttt_jax import ModelConfig, RunConfig, TTTConfig, save_config
from ttt_jax.checkpoint import CheckpointError, Checkpointer
from ttt_jax.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from ttt_jax.trainer import run

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def config(run_dir, steps=STEPS, every=1) -> RunConfig:
    ttt = TTTConfig(model_dim=16, num_heads=2, mini_batch_size=4)
    return RunConfig(
        model=ModelConfig(vocab_size=256, num_layers=1, intermediate_size=32, ttt=ttt),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2),
        data=DataConfig(source="bytes", seq_len=16, batch_size=4),
        train=TrainConfig(steps=steps, eval_every=1000, eval_batches=1, log_every=1000,
                          run_dir=str(run_dir)),
        checkpoint=CheckpointConfig(every=every, keep=3))


def quiet(*args):
    pass


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    straight = run(config(tmp_path / "straight"), print_fn=quiet)["state"]

    run_dir = tmp_path / "killed"
    cfg = config(run_dir)
    save_config(cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config",
                             str(tmp_path / "killed.yaml")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = run_dir / "checkpoints"
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
        if steps and max(steps) >= 3:
            proc.send_signal(signal.SIGKILL)
            killed_after = max(steps)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_after is not None, proc.stderr.read().decode()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    assert killed_after < STEPS

    resumed = run(cfg, print_fn=quiet)
    assert int(resumed["state"].step) == STEPS
    leaves_a = jax.tree.leaves(straight)
    leaves_b = jax.tree.leaves(resumed["state"])
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_corrupted_latest_falls_back_to_previous_good_step(tmp_path):
    cfg = config(tmp_path / "run", steps=6, every=2)
    state = run(cfg, print_fn=quiet)["state"]
    ckpt = Checkpointer(tmp_path / "run", every=2, keep=3)
    assert ckpt.steps() == [2, 4, 6]
    for f in (ckpt.directory / "6").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])  # truncate every file
    messages = []
    with pytest.warns(UserWarning, match="previous good step 4"):
        restored, meta = ckpt.restore_latest(state, log=messages.append)
    assert int(restored.step) == 4 and meta["step"] == 4
    assert any("step 6" in m and "could not be restored" in m for m in messages)

    for step in (2, 4):
        for f in (ckpt.directory / str(step)).rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.restore_latest(state, log=quiet)
    ckpt.close()
