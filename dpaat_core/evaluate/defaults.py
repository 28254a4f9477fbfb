"""Which run a page opens on: the store's chosen default, else the best finished model, never a stub.

The keeper of a store may name its default (``python -m dpaat_core runs --set-default RUN``, written to
``<store>/default.json``). Without one, the default is the finished run (state ``done``, with weights, at least
:data:`MIN_EPOCHS` epochs, not a sweep's trial) with the best balanced accuracy, audited figures first
(:func:`dpaat_core.evaluate.trust.accuracy`). A running, stopped, failed or tiny run is opened only when the user picks it;
a short run started from a trained model's weights is not tiny.
The comparison a robustness page opens on is the best such run of each method on the default's data and size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from dpaat_core.store import runs
from dpaat_core.evaluate import trust

DEFAULT_FILE = "default.json"
#: a run trained for fewer epochs than this is a test or a stub, not a model to show first
MIN_EPOCHS = 3


def read_default(store) -> Optional[str]:
    """The run id the store names as its default, or None (no file, or one that cannot be read)."""
    try:
        value = json.loads((Path(store) / DEFAULT_FILE).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def set_default(store, run_id: str) -> Path:
    """Name ``run_id`` the store's default; it must be a finished run with weights (a RunError says why not)."""
    run = runs.load_run(Path(store) / runs.check_run_id(run_id))
    if run.state != "done" or not run.has_weights:
        raise runs.RunError(f"{run_id} is {run.state}{'' if run.has_weights else ', without weights'}: only a "
                            "finished run with weights can be the default")
    path = Path(store) / DEFAULT_FILE
    runs.atomic_write_json(path, {"run": run_id})
    return path


def clear_default(store) -> bool:
    """Remove the store's default (the best finished run is chosen again); False if there was none."""
    try:
        (Path(store) / DEFAULT_FILE).unlink()
        return True
    except FileNotFoundError:
        return False


def showable(run: runs.Run, found: Optional[Sequence[runs.Run] | Mapping[str, runs.Run]] = None) -> bool:
    """A run a page may open on by itself: finished, with weights, trained long enough (or imported), not a trial.
    A run started from another run's weights (``train --init-from``) counts that run's epochs too: a two-epoch
    fine-tune of a model is not a stub, one of a stub is (a source outside ``found`` counts as a model)."""
    if not (run.state == "done" and run.has_weights and run.config is not None and run.sweep is None):
        return False
    return run.origin == "imported" or trained_epochs(run, found) >= MIN_EPOCHS


def trained_epochs(run: runs.Run, found: Optional[Sequence[runs.Run] | Mapping[str, runs.Run]] = None,
                   depth: int = 0) -> float:
    """The epochs behind a run's weights: its own, plus those of the run it started from (followed through
    ``found``, runs or runs by id; an imported source, or one not there, counts as a trained model)."""
    start = (run.record.init or {}).get("run_id") if run.record is not None else None
    if start is None:
        return run.epochs_done
    by_id = found if isinstance(found, Mapping) else {r.run_id: r for r in found or ()}
    source = by_id.get(start)
    if source is None or source.origin == "imported" or depth > 8:
        return float("inf")
    return run.epochs_done + trained_epochs(source, by_id, depth + 1)


def score(run: runs.Run) -> tuple:
    """How good a run looks for opening on: (has a test-split figure, balanced accuracy); higher is better."""
    value, source = trust.accuracy(run.path, run.record, run.best)
    return (source.startswith("test"), value if value is not None else -1.0)


def _ranked(found: Sequence[runs.Run]) -> list[runs.Run]:
    """The showable runs, best first (each run's figures read once)."""
    by_id = {r.run_id: r for r in found}
    scores = {r.run_id: score(r) for r in found if showable(r, by_id)}
    return sorted((r for r in found if r.run_id in scores), key=lambda r: scores[r.run_id], reverse=True)


def default_run(found: Sequence[runs.Run], store, ranked: Optional[list] = None) -> Optional[str]:
    """The run id to open on (see the module's docstring), or None when no run is showable."""
    by_id = {r.run_id: r for r in found}
    named = read_default(store)
    if named in by_id and by_id[named].has_weights and by_id[named].config is not None:
        return named
    ranked = _ranked(found) if ranked is None else ranked
    return ranked[0].run_id if ranked else None


def comparison(found: Sequence[runs.Run], store) -> list[str]:
    """The default run and the best showable run of each other method on the same data and image size."""
    ranked = _ranked(found)
    first = default_run(found, store, ranked)
    if first is None:
        return []
    by_id = {r.run_id: r for r in found}
    key = lambda r: (r.record.spec, r.record.dataset.image_size) if r.record else None  # noqa: E731
    best: dict = {by_id[first].method: first}
    for run in ranked:
        if key(run) == key(by_id[first]):
            best.setdefault(run.method, run.run_id)
    return list(best.values())
