"""``python -m dpaat_core sweep NAME``: a parameter sweep on Optuna (:mod:`dpaat_core.sweep`), from one process to
many machines. ``train``'s flags give what every trial shares, ``--space`` what varies."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dpaat_core.cli.args import add_device_arg
from dpaat_core.cli.train import add_run_arguments, config_from_args
from dpaat_core.config import ConfigError
from dpaat_core.sweep import (Every, SweepError, SweepSpec, check_name, check_space, counts, default_storage, open_storage,
                    open_study, parse_objectives, parse_space, trials_frame, work)


def add_sweep_parser(sub) -> None:
    s = sub.add_parser(
        "sweep", help="tune eps, gamma, lam, ... with Optuna: every trial is a run in the store",
        description="Sweep training settings with Optuna. Every trial trains one run in the store "
                    "(sweep-NAME-tNNN) and is scored on its validation split at one eval eps. The same command on "
                    "several machines with one --storage URL and a shared --store works on one study.")
    s.add_argument("study", metavar="NAME", help="the study's name (letters, digits, . _ -); the same name continues it")
    add_run_arguments(s)
    w = s.add_argument_group("the sweep")
    w.add_argument("--space", required=True,
                   help="what varies: name=low:high[:log] or threshold=a|b, comma-separated, e.g. "
                        "'eps=0.1:0.6,gamma=0.05:0.3,lam=0.1:2:log'. Names: eps, alpha_ratio, steps, gamma, lam "
                        "(beta for TRADES), beta_clean, eps_min_ratio, eps_max_ratio, sigma, threshold, lr, "
                        "weight_decay")
    w.add_argument("--trials", type=int, default=20, help="trials the study should finish, over all workers (default 20)")
    w.add_argument("--objectives", default="pgd20_balanced,balanced_accuracy",
                   help="what to maximise, comma-separated: pgd20_balanced, pgd20, balanced_accuracy, accuracy, auc "
                        "(default pgd20_balanced,balanced_accuracy: a Pareto front). All on the validation split")
    w.add_argument("--eval-eps", type=float,
                   help="eps of the PGD that scores every trial (default: --eps, else 0.3), fixed so that trials "
                        "training at different eps are compared at the same attack")
    w.add_argument("--eval-steps", type=int, default=20, help="PGD steps of that attack (default 20)")
    w.add_argument("--prune", choices=("none", "median", "hyperband"), default="none",
                   help="stop unpromising trials early (one objective only; default none)")
    w.add_argument("--sampler", choices=("auto", "tpe", "nsga2", "random"), default="auto",
                   help="auto: TPE for one objective, NSGA-II for several")
    w.add_argument("--storage", help="Optuna storage URL (default sqlite:///<store>/sweeps.db); postgresql://user:pw@"
                                     "host/db or mysql://... to share the study across machines")
    w.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine (default 1): one GPU each where there are several, else "
                        "the CPU threads split between them")
    w.add_argument("--threads", type=int, help="torch CPU threads of each worker (default: cores / workers)")
    w.add_argument("--heartbeat", type=int, default=10, help="seconds between a worker's heartbeats (default 10)")
    w.add_argument("--grace", type=int, default=30,
                   help="seconds without a heartbeat after which a trial counts as dead and is retried (default 30)")
    add_device_arg(w, None, help="where trials train (default auto)")
    w.add_argument("--store", default="checkpoints", help="run store folder (default checkpoints)")
    w.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(run=_sweep)


def build_spec(args: argparse.Namespace):
    check_name(args.study)
    if args.trials < 1:
        raise SweepError(f"--trials {args.trials}: need at least 1")
    if args.workers < 1:
        raise SweepError(f"--workers {args.workers}: need at least 1")
    if args.eval_steps < 1:
        raise SweepError(f"--eval-steps {args.eval_steps}: need at least 1")
    objectives = parse_objectives(args.objectives)
    space = parse_space(args.space)
    if args.model is None and args.config is None and args.init_from is None:
        args.model = "resnet8"
    try:
        base = config_from_args(args)
    except ConfigError as exc:
        raise SweepError(str(exc).replace("train needs", "sweep needs")) from None
    check_space(base, space)
    eval_eps = args.eval_eps if args.eval_eps is not None else base.attack.eps
    if not (eval_eps > 0 and eval_eps < 100):
        raise SweepError(f"--eval-eps {eval_eps}: need a number in (0, 100)")
    return SweepSpec(args.study, base, space, tuple(objectives), float(eval_eps), args.eval_steps, args.prune,
                     args.sampler)


class _Monitor:
    """A bar over the study's finished trials with the best so far, read from the storage every second."""

    def __init__(self, study, spec, n_trials):
        self.study, self.spec, self.n = study, spec, n_trials
        self.bar = tqdm(total=n_trials, desc=f"sweep {spec.name}", unit="trial", file=sys.stderr, dynamic_ncols=True)
        self.ticker = Every(1.0, self.refresh, "dpaat-sweep-monitor")

    def refresh(self, force: bool = False):
        """Redraw when something changed (every second on a terminal, where the clock moves on)."""
        c = counts(self.study)
        text = f"running {c['running']}  failed {c['fail']}  {self.best()}"
        done = min(self.n, c["complete"] + c["pruned"])
        if force or sys.stderr.isatty() or (done, text) != (self.bar.n, self.bar.postfix):
            self.bar.n = done
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()

    def best(self) -> str:
        try:
            best = self.study.best_trials
        except Exception:
            return ""
        if not best:
            return ""
        if len(self.spec.objectives) == 1:
            return f"best {self.spec.objectives[0]} {best[0].values[0]:.3f} (trial {best[0].number})"
        return f"Pareto front {len(best)} trials"

    def __enter__(self):
        self.ticker.__enter__()
        return self

    def __exit__(self, *exc):
        self.ticker.__exit__(*exc)
        try:
            self.refresh(force=True)
        finally:
            self.bar.close()


