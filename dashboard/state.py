"""What the pages share: the run store, cached reads keyed on file times, and the sidebar run picker."""
from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path
from typing import Callable

import pandas as pd
import streamlit as st

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.store import loading, runs
from dpaat_core.data import display_name


def viewer_mode() -> bool:
    """``DPAAT_VIEWER=1``: the dashboard as a clinic serves it to people who only look. No Train page and no control
    that reads a server path, starts a process or writes a file (uploads stay in memory)."""
    return os.environ.get("DPAAT_VIEWER", "").strip().lower() in ("1", "true", "yes", "on")


def hide_paths(text):
    """``text`` with every absolute path replaced by its last part, in viewer mode (a message as it may be shown to
    anyone); unchanged otherwise, and for what is not text."""
    if not viewer_mode() or not isinstance(text, str):
        return text
    return re.sub(r"(?<![\w.~])(/[^\s:;,'\"()]+)", lambda m: "…/" + Path(m.group(1)).name, text)


def refuse_in_viewer_mode(what: str) -> None:
    """Stop the page here in viewer mode: a page or control that is not offered is not reachable by its address."""
    if viewer_mode():
        st.error(f"{what} is not available in this viewer (DPAAT_VIEWER=1).")
        st.stop()


def store() -> Path:
    """The run store: ``$DPAAT_STORE``, else ``checkpoints/`` beside the dashboard."""
    return Path(os.environ.get("DPAAT_STORE") or ROOT / "checkpoints")


def store_signature(path: Path) -> tuple:
    """Names and modification times of the store's run folders and their files: changes when any run does."""
    if not path.is_dir():
        return ()
    entries = []
    for run in sorted(path.iterdir()):
        if run.is_dir() and not run.name.startswith((".", "_")):
            for f in (run, *run.iterdir()):
                try:
                    entries.append((str(f), f.stat().st_mtime_ns))
                except OSError:   # a file replaced while we looked
                    pass
    return tuple(entries)


@st.cache_data(show_spinner=False, max_entries=32)
def _listing(path: str, signature: tuple) -> list[runs.Run]:
    return runs.list_runs(path)


def list_runs() -> list[runs.Run]:
    """Every run in the store, re-read only when a file in it changed (a run in progress refreshes)."""
    path = store()
    return _listing(str(path), store_signature(path))


@st.cache_data(show_spinner=False, max_entries=32)
def _defaults(path: str, signature: tuple, _found: tuple, compare: bool) -> list[str]:
    from dpaat_core.evaluate import defaults
    if compare:
        return defaults.comparison(_found, path)
    first = defaults.default_run(_found, path)
    return [first] if first else []


def default_runs(found: list[runs.Run], compare: bool = False) -> list[str]:
    """What a page opens on (``dpaat_core.evaluate.defaults``): the store's default, else its best finished model; with
    ``compare``, that run and the best finished run of each other method on the same data. With nothing finished
    (a fresh store), the most recent readable run, so that a page still shows something."""
    path = store()
    chosen = _defaults(str(path), store_signature(path), tuple(found), compare)
    if chosen:
        return chosen
    readable = [r for r in found if r.config is not None and r.sweep is None] or [r for r in found if r.config]
    return [max(readable, key=lambda r: r.modified).run_id] if readable else []


def run_picker(label: str = "Runs", multi: bool = True, compare: bool = False) -> list[runs.Run]:
    """The sidebar's run selection, shared by the pages through ``st.session_state["runs"]``; ``compare``: with
    nothing picked yet, open on the comparison of the methods (:func:`default_runs`)."""
    found = list_runs()
    usable = [r.run_id for r in found if r.config is not None]
    chosen = [r for r in st.session_state.get("runs", []) if r in usable] or default_runs(found, compare and multi)
    with st.sidebar:
        if multi:
            chosen = st.multiselect(label, usable, default=chosen, key="run_picker_multi")
        elif usable:
            chosen = [st.selectbox(label, usable, index=usable.index(chosen[0]), key="run_picker_one")]
    st.session_state["runs"] = chosen
    by_id = {r.run_id: r for r in found}
    return [by_id[r] for r in chosen]


