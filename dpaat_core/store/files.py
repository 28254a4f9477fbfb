"""Files of the run store written atomically (a reader sees the old file or the new one, never a part) and JSON
read back strictly: the lowest layer of the store, which the tables and the run folders build on."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from dpaat_core.errors import RunError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp makes 0600 files, but a shared run store should get the usual permissions


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in chunks (weights files can be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a reader sees the old file or the new one, never a part of either."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # same folder: replace is atomic
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave a temp file behind
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temp_files(run_dir, pattern: str = ".*.tmp") -> int:
    """Delete the ``.<name>.<random>.tmp`` files (those matching ``pattern``) a killed writer left (SIGKILL skips
    cleanup); how many went.

    Only while no writer is running: a live writer's temp file would be pulled from under it."""
    temps = [*Path(run_dir).glob(pattern), *(Path(run_dir) / "dynamics").glob(pattern)]
    for p in temps:
        p.unlink(missing_ok=True)
    return len(temps)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps(obj, indent: int | None = None) -> str:
    """Strict JSON: NaN/inf become ``null`` (no ``NaN`` tokens), numpy scalars become Python numbers."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        x = x.item() if isinstance(x, np.generic) else x
        return None if isinstance(x, float) and not math.isfinite(x) else x
    return json.dumps(clean(obj), indent=indent, allow_nan=False, ensure_ascii=False)


def atomic_write_json(path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, dumps(obj, indent) + "\n")  # encoding fails before the file is touched


def read_json(file: Path) -> dict:
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{file}: missing") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RunError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RunError(f"{file}: not a JSON object")
    return obj
