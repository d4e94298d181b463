"""Checkpoints: exact resume after SIGKILL (from the right step, training only what is left),
keep-last-K pruning, fallback past a corrupted latest step to the previous step's saved values,
refusal of a shape or dtype mismatch, ``checkpoint.init_from`` / ``strict`` through a run, and
the committed format-v1 fixture against values recorded from it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
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

from conftest import compilation_cache

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def config(run_dir, steps=STEPS, every=1, keep=3, log_every=1000, num_layers=1,
           **checkpoint) -> RunConfig:
    ttt = TTTConfig(model_dim=16, num_heads=2, mini_batch_size=4)
    return RunConfig(
        model=ModelConfig(vocab_size=256, num_layers=num_layers, intermediate_size=32, ttt=ttt),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=2),
        data=DataConfig(source="bytes", seq_len=16, batch_size=4),
        train=TrainConfig(steps=steps, eval_every=1000, eval_batches=1, log_every=log_every,
                          run_dir=str(run_dir)),
        checkpoint=CheckpointConfig(every=every, keep=keep, **checkpoint))


def quiet(*args, **kwargs):
    pass


def collect(lines):
    """A ``print_fn`` that keeps what the trainer prints."""
    return lambda *args, **kwargs: lines.append(" ".join(map(str, args)))


def steps_on_disk(run_dir) -> list[int]:
    """The step directories under ``run_dir/checkpoints``, read from the file system."""
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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
    """A run SIGKILLed after its step-N checkpoint resumes from step N, trains only steps
    N+1..12 and ends bit-identical to a straight run. Both save every step and keep 2. The
    three runs share a compilation cache: the killed process and the resumed run load the
    straight run's programs instead of compiling them again."""
    with compilation_cache(tmp_path / "jax_cache") as cache_env:
        _sigkill_then_resume(tmp_path, cache_env)


def _sigkill_then_resume(tmp_path, cache_env):
    straight = run(config(tmp_path / "straight", keep=2, log_every=1), print_fn=quiet)["state"]
    assert steps_on_disk(tmp_path / "straight") == [STEPS - 1, STEPS]  # keep-last-K pruning

    run_dir = tmp_path / "killed"
    cfg = config(run_dir, keep=2, log_every=1)
    save_config(cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config",
                             str(tmp_path / "killed.yaml")], cwd=REPO,
                            env={**os.environ, **cache_env},
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
    on_disk = steps_on_disk(run_dir)
    resume_step = max(on_disk)
    assert killed_after <= resume_step < STEPS and len(on_disk) <= 2

    printed = []
    resumed = run(cfg, print_fn=collect(printed))
    assert int(resumed["state"].step) == STEPS
    assert [int(n) for line in printed for n in re.findall(r"resumed from step (\d+)", line)] \
        == [resume_step], printed
    # The resumed run's rows start with its validation at resume_step; it trained only the rest.
    rows = metrics(run_dir)
    starts = [i for i, r in enumerate(rows) if r["kind"] == "eval" and r["step"] == resume_step]
    assert starts, rows
    trained = [r["step"] for r in rows[starts[-1]:] if r["kind"] == "train"]
    assert trained == list(range(resume_step + 1, STEPS + 1))
    assert steps_on_disk(run_dir) == [STEPS - 1, STEPS]
    leaves_a = jax.tree.leaves(straight)
    leaves_b = jax.tree.leaves(resumed["state"])
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_corrupted_latest_falls_back_to_previous_good_step(six_steps, tmp_path):
    from ttt_jax.checkpoint import load_saved

    cfg, state = copy_run(six_steps, tmp_path)
    saved = {step: load_saved(tmp_path / "run", step=step)[0] for step in (2, 4)}  # intact
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
    # The values are step 4's as saved (not step 2's, not the target's).
    got, want = jax.tree.leaves(restored.params), jax.tree.leaves(saved[4]["params"])
    assert len(got) == len(want) == len(jax.tree.leaves(state.params))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for other in (jax.tree.leaves(saved[2]["params"]), jax.tree.leaves(state.params)):
        assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, other))

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
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM, after saving
    assert "stopped by signal" in out
    steps = Checkpointer(run_dir, every=1, keep=3).steps()
    assert len(steps) == 1 and 0 < steps[0] < 100000