#: the pages a run can be opened in, from another page (the run becomes the picked one there)
RUN_PAGES = (("views/runs.py", "Runs"), ("views/robustness.py", "Robustness"),
             ("views/dynamics.py", "Training dynamics"))


def open_run_buttons(run_id: str, key: str, where=None) -> None:
    """One button per page in RUN_PAGES that opens it on ``run_id``."""
    for column, (page, label) in zip((where or st).columns(len(RUN_PAGES)), RUN_PAGES):
        if column.button(f"Open in {label}", key=f"{key}-{label}"):
            st.session_state["runs"] = [run_id]
            st.switch_page(page)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=256)
def _dynamics(run_dir: str, epoch: int, mtime: int) -> pd.DataFrame:
    config = runs.read_config(run_dir)
    from dashboard.charts import dynamics_frame
    return dynamics_frame(runs.load_dynamics(run_dir, epoch), config["dataset"]["classes"]).assign(epoch=epoch)


def dynamics(run: runs.Run, epoch: int) -> pd.DataFrame | None:
    """One epoch's per-sample dynamics as a frame (cached until the file changes); None, with a warning that
    names the file, when it cannot be read."""
    file = run.path / "dynamics" / f"epoch_{epoch:03d}.npz"
    try:
        return _dynamics(str(run.path), epoch, _mtime(file))
    except Exception as exc:  # noqa: BLE001 - one bad file must not take the page down
        st.warning(f"{run.run_id}: dynamics/{file.name} cannot be read and is left out ({_first_line(exc)})")
        return None


