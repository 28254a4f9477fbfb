"""The run store's tables: one :class:`Table` record per CSV a run folder can hold, in :data:`TABLES`.

A record says which file the table is, which columns identify a row (a merge replaces the old rows of the same key
and keeps every other), how rows are ordered within a key, and which columns a reader needs. Every table is read the
same way (an absent file is an empty table; an unreadable file, a missing column or a cell that should be a number and
is not is a :class:`~dpaat_core.errors.RunError` naming the file, never a crash further on) and merged the same way
(atomically, under the run's merge lock). What is particular to a table (a file written before a column existed,
a stricter check) is its ``upgrade`` function.

Adding a table is one record here; the ``evaluate/`` module that computes it calls ``TABLES[name].save``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd

from dpaat_core.errors import RunError
from dpaat_core.store.files import atomic_write_text, remove_temp_files
from dpaat_core.store.locks import merge_lock

#: the columns of the store's tables that hold numbers (and ``accuracy:<class>``, ``n:<class>``): a cell that is not
#: one is a RunError naming the file, its row and its column
NUMERIC_COLUMNS = frozenset((
    "eps", "eps_rms", "accuracy", "balanced_accuracy", "robust_accuracy", "robust_balanced_accuracy",
    "mean_average_precision", "auc", "steps", "alpha_ratio", "n", "average_precision", "class_index", "pgd20",
    "severity", "mean", "std", "median", "index", "label", "pred_clean", "pred_adv", "confidence_clean",
    "confidence_adv", "spearman", "topk_iou", "ssim", "mask_fraction", "energy_clean", "energy_adv",
    "energy_other_mask", "pointing_clean", "pointing_adv", "seed", "pa_lower", "radius", "sigma", "n0", "alpha",
    "count"))


def read_table(path, columns, missing_ok: bool = True) -> pd.DataFrame:
    """A CSV of the store with at least ``columns``: an empty frame of them if the file is absent
    (and ``missing_ok``); an unreadable file or a missing column is a :class:`RunError` naming it."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError) as exc:
        raise RunError(f"{path}: not a readable CSV ({exc})") from None
    missing = set(columns) - set(frame.columns)
    if missing:
        raise RunError(f"{path}: missing columns {', '.join(sorted(missing))}")
    return _numeric_columns(frame, path)


