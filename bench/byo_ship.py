"""Ship the runs of ``bench/byo_demo.sh`` as demo runs: copied into checkpoints/ without the resume state and the
report (both regenerate), the hardened run's start pointed at the shipped imported run, and the weights stored as
float16 where that changes no clean prediction and no PGD-20 outcome on the test split (``fp16_check.json``).

    python bench/byo_ship.py study_runs/byo/demo-imported-mobilenet_v3_small-ham10000 \
        study_runs/byo/demo-hardened-mobilenet_v3_small-ham10000
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from demo_runs import halve_if_lossless
from dpaat_core.store import runs

DEST = Path(__file__).resolve().parents[1] / "checkpoints"


def ship(src: Path, shipped: dict) -> Path:
    dest = DEST / src.name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("last.pt", "report.html", ".*.lock", ".*.tmp", "*.log"))
    config = runs.read_config(dest)
    start = (config.get("init") or {}).get("run_id")
    if start in shipped:                       # the start as a clean clone has it
        config["init"]["run"] = config["model"]["init_from"] = f"checkpoints/{start}"
        runs.atomic_write_json(dest / "config.json", config)
    check = halve_if_lossless(dest)
    print(dest, check)
    return dest


def main() -> None:
    shipped: dict = {}
    for src in map(Path, sys.argv[1:]):
        shipped[src.name] = ship(src, shipped)


if __name__ == "__main__":
    main()
