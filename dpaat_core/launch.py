"""Training as a separate process, for the dashboard's Train page: start ``python -m dpaat_core
train`` detached from the caller (it survives a page reload), and stop it with SIGTERM."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from . import runs
from .config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def train_argv(config: RunConfig, store: str | Path, run_id: str) -> list[str]:
    """The ``python -m dpaat_core train`` command line that trains ``config`` into ``store/run_id``."""
    c = config.validate()
    m = c.method
    argv = [sys.executable, "-m", "dpaat_core", "train", "--data", c.data.spec, "--model", c.model.name,
            "--method", m.name, "--epochs", str(c.train.epochs), "--batch-size", str(c.train.batch_size),
            "--image-size", str(c.data.image_size), "--norm", c.attack.norm, "--eps", repr(c.attack.eps),
            "--alpha-ratio", repr(c.attack.alpha_ratio), "--steps", str(c.attack.steps),
            "--threshold", m.threshold, "--sync", m.sync, "--beta-clean", repr(m.beta_clean), "--lam", repr(m.lam),
            "--lr", repr(c.train.lr), "--weight-decay", repr(c.train.weight_decay), "--schedule", c.train.schedule,
            "--imbalance", c.train.imbalance, "--early-stop", c.train.early_stop, "--patience", str(c.train.patience),
            "--seed", str(c.train.seed), "--device", c.train.device, "--store", str(store), "--name", run_id, "--quiet"]
    if m.adaptive:
        argv += ["--gamma", repr(m.gamma)]
    if m.memoryless:
        argv.append("--memoryless")
    if not c.train.augment:
        argv.append("--no-augment")
    if c.model.pretrained:
        argv.append("--pretrained")
    if c.data.max_samples is not None:
        argv += ["--max-samples", str(c.data.max_samples)]
    if c.data.root is not None:
        argv += ["--root", c.data.root]
    return argv


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
    log = log_path(store, run_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(train_argv(config, store, run_id), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
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
    if None not in recorded.values() and runs.process_identity(pid) != recorded:
        return False   # the number belongs to another process by now
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
