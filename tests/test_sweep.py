"""Sweeps on Optuna (dpaat_core/sweep.py, ``python -m dpaat_core sweep``): the space, the objectives, bad input,
SQLite by default, and a real PostgreSQL server with two workers and a worker that dies mid-trial."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dpaat_core.store import runs
from dpaat_core.config import RunConfig, method_config
from dpaat_core.sweep import SweepError, apply_params, check_space, parse_objectives, parse_space

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "synthetic:n=60,classes=3", "--image-size", "16", "--method", "dpaat", "--epochs", "2",
        "--steps", "2", "--batch-size", "16", "--eval-steps", "2", "--threads", "1", "--device", "cpu"]
SPACE = "eps=0.1:0.6,gamma=0.05:0.3,lam=0.1:2:log"


def sweep(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "dpaat_core", "sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def study_of(name, storage):
    import optuna
    return optuna.load_study(study_name=name, storage=storage)


# ------------------------------------------------------------------------------------------ the space

def test_space_parses_ranges_logs_and_choices():
    space = parse_space("eps=0.1:0.6, lam=0.1:2:log,steps=3:9,threshold=batch_mean|class_mean")
    assert (space["eps"].low, space["eps"].high, space["eps"].log) == (0.1, 0.6, False)
    assert space["lam"].log and space["threshold"].choices == ("batch_mean", "class_mean")
    cfg = apply_params(RunConfig().replace(method=method_config("dpaat")),
                       {"eps": 0.2, "lam": 0.5, "steps": 4.0, "threshold": "class_mean", "gamma": 0.2})
    assert (cfg.attack.eps, cfg.method.lam, cfg.attack.steps, cfg.method.threshold, cfg.method.gamma) == \
        (0.2, 0.5, 4, "class_mean", 0.2)
    assert apply_params(RunConfig().replace(method=method_config("trades")), {"beta": 3.0}).method.lam == 3.0


@pytest.mark.parametrize("text, says", [
    ("", "empty"), ("eps", "name=low:high"), ("eps=0.6:0.1", "low < high"), ("eps=a:b", "numbers"),
    ("eps=0:1:log", "low > 0"), ("eps=0.1:0.5:cubic", "low:high:log"), ("size=1:2", "unknown parameter 'size'"),
    ("eps=0.1:0.2,eps=0.3:0.4", "twice"), ("steps=1.5:4", "whole numbers"), ("gamma=a|b", "threshold only"),
    ("eps=0.1:inf", "finite"),
])
def test_malformed_spaces_are_refused_with_the_reason(text, says):
    with pytest.raises(SweepError, match=says):
        parse_space(text)


@pytest.mark.parametrize("method, text, says", [
    ("dpaat", "eps=0.1:700", "eps=700"),                # past the trainer's own eps limit
    ("dpaat", "gamma=0.05:1.5", "gamma=1.5"),
    ("pgd_at", "gamma=0.05:0.3", "keeps eps fixed"),
    ("dpaat", "sigma=0.1:0.5", "gaussian"),
    ("dpaat", "threshold=batch_mean|quantile:2", "quantile"),
])
def test_spaces_outside_the_trainers_limits_are_refused(method, text, says):
    with pytest.raises(SweepError, match=says):
        check_space(RunConfig().replace(method=method_config(method)), parse_space(text))


def test_objectives_are_checked():
    assert parse_objectives("pgd20_balanced, auc") == ["pgd20_balanced", "auc"]
    for bad, says in (("", "empty"), ("pgd20,robustness", "unknown 'robustness'"), ("auc,auc", "twice")):
        with pytest.raises(SweepError, match=says):
            parse_objectives(bad)


# ------------------------------------------------------------------------------------------ SQLite, one machine

def test_a_sweep_on_sqlite_makes_ordinary_runs_and_continues_by_name(tmp_path):
    done = sweep("demo", *TINY, "--space", SPACE, "--trials", "3", "--store", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Pareto front of demo" in done.stderr
    study = study_of("demo", f"sqlite:///{tmp_path / 'sweeps.db'}")
    front = {t.user_attrs["run"] for t in study.best_trials}                  # the Pareto trials, and no other
    assert front and front == set(re.findall(r"sweep-demo-t\d{3}", done.stdout))
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 and len(trials[0].values) == 2
    for t in trials:
        run = runs.load_run(tmp_path / t.user_attrs["run"])
        assert run.state == "done" and run.method == "dpaat"
        assert run.config["attack"]["eps"] == pytest.approx(t.params["eps"])
        assert run.config["method"]["gamma"] == pytest.approx(t.params["gamma"])
        tag = json.loads((run.path / "sweep.json").read_text())
        assert tag["study"] == "demo" and tag["trial"] == t.number and tag["state"] == "complete"
        assert tag["values"]["balanced_accuracy"] == pytest.approx(t.values[1])
        assert 0.1 <= t.params["eps"] <= 0.6 and 0.1 <= t.params["lam"] <= 2
    more = sweep("demo", *TINY, "--space", SPACE, "--trials", "4", "--store", str(tmp_path))
    assert more.returncode == 0, more.stderr
    assert len(study_of("demo", f"sqlite:///{tmp_path / 'sweeps.db'}").get_trials()) == 4
    # the same name with another space is refused, and nothing is trained
    other = sweep("demo", *TINY, "--space", "eps=0.1:0.3", "--trials", "5", "--store", str(tmp_path))
    assert other.returncode == 2 and "already exists with another space" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert len(study_of("demo", f"sqlite:///{tmp_path / 'sweeps.db'}").get_trials()) == 4


def test_one_objective_with_pruning_reports_each_epoch(tmp_path):
    done = sweep("pruned", *TINY, "--space", "eps=0.1:0.6", "--objectives", "balanced_accuracy", "--prune", "median",
                 "--trials", "2", "--store", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "best trial of pruned" in done.stderr
    study = study_of("pruned", f"sqlite:///{tmp_path / 'sweeps.db'}")
    assert all(sorted(t.intermediate_values) == [1, 2] for t in study.trials)


@pytest.mark.parametrize("args, says", [
    (["--space", SPACE, "--objectives", "robustness"], "unknown 'robustness'"),
    (["--space", "eps=0.1"], "write eps=low:high"),
    (["--space", SPACE, "--objectives", "pgd20,auc", "--prune", "median"], "one objective"),
    (["--space", SPACE, "--storage", "redis://localhost"], "use sqlite"),
    (["--space", SPACE, "--storage", "sqlite:////nonexistent/folder/s.db"], "does not exist"),
    (["--space", SPACE, "--trials", "0"], "at least 1"),
])
def test_bad_sweep_input_is_one_line(tmp_path, args, says):
    done = sweep("bad", *TINY, *args, "--store", str(tmp_path), timeout=60)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tmp_path.glob("sweep-*"))


def test_an_unreachable_server_is_one_line_within_seconds(tmp_path):
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    done = sweep("far", *TINY, "--space", SPACE, "--store", str(tmp_path),
                 "--storage", f"postgresql://someone:secret@127.0.0.1:{port}/db", timeout=60)
    assert done.returncode == 2 and "cannot reach it" in done.stderr, done.stderr
    assert "secret" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 30


def test_two_sweeps_of_one_name_in_one_store_are_refused(tmp_path):
    first = sweep("same", *TINY, "--space", SPACE, "--trials", "1", "--store", str(tmp_path))
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "sweep-same-t000" / "weights.safetensors").read_bytes()
    other = f"sqlite:///{tmp_path / 'other.db'}"
    second = sweep("same", *TINY, "--space", SPACE, "--trials", "1", "--store", str(tmp_path), "--storage", other)
    assert second.returncode == 2 and "share this store" in second.stderr, second.stderr
    assert (tmp_path / "sweep-same-t000" / "weights.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------------------ a real PostgreSQL

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster: initdb in a temp folder, pg_ctl start on a free port (as the postgres user
    when we are root: the server refuses root), removed afterwards."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does this)")
    bindir = Path(initdb).resolve().parent
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="dpaat-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        import pwd
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _check_every_trial_once(study, store: Path, n: int):
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(complete) == n
    run_ids = [t.user_attrs["run"] for t in complete]
    assert len(set(run_ids)) == n
    for rid in run_ids:
        assert runs.load_run(store / rid).state == "done"
        assert json.loads((store / rid / "sweep.json").read_text())["state"] == "complete"


def test_local_workers_start_their_trials_together_and_a_dead_worker_is_not_waited_for(tmp_path):
    """``--workers N``: each worker says it is ready, then waits for the launcher's go, given once all are ready, so
    the first one up does not take a short sweep's every trial; a worker that died before it was ready is skipped."""
    from dpaat_core.cli.sweep import _start_together

    def worker(i, delay):
        code = (f"import pathlib, time; time.sleep({delay}); from dpaat_core.cli.sweep import _ready_then_wait; "
                f"_ready_then_wait(pathlib.Path({str(tmp_path)!r})); "
                f"pathlib.Path({str(tmp_path / f'started-{i}')!r}).write_text(repr(time.time()))")
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)

    procs = [worker(0, 0), worker(1, 2.0), subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])]
    began = time.monotonic()
    _start_together(tmp_path, procs, timeout=60)
    assert time.monotonic() - began < 30          # the go came when both live workers were ready, not at the cap
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 3]
    ready = max(f.stat().st_mtime for f in tmp_path.glob("ready-*"))
    started = [float((tmp_path / f"started-{i}").read_text()) for i in range(2)]
    assert len(list(tmp_path.glob("ready-*"))) == 2 and min(started) >= ready - 0.05, (started, ready)


