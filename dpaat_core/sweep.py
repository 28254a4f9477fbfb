"""Parameter sweeps on Optuna: a search space over the training settings, trials that are ordinary runs.

A sweep is an Optuna study. Each trial trains one run in the run store (``sweep-<study>-t<NNN>``, with a
``sweep.json`` naming its study, trial and parameters), then scores the run's best checkpoint on its validation
split with PGD-20 at one fixed eps (the sweep's ``eval_eps``, so trials that train at different eps are measured
alike). Objectives (all maximised): :data:`OBJECTIVES`. One objective samples with TPE, several with NSGA-II (a
Pareto front). With ``prune`` and one objective, each epoch's validation figure is reported and a median or
Hyperband pruner may stop the run (state ``stopped``, trial ``PRUNED``).

Storage: an SQLite file in the store (``<store>/sweeps.db``) by default; a ``postgresql://`` or ``mysql://`` URL
lets workers on several machines share one study (the run store then shared too, NFS or the like). Workers beat a
heartbeat; a trial whose worker died is marked failed when another worker notices and retried once more
(:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`). The trial budget is exact: a worker takes a new trial under a
lock (a file lock for SQLite, an advisory lock on the server) only while fewer than ``n_trials`` are finished,
running or waiting.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import math
import os
import re
import socket
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from dpaat_core.store import loading
from dpaat_core.config import METHODS, ConfigError, RunConfig
from dpaat_core.evaluate.robustness import evaluate
from dpaat_core.store.runs import atomic_write_json, read_record
from dpaat_core.train.loop import Stopped, resolve_device, train

#: what a trial's run may vary: space name -> (config section, field); ``beta`` is TRADES' name for lam
PARAMS = {
    "eps": ("attack", "eps"), "alpha_ratio": ("attack", "alpha_ratio"), "steps": ("attack", "steps"),
    "gamma": ("method", "gamma"), "lam": ("method", "lam"), "beta": ("method", "lam"),
    "beta_clean": ("method", "beta_clean"), "eps_min_ratio": ("method", "eps_min_ratio"),
    "eps_max_ratio": ("method", "eps_max_ratio"), "sigma": ("method", "sigma"), "threshold": ("method", "threshold"),
    "lr": ("train", "lr"), "weight_decay": ("train", "weight_decay"),
}
_INTEGER = ("steps",)
#: objective -> (what it is, the per-epoch validation figure reported for pruning)
OBJECTIVES = {
    "pgd20_balanced": ("PGD-20 balanced accuracy on validation at eval_eps", "val_robust_balanced_accuracy"),
    "pgd20": ("PGD-20 accuracy on validation at eval_eps", "val_robust_accuracy"),
    "balanced_accuracy": ("clean balanced accuracy on validation", "val_balanced_accuracy"),
    "accuracy": ("clean accuracy on validation", "val_accuracy"),
    "auc": ("clean one-vs-rest ROC AUC on validation, macro", "val_balanced_accuracy"),
}
PRUNERS = ("none", "median", "hyperband")
SAMPLERS = ("auto", "tpe", "nsga2", "random")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SweepError(ConfigError):
    """A sweep that cannot run as asked (bad space, objective, storage or name): one line saying why."""


def check_name(name: str) -> str:
    """``name`` if it can name a sweep (and its runs' folders), else a :class:`SweepError` saying why."""
    if not NAME.match(name or ""):
        raise SweepError(f"sweep name {name!r}: letters, digits, '.', '_' and '-' only, at most 64")
    return name


@dataclass(frozen=True)
class Param:
    name: str
    low: float = math.nan
    high: float = math.nan
    log: bool = False
    choices: tuple = ()

    def text(self) -> str:
        if self.choices:
            return f"{self.name}={'|'.join(self.choices)}"
        return f"{self.name}={self.low:g}:{self.high:g}" + (":log" if self.log else "")


def parse_space(text: str) -> dict[str, Param]:
    """``'eps=0.1:0.6,gamma=0.05:0.3,lam=0.1:2:log,threshold=batch_mean|class_mean'`` as :class:`Param` s."""
    if not isinstance(text, str) or not text.strip():
        raise SweepError("--space is empty: give name=low:high[,...], e.g. 'eps=0.1:0.6,gamma=0.05:0.3'")
    space: dict[str, Param] = {}
    for part in (p.strip() for p in text.split(",")):
        name, eq, rng = part.partition("=")
        name = name.strip()
        if not eq or not name or not rng.strip():
            raise SweepError(f"--space {part!r}: write name=low:high[:log] or name=a|b")
        if name not in PARAMS:
            raise SweepError(f"--space {part!r}: unknown parameter {name!r}; one of {', '.join(PARAMS)}")
        if name in space or (name in ("lam", "beta") and {"lam", "beta"} & set(space)):
            raise SweepError(f"--space names {name!r} twice")
        if "|" in rng:
            choices = tuple(c.strip() for c in rng.split("|"))
            if name != "threshold" or not all(choices) or len(set(choices)) != len(choices):
                raise SweepError(f"--space {part!r}: a list of choices (a|b) is for threshold only, each once")
            space[name] = Param(name, choices=choices)
            continue
        bits = rng.split(":")
        log = len(bits) == 3 and bits[2].strip() == "log"
        if len(bits) not in (2, 3) or (len(bits) == 3 and not log):
            raise SweepError(f"--space {part!r}: write {name}=low:high or {name}=low:high:log")
        try:
            low, high = float(bits[0]), float(bits[1])
        except ValueError:
            raise SweepError(f"--space {part!r}: the bounds must be numbers") from None
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            raise SweepError(f"--space {part!r}: need finite bounds with low < high")
        if log and low <= 0:
            raise SweepError(f"--space {part!r}: a log range needs low > 0")
        if name in _INTEGER and (low != int(low) or high != int(high)):
            raise SweepError(f"--space {part!r}: {name} takes whole numbers")
        space[name] = Param(name, low, high, log)
    return space


def apply_params(base: RunConfig, params: dict) -> RunConfig:
    """``base`` with the trial's values put in (validated by :class:`RunConfig` itself)."""
    changes: dict[str, dict] = {}
    for name, value in params.items():
        section, field = PARAMS[name]
        changes.setdefault(section, {})[field] = int(value) if name in _INTEGER else value
    return base.replace(**changes)


def check_space(base: RunConfig, space: dict[str, Param]) -> None:
    """Every corner of the space must be a config the trainer accepts: else a one-line error naming the bound."""
    method = base.method.name
    adaptive = METHODS[method].adaptive
    for name in space:
        if name in ("gamma", "eps_min_ratio", "eps_max_ratio") and not adaptive:
            raise SweepError(f"--space {name}: {method} keeps eps fixed, so {name} does nothing; "
                             "sweep it with an adaptive method (dpaat, dpaat_nosync, dpaat_cthr, dpaat_cnorm)")
        if name == "sigma" and method != "gaussian":
            raise SweepError(f"--space sigma: only the gaussian method trains on noise, not {method}")
    ranged = [p for p in space.values() if not p.choices]
    corners = [{p.name: (p.low, p.high)[(i >> j) & 1] for j, p in enumerate(ranged)} for i in range(2 ** len(ranged))]
    for corner in corners[:64] or [{}]:
        for choice in ([{}] if "threshold" not in space else [{"threshold": c} for c in space["threshold"].choices]):
            try:
                apply_params(base, corner | choice)
            except ConfigError as exc:
                where = ", ".join(f"{k}={v:g}" for k, v in corner.items())
                raise SweepError(f"--space at {where or 'its choices'}: {exc}") from None


def parse_objectives(text: str) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise SweepError(f"--objectives is empty: one or more of {', '.join(OBJECTIVES)}")
    bad = [n for n in names if n not in OBJECTIVES]
    if bad:
        raise SweepError(f"--objectives: unknown {', '.join(map(repr, bad))}; choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise SweepError("--objectives names one objective twice")
    return names


# --------------------------------------------------------------------------------------------- storage

def default_storage(store: Path) -> str:
    return f"sqlite:///{(Path(store) / 'sweeps.db').resolve()}"


def storage_tag(url: str, store: Path) -> str:
    """How a run folder names its sweep's storage: ``<store>/sweeps.db`` for the store's own file (so a store that
    moves keeps its sweeps), else the URL without its password."""
    return "<store>/sweeps.db" if url == default_storage(store) else public_url(url)


def public_url(url: str) -> str:
    """The storage URL without its password (what goes into run folders and messages)."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def _engine_url(url: str) -> str:
    """``postgresql://`` through psycopg 3 (the driver we pin) unless psycopg2 is there."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        if importlib.util.find_spec("psycopg2") is None:
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(url: Optional[str], store: Path, heartbeat: int = 10, grace: int = 30, connect_timeout: int = 5):
    """An Optuna RDB storage with heartbeats and the retry of dead workers' trials; a one-line
    :class:`SweepError` when it cannot be reached (within ``connect_timeout`` seconds for a server)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    url = url or default_storage(store)
    scheme = url.split(":", 1)[0].split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql", "postgres", "mysql"):
        raise SweepError(f"--storage {public_url(url)!r}: use sqlite:///<file>, postgresql://... or mysql://...")
    if scheme == "sqlite":
        db = Path(url.split(":///", 1)[-1])
        if not db.parent.is_dir():
            raise SweepError(f"--storage {url}: the folder {db.parent} does not exist")
        engine = {"connect_args": {"timeout": 60}}
    else:
        engine = {"connect_args": {"connect_timeout": connect_timeout}, "pool_pre_ping": True}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # two processes opening a new SQLite file at once both create its tables and one fails: one at a time. The file
    # appears the moment the first connects, before its tables exist, so every opening takes the lock; a read-only
    # store (as a viewer may serve) cannot hold one, and has its tables already
    guard = _file_lock(db.with_suffix(".lock"), optional=True) if scheme == "sqlite" else contextlib.nullcontext()
    try:
        with guard, warnings.catch_warnings():   # heartbeats: "experimental" in Optuna 5, the documented way to retry
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(_engine_url(url), engine_kwargs=engine, heartbeat_interval=heartbeat,
                              grace_period=grace, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                  max_retry=2))
    except ModuleNotFoundError as exc:
        raise SweepError(f"--storage {public_url(url)}: its database driver is not installed ({exc.name})") from None
    except Exception as exc:   # sqlalchemy's OperationalError and kin: the first line says why
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SweepError(f"--storage {public_url(url)}: cannot reach it ({reason})") from None


@contextlib.contextmanager
def _file_lock(path: Path, optional: bool = False):
    """An exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block; with ``optional``, none where
    ``path`` cannot be opened for writing (a read-only store)."""
    try:
        fh = open(path, "a")
    except OSError:
        if not optional:
            raise
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def budget_lock(storage, study_name: str):
    """Held while a worker counts the trials and takes a new one: a file lock beside an SQLite file, an advisory
    lock on a PostgreSQL or MySQL server (so workers on several machines agree)."""
    engine = storage.engine
    dialect = engine.dialect.name
    if dialect == "sqlite":
        with _file_lock(Path(engine.url.database).with_suffix(".lock")):
            yield
        return
    from sqlalchemy import text
    key = zlib.crc32(f"dpaat-sweep:{study_name}".encode())
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            conn.execute(text("SELECT GET_LOCK(:k, 600)"), {"k": str(key)})
        try:
            yield
        finally:
            if dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": str(key)})
            conn.commit()


# --------------------------------------------------------------------------------------------- the study

@dataclass(frozen=True)
class SweepSpec:
    """What every trial of one study shares; kept in the study so a second command must match it."""

    name: str
    base: RunConfig
    space: dict
    objectives: tuple
    eval_eps: float
    eval_steps: int = 20
    prune: str = "none"
    sampler: str = "auto"

    def identity(self) -> dict:
        base = self.base.to_dict()
        base["train"].pop("device", None)   # workers may train on different devices
        base["train"].pop("compile", None)
        return {"space": ",".join(p.text() for p in self.space.values()), "objectives": list(self.objectives),
                "eval_eps": self.eval_eps, "eval_steps": self.eval_steps, "base": base}


def _sampler(spec: SweepSpec, seed: int):
    import optuna
    kind = spec.sampler
    if kind == "auto":
        kind = "tpe" if len(spec.objectives) == 1 else "nsga2"
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=4)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(spec: SweepSpec):
    import optuna
    if spec.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if spec.prune == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.base.train.epochs)
    return optuna.pruners.NopPruner()


def worker_seed(base: int) -> int:
    """The sampler seed of this process: the sweep's seed mixed with the host and process, so that workers sharing a
    study do not propose the same settings (with one seed each would draw the same random trials)."""
    return zlib.crc32(f"{base}:{socket.gethostname()}:{os.getpid()}".encode())


def open_study(spec: SweepSpec, storage, create: bool = True, seed: Optional[int] = None):
    """The study ``spec.name`` in ``storage``, created on first use; a study of that name made with another space,
    objectives or shared settings is refused. ``seed``: the sampler's (default the sweep's own)."""
    import optuna
    seed = spec.base.train.seed if seed is None else seed
    if spec.prune != "none" and len(spec.objectives) > 1:
        raise SweepError("--prune works with one objective (Optuna does not prune multi-objective studies)")
    directions = ["maximize"] * len(spec.objectives)
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec, seed),
                                  pruner=_pruner(spec))
    except KeyError:
        if not create:
            raise SweepError(f"no sweep named {spec.name!r} in this storage") from None
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions,
                                    sampler=_sampler(spec, seed), pruner=_pruner(spec),
                                    load_if_exists=True)
        if "dpaat_sweep" not in study.user_attrs:
            study.set_user_attr("dpaat_sweep", spec.identity())
    theirs = study.user_attrs.get("dpaat_sweep")
    if theirs is None:
        raise SweepError(f"study {spec.name!r} in this storage was not made by dpaat_core sweep; choose another name")
    mine = json.loads(json.dumps(spec.identity()))
    if theirs != mine:
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        shown = f" (its space: {theirs['space']})" if "space" in diff else ""
        raise SweepError(f"sweep {spec.name!r} already exists with another {', '.join(diff)}{shown}; "
                         "give the new sweep another name")
    return study


def spec_from_study(study) -> dict:
    return study.user_attrs.get("dpaat_sweep") or {}


def counts(study) -> dict[str, int]:
    from optuna.trial import TrialState
    out = {s.name.lower(): 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] += 1
    return out


def run_id_of(study_name: str, number: int) -> str:
    return f"sweep-{study_name}-t{number:03d}"


def _check_store_owner(run_dir: Path, spec: SweepSpec, storage: str) -> None:
    """A trial's run folder that another sweep (same name, another storage) already wrote is refused."""
    tag = run_dir / "sweep.json"
    if tag.is_file():
        other = json.loads(tag.read_text())
        if other.get("storage") != storage:
            raise SweepError(f"{run_dir} belongs to sweep {other.get('study')!r} in {other.get('storage')}: two "
                             "sweeps of one name share this store; give this sweep another name")
    elif run_dir.exists():
        raise SweepError(f"{run_dir} exists and is not a trial of this sweep; give the sweep another name")


def score(run_dir: Path, objectives, eval_eps: float, eval_steps: int, device: str = "cpu") -> dict[str, float]:
    """The objectives of one finished run: its best checkpoint on its validation split."""
    model = loading.load_model(run_dir, device=device)
    val = loading.load_run_data(run_dir, "val")
    norm = read_record(run_dir).judged_norm
    ev = evaluate(model, val, "pgd", norm, eval_eps, eval_steps, device=device)
    figures = {"pgd20_balanced": ev.robust_balanced_accuracy, "pgd20": ev.robust_accuracy,
               "balanced_accuracy": ev.balanced_accuracy, "accuracy": ev.accuracy, "auc": ev.auc}
    return {name: float(figures[name]) for name in objectives}


class Every:
    """Calls ``fn`` every ``interval`` seconds in a daemon thread while the ``with`` block runs (first call at once);
    an exception in one call is dropped and the next comes on time. A trial's heartbeat, the sweep's progress bar."""

    def __init__(self, interval: float, fn: Callable[[], None], name: str):
        self.interval, self.fn = interval, fn
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def _loop(self):
        while not self.done.is_set():
            with contextlib.suppress(Exception):
                self.fn()
            self.done.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(timeout=5)


def run_trial(study, trial, spec: SweepSpec, store: Path, storage_url: str, device: Optional[str] = None) -> str:
    """Train and score one trial; returns its final state name. Pruned runs stop between batches."""
    from optuna.trial import TrialState
    params = {}
    for p in spec.space.values():
        if p.choices:
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.name in _INTEGER:
            params[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), log=p.log)
        else:
            params[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log)
    config = apply_params(spec.base, params)
    if device:
        config = config.replace(train={"device": device})
    rid = run_id_of(spec.name, trial.number)
    run_dir = Path(store) / rid
    where = storage_tag(storage_url, Path(store))
    _check_store_owner(run_dir, spec, where)
    trial.set_user_attr("run", rid)
    trial.set_user_attr("pid", os.getpid())
    tag = {"study": spec.name, "trial": trial.number, "storage": where, "params": params,
           "objectives": list(spec.objectives), "eval_eps": spec.eval_eps}
    pruned = threading.Event()
    report = OBJECTIVES[spec.objectives[0]][1]

    def progress(p):
        if p.phase == "epoch_end":
            if not (run_dir / "sweep.json").is_file():
                atomic_write_json(run_dir / "sweep.json", tag | {"state": "running"})
            if spec.prune != "none":
                trial.report(float(p.metrics.get(report, math.nan)), p.epoch)
                if p.epoch < p.epochs and trial.should_prune():
                    pruned.set()

    try:
        train(config, store=store, run_id=rid, progress=progress, should_stop=pruned.is_set)
    except Stopped:
        atomic_write_json(run_dir / "sweep.json", tag | {"state": "pruned"})
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    except Exception as exc:
        if run_dir.is_dir():
            atomic_write_json(run_dir / "sweep.json", tag | {"state": "failed", "message": str(exc)[:300]})
        trial.set_user_attr("error", f"{exc.__class__.__name__}: {exc}"[:300])
        study.tell(trial, state=TrialState.FAIL)
        raise
    values = score(run_dir, spec.objectives, spec.eval_eps, spec.eval_steps,
                   device=resolve_device(config.train.device))   # where the run trained: its GPU under auto
    atomic_write_json(run_dir / "sweep.json", tag | {"state": "complete", "values": values})
    study.tell(trial, [values[o] for o in spec.objectives])
    return "complete"