FIXTURE = REPO / "tests" / "fixtures" / "ckpt_v1"

# Recorded from tests/fixtures/ckpt_v1 at format version 1 (the checkpoint as committed, read
# with load_saved): per params leaf, its sum and its sum of squares (float64), ...
FIXTURE_PARAM_SUMS = {
    "embed_tokens/embedding": (0.3519650312, 0.04409045776),
    "layers_0/conv/conv/bias": (-1.182886481, 0.5598311011),
    "layers_0/conv/conv/kernel": (-2.611479521, 2.322268597),
    "layers_0/conv/norm/weight": (8.0, 8.0),
    "layers_0/ffn_norm/weight": (8.0, 8.0),
    "layers_0/mlp/down_proj/kernel": (0.3623138193, 0.04619988998),
    "layers_0/mlp/gate_proj/kernel": (0.128764565, 0.05807943206),
    "layers_0/mlp/up_proj/kernel": (-0.1653001995, 0.05216402015),
    "layers_0/seq_modeling_block/W1": (-0.1675758267, 0.05019220552),
    "layers_0/seq_modeling_block/W2": (-0.1322361744, 0.04415898106),
    "layers_0/seq_modeling_block/b1": (0.0, 0.0),
    "layers_0/seq_modeling_block/b2": (0.0, 0.0),
    "layers_0/seq_modeling_block/k_proj/kernel": (-0.1049640411, 0.02334356936),
    "layers_0/seq_modeling_block/learnable_token_idx": (0.0, 0.0),
    "layers_0/seq_modeling_block/learnable_ttt_lr_bias": (0.0, 0.0),
    "layers_0/seq_modeling_block/learnable_ttt_lr_weight": (0.04853673861, 0.009592674526),
    "layers_0/seq_modeling_block/o_proj/kernel": (-0.3149892263, 0.0280873784),
    "layers_0/seq_modeling_block/post_norm/bias": (0.0, 0.0),
    "layers_0/seq_modeling_block/post_norm/scale": (8.0, 8.0),
    "layers_0/seq_modeling_block/q_proj/kernel": (0.2853045481, 0.02174447562),
    "layers_0/seq_modeling_block/ttt_norm_bias": (0.0, 0.0),
    "layers_0/seq_modeling_block/ttt_norm_weight": (8.0, 8.0),
    "layers_0/seq_modeling_block/v_proj/kernel": (0.09168647893, 0.02417294957),
    "layers_0/seq_norm/weight": (8.0, 8.0),
    "norm/weight": (8.0, 8.0),
}
# ... and the logits [6, 16] of the tokens FIXTURE_TOKENS under the model its config describes.
FIXTURE_TOKENS = [0, 7, 14, 5, 12, 3]
FIXTURE_LOGITS = [
    [-0.0083712, -0.1569010, -0.1083286, -0.0617854, 0.0239722, -0.0846856, 0.0574316, -0.0109130,
     -0.0075816, -0.0229443, -0.0210286, -0.0879982, -0.0124985, 0.1163602, -0.0242010, -0.0716970],
    [-0.0099950, -0.0495741, -0.0486825, 0.0590079, 0.0012262, 0.0258668, 0.1204663, -0.0615847,
     0.0146406, 0.0199335, -0.0528267, 0.0234244, 0.0329617, 0.0349494, 0.0299690, -0.0511080],
    [-0.0475504, -0.0971101, -0.0766454, -0.0761700, 0.0750389, -0.0939975, 0.0013671, 0.0696446,
     0.0282212, -0.0161203, -0.0404244, -0.0586339, -0.0438178, 0.0690738, -0.1199830, -0.0187865],
    [-0.0193790, -0.0863912, -0.0697488, 0.0111919, -0.0225843, -0.0112469, 0.1283842, -0.0098720,
     0.0241660, 0.0122121, -0.0944746, -0.0004305, 0.0281140, 0.0688804, 0.0008940, -0.0855480],
    [-0.0435535, -0.1231669, -0.0887311, -0.0509647, 0.1011682, -0.0909490, 0.0044620, 0.0454029,
     0.0371892, 0.0049467, -0.0385118, -0.0572546, -0.0355978, 0.0556309, -0.0988263, -0.0418957],
    [-0.0463914, -0.0971147, -0.0692617, -0.0570637, 0.0016300, -0.0655741, 0.0989927, 0.0431427,
     0.0010556, -0.0381082, -0.0705305, -0.0340754, -0.0451825, 0.1100636, -0.1075302, -0.0262797],
]


