"""What the pages share: the environment (viewer mode, the store), the run listing and the pages' default runs, and a
run's data, model and dynamics, each cached until its files change. Saved tables are read in ``tables``, results
computed on a model in ``compute``, and the controls the pages share are in ``widgets``."""
from __future__ import annotations

import os
import re
from pathlib import Path

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
    readable = [r for r in found if r.record is not None and r.sweep is None] or [r for r in found if r.record]
    return [max(readable, key=lambda r: r.modified).run_id] if readable else []


def stamp(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


@st.cache_data(show_spinner=False, max_entries=256)
def _dynamics(run_dir: str, epoch: int, mtime: int) -> pd.DataFrame:
    classes = runs.read_record(run_dir).classes
    from dashboard.charts import dynamics_frame
    return dynamics_frame(runs.load_dynamics(run_dir, epoch), classes).assign(epoch=epoch)


def dynamics(run: runs.Run, epoch: int) -> pd.DataFrame | None:
    """One epoch's per-sample dynamics as a frame (cached until the file changes); None, with a warning that
    names the file, when it cannot be read."""
    file = run.path / "dynamics" / f"epoch_{epoch:03d}.npz"
    try:
        return _dynamics(str(run.path), epoch, stamp(file))
    except Exception as exc:  # noqa: BLE001 - one bad file must not take the page down
        st.warning(f"{run.run_id}: dynamics/{file.name} cannot be read and is left out ({first_line(exc)})")
        return None


def first_line(exc: BaseException) -> str:
    """An error in one line, without the server's folders."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.replace(str(store().resolve()), "<store>").replace(str(store()), "<store>")


@st.cache_resource(show_spinner=False, max_entries=1)
def _data_store() -> dict:
    """Splits of data read by the pages, shared by the sessions (key: run, split, spec, root, config stamp)."""
    return {}


def keep(shared: dict, key, value, most: int):
    """``shared[key] = value``, first dropping the oldest entry when ``shared`` already holds ``most``."""
    if key not in shared and len(shared) >= most:
        shared.pop(next(iter(shared)))
    shared[key] = value
    return value


def _run_data(run_dir: str, split: str, spec: str | None, root: str | None, mtime: int):
    """The split (read once per key), with a bar that counts the decoded files while a folder of images is read."""
    shared, key = _data_store(), (run_dir, split, spec, root, mtime)
    if key not in shared:
        bar = st.empty()

        def show(done: int, total: int, what: str):
            bar.progress(done / total, text=f"Reading the {split} split's {what}: {done:,} of {total:,} "
                                            "(once, then kept for every page)")
        with st.spinner("Loading images…"):
            try:
                data = loading.load_run_data(run_dir, split, spec, root=root, on_progress=show)
            finally:
                bar.empty()
        keep(shared, key, data, most=8)
    return shared[key]


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
        key = (str(run.path), split, spec, root, stamp(run.path / "config.json"))
        if key in failed:
            problems.append(failed[key])
            continue
        try:
            data = _run_data(*key)
        except Exception as exc:  # noqa: BLE001 - a missing or moved dataset must not break the page
            failed[key] = f"{what}: {first_line(exc)}"
            problems.append(failed[key])
            continue
        (st.caption if not problems else st.info)(hide_paths(f"Images from {what}, {split} split."
                                                             + (" Not found: " + "; ".join(problems) if problems
                                                                else "")))
        return data
    st.warning(hide_paths("No images could be loaded for this run: " + "; ".join(problems)))
    return None


@st.cache_resource(show_spinner="Loading model…", max_entries=16)
def cached_model(run_dir: str, mtime: int):
    return loading.load_model(run_dir)


def weights_key(run: runs.Run) -> tuple[str, int]:
    """What a cached result on a run's model is keyed by: its folder and its weights' modification time."""
    return str(run.path), stamp(run.path / "weights.safetensors")


def model(run: runs.Run):
    """The run's best model on CPU, eval mode (cached until its weights change); None, with a warning that names
    the run, when its weights cannot be loaded."""
    try:
        return cached_model(*weights_key(run))
    except Exception as exc:  # noqa: BLE001 - truncated, hostile or mismatched weights: say so, keep the page
        st.warning(f"{run.run_id}: its weights cannot be loaded ({first_line(exc)}); it is left out here")
        return None


def unreadable(what: str, exc: BaseException) -> None:
    """Warn that ``what`` cannot be read: with the reason, or in viewer mode without it (it names server paths)."""
    st.warning(f"{what} cannot be read" + ("." if viewer_mode() else f": {exc}"))


def comparable_runs(run: runs.Run) -> dict:
    """The other runs with weights that predict the same classes as ``run``, by id: what a page compares it with."""
    return {r.run_id: r for r in list_runs() if r.has_weights and r.record is not None and r.run_id != run.run_id
            and r.record.classes == run.record.classes}