def _first_line(exc: BaseException) -> str:
    """An error in one line, without the server's folders."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.replace(str(store().resolve()), "<store>").replace(str(store()), "<store>")


@st.cache_resource(show_spinner="Loading images…", max_entries=8)
def _run_data(run_dir: str, split: str, spec: str | None, root: str | None, mtime: int):
    return loading.load_run_data(run_dir, split, spec, root=root)


def data_sources(run: runs.Run) -> list[tuple[str | None, str | None, str]]:
    """Where a page looks for a run's images, in order: ``(spec, root, what to say on screen)``.

    The spec typed in the sidebar; the run's own data spec; the same file under
    ``$DPAAT_DATA_ROOT``; the synthetic set with the run's class count.
    """
    own = (run.config or {}).get("data", {}).get("spec", "")
    typed = st.session_state.get("data_spec", "").strip()
    sources = [(typed, None, f"the data spec you entered ({typed})")] if typed else []
    sources.append((None, None, f"the run's own data ({display_name(own) if viewer_mode() else own})"))
    env = os.environ.get("DPAAT_DATA_ROOT")
    kind, _, arg = own.partition(":")
    if env and kind in ("npz", "ham10000", "folder") and arg:
        moved = f"{kind}:{Path(env) / Path(arg).name}"
        sources.append((moved, None, f"DPAAT_DATA_ROOT ({moved})"))
    elif env and kind == "medmnist":
        sources.append((own, env, f"DPAAT_DATA_ROOT ({env}/{arg})"))
    classes = (run.config or {}).get("dataset", {}).get("num_classes", 2)
    synthetic = f"synthetic:n=256,classes={classes}"
    sources.append((synthetic, None, f"the synthetic set ({synthetic}): not this run's data, for a look at the model"))
    return sources


def run_data(run: runs.Run, split: str):
    """The first readable data source for the run (cached), announced on screen; None if none is."""
    problems = []
    failed = st.session_state.setdefault("failed_sources", {})   # a source that failed is not tried on every re-run
    for spec, root, what in data_sources(run):
        key = (str(run.path), split, spec, root, _mtime(run.path / "config.json"))
        if key in failed:
            problems.append(failed[key])
            continue
        try:
            data = _run_data(*key)
        except Exception as exc:  # noqa: BLE001 - a missing or moved dataset must not break the page
            failed[key] = f"{what}: {_first_line(exc)}"
            problems.append(failed[key])
            continue
        (st.caption if not problems else st.info)(hide_paths(f"Images from {what}, {split} split."
                                                             + (" Not found: " + "; ".join(problems) if problems
                                                                else "")))
        return data
    st.warning(hide_paths("No images could be loaded for this run: " + "; ".join(problems)))
    return None


def data_spec_input() -> None:
    """A sidebar box for a data spec that overrides the run's own (same specs as the CLI); none in viewer mode,
    where a visitor may not name a path on the server."""
    if viewer_mode():
        st.session_state.pop("data_spec", None)
        return
    st.sidebar.text_input("Data spec (optional)", key="data_spec",
                          help="npz:<file>, medmnist:<flag>[@size], ham10000:<dir>, folder:<dir> or synthetic; "
                               "empty: the run's own data, then $DPAAT_DATA_ROOT, then the synthetic set")


@st.cache_resource(show_spinner="Loading model…", max_entries=16)
def _model(run_dir: str, mtime: int):
    return loading.load_model(run_dir)


def _weights_key(run: runs.Run) -> tuple[str, int]:
    """What a cached result on a run's model is keyed by: its folder and its weights' modification time."""
    return str(run.path), _mtime(run.path / "weights.safetensors")


def model(run: runs.Run):
    """The run's best model on CPU, eval mode (cached until its weights change); None, with a warning that names
    the run, when its weights cannot be loaded."""
    try:
        return _model(*_weights_key(run))
    except Exception as exc:  # noqa: BLE001 - truncated, hostile or mismatched weights: say so, keep the page
        st.warning(f"{run.run_id}: its weights cannot be loaded ({_first_line(exc)}); it is left out here")
        return None


@st.fragment(run_every=2.0)
def evaluation_progress(waiting: dict) -> None:
    """Progress of the ``evaluate`` processes started from a page (``{run_id: run_dir}``); the page re-runs, and
    reads what was written, when one ends."""
    from dpaat_core.cli import launch
    jobs = {rid: job for rid, path in waiting.items() if (job := launch.evaluating(path)) is not None}
    for rid, job in jobs.items():
        argv = job.get("argv", [])
        what = ("certified radii" if "certify" in argv else "the corruption grid" if "--corruptions" in argv
                else "the PGD-20 l2 curve")
        st.progress(job["progress"] or 0.0, text=f"{rid}: computing {what} · {job['line'][:90]}")
    if len(jobs) < len(waiting):
        st.rerun()


def unreadable(what: str, exc: BaseException) -> None:
    """Warn that ``what`` cannot be read: with the reason, or in viewer mode without it (it names server paths)."""
    st.warning(f"{what} cannot be read" + ("." if viewer_mode() else f": {exc}"))


def compute_buttons(selected: list, saved: pd.DataFrame, label, key: str, starter: str = "start_evaluate",
                    **start) -> None:
    """A button per run of ``selected`` with no rows in ``saved`` (a table with a ``run`` column; ``label(run_id)``
    on the button) that starts ``launch.<starter>(run, **start)`` (``start_evaluate`` or ``start_certify``) as a
    process of its own, and the progress of those started; nothing in viewer mode (it writes the store)."""
    from dpaat_core.cli import launch
    if viewer_mode():
        return
    done = set(saved.get("run", []))
    missing = [r for r in selected if r.run_id not in done]
    waiting = {r.run_id: r.path for r in missing if launch.evaluating(r.path) is not None}
    for run in missing:
        if run.run_id not in waiting and st.button(label(run.run_id), key=f"{key}-{run.run_id}"):
            try:
                getattr(launch, starter)(run.path, **start)
                waiting[run.run_id] = run.path
            except runs.RunError as exc:
                st.error(str(exc))
    if waiting:
        evaluation_progress(waiting)


def comparable_runs(run: runs.Run) -> dict:
    """The other runs with weights that predict the same classes as ``run``, by id: what a page compares it with."""
    classes = run.config["dataset"]["classes"]
    return {r.run_id: r for r in list_runs() if r.has_weights and r.config is not None and r.run_id != run.run_id
            and r.config["dataset"]["classes"] == classes}


def training_split_filter(run: runs.Run, data, split: str, column, key: str | None = None):
    """For images of the run's whole training split with saved dynamics: each image's fragile/stable split at the
    last epoch (by index) and the split picked in a radio in ``column``; else (None, "all")."""
    epochs = runs.dynamics_epochs(run.path) if split == "train" else []
    last = dynamics(run, epochs[-1]) if epochs else None
    if last is None or len(data) != run.config["dataset"]["train_size"]:
        return None, "all"
    return last.set_index("index")["split"], column.radio(f"In training (epoch {epochs[-1]})",
                                                          ["all", "fragile", "stable"], horizontal=True, key=key)


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
    spec = data or run.config["data"]["spec"]
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


@st.cache_data(show_spinner="Classifying the images…", max_entries=16)
def _predictions(run_dir: str, mtime: int, spec: str, split: str, _data) -> pd.DataFrame:
    from dpaat_core.evaluate.robustness import clean_logits
    with model_lock(run_dir):     # clean_logits switches the shared model to eval mode and back
        pred = clean_logits(_model(run_dir, mtime), _data, batch_size=256).argmax(1)
    return pd.DataFrame({"index": range(len(_data)), "label": _data.labels.numpy(), "pred": pred.numpy(),
                         "class": [_data.classes[int(c)] for c in _data.labels]})


def predictions(run: runs.Run, data, split: str) -> pd.DataFrame:
    """Each image's class and the run's clean prediction on ``data`` (cached per run, data and split)."""
    return _predictions(*_weights_key(run), data.source.spec, split, data)


@st.cache_data(show_spinner=False, max_entries=8)
def _report(run_dirs: tuple, stamps: tuple) -> str:
    from dpaat_core.report import report_html
    return report_html(list(run_dirs), viewer=viewer_mode())   # a viewer's download shows no server path


def _report_or_problem(run_dirs: tuple, stamps: tuple) -> str:
    """The report, or (a table that cannot be read, ...) a page that says what stopped it: a download has no
    page to show a warning on."""
    import html
    try:
        return _report(run_dirs, stamps)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the downloaded page's one line
        why = "one of the runs' saved tables could not be read" if viewer_mode() else _first_line(exc)
        return (f"<!DOCTYPE html><meta charset='utf-8'><title>No report</title><p>The report could not be made: "
                f"{html.escape(why)}</p>")


def report_download(selected) -> Callable[[], str]:
    """The audit report of the ``selected`` runs, built when the download is clicked (on Streamlit's download
    thread, not in the page script) and cached until a run folder changes; nothing is written on the server."""
    dirs, stamps = tuple(str(r.path) for r in selected), tuple(r.modified for r in selected)
    return lambda: _report_or_problem(dirs, stamps)


def eps_slider(where, eps0: float) -> float:
    """An eps slider from 0 to 4x the run's reference ``eps0`` in steps of ``eps0 / 20``; the value snapped to that
    grid: the browser computes arrow-key steps in floating point (0.3 - 4 * 0.015 arrives as 0.24000000000000002),
    and an attack, whose maps may move with the last bits of eps, then runs at the eps on show."""
    step = float(eps0) / 20
    value = where.slider("eps", 0.0, float(4 * eps0), float(eps0), step, format="%.4f")
    return round(round(value / step) * step, 10)


#: the explorer's attack steps: PGD-10, the setting ``python -m dpaat_core attribute`` writes into attribution.csv
EXPLORER_STEPS = 10


@st.cache_resource
def model_lock(run_dir: str) -> threading.Lock:
    """One lock per cached model: the model is shared by every session, and an attack (train/eval flags) or
    Captum (hooks) changes it while it runs, so two sessions take turns."""
    return threading.Lock()


def image_key(x) -> str:
    """A short fingerprint of an image tensor, for caching results on it."""
    return hashlib.sha256(x.detach().cpu().numpy().tobytes()).hexdigest()[:16]


@st.cache_data(show_spinner="Perturbing and explaining…", max_entries=64)
def _explanation(run_dir: str, mtime: int, key: str, _x, label, perturbation: tuple, methods: tuple) -> dict:
    import torch

    from dpaat_core.evaluate.attribution import clean_and_adversarial, clean_and_corrupted
    net = _model(run_dir, mtime)
    with model_lock(run_dir):
        if perturbation[0] == "corruption":
            _, name, severity, index = perturbation
            out = clean_and_corrupted(net, _x, name, severity, index=[index], methods=methods)
        else:
            _, attack, norm, eps, index = perturbation
            with torch.no_grad():
                clean = net(_x).argmax(1)
            y = torch.tensor([label]) if label is not None else clean     # the attack fights the truth when known
            # an image of a split starts from its own point, as in attribute's numbers and the gallery
            out = clean_and_adversarial(net, _x, y, eps, attack=attack, norm=norm, steps=EXPLORER_STEPS,
                                        methods=methods, index=None if index is None else [index])
    return {"x_adv": out["x_adv"].numpy(), "prob_clean": out["prob_clean"][0].numpy(),
            "prob_adv": out["prob_adv"][0].numpy(),
            "maps": {m: (a[0, 0].numpy(), b[0, 0].numpy()) for m, (a, b) in out["maps"].items()}}


def explanation(run: runs.Run, x, label, attack: str, norm: str, eps: float, methods,
                index: int | None = None) -> dict | None:
    """The explorer's numbers for one image: the attacked image, both probability sets and each method's clean and
    perturbed maps (numpy), computed once per (run, image, attack, norm, eps, methods) and cached; None, with a
    warning, when the run's weights cannot be loaded. ``index``: the image's index in its split, whose seeded start
    the attack then uses (the gallery's and ``attribute``'s maps); None (an upload): seed 0."""
    if model(run) is None:
        return None
    return _explanation(*_weights_key(run), image_key(x), x, label,
                        ("attack", attack, norm, float(eps), None if index is None else int(index)), tuple(methods))


def corrupted_explanation(run: runs.Run, x, index: int, corruption: str, severity: int, methods) -> dict | None:
    """:func:`explanation` with a natural corruption in place of the attack (seeded by the image's ``index``)."""
    if model(run) is None:
        return None
    return _explanation(*_weights_key(run), image_key(x), x, None,
                        ("corruption", corruption, int(severity), int(index)), tuple(methods))


@st.cache_data(show_spinner="Perturbing the batch…", max_entries=64)
def _live(run_dir: str, mtime: int, key: str, _x, _y, perturbation: tuple) -> dict:
    import torch

    from dpaat_core.attack.attacks import ATTACKS, attack_mode, perturb
    from dpaat_core.evaluate.corruptions import corrupt
    net = _model(run_dir, mtime)
    with model_lock(run_dir):
        if perturbation[0] == "corruption":
            x_adv = corrupt(_x, perturbation[1], perturbation[2], index=range(len(_x)))
        else:
            _, attack, norm, eps = perturbation
            x_adv = perturb(net, _x, _y, attack, norm, eps, ATTACKS[attack].default_steps)    # one attack, seeded
        with torch.no_grad(), attack_mode(net):
            logits = net(_x)
            p_clean, p_adv = logits.softmax(1), net(x_adv).softmax(1)
            (conf, clean), (conf_adv, adv) = p_clean.max(1), p_adv.max(1)
    correct, robust = clean == _y, (clean == _y) & (adv == _y)
    from dpaat_core.train.validation import balanced_accuracy
    y = _y.numpy()
    return {"accuracy": float(correct.float().mean()), "robust_accuracy": float(robust.float().mean()),
            "robust_balanced_accuracy": balanced_accuracy(y, torch.where(robust, _y, -1).numpy(), logits.shape[1]),
            "flipped": int((correct & ~robust).sum()), "x": _x.numpy(), "x_adv": x_adv.numpy(),
            "y": y, "pred": clean.numpy(), "pred_adv": adv.numpy(), "confidence": conf.numpy(),
            "confidence_adv": conf_adv.numpy(), "labels": y, "correct": correct.numpy(), "robust": robust.numpy()}


def _live_batch(run: runs.Run, data, n: int, perturbation: tuple) -> dict | None:
    if model(run) is None:
        return None
    x, y = data.batch(range(min(int(n), len(data))))
    return _live(*_weights_key(run), f"{data.source.spec}:{image_key(x)}", x, y,
                 perturbation)


def live_attack(run: runs.Run, data, n: int, attack: str, norm: str, eps: float) -> dict | None:
    """Attack the first ``n`` images of ``data`` once at ``eps`` (the protocol's steps) and return clean, robust and
    robust balanced accuracy, how many flipped, each image's label and outcome (``labels``, ``correct``, ``robust``),
    and the first four clean and attacked images with labels and predictions; cached."""
    return _live_batch(run, data, n, ("attack", attack, norm, float(eps)))


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
    spec = st.session_state.get("data_spec", "").strip() or (run.config.get("data") or {}).get("spec")
    stamps = tuple(_mtime(run.path / name) for name in (PROTOCOL_FILE, PER_CLASS_FILE))
    try:
        protocol, per_class = _audit_tables(str(run.path), stamps, "test", spec)
    except runs.RunError as exc:
        unreadable(f"{run.run_id}: the audit's tables", exc)
        protocol = per_class = pd.DataFrame(columns=["preset"])
    mine = runs.select(curves[curves["run"] == run.run_id], split="test", data=spec) if len(curves) else curves
    same = data is not None and data.source.spec == spec
    table, source = by_class.saved(protocol, per_class, mine, attack, norm, ATTACKS[attack].default_steps, eps,
                                   run.config["dataset"]["classes"], data.labels.numpy() if same else None,
                                   int((run.config.get("train") or {}).get("seed") or 0))
    if not len(table) and live is not None and data is not None:
        table = by_class.from_outcomes(live["labels"], live["correct"], live["robust"], data.classes)
        source = f"this batch ({len(live['labels'])} images)"
    return table, source


def live_corruption(run: runs.Run, data, n: int, corruption: str, severity: int) -> dict | None:
    """:func:`live_attack` with a natural corruption (each image seeded by its index) in place of the attack."""
    return _live_batch(run, data, n, ("corruption", corruption, int(severity)))


#: the gallery's attack: the explorer's (PGD-10, l2, the run's training eps), each image from its own start, seed 0
GALLERY_NORM = "l2"


@st.cache_resource(show_spinner=False, max_entries=1)
def _numbers_store() -> dict:
    """The gallery's computed numbers, shared by the sessions (key: run, weights, data, split, method, eps)."""
    return {}


def _image_numbers(run_dir: str, mtime: int, spec: str, split: str, method: str, eps: float, data) -> pd.DataFrame:
    """Every image's numbers, computed once per key with a progress bar that counts the images (24 at a time)."""
    from dpaat_core.evaluate.gallery import image_numbers
    store_, key = _numbers_store(), (run_dir, mtime, spec, split, method, eps)
    if key not in store_:
        bar = st.progress(0.0, text=f"Explaining every image of the split: 0 of {len(data)} (once per run, data and "
                                    "method)")
        table = image_numbers(_model(run_dir, mtime), data, eps, method, norm=GALLERY_NORM, steps=EXPLORER_STEPS,
                              batch_size=24, around=lambda: model_lock(run_dir),
                              callback=lambda done, total: bar.progress(
                                  done / total, text=f"Explaining every image of the split: {done} of {total}"))
        bar.empty()
        if len(store_) >= 16:
            store_.pop(next(iter(store_)))
        store_[key] = table
    return store_[key]


@st.cache_data(show_spinner=False, max_entries=32)
def _saved_numbers(run_dir: str, mtime: int, method: str, split: str, spec: str, eps: float) -> pd.DataFrame:
    """The rows of the run's ``attribution_images.csv`` made with the gallery's setting, by index (read once per
    version of the file)."""
    mine = runs.select(runs.read_attribution_images(run_dir), method=method, split=split, data=spec,
                       norm=GALLERY_NORM, steps=EXPLORER_STEPS, seed=0)
    mine = mine[(pd.to_numeric(mine["eps"]) - eps).abs() < 1e-9]
    return mine.sort_values("index").reset_index(drop=True)


def gallery_eps(run: runs.Run) -> float:
    """The eps the gallery attacks at: the run's reference eps in :data:`GALLERY_NORM`."""
    from dpaat_core.evaluate.robustness import reference_eps
    return float(reference_eps(run.config, GALLERY_NORM))


def gallery_numbers(run: runs.Run, data, split: str, method: str) -> tuple[pd.DataFrame | None, str]:
    """Every image's attribution numbers for the gallery, and where they came from: the run's saved
    ``attribution_images.csv`` when it covers the split with the gallery's setting, else computed here (in memory,
    cached; the store is only read)."""
    if model(run) is None:
        return None, ""
    eps = gallery_eps(run)
    try:
        mine = _saved_numbers(str(run.path), _mtime(run.path / runs.ATTRIBUTION_IMAGES_FILE), method, split,
                              data.source.spec, eps)
    except runs.RunError as exc:
        unreadable(f"{run.run_id}: attribution_images.csv", exc)
        mine = pd.DataFrame()
    if len(mine) == len(data) and set(mine["index"]) == set(range(len(data))):
        return mine, "saved with the run (attribution_images.csv)"
    table = _image_numbers(*_weights_key(run), data.source.spec, split, method,
                           eps, data)
    return table, "computed for this view (`python -m dpaat_core attribute RUN --n all` saves them with the run)"


@st.cache_data(show_spinner="Drawing the maps of this page…", max_entries=64)
def _page_maps(run_dir: str, mtime: int, spec: str, split: str, index: tuple, method: str, eps: float,
               _data) -> dict:
    from dpaat_core.evaluate.gallery import page_maps
    net = _model(run_dir, mtime)
    with model_lock(run_dir):
        return page_maps(net, _data, index, eps, method, GALLERY_NORM, EXPLORER_STEPS)


def gallery_maps(run: runs.Run, data, split: str, index, method: str) -> dict | None:
    """The clean and attacked images and maps of the images ``index`` (one page), cached per page."""
    if model(run) is None or not len(index):
        return None
    return _page_maps(*_weights_key(run), data.source.spec, split,
                      tuple(int(i) for i in index), method, gallery_eps(run), data)


@st.cache_data(show_spinner=False, max_entries=256)
def _accuracy(run_dir: str, stamps: tuple, _config: dict, _best: dict) -> tuple:
    from dpaat_core.evaluate import trust
    return trust.accuracy(run_dir, _config, _best)


@st.cache_data(show_spinner=False, max_entries=64)
def _localisation(run_dir: str, stamp: int, method: str, _config: dict):
    from dpaat_core.evaluate import trust
    return trust.saved_localisation(run_dir, _config, method)


def _accuracy_of(run: runs.Run) -> tuple:
    stamps = tuple(_mtime(run.path / f) for f in ("protocol.csv", "robustness.csv", "metrics.jsonl"))
    return _accuracy(str(run.path), stamps, run.config, run.best)


def test_balanced_accuracy(run: runs.Run) -> float:
    """The run's balanced accuracy on the test split (audit, else a saved curve's clean point); NaN if not measured:
    the figure an imported model, without training metrics, is listed by."""
    if run.config is None:
        return float("nan")
    value, source = _accuracy_of(run)
    return value if value is not None and source.startswith("test") else float("nan")


def trust_notice(run: runs.Run, method: str = "gradcam", numbers: pd.DataFrame | None = None) -> None:
    """How far to trust this run's maps, beside them: its balanced accuracy and its maps' localisation against
    chance (from ``numbers``, the per-image rows on show, else the saved test-split rows), with a plain warning when
    either is weak."""
    from dpaat_core.evaluate import trust
    balanced, source = _accuracy_of(run)
    found = trust.localisation(numbers, method) if numbers is not None else None
    if found is None:
        found = _localisation(str(run.path), _mtime(run.path / runs.ATTRIBUTION_IMAGES_FILE), method, run.config)
    level, text = trust.trust_line(balanced, source, found)
    {"trust": st.info, "doubt": st.warning, "unknown": st.info}[level](text, icon=":material/verified:" if
                                                                      level == "trust" else None)
