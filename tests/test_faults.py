"""Runs never lose, mix or silently corrupt work: one test per fault the trainer and the
commands handle (README "Reliability"). Small shapes from ``configs/tiny.yaml``; in-process where
the behaviour is not about the process itself, subprocesses for exit statuses of signals,
one-line stderr and permissions."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ttt_jax import apply_overrides, load_config, training
from ttt_jax.checkpoint import CheckpointError, Checkpointer, load_run, load_saved
from ttt_jax.trainer import run


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
SMALL = ("model.num_layers=1", "model.ttt.model_dim=32", "model.intermediate_size=64",
         "data.seq_len=16", "data.batch_size=2", "train.eval_batches=1", "train.log_every=1",
         "train.eval_every=1000", "optim.warmup_steps=2")
# The module's run: RoPE off (for the export refusal), checkpoints at 2, 4, 6.
TRAINED = ("checkpoint.every=2", "checkpoint.keep=5", "model.ttt.use_rope=false")
LONG = ("train.steps=100000", "checkpoint.every=100000")


def argv(run_dir, *overrides, extra=()) -> list[str]:
    out = ["--config", str(TINY)]
    for o in (*SMALL, f"train.run_dir={run_dir}", *overrides):
        out += ["--set", o]
    return out + list(extra)


def config(run_dir, *overrides):
    return apply_overrides(load_config(TINY), [*SMALL, f"train.run_dir={run_dir}", *overrides])


def quiet(*args, **kwargs):
    pass


def step_dirs(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def readme_row(row: str) -> str:
    """The message of a row of the README's "Errors" table."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| bad input | message |"):].split("\n\n")[0]
    for line in table.splitlines()[2:]:
        name, message = (cell.strip() for cell in line.strip("|").split("|", 1))
        if name == row:
            return message.strip().strip("`")
    raise AssertionError(f"no README row {row!r}")


def assert_readme_row(row: str, err: str, tmp_path) -> None:
    """``err`` (one line) is the README row's message, with DIR for ``tmp_path`` and … for any
    text."""
    pattern = ".*".join(re.escape(piece).replace("DIR", re.escape(str(tmp_path)))
                        for piece in readme_row(row).split("…"))
    assert re.fullmatch(pattern, err.rstrip("\n")), f"README {row!r}: {readme_row(row)!r}\n{err}"


def child_env(**extra) -> dict[str, str]:
    """The subprocess's environment: this one's (with the suite's shared compilation cache,
    ``conftest.shared_compilation_cache``) plus ``extra``."""
    return {**os.environ, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(run_dir, final state)`` of a 6-step run; tests work on copies of its directory."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = run(config(run_dir, "train.steps=6", *TRAINED), print_fn=quiet)
    assert step_dirs(run_dir) == [2, 4, 6]
    return run_dir, result["state"]


def copy_run(trained, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained[0], dst)
    return dst


# ---------------------------------------------------------------- 1. a run dir belongs to one run

def test_resume_false_on_a_run_dir_with_checkpoints_is_refused(trained, tmp_path, train_main,
                                                                capsys):
    run_dir = copy_run(trained, tmp_path)
    before = {n: (run_dir / n).read_bytes() for n in ("config.yaml", "metrics.jsonl")}
    assert train_main(argv(run_dir, *TRAINED, "train.steps=8", "checkpoint.resume=false")) == 2
    assert_readme_row("run directory of another run", one_error_line(capsys.readouterr().err),
                      tmp_path)
    assert {n: (run_dir / n).read_bytes() for n in before} == before  # config.yaml untouched
    assert step_dirs(run_dir) == [2, 4, 6] and not (run_dir / "run.lock").exists()


def test_force_new_moves_the_old_run_aside_first(trained, tmp_path, train_main, capsys):
    run_dir = copy_run(trained, tmp_path)
    old_config = (run_dir / "config.yaml").read_bytes()
    assert train_main(argv(run_dir, *TRAINED, "train.steps=6", extra=["--force-new"])) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "aside" in line]
    assert len(said) == 1, said
    old = Path(said[0].rsplit(" aside to ", 1)[1])
    assert old.parent == run_dir.resolve().parent and old.name.startswith("run.old-")
    assert step_dirs(old) == [2, 4, 6] and (old / "config.yaml").read_bytes() == old_config
    assert step_dirs(run_dir) == [2, 4, 6]  # the new run's
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()] == \
        [0, 1, 2, 3, 4, 5, 6, 6]  # one run: eval 0, train 1-6, eval 6