def test_two_workers_on_postgres_finish_the_trials_once_each(tmp_path, postgres):
    done = sweep("pg2", *TINY, "--space", SPACE, "--trials", "4", "--workers", "2", "--store", str(tmp_path),
                 "--storage", postgres)
    assert done.returncode == 0, done.stderr
    study = study_of("pg2", postgres)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 4       # none lost, none extra
    _check_every_trial_once(study, tmp_path, 4)
    assert len({t.user_attrs["pid"] for t in study.get_trials()}) == 2            # both workers took trials
    # each worker samples with its own seed: two workers do not propose the same settings
    assert len({tuple(sorted(t.params.items())) for t in study.get_trials()}) == 4


def test_a_worker_killed_mid_trial_has_its_trial_retried(tmp_path, postgres):
    slow = [*TINY, "--epochs", "8"]   # long enough to be caught mid-trial
    common = ["--space", SPACE, "--trials", "3", "--store", str(tmp_path), "--storage", postgres,
              "--heartbeat", "1", "--grace", "3"]
    victim = subprocess.Popen([sys.executable, "-m", "dpaat_core", "sweep", "pgkill", *slow, *common, "--worker"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        running = []
        while time.monotonic() < deadline and not running:
            time.sleep(0.5)
            try:
                running = [t for t in study_of("pgkill", postgres).get_trials() if t.state.name == "RUNNING"
                           and t.user_attrs.get("pid") == victim.pid]
            except KeyError:   # the study is not made yet
                pass
        assert running, "the first worker never started a trial"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed = running[0].number
    survivor = sweep("pgkill", *slow, *common, timeout=600)
    assert survivor.returncode == 0, survivor.stderr
    study = study_of("pgkill", postgres)
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[killed] == "FAIL"
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    retried = [t for t in study.get_trials() if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE"
    assert retried[0].params == running[0].params                    # the same settings, run again
    _check_every_trial_once(study, tmp_path, 3)