def work(spec: SweepSpec, n_trials: int, store: Path, storage_url: Optional[str] = None, device: Optional[str] = None,
         heartbeat: int = 10, grace: int = 30, poll: float = 1.0,
         on_trial: Optional[Callable[[str], None]] = None, storage=None) -> int:
    """One worker: take trials while the study has fewer than ``n_trials`` finished (complete or pruned), running or
    waiting; wait while the rest run elsewhere (a dead worker's trial comes back once its heartbeat is stale).
    Returns the number of trials this worker finished. A bad config or data stops the worker with its error.
    ``storage``: one already open on ``storage_url`` (else it is opened here)."""
    import optuna
    url = storage_url or default_storage(store)
    storage = storage or open_storage(url, store, heartbeat, grace)
    study = open_study(spec, storage, seed=worker_seed(spec.base.train.seed))
    mine = 0
    while True:
        with warnings.catch_warnings():   # "experimental since 2.9": the documented way to retry dead workers' trials
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        with budget_lock(storage, spec.name):
            c = counts(study)
            done = c["complete"] + c["pruned"]
            busy = c["running"] + c["waiting"]
            trial = None
            if done < n_trials and (done + busy < n_trials or c["waiting"]):
                trial = study.ask()
        if trial is None:
            if done >= n_trials:
                return mine
            time.sleep(poll)   # the last trials run in other workers: wait for them or for their heartbeat to stop
            continue
        with Every(heartbeat, lambda: storage.record_heartbeat(trial._trial_id), "dpaat-sweep-heartbeat"):
            state = run_trial(study, trial, spec, store, url, device)
        mine += 1
        if on_trial:
            on_trial(state)


