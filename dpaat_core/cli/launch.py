"""Training as a separate process, for the dashboard's Train page: write the run's config to a file, start
``python -m dpaat_core train --config FILE`` detached from the caller (it survives a page reload), and stop
it with SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dpaat_core.store import liveness, runs
from dpaat_core.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def config_path(store: str | Path, run_id: str) -> Path:
    """Where a launched run's config travels to its process (beside its log, in a folder the listing skips)."""
    return Path(store) / ".logs" / f"{run_id}.config.json"


def train_argv(config_file: str | Path, store: str | Path, run_id: str) -> list[str]:
    """The ``python -m dpaat_core train`` command line that trains the config in ``config_file`` into
    ``store/run_id``: the config travels whole, as a file, never as flags rebuilt from it."""
    return [sys.executable, "-m", "dpaat_core", "train", "--config", str(config_file), "--store", str(store),
            "--name", run_id, "--quiet"]


def log_path(store: str | Path, run_id: str) -> Path:
    """Where a launched run's console output goes (a hidden folder the run listing skips)."""
    return Path(store) / ".logs" / f"{run_id}.log"


def launch(config: RunConfig, store: str | Path, run_id: str) -> int:
    """Start training ``config`` as ``store/run_id`` in its own process session; returns its pid.

    The run id is checked and must be new, so two launches never write one folder.
    """
    runs.check_run_id(run_id)
    if (Path(store) / run_id).exists():
        raise runs.RunError(f"run '{run_id}' already exists in {store}; choose another name")
    log, config_file = log_path(store, run_id), config_path(store, run_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_json(config_file, config.to_dict())
    with open(log, "wb") as out:
        proc = subprocess.Popen(train_argv(config_file, store, run_id), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def launch_sweep(argv: list[str], store: str | Path, name: str) -> int:
    """Start ``python -m dpaat_core sweep NAME ...`` (``argv`` after ``sweep``) in its own process session, its
    output in ``store/.logs/sweep-NAME.log``; returns its pid. The sweep checks its own arguments: a bad space or
    name ends it at once with the reason as the log's last line."""
    log = Path(store) / ".logs" / f"sweep-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dpaat_core", "sweep", name, *argv, "--store", str(store)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc.pid


def stop(run_dir: str | Path) -> bool:
    """Ask a running run to stop (SIGTERM: it ends between batches, keeping its completed epochs).

    Only a run that proves it is alive is signalled (``runs.load_run``: it holds its writer lock, or its pid
    still names the process that wrote its status), so a stale status never gets another process killed.
    Returns False when there is nothing to stop here (not running, interrupted, or on another host).
    """
    run = runs.load_run(run_dir)
    status = run.status
    if run.state != "running" or status.get("host") != socket.gethostname() or type(status.get("pid")) is not int:
        return False
    pid = status["pid"]
    recorded = {k: status.get(k) for k in ("pid_start", "boot_id")}
    if None not in recorded.values() and not liveness.same_process(pid, recorded):
        return False   # the number belongs to another process by now
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def _job_files(run_dir: Path) -> tuple[Path, Path]:
    logs = run_dir.parent / ".logs"
    return logs / f"{run_dir.name}.evaluate.json", logs / f"{run_dir.name}.evaluate.log"


def start_evaluate(run_dir: str | Path, max_samples: int | None = 256, corruptions: bool = False) -> int:
    """Compute the run's PGD-20 l2 curve (or, with ``corruptions``, its grid of every natural corruption at every
    severity) on a seeded draw of ``max_samples`` test images (None: all) in a ``python -m dpaat_core evaluate`` process of its
    own (the page that asks only reads); returns its pid. One at a time per run."""
    what = ["--corruptions", "all"] if corruptions else ["--attack", "pgd", "--norm", "l2"]
    return _start(Path(run_dir), ["evaluate", str(run_dir), *what,
                                  *(["--max-samples", str(int(max_samples))] if max_samples is not None else [])])


def start_certify(run_dir: str | Path, sigma: float = 0.25, n: int = 500, max_samples: int | None = 128) -> int:
    """Certify the run's smoothed classifier at ``sigma`` (``n`` noise draws) on a seeded draw of ``max_samples``
    test images (the draw of ``start_evaluate``'s curve; None: all) in a ``python -m dpaat_core certify`` process of
    its own; returns its pid. It shares the one-job-per-run slot with ``start_evaluate``."""
    return _start(Path(run_dir), ["certify", str(run_dir), "--sigma", f"{float(sigma):g}", "--n", str(int(n)),
                                  *(["--max-samples", str(int(max_samples))] if max_samples is not None else [])])


def _start(run_dir: Path, command: list[str]) -> int:
    if evaluating(run_dir) is not None:
        raise runs.RunError(f"{run_dir.name}: a curve is already being computed")
    job, log = _job_files(run_dir)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "dpaat_core", *command]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    runs.atomic_write_json(job, {"pid": proc.pid, **liveness.process_identity(proc.pid), "started": time.time(),
                                 "argv": argv[1:]})
    return proc.pid


def evaluating(run_dir: str | Path) -> dict | None:
    """The run's evaluation process if one is alive (pid, start time, ``argv``, ``progress`` in [0, 1] or None,
    and the ``line`` of output it last printed), else None."""
    job, log = _job_files(Path(run_dir))
    try:
        info = runs.read_json(job)
    except (runs.RunError, OSError):
        return None
    if not liveness.same_process(info.get("pid"), info):
        return None
    text = ""
    if log.is_file():   # its last few KiB: the log grows with every progress update
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace")
    line = (re.split(r"[\r\n]+", text.strip()) or [""])[-1]
    match = re.search(r"(\d+)%\|", line)
    return info | {"progress": int(match.group(1)) / 100 if match else None, "line": line}
