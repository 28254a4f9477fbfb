"""The run store: one folder per training run (config, metrics, per-sample dynamics, weights, status),
every file written atomically and read back without ever executing code from it."""
from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from dpaat_core.errors import RunError
# the file helpers and the table selection are the store's API too (runs.atomic_write_text, runs.select, ...)
from dpaat_core.store.files import (atomic_write_bytes, atomic_write_json, atomic_write_text, dumps,  # noqa: F401
                                    file_sha256, read_json, remove_temp_files)
from dpaat_core.store.liveness import own_identity, writer_gone
from dpaat_core.store.record import RunRecord, parse_record
from dpaat_core.store.tables import CURVE_KEYS, TABLES, select  # noqa: F401

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STATES = ("running", "done", "failed", "stopped")
CONFIG_SECTIONS = ("model", "data", "method", "dataset")
DYNAMICS_KEYS = {"index": np.int64, "label": np.int64, "delta_loss": np.float32, "eps": np.float32,
                 "fragile": np.bool_, "correct_clean": np.bool_, "correct_adv": np.bool_}


def _check_config(config, where) -> None:
    missing = [s for s in CONFIG_SECTIONS if not isinstance(config.get(s), dict)] if isinstance(config, dict) else ["all"]
    if missing:
        raise RunError(f"{where}: the config lacks its {', '.join(missing)} section(s)")


def _slug(text) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text or "")).strip("._-")


def default_run_id(config: dict, now: float | None = None) -> str:
    """``<YYYYmmdd-HHMMSS>-<method>-<model>-<data>`` in local time, e.g. ``20261125-142530-dpaat-resnet8-ham10000_sample``."""
    kind, _, arg = str((config.get("data") or {}).get("spec", "")).partition(":")
    name = re.split(r"[\\/]", arg.rstrip("\\/"))[-1]  # both separators: the spec may name a Windows path
    data = {"npz": Path(name).stem, "folder": name, "ham10000": name, "medmnist": arg.partition("@")[0]}.get(kind, kind)
    method, model = ((config.get(s) or {}).get("name") for s in ("method", "model"))
    parts = [time.strftime("%Y%m%d-%H%M%S", time.localtime(now)), _slug(method) or "run", _slug(model) or "model",
             _slug(data) or _slug(kind) or "data"]
    return "-".join(parts)[:100]


def check_run_id(run_id) -> str:
    """``run_id`` if it is a safe folder name, else a :class:`RunError` that says what is allowed."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise RunError(f"bad run id {run_id!r}: use 1-100 of A-Z a-z 0-9 . _ - starting with a letter or digit")
    return run_id


def create_run(store, config: dict, run_id: str | None = None) -> Path:
    """Make ``<store>/<run_id>/`` with config.json (``run_id`` filled in) and status.json ``running``; return its path."""
    _check_config(config, "create_run")
    run_id = check_run_id(default_run_id(config) if run_id is None else run_id)
    run_dir = Path(store) / run_id
    if run_dir.parent.exists() and not run_dir.parent.is_dir():
        raise RunError(f"{run_dir.parent}: the run store must be a folder, and this is a file")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()  # atomic: of two trainers given the same id, one gets here first
    except FileExistsError:
        if not run_dir.is_dir() or any(run_dir.iterdir()):
            raise RunError(f"run '{run_id}' already exists in {store}; choose another --name "
                           f"or continue it with --resume {run_dir}") from None
    atomic_write_json(run_dir / "config.json", {**config, "run_id": run_id})  # a copy: the caller's dict is left alone
    write_status(run_dir, "running")
    return run_dir


def read_config(run_dir) -> dict:
    """config.json as written (a dict); :func:`read_record` gives it typed."""
    file = Path(run_dir) / "config.json"
    config = read_json(file)
    _check_config(config, file)
    return config


def read_record(run_dir) -> RunRecord:
    """config.json parsed into a :class:`RunRecord` (a RunConfig or an ImportedModel, and the dataset info); a
    config neither shape accepts is a :class:`RunError` naming the file and the setting."""
    file = Path(run_dir) / "config.json"
    return parse_record(read_config(run_dir), str(file))


def _metric_lines(file: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for each non-blank line of metrics.jsonl, JSON null read as NaN; ``[]`` without a file."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise RunError(f"{file}: unreadable ({exc})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_hook=lambda d: {k: math.nan if v is None else v for k, v in d.items()})
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunError(f"{file}: line {n} is not a JSON object with an integer epoch: {line[:80]!r}")
        out.append((line, record))
    return out


def append_metrics(run_dir, record: dict) -> None:
    """Add one completed epoch's record (with an integer ``epoch``, 1-based) as a line of metrics.jsonl."""
    if not isinstance(record, dict) or not isinstance(record.get("epoch"), (int, np.integer)):
        raise ValueError(f"a metrics record is a dict with an integer 'epoch', got {record!r}")
    file = Path(run_dir) / "metrics.jsonl"
    old = "".join(line + "\n" for line in file.read_text(encoding="utf-8").splitlines()) if file.exists() else ""
    atomic_write_text(file, old + dumps(record) + "\n")  # the file is small: rewrite it whole, atomically


