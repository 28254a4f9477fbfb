"""The paper-scale study in one call: methods x seeds trained at once on one device, as many epochs as fit, then the
protocol on each.

    python bench/gpu_study.py --data .device-data/ham10000_200x150              # on a GPU: 9.5 minutes at most
    python bench/gpu_study.py --device cpu --quick                              # a rehearsal (resnet8, 32 px)

Every run is a process of its own on the same device (one CUDA context each; several runs fill a GPU that one run
at the paper's batch of 32 leaves mostly idle). The length is the same for every run and fixed after the first
epoch: every run trains one epoch; from the slowest first epoch and the time left, the study picks the number of
epochs E that fits (at most ``--epochs``); every run then resumes to E (``train.resume(..., epochs=E)``). The
checkpoint is each run's best epoch on validation balanced accuracy (no early stop). Then each run is evaluated on
the whole test split: PGD-20 (overall, balanced and per class), I-FGSM and the APGD worst case, written as the run's
``study.json`` (what ``bench/study.py collect`` reads) as soon as it exists.

``--out`` (default ``gpu_study_out/``) gets ``results.json`` and ``report.md``, rewritten whenever a run finishes a
phase, and ``collect/study.csv``. Throughput: the images per second of all runs together (training epochs only)
against one run trained alone for one epoch first (``--solo``, on by default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.store import runs

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000_200x150"
QUICK_DATA = ROOT.parent / "shared" / "data" / "ham10000_images"
PAPER = {"dpaat": 65.46, "pgd_at": 63.14}
#: seconds kept at the end for the protocol of every run (they evaluate at once, as they trained)
EVAL_RESERVE = {"cuda": 150.0, "cpu": 40.0}


def run_config(method: str, seed: int, args, epochs: int):
    """The paper's setting (ResNet34, 224 px, batch 32, Adam 3e-4, l2 eps 0.3, PGD-7), resnet8 at 32 px with
    --quick; patience as long as the run, so no run stops early."""
    from dpaat_core.config import RunConfig, method_config
    return RunConfig().replace(
        data={"spec": f"ham10000:{args.data}", "image_size": 32 if args.quick else 224},
        model={"name": "resnet8" if args.quick else "resnet34"}, method=method_config(method),
        attack={"steps": 2 if args.quick else 7},
        train={"epochs": epochs, "batch_size": 32, "lr": 3e-4, "patience": max(args.epochs, epochs), "seed": seed,
               "device": args.device})


def run_id(method: str, seed: int, quick: bool) -> str:
    return f"{'quick32' if quick else 'paper224'}-{method}-s{seed}"


# --- one worker: one run ---------------------------------------------------------------------------

def worker(args) -> int:
    """Train the run one epoch, wait for the study's length, resume to it, evaluate (``study.json``)."""
    from dpaat_core.train.loop import resume, train
    from study import evaluate_run
    method, seed = args.worker.rsplit(":", 1)
    store, out = Path(args.store), Path(args.out)
    rid = run_id(method, int(seed), args.quick)
    run_dir = train(run_config(method, int(seed), args, 1), store=store, run_id=rid)
    length = out / "epochs.json"
    while not length.is_file():
        time.sleep(0.2)
    epochs = json.loads(length.read_text())["epochs"]
    if epochs > 1:
        resume(run_dir, epochs=epochs)
    (out / f"{rid}.trained").write_text(str(time.time()))
    evaluate_run(run_dir, device=args.device)
    return 0


def solo(args) -> int:
    """One run alone for one epoch: the throughput the study is compared with."""
    from dpaat_core.train.loop import train
    train(run_config(args.methods[0], 0, args, 1), store=Path(args.store) / ".solo", run_id="solo")
    return 0


# --- the coordinator ---------------------------------------------------------------------------------

def _spawn(args, *extra) -> subprocess.Popen:
    argv = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--data", str(args.data),
            "--store", str(args.store), "--out", str(args.out), "--epochs", str(args.epochs),
            *(["--quick"] if args.quick else []), "--methods", *args.methods, *extra]
    log = open(Path(args.out) / "workers.log", "a")
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)})


