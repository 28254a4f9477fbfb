"""Locks on a run folder: one writer (trainer) per run, and read-merge-replace of its shared tables under a lock.

Both are ``flock(2)`` locks on hidden files in the run folder. The kernel drops such a lock when the process
that holds it ends, however it ends (SIGKILL included), so a killed process never leaves a run locked. Where
``fcntl`` is missing (Windows) the locks are no-ops and liveness falls back to the status heartbeat.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

from dpaat_core.errors import RunError

WRITER_LOCK = ".writer.lock"
MERGE_LOCK = ".merge.lock"


class Busy(RunError):
    """Another live process holds the lock; the message says which."""


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def merge_lock(run_dir, timeout: float = 60.0):
    """Hold the run's merge lock for a read-merge-replace of one of its files (e.g. ``robustness.csv``); waits
    up to ``timeout`` seconds for another merger, then raises :class:`Busy`."""
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / MERGE_LOCK
    fd = _open(path)
    try:
        deadline = time.monotonic() + timeout
        while not _try(fd, exclusive=True):
            if time.monotonic() > deadline:
                raise Busy(f"{path}: another process has been merging into {Path(run_dir).name} for over {timeout:g} s")
            time.sleep(0.02)
        yield
    finally:
        os.close(fd)   # closing the descriptor drops the lock


class WriterLock:
    """The one-writer-per-run lock a trainer holds for as long as it trains ``run_dir``.

    Taken without waiting (a few retries over ``patience`` seconds, so a listing that probes it at the same
    instant does not refuse the trainer); a second trainer or resume gets :class:`Busy` naming the holder."""

    def __init__(self, run_dir, patience: float = 1.0):
        self.path = Path(run_dir) / WRITER_LOCK
        self.fd: Optional[int] = None
        if fcntl is None:
            return
        fd = _open(self.path)
        deadline = time.monotonic() + patience
        while not _try(fd, exclusive=True):
            if time.monotonic() > deadline:
                os.close(fd)
                raise Busy(f"{Path(run_dir)}: already being trained by {holder(run_dir)}; one writer per run: wait for "
                           "it to finish or stop it first")
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder(run_dir) -> str:
    """Who holds (or last held) the writer lock, in words."""
    try:
        info = json.loads((Path(run_dir) / WRITER_LOCK).read_text() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"process {info['pid']} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def writer_alive(run_dir) -> Optional[bool]:
    """Whether a live process on this machine holds the run's writer lock: True, False, or None when this cannot
    be told here (no lock file: a run written before the lock existed, or no ``fcntl``)."""
    path = Path(run_dir) / WRITER_LOCK
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return not _try(fd, exclusive=False)
    finally:
        os.close(fd)
