"""One run per run directory, and a run that ends the way it was asked to (no JAX imported here).

- ``check_directory``: ``train.run_dir`` and its ``checkpoints/`` must be directories this
  process can write, or creatable ones; checked before anything is written.
- ``check_ownership``: a run directory that holds checkpoints belongs to that run. It is
  resumed (``checkpoint.resume: true``), or refused with ``checkpoint.resume: false`` unless
  ``checkpoint.overwrite: true`` (``train --force-new``), which ``move_aside`` carries out: every
  entry of the old run goes to ``RUN_DIR.old-YYYYmmdd-HHMMSS/``.
- ``RunLock``: ``RUN_DIR/run.lock`` (pid, host, process start time) under an exclusive
  ``flock``, so a second process never trains into the same directory. A lock left by a
  process that is gone (killed with SIGKILL, a crash) is stale: on the same host it is replaced
  with a one-line note; a lock of another host is refused (its process cannot be checked).
- ``StopSignals``: SIGINT/SIGTERM during start-up stop the run at the next safe point
  (``Interrupted``, nothing written); once training runs, the first asks the loop to save and
  stop (exit status 128 + signal: 130, 143), and a second raises ``Interrupted`` at once,
  without saving.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Callable, Optional

try:
    import fcntl
except ImportError:  # not POSIX: the pid/host check alone
    fcntl = None

LOCK_NAME = "run.lock"
CHECKPOINT_DIR = "checkpoints"  # ttt_jax.checkpoint.CHECKPOINT_DIR, without importing Orbax


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (reported as one ``error:`` line)."""


# ------------------------------------------------------------------ writable directories

def _nearest_existing(path: Path) -> Path:
    p = path
    while not (p.exists() or p.is_symlink()) and p != p.parent:
        p = p.parent
    return p


def check_directory(path: str | Path, what: str) -> None:
    """Raises ``RunDirError`` naming ``what`` unless ``path`` is a writable directory or one
    that can be created (its nearest existing ancestor is a writable directory)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise RunDirError(f"{what} is a file, not a directory: expected a directory "
                              f"(or a path where one can be created)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RunDirError(f"{what} is not writable by this user: expected a directory this "
                              f"process can write into")
        return
    parent = _nearest_existing(path)
    if not parent.is_dir():
        raise RunDirError(f"{what} cannot be created: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{what} cannot be created: {parent} is not writable by this user")


def check_free_space(path: str | Path, need: int, what: str, *, free: Optional[int] = None) -> None:
    """Raises ``RunDirError`` naming ``what`` unless the file system of ``path`` (or of its
    nearest existing ancestor) has ``need`` bytes free (``free``: the free bytes, for tests)."""
    if free is None:
        free = shutil.disk_usage(_nearest_existing(Path(path))).free
    if free < need:
        raise RunDirError(f"{what} has {free / 2**20:,.0f} MiB free, fewer than the "
                          f"{need / 2**20:,.0f} MiB one checkpoint needs (params and two Adam "
                          f"moments): free some space or choose another train.run_dir")


# ------------------------------------------------------------------ ownership

def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The step directories under ``run_dir/checkpoints`` (names that are integers)."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def _steps_text(steps: list[int]) -> str:
    more = f" and {len(steps) - 5} more" if len(steps) > 5 else ""
    return ", ".join(map(str, steps[-5:])) + more


def check_ownership(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to start a new run (``resume`` false) in a directory that holds another run's
    checkpoints, unless ``overwrite`` (which moves the old run aside)."""
    steps = checkpoint_steps(run_dir)
    if steps and not resume and not overwrite:
        raise RunDirError(
            f"checkpoint.resume=false is refused: train.run_dir {str(run_dir)!r} holds the "
            f"checkpoints of another run (steps {_steps_text(steps)}); expected one of: "
            f"checkpoint.resume=true (continue that run), checkpoint.overwrite=true or "
            f"train --force-new (move it aside and start anew), or another train.run_dir")