def read_metrics(run_dir) -> pd.DataFrame:
    """One row per epoch line; nested dicts flattened to ``"outer.inner"`` columns; JSON null as NaN."""
    records = [r for _, r in _metric_lines(Path(run_dir) / "metrics.jsonl")]
    return pd.json_normalize(records) if records else _no_metrics()


def _no_metrics() -> pd.DataFrame:
    return pd.DataFrame({"epoch": pd.Series(dtype="int64")})


def truncate_metrics(run_dir, last_epoch: int) -> None:
    """Keep only the lines with ``epoch <= last_epoch``: resume may find epochs newer than last.pt after a kill."""
    file = Path(run_dir) / "metrics.jsonl"
    lines = _metric_lines(file)
    kept = [line for line, r in lines if r["epoch"] <= last_epoch]
    if len(kept) < len(lines):
        atomic_write_text(file, "".join(line + "\n" for line in kept))


def write_status(run_dir, state: str, message: str | None = None, **progress) -> None:
    """status.json: ``state``, ``message``, the trainer's progress fields, pid (with its start time and boot id,
    see :func:`process_identity`), host and ``updated`` (unix seconds: the heartbeat)."""
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    atomic_write_json(Path(run_dir) / "status.json", {"state": state, "message": message, **progress, "pid": os.getpid(),
                                                      **own_identity(), "host": socket.gethostname(),
                                                      "updated": time.time()})


def read_status(run_dir) -> dict:
    file = Path(run_dir) / "status.json"
    status = read_json(file)
    if status.get("state") not in STATES:
        raise RunError(f"{file}: unknown state {status.get('state')!r}")
    return status


def _dynamics_file(run_dir, epoch: int) -> Path:
    return Path(run_dir) / "dynamics" / f"epoch_{int(epoch):03d}.npz"


def save_dynamics(run_dir, epoch: int, arrays: dict) -> Path:
    """Save one epoch's per-sample arrays (exactly the DYNAMICS_KEYS, each of shape [N]) as dynamics/epoch_NNN.npz."""
    if set(arrays) != set(DYNAMICS_KEYS):
        missing, unknown = sorted(set(DYNAMICS_KEYS) - set(arrays)), sorted(set(arrays) - set(DYNAMICS_KEYS))
        raise ValueError(f"dynamics need exactly the keys {', '.join(DYNAMICS_KEYS)}; missing {missing}, unknown {unknown}")
    arrays = {k: np.asarray(arrays[k], dtype=dtype) for k, dtype in DYNAMICS_KEYS.items()}  # the contract's dtypes
    if {v.shape for v in arrays.values()} != {arrays["index"].shape} or arrays["index"].ndim != 1:
        raise ValueError(f"dynamics arrays must be 1-D and equally long, got {({k: v.shape for k, v in arrays.items()})}")
    file = _dynamics_file(run_dir, epoch)
    file.parent.mkdir(exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(file, buf.getvalue())
    return file


def load_dynamics(run_dir, epoch: int) -> dict[str, np.ndarray]:
    file = _dynamics_file(run_dir, epoch)
    if not file.is_file():
        raise RunError(f"{file}: missing")
    try:
        with np.load(file, allow_pickle=False) as npz:  # an object array is refused here, never unpickled
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise RunError(f"{file}: refused to load ({exc.__class__.__name__}: {exc})") from None
    missing = [k for k in DYNAMICS_KEYS if k not in arrays]
    if missing or len({arrays[k].shape for k in DYNAMICS_KEYS}) > 1:
        raise RunError(f"{file}: " + (f"lacks {', '.join(missing)}" if missing else "arrays of different shapes"))
    return arrays


def dynamics_epochs(run_dir) -> list[int]:
    """The epochs that have a dynamics file, ascending."""
    names = [p.name for p in (Path(run_dir) / "dynamics").glob("epoch_*.npz")]
    return sorted(int(m.group(1)) for m in map(re.compile(r"epoch_(\d{3,})\.npz").fullmatch, names) if m)


def save_weights(path, state_dict: dict, half: bool = False) -> None:
    """A state_dict as safetensors; ``half`` stores floating tensors as float16 (integer buffers keep their dtype)."""
    tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
    tensors = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors.torch.save(tensors))


