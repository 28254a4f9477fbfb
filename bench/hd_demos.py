"""Ship finished runs trained on the 200x150 JPEG layout (9,114 HAM10000 images) as demo runs in ``checkpoints/``.

    python bench/hd_demos.py STORE/erm-run STORE/pgd-run ... [--dest checkpoints] [--curve-samples N] [--threads 1]

Each run is copied as ``demo-<method>-<model>-ham10000-<size>px`` (config, metrics, status, best weights; the
per-sample dynamics of a method with an eps memory, which the Training dynamics page shows, none for the others
(1.2 MB an epoch at 6,372 images); not ``last.pt``), with:

- its data spec and data path relative to the checkout (``ham10000:../shared/data/ham10000_200x150``), and a run
  started from another shipped run (``--init-from``) pointing at that run's demo folder;
- float16 weights, which keep ``checkpoints/`` small enough to travel to a GPU machine with the checkout; what
  rounding changed (clean predictions on the test split, PGD-20 outcomes on the curves' images) is recorded in
  ``fp16_check.json``, and the audit measures the rounded weights, so every shipped figure is the shipped model's;
- its audit (``python -m dpaat_core audit``): the protocol with per-class figures and the Grad-CAM and saliency
  numbers of every test image (what the Gallery and the trust line read), and the curves in both norms and the APGD
  check on a seeded draw of ``--curve-samples`` test images (default all; 256 keeps a 128 px audit near 20 minutes on
  one CPU core).

Give the runs a later one starts from first (ERM before the runs fine-tuned from it). A run that continues a
shipped run (``train --init-from checkpoints/ID``) and ships under the same id replaces it; its record then names
its source by the commit that held it (``ID@COMMIT``; ``git show COMMIT:checkpoints/ID/config.json``).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.__main__ import main as cli
from dpaat_core.store import runs

from demo_runs import halve_if_lossless

COPY = ("config.json", "metrics.jsonl", "status.json", "weights.safetensors")


def demo_id(run_dir: Path) -> str:
    record = runs.read_record(run_dir)
    return f"demo-{record.method}-{record.model.name}-ham10000-{record.image_size}px"


def relative(path: str) -> str:
    """An absolute path under the checkout's parent as seen from the checkout (``../shared/data/...``); others
    as they are."""
    absolute = Path(path).resolve()
    return os.path.relpath(absolute, ROOT) if absolute.is_relative_to(ROOT.parent) else path


def relocate(config: dict, run_id: str, shipped: dict[str, str], dest_store: Path) -> dict:
    """``config`` as shipped: its id, the data where the checkout sees it, a source run by its demo folder
    (``shipped``: source folder -> demo id; else the source's demo folder already in ``dest_store``)."""
    config = {**config, "run_id": run_id}
    kind, _, where = config["data"]["spec"].partition(":")
    config["data"] = {**config["data"], "spec": f"{kind}:{relative(where)}" if where else kind}
    if config.get("dataset", {}).get("source_path"):
        config["dataset"] = {**config["dataset"], "source_path": relative(config["dataset"]["source_path"])}
    source = config["model"].get("init_from")
    if not source:
        return config
    source_id = demo_id(Path(source)) if Path(source).is_dir() else None
    if source_id == run_id:                                  # it continues the run it is to replace
        return continued(config, run_id, dest_store / run_id)
    key = str(Path(source).resolve())
    if key not in shipped and source_id and same_history(Path(source), dest_store / source_id):
        shipped[key] = source_id                             # shipped by an earlier call
    if key not in shipped:
        raise SystemExit(f"{run_id} starts from {source}, which is not shipped: give that run first")
    config["model"] = {**config["model"], "init_from": f"checkpoints/{shipped[key]}"}
    config["init"] = {**config["init"], "run": f"checkpoints/{shipped[key]}", "run_id": shipped[key]}
    return config


def same_history(run_dir: Path, shipped: Path) -> bool:
    """Whether ``shipped`` is ``run_dir`` as shipped (the same training history, copied verbatim; its weights are
    rounded, so they cannot be compared)."""
    mine, theirs = run_dir / "metrics.jsonl", shipped / "metrics.jsonl"
    return mine.is_file() and theirs.is_file() and filecmp.cmp(mine, theirs, shallow=False)


def continued(config: dict, run_id: str, replaced: Path) -> dict:
    """``config`` of a run that continues the shipped run it replaces (same id): its source is named by the
    commit that holds it (``ID@COMMIT``; ``git show COMMIT:checkpoints/ID/config.json``; the full hash in
    ``init.commit``), and only if the shipped weights are the ones it started from (the SHA-256 in its ``init``
    record), so that such a record never points at itself or at other weights."""
    weights = replaced / "weights.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{run_id} continues a run of that id, but nothing is shipped as {run_id} in "
                         f"{replaced.parent}")
    if config["init"].get("weights_sha256") != runs.file_sha256(weights):
        raise SystemExit(f"{run_id} did not start from the weights shipped as {replaced}: a run that replaces a "
                         f"shipped run continues it (train --init-from {replaced}), or ships into another --dest")
    try:
        found = subprocess.run(["git", "log", "-1", "--format=%H", "--", "."], cwd=replaced, capture_output=True,
                               text=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=replaced, capture_output=True,
                                 text=True)
    except OSError as exc:
        raise SystemExit(f"{run_id} names the run it continues by its commit, and git could not run: {exc}")
    commit = found.stdout.strip()
    if found.returncode != 0 or not commit or changed.returncode != 0 or changed.stdout.strip():
        raise SystemExit(f"{run_id} continues {replaced}, which no commit holds: commit it first, so the shipped "
                         "run can name its source")
    where = f"checkpoints/{run_id}@{commit[:7]}"
    config["model"] = {**config["model"], "init_from": where}
    config["init"] = {**config["init"], "run": where, "run_id": f"{run_id}@{commit[:7]}", "commit": commit}
    return config


def ship(src: Path, dest_store: Path, shipped: dict[str, str], curve_samples) -> Path:
    run = runs.load_run(src)
    if run.state != "done" or not run.has_weights:
        raise SystemExit(f"{src}: {run.state}; only a finished run with weights is shipped")
    run_id = demo_id(src)
    config = relocate(runs.read_config(src), run_id, shipped, dest_store)
    dest = dest_store / run_id
    tmp = dest.with_name(run_id + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPY:
        shutil.copy2(src / name, tmp / name)
    if runs.dynamics_epochs(src) and runs.read_record(src).config.method.adaptive:
        shutil.copytree(src / "dynamics", tmp / "dynamics")
    runs.atomic_write_json(tmp / "config.json", config)
    check = halve_if_lossless(tmp, curve_samples, always=True)
    argv = ["audit", str(tmp), "--no-report"] + (["--curve-samples", str(curve_samples)] if curve_samples else [])
    if cli(argv) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    shipped[str(src.resolve())] = run_id
    print(f"[ship] {run_id}: float16 weights, {check['changed_clean_predictions']} of {check['n']} clean "
          f"predictions changed by rounding", flush=True)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders, a source before the runs started from it")
    p.add_argument("--dest", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--curve-samples", type=int, help="test images of the curves and the APGD check (default: all)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped: dict[str, str] = {}
    for src in args.runs:
        ship(src, args.dest, shipped, args.curve_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