def test_committed_format_v1_checkpoint_keeps_loading():
    """A checkpoint written by format version 1 (TTT-MLP, RoPE, pre-conv) must keep restoring
    into the model its stored config describes, with the optimizer state, exactly typed, and
    give the params and logits recorded from it."""
    from ttt_jax import from_dict
    from ttt_jax.checkpoint import FORMAT_VERSION, load_saved
    from ttt_jax.tree import flatten

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
    flat = flatten(restored.params)
    assert sorted(flat) == sorted(FIXTURE_PARAM_SUMS)
    for key, (total, squares) in FIXTURE_PARAM_SUMS.items():
        leaf = np.asarray(flat[key], np.float64)
        assert leaf.sum() == pytest.approx(total, rel=1e-6, abs=1e-9), key
        assert (leaf ** 2).sum() == pytest.approx(squares, rel=1e-6, abs=1e-9), key
    logits = jax.jit(arch.build_model(cfg.model).apply)({"params": restored.params},
                                                        np.asarray([FIXTURE_TOKENS], np.int32))
    np.testing.assert_allclose(np.asarray(logits)[0], np.asarray(FIXTURE_LOGITS),
                               rtol=0, atol=2e-6)


def test_restore_refuses_a_dtype_or_shape_mismatch_by_name(six_steps, tmp_path):
    """No silent cast: a bfloat16 model does not load the float32 checkpoint, a float32 model
    does not load a bfloat16 checkpoint, and a smaller embedding is refused too."""
    cfg, state, run_dir = six_steps
    bf16 = state.replace(params=jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), state.params))
    smaller = jax.tree.map(lambda a: a[:128] if a.shape == (256, 16) else a, state)
    ckpt = Checkpointer(run_dir, every=1, keep=3)
    for target, message in ((bf16, r"checkpoint float32\[256, 16\] vs model bfloat16\[256, 16\]"),
                            (smaller, r"checkpoint float32\[256, 16\] vs model float32\[128, 16\]")):
        with pytest.raises(CheckpointError, match=r"params/embed_tokens/embedding: " + message):
            ckpt.restore_latest(target, log=quiet)
    ckpt.close()
    assert steps_on_disk(run_dir) == [2, 4, 6]  # a refusal moves nothing aside

    written = Checkpointer(tmp_path / "bf16", every=1, keep=1)
    assert written.save(bf16, cfg, force=True)
    with pytest.raises(CheckpointError, match=r"params/embed_tokens/embedding: checkpoint "
                                              r"bfloat16\[256, 16\] vs model float32\[256, 16\]"):
        written.restore_latest(state, log=quiet)
    written.close()


def test_init_from_and_strict_through_a_run(six_steps, tmp_path):
    """``checkpoint.init_from`` + ``strict``: a run of the same model starts at step 0 from the
    source's params (its first validation equals the source's last) with a fresh optimizer;
    a run of a 2-block model is refused by name before training."""
    _, _, source = six_steps
    source_val = [r for r in metrics(source) if r["kind"] == "eval"][-1]
    assert source_val["step"] == 6

    printed = []
    cfg = config(tmp_path / "same", steps=2, log_every=1, init_from=str(source), strict=True)
    out = run(cfg, print_fn=collect(printed))
    text = "\n".join(printed)
    assert f"initialised from {source} (step 6)" in text and "missing (0): none" in text
    rows = metrics(tmp_path / "same")
    assert rows[0]["kind"] == "eval" and rows[0]["step"] == 0
    assert rows[0]["val_loss"] == pytest.approx(source_val["val_loss"], rel=1e-6)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert int(out["state"].step) == 2

    bigger = config(tmp_path / "bigger", steps=2, num_layers=2, init_from=str(source),
                    strict=True)
    with pytest.raises(ValueError, match=r"strict restore refused(.|\n)*missing \(\d+\): "
                                         r"layers_1/"):
        run(bigger, print_fn=quiet)
    assert not (tmp_path / "bigger" / "checkpoints").exists() or \
        not steps_on_disk(tmp_path / "bigger")