def load_weights(path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:
        reason = f"{exc.__class__.__name__}: {exc}" if Path(path).is_file() else "no such file"
        raise RunError(f"{path}: not a readable safetensors file ({reason})") from None


def save_checkpoint(path, state: dict) -> None:
    """A resume state of plain tensors, numbers, strings, lists and dicts: what ``weights_only`` loading accepts."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path) -> dict:
    if not Path(path).is_file():
        raise RunError(f"{path}: missing")
    try:  # weights_only: the unpickler rebuilds tensors and plain containers only, it never calls what the file names
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch's message is long: its first line names the refused global
        reason = f"{exc.__class__.__name__}: {(str(exc).strip() or '-').splitlines()[0]}"
        raise RunError(f"{path}: refused to load: not a plain tensor checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise RunError(f"{path}: refused to load: not a plain tensor checkpoint (a {type(state).__name__}, not a dict)")
    return state


@dataclass
class Run:
    """One run folder as read from disk; ``state`` adds interrupted/incomplete/corrupt to the status states."""

    path: Path
    run_id: str
    state: str
    problem: str | None
    config: dict | None        # config.json as written; ``record`` is the same, typed
    status: dict
    metrics: pd.DataFrame
    sweep: str | None = None   # ``<study> #<trial>`` for a sweep's trial (its ``sweep.json``), read once with the run
    record: RunRecord | None = None   # None when config.json is missing or unreadable (state incomplete or corrupt)

    def _typed(self, get):
        return None if self.record is None else get(self.record)

    method = property(lambda self: self._typed(lambda r: r.method))
    model = property(lambda self: self._typed(lambda r: r.model.name))
    data = property(lambda self: self._typed(lambda r: r.spec))
    eps = property(lambda self: self._typed(lambda r: r.attack and r.attack.eps))
    norm = property(lambda self: self._typed(lambda r: r.attack and r.attack.norm))
    epochs = property(lambda self: self._typed(lambda r: None if r.imported else r.config.train.epochs)
                      or self.status.get("epochs"), doc="planned epochs")
    classes = property(lambda self: self._typed(lambda r: r.classes))
    epochs_done = property(lambda self: int(self.metrics["epoch"].max()) if len(self.metrics) else 0)
    has_weights = property(lambda self: (self.path / "weights.safetensors").is_file())

    origin = property(lambda self: self._typed(lambda r: r.origin),
                      doc="where the model comes from: imported, from <run_id> (train --init-from) or trained")

    @property
    def best(self) -> dict:
        """The latest metrics row marked ``is_best``, else the last row, else ``{}``."""
        m = self.metrics
        if "is_best" in m and m["is_best"].eq(True).any():
            m = m[m["is_best"].eq(True)]
        return m.iloc[-1].to_dict() if len(m) else {}

    @property
    def modified(self) -> float:
        """Latest mtime (unix seconds) of the folder and its entries; an entry may vanish while we look."""
        times = []
        for p in (self.path, *(self.path.iterdir() if self.path.is_dir() else ())):
            try:
                times.append(p.stat().st_mtime)
            except OSError:
                pass
        return max(times, default=0.0)


def _sweep_tag(path: Path) -> str | None:
    try:
        tag = json.loads((path / "sweep.json").read_text())
        return f"{tag['study']} #{tag['trial']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_run(path) -> Run:
    """Read a run folder; a bad one gives state ``incomplete``/``corrupt`` and a ``problem``, never an exception."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a run folder")
    run = Run(path, path.name, "incomplete", None, None, {}, _no_metrics(), _sweep_tag(path))
    corrupt = []
    for name, attr, read in (("config.json", "config", read_config), ("status.json", "status", read_status),
                             ("metrics.jsonl", "metrics", read_metrics)):
        if name != "metrics.jsonl" and not (path / name).exists():
            run.problem = run.problem or f"{name} is missing"
            continue
        try:
            setattr(run, attr, read(path))
        except RunError as exc:  # name the file relative to the run: the table shows which run it is
            corrupt.append(str(exc).replace(f"{path}{os.sep}", ""))
    if run.config is not None:
        try:
            run.record = parse_record(run.config, "config.json")
        except RunError as exc:
            corrupt.append(str(exc))
    if corrupt:
        run.state, run.problem = "corrupt", "; ".join(corrupt)
    elif run.problem is None:
        run.state = run.status["state"]
        if run.state == "running" and (gone := writer_gone(run.status, path)):
            run.state, run.problem = "interrupted", f"{gone}; continue with: python -m dpaat_core train --resume {path}"
        elif run.state == "failed":
            run.problem = run.status.get("message") or "failed without a message"
        elif run.state in ("done", "stopped"):
            bad = _unreadable_files(path)
            if bad:
                run.state, run.problem = "corrupt", bad
    return run