def _first_epoch_seconds(run_dir: Path):
    metrics = runs.read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else None
    return None if metrics is None or not len(metrics) else float(metrics["seconds"].iloc[0])


def pick_epochs(first: list[float], seconds_left: float, most: int) -> int:
    """As many epochs as fit: the first one is done; each further one takes as long as the slowest first epoch
    (which paid for loading and compiling too, so this errs short)."""
    return max(1, min(most, 1 + math.floor(seconds_left / max(first))))


def coordinate(args) -> int:
    out, store = Path(args.out), Path(args.store)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.trained"), out / "epochs.json", out / "workers.log"]:
        stale.unlink(missing_ok=True)
    start = time.time()
    deadline = start + 60 * args.minutes
    reserve = EVAL_RESERVE["cuda" if args.device == "cuda" else "cpu"]
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    ids = [run_id(m, s, args.quick) for m, s in jobs]
    for rid in [*ids, ".solo"]:
        if (store / rid).exists():
            import shutil
            shutil.rmtree(store / rid)
    results = {"setting": vars(args) | {"data": str(args.data), "store": str(store), "out": str(out)}, "runs": {}}

    def save(**fields):
        results.update(fields)
        runs.atomic_write_json(out / "results.json", results)
        (out / "report.md").write_text(report(results))

    if args.solo:
        proc = _spawn(args, "--solo-run")
        proc.wait(timeout=max(1, deadline - time.time()))
        metrics = runs.read_metrics(store / ".solo" / "solo")
        save(solo_images_per_second=float(metrics["images_per_second"].iloc[0]))
    workers = {rid: _spawn(args, "--worker", f"{m}:{s}") for rid, (m, s) in zip(ids, jobs)}
    train_start = time.time()
    epochs = None
    while any(p.poll() is None for p in workers.values()) and time.time() < deadline:
        if epochs is None:
            first = [_first_epoch_seconds(store / rid) for rid in ids]
            failed = [rid for rid, p in workers.items() if p.poll() not in (None, 0)]
            if all(f is not None for f in first) or failed:
                found = [f for f in first if f is not None] or [1.0]
                epochs = pick_epochs(found, deadline - reserve - time.time(), args.epochs)
                runs.atomic_write_json(out / "epochs.json", {"epochs": epochs, "first_epoch_seconds": first})
                save(epochs=epochs, first_epoch_seconds=dict(zip(ids, first)))
        for rid in ids:
            entry = results["runs"].get(rid, {})
            if "trained" not in entry and (out / f"{rid}.trained").is_file():
                save(runs={**results["runs"], rid: entry | train_figures(store / rid, train_start)})
            if "pgd20" not in entry and (store / rid / "study.json").is_file():
                figures = json.loads((store / rid / "study.json").read_text())
                save(runs={**results["runs"], rid: results["runs"].get(rid, {}) | figures})
        time.sleep(0.5)
    for rid, p in workers.items():
        if p.poll() is None:
            os.killpg(p.pid, 9)
            results["runs"].setdefault(rid, {})["error"] = "killed at the study's time limit"
        elif p.returncode != 0:
            results["runs"].setdefault(rid, {})["error"] = f"worker exited with {p.returncode} (see workers.log)"
    for rid in ids:   # a study.json written in the last half second
        if (store / rid / "study.json").is_file():
            results["runs"][rid] = results["runs"].get(rid, {}) | json.loads((store / rid / "study.json").read_text())
    from study import collect
    if any((store / rid / "study.json").is_file() for rid in ids):
        collect(store, out / "collect")
    save(seconds=time.time() - start, aggregate_images_per_second=aggregate(results["runs"]))
    print(report(results))
    return 0 if all("pgd20" in results["runs"].get(rid, {}) for rid in ids) else 1


def train_figures(run_dir: Path, train_start: float) -> dict:
    metrics, status = runs.read_metrics(run_dir), runs.read_status(run_dir)
    return {"trained": True, "epochs_run": len(metrics), "best_epoch": status.get("best_epoch"),
            "train_images": int(runs.read_record(run_dir).dataset.train_size) * len(metrics),
            "train_seconds": float(metrics["train_seconds"].sum()), "trained_after": time.time() - train_start,
            "images_per_second": float(metrics["images_per_second"].median())}


