"""Whether a process is alive and still the one a record names, and whether a run's writer is alive.

A pid alone can be reused by a later process, so a record keeps the process's start time and the boot's id
(:func:`process_identity`); :func:`same_process` compares against it. :func:`writer_gone` answers for a run
whose status says ``running``: on this machine by its writer lock, else by the status heartbeat.
"""
from __future__ import annotations

import functools
import os
import socket
import time
from pathlib import Path

from dpaat_core.store.locks import writer_alive

STALE_SECONDS = 5 * 60  # a "running" run that has not refreshed status.json for this long (heartbeat: 30 s) is presumed dead


def process_identity(pid: int) -> dict:
    """What tells process ``pid`` apart from a later process given the same number: its start time (clock ticks
    after boot, from ``/proc/<pid>/stat``) and the boot's id. Empty where ``/proc`` is missing or pid is gone."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, ValueError):
        return {}
    return {"pid_start": int(stat.rsplit(")", 1)[1].split()[19]), "boot_id": boot}


def process_ended(pid: int) -> bool:
    """Whether ``pid`` has ended: gone, or a zombie waiting to be reaped (then reaped here if it is our child)."""
    try:
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return True
    if state != "Z":
        return False
    try:
        os.waitpid(int(pid), os.WNOHANG)
    except ChildProcessError:   # another process's child: its parent reaps it
        pass
    return True


def same_process(pid, recorded: dict) -> bool:
    """Whether ``pid`` is still the process whose :func:`process_identity` was ``recorded`` (and has not ended)."""
    if type(pid) is not int or pid <= 0:
        return False
    now = process_identity(pid)
    return bool(now) and now == {k: recorded.get(k) for k in now} and not process_ended(pid)


@functools.lru_cache(maxsize=4)
def _identity_of(pid: int) -> tuple:
    return tuple(process_identity(pid).items())


def own_identity() -> dict:
    """This process's identity, read once (a forked child has another pid, so it reads its own)."""
    return dict(_identity_of(os.getpid()))


def writer_gone(status: dict, run_dir) -> str | None:
    """Why a status that says ``running`` has no live writer, or None if its writer is alive.

    On this machine a run proves it is alive by holding its writer lock (``locks.WriterLock``); a run written
    before that lock existed, by a pid that still exists and started when the status says it did. A run on
    another machine proves it by its heartbeat: ``updated`` refreshed within ``STALE_SECONDS``."""
    pid, host, updated = status.get("pid"), status.get("host"), status.get("updated")
    if host == socket.gethostname() and os.name == "posix":
        alive = writer_alive(run_dir)
        if alive is not None:
            return None if alive else f"no process holds the run (its process {pid} has ended)"
        if type(pid) is not int or pid <= 0:
            return "its status names no process"
        recorded = {k: status.get(k) for k in ("pid_start", "boot_id")}
        if None not in recorded.values():   # the status says which process wrote it
            return None if same_process(pid, recorded) else f"process {pid} is gone (or its number now belongs to " \
                                                               "another process)"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} is gone"
        except OSError:   # PermissionError: it exists, as another user's process
            pass
        if not _fresh(updated):
            return f"process {pid} cannot be shown to be the run's, and it has not updated it for over " \
                   f"{STALE_SECONDS // 60} minutes"
        return None
    return None if _fresh(updated) else f"no update from {host} for over {STALE_SECONDS // 60} minutes"


def _fresh(updated) -> bool:
    return isinstance(updated, (int, float)) and time.time() - updated <= STALE_SECONDS