def check_writable(run_dir, command: str) -> None:
    """Refuse, before any work, a run folder this process cannot write into: ``command`` saves its tables there."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", dir=run_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RunError(f"{run_dir}: cannot write into this run folder ({exc.strerror or exc}); {command} saves its "
                       "tables there, so nothing was computed") from None


def check_not_training(run_dir, command: str) -> None:
    """Refuse to measure a run while it trains: its weights change under the measurement, and the saved figures would
    not say which epoch they are of. A stopped, interrupted or finished run is measured at its best epoch."""
    run = load_run(run_dir)
    if run.state == "running":
        raise RunError(f"{run.run_id} is still training (epoch {run.epochs_done}/{run.epochs or '?'}): {command} "
                       "measures a finished run's weights; wait for it, or stop it (a stopped run is measured at its "
                       "best epoch so far)")


def _unreadable_files(run_dir: Path) -> str | None:
    """A cheap look at the weights and the resume state (headers only): what is wrong with them, or None."""
    weights, resume = run_dir / "weights.safetensors", run_dir / "last.pt"
    if weights.exists():
        try:
            with safetensors.safe_open(str(weights), "pt") as f:
                f.keys()
        except Exception as exc:  # noqa: BLE001 - truncated, hostile or not safetensors at all
            return f"weights.safetensors is unreadable ({str(exc).splitlines()[0][:120]})"
    if resume.exists():
        import zipfile
        try:
            with zipfile.ZipFile(resume) as z:
                if not any(n.endswith("data.pkl") for n in z.namelist()):
                    return "last.pt is not a PyTorch checkpoint"
        except (zipfile.BadZipFile, OSError) as exc:
            return f"last.pt is unreadable ({exc}); the run cannot be resumed"
    return None


def list_runs(store="checkpoints") -> list[Run]:
    """Every run folder in ``store`` (names starting with ``.``/``_`` skipped), newest first; ``[]`` without a store."""
    runs = []
    for entry in sorted(Path(store).iterdir()) if Path(store).is_dir() else ():
        if entry.is_dir() and not entry.name.startswith((".", "_")):
            try:
                runs.append(load_run(entry))
            except RunError:  # removed while we listed
                pass
    return sorted(runs, key=lambda r: r.modified, reverse=True)


def _weakest(best: dict) -> str | None:
    """``"akiec 0.12"``: the class with the lowest validation robust accuracy at the best epoch (None before runs
    logged it, or with no class measured)."""
    prefix = "val_per_class_robust_accuracy."            # metrics.jsonl's dict, flattened by read_metrics
    finite = {k[len(prefix):]: float(a) for k, a in best.items() if k.startswith(prefix) and a == a}
    if not finite:
        return None
    name = min(finite, key=finite.get)
    return f"{name} {finite[name]:.2f}"


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: identity, origin, attack, progress as ``"done/planned"``, the best epoch's validation
    numbers (robust balanced accuracy among them, and the class whose robust accuracy is lowest: where robustness
    stops at the common class; the clean macro ROC AUC, NaN for runs trained before it was logged), and the sweep trial
    it is, if any."""
    scores = ("val_accuracy", "val_balanced_accuracy", "val_robust_accuracy", "val_robust_balanced_accuracy", "val_auc")
    columns = ["run_id", "state", "method", "model", *scores, "val_weakest_robust_class", "epochs", "norm", "eps",
               "origin", "sweep", "problem", "data"]   # the headline figures first, the long data spec last
    rows = [[r.run_id, r.state, r.method, r.model, *(r.best.get(s, math.nan) for s in scores), _weakest(r.best),
             f"{r.epochs_done}/{r.epochs or '?'}", r.norm, r.eps, r.origin, r.sweep, r.problem, r.data] for r in runs]
    return pd.DataFrame(rows, columns=columns)


