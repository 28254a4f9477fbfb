"""Faults a careful user or a hostile visitor can cause, each with the run store holding up.

Run this file alone to see the list hold: a stale "running" status whose pid now belongs to another process
(Stop kills nothing), a heartbeat that proves a run alive, two merges of robustness.csv at the same instant
(no curve lost), and a second trainer on a live run (refused, one line)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from dpaat_core import launch, locks, runs
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train import _StatusWriter, train
from dpaat_core.distributed import World

ROOT = Path(__file__).resolve().parents[1]


def _tiny_run(store: Path, name="r") -> Path:
    cfg = RunConfig()
    cfg.data.spec, cfg.data.image_size, cfg.attack.steps = "synthetic:n=24,classes=3", 16, 1
    cfg.method = method_config("erm")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 1, 16, "cpu"
    return train(cfg.validate(), store=store, run_id=name)


def _claim_running(run: Path, **fields) -> None:
    """Make the run's status say "running" as a crashed trainer would have left it."""
    status = runs.read_status(run) | {"state": "running", "host": socket.gethostname(), "updated": time.time()}
    for key in ("pid_start", "boot_id"):
        status.pop(key, None)
    runs.atomic_write_json(run / "status.json", status | fields)


@pytest.fixture
def stranger():
    """An unrelated process, as the one that inherits a dead trainer's pid after a crash or a reboot."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_stale_status_with_a_reused_pid_is_listed_interrupted_and_stop_kills_nothing(tmp_path, stranger):
    run = _tiny_run(tmp_path)
    assert (run / locks.WRITER_LOCK).is_file()
    _claim_running(run, pid=stranger.pid)                 # fresh heartbeat, but nobody holds the run's writer lock
    listed = runs.load_run(run)
    assert listed.state == "interrupted" and "--resume" in listed.problem
    assert launch.stop(run) is False
    time.sleep(0.2)
    assert stranger.poll() is None                        # the stranger lives


def test_a_run_from_before_the_lock_is_judged_by_its_pid_start_time(tmp_path, stranger):
    run = _tiny_run(tmp_path)
    (run / locks.WRITER_LOCK).unlink()                    # as a run written by an older version
    real = runs.process_identity(stranger.pid)
    assert real, "this test needs /proc"
    _claim_running(run, pid=stranger.pid, pid_start=real["pid_start"] + 1, boot_id=real["boot_id"])
    assert runs.load_run(run).state == "interrupted" and "belongs to another process" in runs.load_run(run).problem
    assert launch.stop(run) is False
    _claim_running(run, pid=stranger.pid, updated=time.time() - 2 * runs.STALE_SECONDS)   # no identity, no heartbeat
    assert runs.load_run(run).state == "interrupted"
    assert launch.stop(run) is False
    time.sleep(0.2)
    assert stranger.poll() is None
    _claim_running(run, pid=stranger.pid, **real)         # the identity matches: that is the run's process
    assert runs.load_run(run).state == "running"


def test_the_heartbeat_refreshes_a_running_status_and_stops_with_the_run(tmp_path):
    run = tmp_path / "beat"
    run.mkdir()
    writer = _StatusWriter(run, World(), epochs=3, heartbeat=0.1)
    writer.epoch_end(1, 1)
    first = runs.read_status(run)["updated"]
    time.sleep(0.5)
    assert runs.read_status(run)["updated"] > first       # refreshed with no progress made
    assert runs.read_status(run)["epochs_done"] == 1
    writer.done(1)
    done = runs.read_status(run)
    time.sleep(0.4)
    assert runs.read_status(run) == done and done["state"] == "done"


MERGER = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from dpaat_core import runs
    run, who, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for k in range(10):
        while time.time() < start + 0.4 * k:      # both processes merge at the same instant, ten times
            pass
        curve = pd.DataFrame({"attack": "pgd", "norm": "l2", "steps": 100 + 2 * k + who, "monotone": True,
                              "split": "test", "data": "d", "eps": [0.0, 0.5], "accuracy": [0.9, 0.4]})
        runs.save_robustness(run, curve)
""")


def test_two_merges_of_robustness_csv_at_the_same_instant_lose_no_curve(tmp_path):
    run = tmp_path / "merge"
    run.mkdir()
    start = time.time() + 6                               # time for both interpreters to import pandas
    procs = [subprocess.Popen([sys.executable, "-c", MERGER, str(run), str(who), str(start)], cwd=ROOT)
             for who in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    curves = runs.read_robustness(run)
    assert sorted(curves["steps"].unique()) == list(range(100, 120))      # 20 curves: every one of both writers
    assert len(curves) == 40 and not list(run.glob(".*.tmp"))


def _train_cli(store: Path, name: str, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpaat_core", "train", "--data", "synthetic:n=96,classes=3",
                             "--model", "resnet8", "--method", "dpaat", "--epochs", str(epochs), "--image-size", "16",
                             "--steps", "2", "--batch-size", "16", "--device", "cpu", "--early-stop", "none",
                             "--store", str(store), "--name", name, "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_the_run_stays_whole(tmp_path):
    first = _train_cli(tmp_path, "live", epochs=30)
    run = tmp_path / "live"
    deadline = time.time() + 120
    while not (run / "last.pt").is_file():                # one epoch done: a resume would have state to take
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "dpaat_core", "train", "--resume", str(run), "--device", "cpu",
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "already being trained by process" in second.stderr and str(first.pid) in second.stderr
    assert runs.load_run(run).state == "running"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert runs.load_run(run).state == "interrupted"      # the lock died with its holder
    resumed = subprocess.run([sys.executable, "-m", "dpaat_core", "train", "--resume", str(run), "--device", "cpu",
                              "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))                   # every epoch once: no 1, 2, 3, 3