def test_a_run_dir_in_use_is_refused_and_a_stale_lock_is_replaced(trained, tmp_path, train_main,
                                                                   capsys):
    from ttt_jax.run_dir import LOCK_NAME, RunLock

    run_dir = copy_run(trained, tmp_path)
    config_before = (run_dir / "config.yaml").read_bytes()
    args = argv(run_dir, *TRAINED, "train.steps=6")
    with RunLock(run_dir, log=quiet):  # held (flock) by a live process: this one
        assert train_main(args) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"is in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert_readme_row("run directory in use", err, tmp_path)
    lock = run_dir / LOCK_NAME
    # a lock file naming a live process of this host, on a filesystem that ignores flock
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    assert train_main(args) == 2
    assert f"pid {os.getppid()}" in one_error_line(capsys.readouterr().err)
    assert (run_dir / "config.yaml").read_bytes() == config_before
    # left by a process that is gone (SIGKILL): stale, replaced with one line
    gone = subprocess.Popen(["sleep", "60"])
    gone.kill()
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert sum(f"replaced the stale lock of pid {gone.pid}" in line
               for line in out.splitlines()) == 1, out
    assert not lock.exists()


# ---------------------------------------------------------------- 2. saving never skips

def test_saving_an_existing_step_replaces_it(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    target = trained[1]
    ckpt = Checkpointer(run_dir, every=2, keep=5)
    state, _ = ckpt.restore_latest(target, log=quiet)
    changed = state.replace(params=jax.tree.map(lambda a: a + 1, state.params))
    assert ckpt.save(changed, config(run_dir, *TRAINED), force=True)
    assert ckpt.steps() == [2, 4, 6]
    again, _ = ckpt.restore_latest(target, log=quiet)
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(changed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [p.name for p in ckpt.directory.iterdir() if not p.name.isdigit()] == []
    ckpt.close()


def test_a_replacement_cut_short_is_repaired_when_reopened(trained, tmp_path):
    """A crash between the two renames of a replacement leaves the old step renamed aside."""
    run_dir = copy_run(trained, tmp_path)
    d = run_dir / "checkpoints"
    os.rename(d / "6", d / ".replaced-6")
    (d / ".staging").mkdir()
    ckpt = Checkpointer(run_dir, every=2, keep=5)
    assert ckpt.steps() == [2, 4, 6] and not (d / ".staging").exists()
    ckpt.close()


def test_a_nonfinite_loss_stops_with_exit_3_keeping_the_last_good_checkpoint(tmp_path,
                                                                             train_main, capsys):
    run_dir = tmp_path / "run"
    blow_up = ("optim.learning_rate=1e30", "optim.warmup_steps=0", "checkpoint.every=1")
    assert train_main(argv(run_dir, "train.steps=6", *blow_up)) == 3
    err = one_error_line(capsys.readouterr().err)
    assert "training stopped at step " in err and "non-finite loss (nan)" in err, err
    bad_step = int(err.split("training stopped at step ")[1].split(":")[0])
    good = int(err.split("the last good checkpoint is step ")[1].split(" ")[0])
    assert step_dirs(run_dir) == [good] and good == bad_step - 1
    state, meta = load_saved(run_dir)
    assert meta["step"] == good and bool(training.all_finite(state))
    assert not (run_dir / "run.lock").exists()
    # train.skip_nonfinite_steps: skipped steps are logged, one more than allowed stops the run
    run_dir = tmp_path / "skip"
    assert train_main(argv(run_dir, "train.steps=6", "train.skip_nonfinite_steps=2",
                           *blow_up)) == 3
    assert "more than train.skip_nonfinite_steps=2" in one_error_line(capsys.readouterr().err)
    skipped = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open())
               if r["kind"] == "skipped_step"]
    assert [(r["step"], r["skipped_total"]) for r in skipped] == [(2, 1), (3, 2), (4, 3)]
    # a skipped update keeps the old state (inside the jitted step): steps 2 and 3 hold the
    # params and optimizer state of step 1, and the step counter went on
    assert step_dirs(run_dir) == [2, 3]  # checkpoint.keep: 2
    (at_2, meta_2), (at_3, meta_3) = load_saved(run_dir / "2"), load_saved(run_dir / "3")
    assert (meta_2["step"], int(at_2["step"]), int(at_3["step"])) == (2, 2, 3)
    for a, b in zip(jax.tree.leaves((at_2["params"], at_2["opt_state"])),
                    jax.tree.leaves((at_3["params"], at_3["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- 3. corruption is detected

def flip_a_byte(step_dir: Path) -> None:
    """Changes one byte in the middle of the step's largest data file: still readable."""
    largest = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))


def test_a_flipped_byte_fails_its_checksum_and_the_previous_step_is_used(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    flip_a_byte(run_dir / "checkpoints" / "6")
    # readers (export, generate, eval): fall back, leave the directory as it is
    said = []
    _, meta = load_saved(run_dir, log=said.append)
    assert meta["step"] == 4 and len(said) == 1, said
    assert "checkpoint step 6" in said[0] and "checksum mismatch" in said[0], said
    assert load_run(run_dir, log=quiet).step == 4
    with pytest.raises(CheckpointError) as named:
        load_saved(run_dir / "6")
    assert_readme_row("corrupt checkpoint step named", f"error: {named.value}", tmp_path)
    assert step_dirs(run_dir) == [2, 4, 6]
    # the trainer's Checkpointer: reported, moved aside, the previous good step restored
    ckpt = Checkpointer(run_dir, every=2, keep=5)
    said = []
    with pytest.warns(UserWarning, match="previous good step 4"):
        restored, meta = ckpt.restore_latest(trained[1], log=said.append)
    assert meta["step"] == 4 and int(restored.step) == 4
    assert any("step 6" in s and "checksum mismatch" in s for s in said), said
    assert ckpt.steps() == [2, 4] and (ckpt.directory / "corrupt-6").is_dir()
    ckpt.close()


def test_an_unreadable_step_is_one_error_line(trained, tmp_path):
    """No Orbax log lines, no asyncio "Event loop is closed" tracebacks: one line, exit 2."""
    run_dir = copy_run(trained, tmp_path)
    for f in (run_dir / "checkpoints" / "6" / "state").rglob("d/*"):
        f.unlink()
    result = subprocess.run([sys.executable, "-m", "ttt_jax", "export", "--checkpoint",
                             str(run_dir / "6"), "--out", str(tmp_path / "x"),
                             "--allow-inexact"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
    assert result.returncode == 2, result.stderr
    assert_readme_row("unreadable checkpoint step named", one_error_line(result.stderr),
                      tmp_path)


def test_unretrieved_failures_of_other_reads_are_not_logged(caplog):
    """When one read of a restore fails, the reads still in flight fail too and asyncio logs
    each as "Future exception was never retrieved" when it is collected; ``quiet_orbax`` drops
    those of tensorstore reads (the restore's failure is reported once) and nothing else."""
    import asyncio
    import gc

    from ttt_jax.checkpoint.integrity import quiet_orbax

    quiet_orbax()
    loop = asyncio.new_event_loop()
    try:
        for text in ('NOT_FOUND: Error opening "zarr" driver: [tensorstore_spec=\'{}\']',
                     "an unrelated failure"):
            future = loop.create_future()
            future.set_exception(ValueError(text))
            del future
            gc.collect()
    finally:
        loop.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 1 and "an unrelated failure" in logged[0], logged


# ---------------------------------------------------------------- 4. signals

def start_training(run_dir, *overrides):
    """``train.py`` in a subprocess; its stdout lines arrive on a queue."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv(run_dir, *overrides)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(PYTHONUNBUFFERED="1"))
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    return proc, lines


def wait_for(lines, text: str, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = lines.get(timeout=deadline - time.time())
        assert line is not None, f"the process ended before printing {text!r}"
        if text in line:
            return line
    raise AssertionError(f"no {text!r} within {timeout}s")


def finish(proc, lines) -> tuple[int, str, str]:
    err = proc.stderr.read()
    rc = proc.wait(timeout=120)
    out = []
    while (line := lines.get(timeout=60)) is not None:
        out.append(line)
    return rc, "".join(out), err


def test_signals_save_then_exit_130_or_143_and_a_second_sigint_stops_at_once(tmp_path,
                                                                             train_main, capsys):
    run_dir = tmp_path / "run"
    proc, lines = start_training(run_dir, *LONG)
    wait_for(lines, "] step 2/")
    # meanwhile the run directory is taken
    assert train_main(argv(run_dir, *LONG)) == 2
    assert f"in use by another run (pid {proc.pid} " in one_error_line(capsys.readouterr().err)
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc, lines)
    assert rc == 130 and err == "", err
    assert "stopped by signal SIGINT at step " in out
    first = int(out.split("stopped by signal SIGINT at step ")[1].split(";")[0])
    assert step_dirs(run_dir) == [first] and not (run_dir / "run.lock").exists()
    assert (run_dir / "loss.png").stat().st_size > 0  # drawn on the way out

    proc, lines = start_training(run_dir, *LONG)
    wait_for(lines, f"resumed from step {first}")
    wait_for(lines, f"] step {first + 2}/")
    proc.send_signal(signal.SIGTERM)
    rc, out, err = finish(proc, lines)
    assert rc == 143 and err == "", err
    second = int(out.split("stopped by signal SIGTERM at step ")[1].split(";")[0])
    assert second > first and step_dirs(run_dir)[-1] == second

    proc, lines = start_training(run_dir, *LONG)
    wait_for(lines, f"] step {second + 2}/")
    proc.send_signal(signal.SIGINT)
    wait_for(lines, "SIGINT: stopping after step")
    proc.send_signal(signal.SIGINT)
    rc, out, err = finish(proc, lines)
    assert rc == 130
    assert "interrupted by SIGINT a second time: stopped at once, without saving" in \
        one_error_line(err)
    assert step_dirs(run_dir)[-1] == second  # nothing saved


def test_ctrl_c_while_the_console_script_imports_is_one_line_and_exit_130(monkeypatch, capsys):
    import ttt_jax.cli as cli

    def interrupted():  # Ctrl-C while the command modules (and JAX) are being imported
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train", "--config", "tiny"]) == 130
    assert "interrupted by SIGINT during start-up" in one_error_line(capsys.readouterr().err)


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc to see when JAX is being imported")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv(run_dir, *LONG)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if "jaxlib" in Path(f"/proc/{proc.pid}/maps").read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT during start-up" in one_error_line(err)
    assert not (run_dir / "config.yaml").exists()


# ---------------------------------------------------------------- 5. metrics after a kill

def test_resume_cuts_metrics_back_to_the_restored_step(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    # killed after logging steps 5 and 6 (and half a line) but before saving step 6
    shutil.rmtree(run_dir / "checkpoints" / "6")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    run(config(run_dir, *TRAINED, "train.steps=6"), print_fn=quiet)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert [s for k, s in keys if k == "train"] == list(range(1, 7))
    assert [s for k, s in keys if k == "eval"] == [0, 4, 6]


# ---------------------------------------------------------------- 6. unusable directories

def test_unusable_run_dirs_are_one_line_before_anything_is_written(tmp_path, train_main, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    holder = tmp_path / "holder"
    holder.mkdir()
    (holder / "checkpoints").write_text("")
    cases = [(a_file, "run directory is a file"), (a_file / "run", "run directory under a file"),
             (holder, "`checkpoints` is a file")]
    for run_dir, row in cases:
        assert train_main(argv(run_dir, "train.steps=2")) == 2
        assert_readme_row(row, one_error_line(capsys.readouterr().err), tmp_path)
    assert sorted(p.name for p in holder.iterdir()) == ["checkpoints"]


# Run as root, a child drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from its
# bounding set (PR_CAPBSET_DROP) before it execs train.py, so even root is held to file modes.
DROP_ROOT_FILE_ACCESS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2, 3):
    if libc.prctl(24, cap, 0, 0, 0) != 0:
        sys.exit("PR_CAPBSET_DROP failed: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_an_unwritable_run_dir_is_refused_before_training(tmp_path):
    locked = Path(tempfile.mkdtemp(dir=tmp_path))
    (locked / "run").mkdir()
    os.chmod(locked / "run", 0o555)
    os.chmod(locked, 0o555)
    wrapper = [sys.executable, "-c", DROP_ROOT_FILE_ACCESS] if os.geteuid() == 0 else []
    try:
        for run_dir, words in ((locked / "run", "is not writable"),
                               (locked / "new", "cannot be created")):
            result = subprocess.run(
                [*wrapper, sys.executable, str(REPO / "train.py"),
                 *argv(run_dir, "train.steps=2")],
                cwd=REPO, capture_output=True, text=True, timeout=300, env=child_env())
            if result.returncode != 2 and "PR_CAPBSET_DROP" in result.stderr:
                pytest.skip("cannot drop root's file capabilities here")
            assert result.returncode == 2, result.stderr
            err = one_error_line(result.stderr)
            assert "train.run_dir" in err and words in err, err
            if run_dir.name == "run":
                assert_readme_row("run directory not writable", err, tmp_path)
    finally:
        os.chmod(locked, stat.S_IRWXU)
        os.chmod(locked / "run", stat.S_IRWXU)


# ---------------------------------------------------------------- 7. bad keys and paths

def test_bad_trainable_run_dir_and_config_paths_name_the_key(tmp_path, train_main, capsys):
    assert train_main(argv(tmp_path / "run", "optim.trainable=no_such_param",
                           extra=["--check"])) == 2
    assert_readme_row("`optim.trainable` matches no param",
                      one_error_line(capsys.readouterr().err), tmp_path)
    assert train_main(argv(tmp_path / "run", "train.run_dir=")) == 2
    assert_readme_row("empty run directory", one_error_line(capsys.readouterr().err), tmp_path)
    assert train_main(["--config", str(tmp_path), "--check"]) == 2
    assert_readme_row("config path is a directory", one_error_line(capsys.readouterr().err),
                      tmp_path)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 8. exact export by default

def test_tiny_preset_uses_rope_as_ttt_lm_pytorch():
    ttt = load_config(TINY).model.ttt
    assert ttt.use_rope and ttt.rope_bounded and ttt.rope_layout == "interleaved"


def test_export_refuses_a_model_without_rope_unless_allow_inexact(trained, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from ttt_jax.cli import main

    run_dir = copy_run(trained, tmp_path)
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 2
    assert_readme_row("export without RoPE", one_error_line(capsys.readouterr().err), tmp_path)
    assert not out.exists()
    flip_a_byte(run_dir / "checkpoints" / "6")  # and the latest step is corrupt: step 4 is used
    old = os.umask(0o022)
    try:
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(out),
                     "--allow-inexact"]) == 0
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert "using the previous good step 4" in err and "use_rope=false" in err, err
    assert all(line.startswith("warning: ") for line in err.splitlines()), err
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def test_too_little_free_space_is_refused_before_training(tmp_path):
    """One checkpoint needs the params and two Adam moments; less free space is refused by
    name before anything is written (the check itself, with the free bytes given)."""
    from ttt_jax.run_dir import RunDirError, check_free_space

    with pytest.raises(RunDirError, match=r"'x' has 1 MiB free, fewer than the 3 MiB one "
                                          r"checkpoint needs"):
        check_free_space(tmp_path / "run", 3 * 2**20, "'x'", free=2**20)
    check_free_space(tmp_path / "run", 3 * 2**20, "'x'", free=4 * 2**20)
    check_free_space(tmp_path / "run" / "checkpoints", 1, "'x'")  # real disk: plenty