def public_config(config: dict | None) -> dict | None:
    """A run's config as anyone may see it: no path of the server (the data spec by its file's name, no data root,
    the weights file and the start run by their names)."""
    from dpaat_core.data import display_name   # here, not at the top: listing runs (the Runs page) need not load torchvision
    if config is None:
        return None
    out = json.loads(json.dumps(config))
    data = out.get("data") or {}
    if data.get("spec") is not None:
        data["spec"] = display_name(data["spec"])
    if data.get("root") is not None:
        data["root"] = "(set on the server)"
    for section, key in (("source", "file"), ("model", "init_from"), ("init", "run")):
        part = out.get(section) or {}
        if part.get(key):
            part[key] = Path(str(part[key])).name
    return out


# --- the run's tables: one record each in tables.TABLES; these names are the store's API for them ---------------

CORRUPTIONS_FILE = TABLES["corruptions"].file
ATTRIBUTION_IMAGES_FILE = TABLES["attribution_images"].file
save_robustness = TABLES["robustness"].save
save_corruptions = TABLES["corruptions"].save
save_certified = TABLES["certified"].save
read_attribution = TABLES["attribution"].read
read_attribution_images = TABLES["attribution_images"].read


def read_robustness(run_dir, fullest: bool = True) -> pd.DataFrame:
    """The run's ``robustness.csv`` (empty frame if none); an unreadable file is a :class:`RunError`. A curve measured
    on several sample counts (``n``: a quick look beside a full curve) is kept for each; ``fullest`` gives each
    curve's rows of its largest ``n`` only, as the pages and reports show it."""
    frame = TABLES["robustness"].read(run_dir)
    if not fullest or not len(frame):
        return frame
    top = frame.groupby(list(CURVE_KEYS), dropna=False)["n"].transform(lambda n: n.max() if n.notna().any() else math.nan)
    return frame[(frame["n"] == top) | top.isna()].reset_index(drop=True)


def read_corruptions(run_dir, split: str | None = None, data: str | None = None) -> pd.DataFrame:
    """The run's ``corruptions.csv`` (empty frame if none): corruption, severity (0: clean), split, data, n,
    accuracy, balanced_accuracy; only the rows of ``split`` and ``data`` when given."""
    return TABLES["corruptions"].read(run_dir, split=split, data=data)


def read_certified(run_dir, split: str | None = None, data: str | None = None) -> pd.DataFrame:
    """The run's ``certified.csv`` (written by ``python -m dpaat_core certify``; empty frame if none): one row per
    image and setting (sigma, n0, n, alpha, split, data) with label, prediction (-1: abstain), pa_lower and radius
    (NaN when abstaining); only the rows of ``split`` and ``data`` when given."""
    return TABLES["certified"].read(run_dir, split=split, data=data)


def save_attribution(run_dir, summary: pd.DataFrame, images: pd.DataFrame) -> tuple[Path, Path]:
    """Merge the means (``attribution.csv``) and the per-image rows (``attribution_images.csv``) of ``attribute``
    into the run: the rows of a method on the same split and data are replaced, other methods' kept."""
    return TABLES["attribution"].save(run_dir, summary), TABLES["attribution_images"].save(run_dir, images)