def aggregate(found: dict) -> float | None:
    """Images per second of all runs together: every image every run trained, over the wall time from the start
    of training to the last run's end (the waits and the first epochs' loading included, so it errs low)."""
    done = [r for r in found.values() if r.get("trained")]
    if not done:
        return None
    return float(sum(r["train_images"] for r in done) / max(r["trained_after"] for r in done))


def report(results: dict) -> str:
    s = results["setting"]
    lines = [f"# {'Quick rehearsal' if s['quick'] else 'Paper-scale study'}: {', '.join(s['methods'])} x seeds "
             f"{', '.join(map(str, s['seeds']))} on {s['device']}", ""]
    if results.get("epochs"):
        lines.append(f"Every run trains {results['epochs']} epochs (fixed after the first; at most {s['epochs']}).")
    solo_rate, agg = results.get("solo_images_per_second"), results.get("aggregate_images_per_second")
    if solo_rate:
        lines.append(f"One run alone: {solo_rate:.0f} images/s." + (
            f" All runs at once: {agg:.0f} images/s ({agg / solo_rate:.2f}x)." if agg else ""))
    lines += ["", "| run | epochs (best) | images/s | clean | balanced | PGD-20 | PGD-20 balanced | I-FGSM | APGD |",
              "|---|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"   # noqa: E731
    for rid, r in sorted(results["runs"].items()):
        lines.append(f"| {rid} | {r.get('epochs_run', '-')} ({r.get('best_epoch', '-')}) | "
                     f"{r.get('images_per_second', 0):.0f} | {pct(r.get('clean_accuracy'))} | "
                     f"{pct(r.get('balanced_accuracy'))} | {pct(r.get('pgd20'))} | {pct(r.get('pgd20_balanced'))} | "
                     f"{pct(r.get('ifgsm'))} | {pct(r.get('apgd'))} |" + (f" {r['error']}" if r.get("error") else ""))
    per_class = {rid: r["per_class"] for rid, r in results["runs"].items() if r.get("per_class")}
    if per_class:
        classes = list(dict.fromkeys(c for p in per_class.values() for c in p))
        lines += ["", "PGD-20 per class (%):", "", "| run | " + " | ".join(classes) + " |",
                  "|---|" + "---|" * len(classes)]
        lines += [f"| {rid} | " + " | ".join(pct(p.get(c, {}).get("pgd20")) for c in classes) + " |"
                  for rid, p in sorted(per_class.items())]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="resnet8 at 32 px on the 56-JPEG folder: a CPU rehearsal")
    p.add_argument("--data", type=Path, help="a HAM10000 folder (JPEGs + HAM10000_metadata.csv)")
    p.add_argument("--methods", nargs="+", default=["dpaat", "pgd_at", "dpaat_fixed"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=50, help="the most epochs a run trains (default 50, the paper's)")
    p.add_argument("--minutes", type=float, default=9.5, help="the whole study's time (default 9.5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (default 1)")
    p.add_argument("--no-solo", dest="solo", action="store_false", help="skip the one-run-alone epoch")
    p.add_argument("--store", type=Path, default=ROOT / "gpu_study_runs")
    p.add_argument("--out", type=Path, default=ROOT / "gpu_study_out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--solo-run", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.data = args.data or (QUICK_DATA if args.quick else DEFAULT_DATA)
    if not (args.data / "HAM10000_metadata.csv").is_file():
        p.exit(2, f"{p.prog}: error: --data {args.data}: no HAM10000_metadata.csv there (a HAM10000 folder)\n")
    if args.epochs < 1 or args.minutes <= 0:
        p.exit(2, f"{p.prog}: error: --epochs must be >= 1 and --minutes > 0\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.solo_run:
        return solo(args)
    return coordinate(args)


if __name__ == "__main__":
    raise SystemExit(main())