def _numeric_columns(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    for column in frame.columns:
        if column in NUMERIC_COLUMNS or str(column).startswith(("accuracy:", "n:")):
            if pd.api.types.is_numeric_dtype(frame[column]):
                continue
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = values.isna() & frame[column].notna() & frame[column].astype(str).str.strip().ne("")
            if bad.any():
                row = int(bad.to_numpy().argmax())
                raise RunError(f"{path}: column {column}, row {row + 2} holds {str(frame[column].iloc[row])[:40]!r}, "
                               "not a number (a damaged or edited file)")
            frame[column] = values
    return frame


def select(frame: pd.DataFrame, **values) -> pd.DataFrame:
    """The rows of a store table whose columns equal ``values`` (a None value, or a column the table lacks, selects
    every row): e.g. ``select(curves, split="test", data=spec)``."""
    keep = pd.Series(True, index=frame.index)
    for column, value in values.items():
        if value is not None and column in frame:
            keep &= frame[column].eq(value)
    return frame[keep]


def merge_table(run_dir, name: str, frame: pd.DataFrame, keys: Sequence[str], order: Sequence[str],
                read) -> Path:
    """Merge ``frame`` into the run's table ``name``: old rows with the same ``keys`` are replaced, others kept.
    Atomic, and under the run's merge lock (``locks.merge_lock``), so concurrent merges each keep the other's rows."""
    path = Path(run_dir) / name
    keys = list(keys)
    frame = frame.assign(**{k: math.nan for k in keys if k not in frame})   # a key the rows lack: empty, as in a file
    with merge_lock(run_dir):   # two evaluate processes finishing at once must not lose each other's rows
        remove_temp_files(run_dir, f".{name}.*.tmp")   # left by a killed writer: none can be live now
        old = read(run_dir)
        if len(old):
            same = _key_tuples(old, keys).isin(set(_key_tuples(frame, keys)))
            frame = pd.concat([old[~same], frame], ignore_index=True)
        atomic_write_text(path, frame.sort_values([*keys, *order]).to_csv(index=False))
    return path


def _key_tuples(frame: pd.DataFrame, keys: list) -> pd.Series:
    """Each row's key as comparable text: numbers as floats (64 read back from a CSV equals 64.0), empty as "nan"."""
    def text(column: pd.Series) -> pd.Series:
        numbers = pd.to_numeric(column, errors="coerce")
        if (numbers.notna() | column.isna()).all() and column.map(lambda v: not isinstance(v, bool)).all():
            return numbers.astype(float).astype(str)
        return column.astype(str)
    if not len(frame):
        return pd.Series([], dtype=object)
    return pd.concat([text(frame[k]) for k in keys], axis=1).apply(tuple, axis=1)


@dataclass(frozen=True)
class Table:
    """One CSV table of a run folder."""

    file: str                   # its name in the run folder
    keys: tuple[str, ...]       # a row's identity: a merge replaces the old rows of the same key
    order: tuple[str, ...]      # the order of rows within a key, after the keys
    columns: tuple[str, ...]    # what a reader needs besides the keys: a file without one is refused
    # a file of an older writer brought up to date, or a stricter check (the frame as read, its path)
    upgrade: Optional[Callable[[pd.DataFrame, Path], pd.DataFrame]] = None
    required_keys: bool = True  # False: a file from before some key columns existed is read (``upgrade`` adds them)

    def read(self, run_dir, **where) -> pd.DataFrame:
        """The run's table (empty if the file is absent), only the rows whose columns equal ``where`` (None: all)."""
        path = Path(run_dir) / self.file
        frame = read_table(path, [*(self.keys if self.required_keys else ()), *self.columns])
        if self.upgrade is not None:
            frame = self.upgrade(frame, path)
        return select(frame, **where)

    def save(self, run_dir, frame: pd.DataFrame) -> Path:
        """Merge ``frame`` into the run's table: the old rows of the same key are replaced, every other row kept."""
        return merge_table(run_dir, self.file, frame, self.keys, self.order, self.read)


def _with_count(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    if "n" not in frame:                       # a file from before curves kept their sample count
        frame["n"] = math.nan
    return frame


def _with_where(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """A file from before the table had a ``data`` (or ``split``) column gets an empty one: its rows match no spec."""
    return frame.assign(**{key: frame[key] if key in frame else None for key in ("split", "data")})


def _strict_certificates(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Every setting and outcome a number (radius NaN only when abstaining), ``correct`` true or false."""
    for column in ("sigma", "n0", "n", "alpha", "index", "label", "prediction", "pa_lower", "radius"):
        values = pd.to_numeric(frame[column], errors="coerce")
        if (values.isna() & frame[column].notna()).any() or (column != "radius" and values.isna().any()):
            raise RunError(f"{path}: column {column} holds values that are not numbers")
        frame[column] = values
    correct = frame["correct"].astype(str).str.lower()
    if not correct.isin(["true", "false"]).all():
        raise RunError(f"{path}: column correct holds values other than True and False")
    frame["correct"] = correct.eq("true")
    return frame


CURVE_KEYS = ("attack", "norm", "steps", "monotone", "split", "data")   # one robustness curve
TABLES: dict[str, Table] = {t.file.removesuffix(".csv"): t for t in (
    # robustness curves: a curve measured on several sample counts (a quick look beside a full one) keeps each
    Table("robustness.csv", (*CURVE_KEYS, "n"), ("eps",), (*CURVE_KEYS, "eps", "accuracy"), _with_count,
          required_keys=False),
    Table("corruptions.csv", ("corruption", "severity", "split", "data"), (), ("accuracy", "balanced_accuracy", "n")),
    # the paper's protocol (one row per preset) and its per-class rows, written by evaluate --protocol and audit
    Table("protocol.csv", ("preset", "split", "data"), (), ("preset", "accuracy", "robust_accuracy", "eps"),
          _with_where, required_keys=False),
    Table("per_class.csv", ("preset", "split", "data"), ("class_index",),
          ("class_index", "class", "n", "accuracy", "robust_accuracy", "average_precision")),
    Table("apgd.csv", ("norm", "split", "data"), (), ("eps", "pgd20", "robust_accuracy")),
    # attribution: the means of each method and metric, and each image's row
    Table("attribution.csv", ("method", "split", "data"), ("metric",), ("method", "metric", "mean", "std", "median", "n"),
          required_keys=False),
    Table("attribution_images.csv", ("method", "split", "data"), ("index",),
          ("index", "label", "pred_clean", "spearman", "eps", "norm", "steps")),
    # certificates: one image's at one setting, so a quick look never replaces a fuller run's rows
    Table("certified.csv", ("sigma", "n0", "n", "alpha", "split", "data", "index"), (),
          ("label", "prediction", "correct", "pa_lower", "radius"), _strict_certificates),
)}
