"""Checkpoints: exact resume after SIGKILL, fallback past a corrupted latest step."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ttt_jax import ModelConfig, RunConfig, TTTConfig, registry, save_config
from ttt_jax.checkpoint import CheckpointError, Checkpointer
from ttt_jax.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from ttt_jax.trainer import run

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


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


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """One 6-step run checkpointed at steps 2, 4, 6; tests work on copies of its directory."""
    root = tmp_path_factory.mktemp("six")
    cfg = config(root / "run", steps=6, every=2)
    return cfg, run(cfg, print_fn=quiet)["state"], root / "run"


def copy_run(six_steps, tmp_path):
    import shutil

    cfg, state, src = six_steps
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(dst))), state


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
        if steps and max(steps) >= 2:
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


def test_corrupted_latest_falls_back_to_previous_good_step(six_steps, tmp_path):
    cfg, state = copy_run(six_steps, tmp_path)
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


def test_failed_save_keeps_previous_checkpoints(six_steps, tmp_path):
    cfg, state = copy_run(six_steps, tmp_path)
    ckpt = Checkpointer(tmp_path / "run", every=1, keep=3)
    assert ckpt.steps() == [2, 4, 6]
    broken = state.replace(step=state.step + 1,
                           params={**state.params, "not_an_array": object()})
    with pytest.raises(Exception):
        ckpt.save(broken, cfg, force=True)
    assert ckpt.steps() == [2, 4, 6]
    restored, meta = ckpt.restore_latest(state, log=quiet)
    assert meta["step"] == 6
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, steps=100000, every=100000)
    save_config(cfg, tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config",
                             str(tmp_path / "run.yaml")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(2.0)  # inside the training loop
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    steps = Checkpointer(run_dir, every=1, keep=3).steps()
    assert len(steps) == 1 and 0 < steps[0] < 100000


FIXTURE = REPO / "tests" / "fixtures" / "ckpt_v1"


def test_committed_format_v1_checkpoint_keeps_loading():
    """A checkpoint written by format version 1 (TTT-MLP, RoPE, pre-conv) must keep restoring
    into the model its stored config describes, with the optimizer state, exactly typed."""
    from ttt_jax import from_dict
    from ttt_jax.checkpoint import FORMAT_VERSION, load_saved

    state, meta = load_saved(FIXTURE)
    assert meta["format_version"] == 1 <= FORMAT_VERSION and meta["step"] == 3
    cfg = from_dict(RunConfig, meta["config"])
    arch = registry.of(cfg)
    optimizer = arch.make_optimizer(cfg)
    target = jax.jit(lambda k: arch.init_state(cfg, optimizer, k))(jax.random.PRNGKey(1))
    ckpt = Checkpointer(FIXTURE, every=1, keep=1)
    restored, _ = ckpt.restore_latest(target, log=quiet)
    ckpt.close()
    assert int(restored.step) == 3
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert a.dtype == b.dtype and a.shape == b.shape
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state["params"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    logits = jax.jit(arch.build_model(cfg.model).apply)({"params": restored.params},
                                                        np.zeros((1, 6), np.int32))
    assert logits.shape == (1, 6, cfg.model.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_restore_refuses_a_dtype_or_shape_mismatch_by_name(six_steps):
    """No silent cast: a bfloat16 model does not load the float32 checkpoint (and vice versa)."""
    from ttt_jax.checkpoint import CheckpointError

    _, state, run_dir = six_steps
    ckpt = Checkpointer(run_dir, every=1, keep=3)
    bf16 = state.replace(params=jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), state.params))
    with pytest.raises(CheckpointError, match=r"params/embed_tokens/embedding: checkpoint "
                                              r"float32\[256, 16\] vs model bfloat16\[256, 16\]"):
        ckpt.restore_latest(bf16, log=quiet)
    ckpt.close()