def trials_frame(study):
    """The study's trials as a table: number, state, run, parameters, objective values, seconds."""
    names = spec_from_study(study).get("objectives") or ["value"]
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.values or [math.nan] * len(names)
        row = {"trial": t.number, "state": t.state.name.lower(), "run": t.user_attrs.get("run"),
               **{f"param {k}": v for k, v in t.params.items()}, **dict(zip(names, values)),
               "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
               if t.datetime_complete and t.datetime_start else math.nan}
        rows.append(row)
    return pd.DataFrame(rows)


def subset(study, numbers):
    """An in-memory copy of ``study`` holding only the trials ``numbers`` (for plots of a filtered view)."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    copy = optuna.create_study(directions=study.directions)
    keep = [t for t in study.get_trials(deepcopy=True) if t.number in set(numbers)]
    for t in keep:   # the copy numbers its trials afresh: the hover names each one's run and its number in the sweep
        t.set_user_attr("sweep trial", t.number)
    copy.add_trials(keep)
    copy.set_user_attr("dpaat_sweep", spec_from_study(study))
    return copy


def figures(study) -> dict:
    """Optuna's plotly figures of a study's complete trials: ``pareto`` (two objectives or more), ``history`` and
    ``parallel`` (the first objective), ``importance`` (from 3 trials with parameters that varied). A figure that
    cannot be drawn from these trials is left out."""
    import optuna.visualization as vis
    names = spec_from_study(study).get("objectives") or ["value"]
    multi = len(study.directions) > 1
    target = (lambda t: t.values[0]) if multi else None
    out = {}
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if multi and done:
            out["pareto"] = vis.plot_pareto_front(study, target_names=names)
        if done:
            out["history"] = vis.plot_optimization_history(study, target=target, target_name=names[0])
            out["parallel"] = vis.plot_parallel_coordinate(study, target=target, target_name=names[0])
        if len(done) >= 3 and done[0].params:
            try:
                out["importance"] = vis.plot_param_importances(study, target=target, target_name=names[0])
            except (RuntimeError, ValueError):   # every parameter constant among these trials
                pass
    return out


def list_sweeps(store: Path, storage_url: Optional[str] = None) -> list[str]:
    """Names of the sweeps in a storage (``[]`` when the default SQLite file does not exist yet)."""
    import optuna
    if storage_url is None and not (Path(store) / "sweeps.db").is_file():
        return []
    storage = open_storage(storage_url, store)
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


__all__ = ["PARAMS", "OBJECTIVES", "SweepError", "SweepSpec", "Param", "parse_space", "parse_objectives",
           "check_space", "apply_params", "open_storage", "open_study", "work", "score", "trials_frame",
           "list_sweeps", "run_id_of", "counts", "subset", "figures", "storage_tag", "check_name", "Every"]