def move_aside(run_dir: str | Path, now: Optional[datetime.datetime] = None) -> Optional[Path]:
    """Moves every entry of ``run_dir`` but the lock into ``RUN_DIR.old-YYYYmmdd-HHMMSS`` (a
    sibling); returns it, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_NAME] if run_dir.is_dir() else []
    if not entries:
        return None
    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = run_dir.resolve()
    target, n = base.with_name(f"{base.name}.old-{stamp}"), 0
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}.old-{stamp}-{n}")
    target.mkdir()
    for p in entries:
        os.rename(p, target / p.name)
    return target


# ------------------------------------------------------------------ the lock

def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """``(state, start time in clock ticks)`` of a process from ``/proc`` (None if unknown)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _alive(pid: int, start: Optional[int]) -> bool:
    """Whether process ``pid`` of this host is running and is the one that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is not None:
        state, started = stat
        if state in ("Z", "X") or (start is not None and started != start):
            return False
    return True


def _since(info: dict) -> str:
    return f", since {info['since']}" if info.get("since") else ""


class RunLock:
    """Holds ``RUN_DIR/run.lock`` while a run trains (a context manager; creates ``run_dir``)."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.log = log
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use(self, info: dict) -> RunDirError:
        who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{_since(info)}"
        return RunDirError(
            f"train.run_dir {str(self.run_dir)!r} is in use by another run ({who}): wait for it "
            f"to finish or choose another train.run_dir (if that process is gone, delete "
            f"{self.path})")

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise self._in_use(self._read()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and deleted between our open and our flock: retry
                os.close(fd)
                continue
            self._fd = fd
            self._check_previous(self._read())
            self._write()
            return
        raise self._in_use(self._read())

    def _check_previous(self, info: dict) -> None:
        """A lock file that we could lock is left over, unless the filesystem ignores locks."""
        if not info or info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            return
        if info.get("host") != socket.gethostname():
            self.release(delete=False)
            raise self._in_use(info)
        if _alive(int(info.get("pid", -1)), info.get("start")):
            self.release(delete=False)
            raise self._in_use(info)
        self.log(f"replaced the stale lock of pid {info.get('pid')} (no longer running) in "
                 f"{self.run_dir}")

    def _write(self) -> None:
        stat = _proc_stat(os.getpid())
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "start": stat[1] if stat else None,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(self._fd)

    def release(self, delete: bool = True) -> None:
        if self._fd is None:
            return
        if delete:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)  # drops the flock
        self._fd = None


# ------------------------------------------------------------------ signals

class Interrupted(BaseException):
    """A signal that ends the run at once (during start-up, or the second one while stopping).

    A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` does not swallow it.
    """

    def __init__(self, signum: int, when: str):
        self.signum, self.when = signum, when
        super().__init__(f"interrupted by {signal.Signals(signum).name} {when}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM handling of a training run (a context manager; restores the old handlers).

    The handler itself never raises on a first signal: it only records it, because an exception
    thrown into the middle of an import of a compiled extension (jaxlib, tensorstore) can crash
    the interpreter. During start-up the run calls ``check()`` at safe points, which raises
    ``Interrupted`` ("during start-up"); once ``training()`` was called, the loop sees ``signal``
    and saves and stops at the end of the step. A second signal raises ``Interrupted`` at once,
    wherever the run is. In a thread other than the main one, signals are left alone.
    """

    STARTUP = "during start-up: nothing was trained or saved"

    def __init__(self):
        self.signal: Optional[int] = None
        self._armed = False
        self._old = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def check(self) -> None:
        """Raises ``Interrupted`` if a signal arrived during start-up."""
        if self.signal is not None and not self._armed:
            raise Interrupted(self.signal, self.STARTUP)

    def training(self) -> None:
        """From now on the first signal asks for a save and a stop (one already received
        during start-up raises here)."""
        self.check()
        self._armed = True

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
            return
        raise Interrupted(signum, "a second time: stopped at once, without saving"
                          if self._armed else self.STARTUP)

    @property
    def name(self) -> Optional[str]:
        return None if self.signal is None else signal.Signals(self.signal).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