START = "DPAAT_SWEEP_START"   # a local worker's environment: the folder where it says it is ready and waits for go


def _wait_for(done, timeout: float) -> None:
    """Poll ``done()`` every 50 ms until it holds or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def _ready_then_wait(folder: Path, timeout: float = 300) -> None:
    """A local worker: say it is ready (imports done, study open), then wait for the launcher's go, so that in a
    short sweep the first worker up does not take every trial while the others still import torch."""
    (folder / f"ready-{os.getpid()}").touch()
    _wait_for((folder / "go").exists, timeout)


def _start_together(folder: Path, procs: list, timeout: float = 300) -> None:
    """The launcher: say go once every worker still running is ready (a worker that died is not waited for)."""
    _wait_for(lambda: len(list(folder.glob("ready-*"))) >= sum(p.poll() is None for p in procs), timeout)
    (folder / "go").touch()


def _worker_commands(argv: list[str], workers: int, threads: int | None) -> list[tuple[list[str], dict]]:
    """One command and environment per local worker: a GPU each when there are several, else CPU threads."""
    gpus = torch.cuda.device_count()
    cores = os.cpu_count() or 1
    per = threads or max(1, cores // workers)
    out = []
    for i in range(workers):
        env = dict(os.environ)
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        out.append(([sys.executable, "-m", "dpaat_core", *argv, "--workers", "1", "--worker", "--threads", str(per)],
                    env))
    return out


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """``argv`` without ``flags`` and their values (``--workers 2`` and ``--workers=2``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def _sweep(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    url = args.storage or default_storage(store)
    storage = open_storage(url, store, args.heartbeat, args.grace)
    study = open_study(spec, storage)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        if START in os.environ:
            _ready_then_wait(Path(os.environ[START]))
        work(spec, args.trials, store, url, args.device, args.heartbeat, args.grace, storage=storage)
        return 0
    if args.workers == 1:
        with _Monitor(study, spec, args.trials):
            work(spec, args.trials, store, url, args.device, args.heartbeat, args.grace, storage=storage)
    else:
        argv = _strip(args.argv, ("--workers", "--threads"))
        with tempfile.TemporaryDirectory(prefix="dpaat-sweep-start-") as start:   # kept until the workers end
            procs = [subprocess.Popen(cmd, env=env | {START: start}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
                     for cmd, env in _worker_commands(argv, args.workers, args.threads)]
            try:   # a worker's stderr is read once it ends: what it writes before it is ready is a few lines
                _start_together(Path(start), procs)
                with _Monitor(study, spec, args.trials):
                    errors = [p.communicate()[1] for p in procs]
            except KeyboardInterrupt:
                for p in procs:
                    p.terminate()
                raise
        failed = [(p.returncode, e) for p, e in zip(procs, errors) if p.returncode]
        if failed:
            last = failed[0][1].strip().splitlines()[-1] if failed[0][1].strip() else f"exit {failed[0][0]}"
            print(f"{len(failed)} of {args.workers} workers failed: {last}", file=sys.stderr)
            return 1
    frame = trials_frame(study)
    done = frame[frame["state"] == "complete"]
    if len(done):
        best = {t.number for t in study.best_trials}
        shown = done[done["trial"].isin(best)].drop(columns=["state"])
        title = "best trial" if len(spec.objectives) == 1 else "Pareto front"
        print(f"{title} of {spec.name} ({len(done)} complete):", file=sys.stderr)
        print(shown.round(4).to_string(index=False))
    return 0
