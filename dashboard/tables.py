"""The run tables the pages show, read from the store and cached until their files change: robustness curves,
certificates, corruptions, the audit's per-class figures, and what the trust line is made of."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard.state import stamp, unreadable
from dpaat_core.store import runs


def _table(run: runs.Run, read) -> pd.DataFrame:
    try:
        return read(run.path).assign(run=run.run_id)
    except runs.RunError as exc:
        unreadable(f"{run.run_id}: a saved table", exc)
        return pd.DataFrame()


def robustness(run: runs.Run) -> pd.DataFrame:
    """The run's saved robustness curves with a ``run`` column (empty if none, a warning if unreadable)."""
    return _table(run, runs.read_robustness)


def certified(run: runs.Run, split: str | None = "test", data: str | None = None) -> pd.DataFrame:
    """The run's certificates (``certified.csv``) of ``split`` and ``data`` (default: the run's own data) with a
    ``run`` column, one setting per sigma (the fullest: ``certify.fullest``); empty if none, a warning if unreadable."""
    from dpaat_core.evaluate.certify import fullest
    spec = data or run.record.spec
    return fullest(_table(run, lambda path: runs.read_certified(path, split, spec)))


def image_certificate(run: runs.Run, index: int) -> dict | None:
    """The certificate of test image ``index`` (its row of :func:`certified` at the smallest sigma, as a dict), or
    None when the run has not certified it."""
    found = certified(run)
    if not len(found):
        return None
    rows = found[found["index"] == int(index)].sort_values("sigma")
    return rows.iloc[0].to_dict() if len(rows) else None


def certificate_text(row: dict, classes: list[str]) -> str:
    """One line for a clinician: what the image's certificate guarantees, or that the smoothed model abstains."""
    setting = f"σ {row['sigma']:g}, n {int(row['n'])}, each guarantee failing with probability {row['alpha']:g}"
    if int(row["prediction"]) < 0:
        return (f"**Certified radius: none.** The smoothed model abstains on this image: under Gaussian noise no class "
                f"stays on top clearly enough to guarantee anything (leaning to {classes[int(row['top_class'])]}; "
                f"{setting}).")
    verdict = "✓ right" if int(row["prediction"]) == int(row["label"]) else f"✗ wrong (true {classes[int(row['label'])]})"
    return (f"**Certified l2 radius {row['radius']:.3f}** for {classes[int(row['prediction'])]} ({verdict}): no change "
            f"of the image with an l2 norm below {row['radius']:.3f} can alter the smoothed model's answer ({setting}).")


def corruptions(run: runs.Run) -> pd.DataFrame:
    """The run's saved corruption grid (``corruptions.csv``) with a ``run`` column (empty if none, a warning if
    unreadable)."""
    return _table(run, runs.read_corruptions)


@st.cache_data(show_spinner=False, max_entries=64)
def _audit_tables(run_dir: str, stamps: tuple, split: str, spec: str | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    from dpaat_core.evaluate.audit import read_per_class, read_protocol
    return (runs.select(read_protocol(run_dir), split=split, data=spec),
            runs.select(read_per_class(run_dir), split=split, data=spec))


def class_robustness(run: runs.Run, curves: pd.DataFrame, attack: str, norm: str, eps: float,
                     live: dict | None = None, data=None) -> tuple[pd.DataFrame, str]:
    """Each class's clean and robust accuracy of ``run`` on its test split against ``attack`` (the protocol's steps)
    in ``norm`` at ``eps``, and where they come from: the run's saved tables for the data spec typed in the sidebar,
    else its own (the audit's per_class.csv, else its curve at this eps among ``curves``, the page's rows), else
    ``live`` (a :func:`live_attack` result of this run on ``data``); (empty, "") when none has them. The labels of
    ``data``, when it is that spec's, give an older curve its class counts (``class_robustness.from_curve``)."""
    from dpaat_core.evaluate import class_robustness as by_class
    from dpaat_core.attack.attacks import ATTACKS
    from dpaat_core.evaluate.audit import PER_CLASS_FILE, PROTOCOL_FILE
    spec = st.session_state.get("data_spec", "").strip() or run.record.spec
    stamps = tuple(stamp(run.path / name) for name in (PROTOCOL_FILE, PER_CLASS_FILE))
    try:
        protocol, per_class = _audit_tables(str(run.path), stamps, "test", spec)
    except runs.RunError as exc:
        unreadable(f"{run.run_id}: the audit's tables", exc)
        protocol = per_class = pd.DataFrame(columns=["preset"])
    mine = runs.select(curves[curves["run"] == run.run_id], split="test", data=spec) if len(curves) else curves
    same = data is not None and data.source.spec == spec
    table, source = by_class.saved(protocol, per_class, mine, attack, norm, ATTACKS[attack].default_steps, eps,
                                   run.record.classes, data.labels.numpy() if same else None, run.record.seed)
    if not len(table) and live is not None and data is not None:
        table = by_class.from_outcomes(live["labels"], live["correct"], live["robust"], data.classes)
        source = f"this batch ({len(live['labels'])} images)"
    return table, source


@st.cache_data(show_spinner=False, max_entries=256)
def _accuracy(run_dir: str, stamps: tuple, _record, _best: dict) -> tuple:
    from dpaat_core.evaluate import trust
    return trust.accuracy(run_dir, _record, _best)


@st.cache_data(show_spinner=False, max_entries=64)
def localisation(run_dir: str, mtime: int, method: str, _record):
    """The localisation of the run's saved maps (``mtime``: the table's, so a new table is read afresh)."""
    from dpaat_core.evaluate import trust
    return trust.saved_localisation(run_dir, _record, method)


def accuracy_of(run: runs.Run) -> tuple:
    stamps = tuple(stamp(run.path / f) for f in ("protocol.csv", "robustness.csv", "metrics.jsonl"))
    return _accuracy(str(run.path), stamps, run.record, run.best)


def test_balanced_accuracy(run: runs.Run) -> float:
    """The run's balanced accuracy on the test split (audit, else a saved curve's clean point); NaN if not measured:
    the figure an imported model, without training metrics, is listed by."""
    if run.record is None:
        return float("nan")
    value, source = accuracy_of(run)
    return value if value is not None and source.startswith("test") else float("nan")
