"""The reproduction study: train a grid of runs, evaluate each on its test split, collect the results.

    python bench/study.py run main64 [--seeds 0 1 2] [--shard 0/2] [--threads 1]
    python bench/study.py collect            # -> bench/results/study.csv and epochs.csv

Runs go to ``--store`` (default ``study_runs/``, git-ignored), named ``<study>-<variant>-s<seed>``.
A finished run is skipped, an interrupted one resumed, so the command can be re-run after a kill.
Each run is evaluated once on its test split at its training eps and norm: clean, balanced accuracy,
mAP, PGD-20, I-FGSM and APGD-CE+DLR (worst case with PGD-20), written to ``<run>/study.json``.
Studies with ``cross_norm`` also get PGD-20 in the other norm (l2 0.3 <-> linf 0.3/sqrt(d)).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.store import loading, runs
from dpaat_core.config import AttackConfig, DataConfig, ModelConfig, RunConfig, TrainConfig, method_config
from dpaat_core.evaluate.eps_dynamics import eps_bounds, per_class
from dpaat_core.evaluate.robustness import evaluate
from dpaat_core.evaluate.strong import strong_robustness
from dpaat_core.train.loop import resume, train

SAMPLE = "npz:../shared/data/ham10000_sample.npz"
HAM28 = "npz:../shared/data/ham10000_28.npz"
METHODS = ("erm", "pgd_at", "trades", "dpaat", "dpaat_nosync", "dpaat_fixed")
L2_EPS = 0.3


def linf_eps(image_size: int) -> float:
    """The largest linf ball inside the l2 ball of radius 0.3: 0.3 / sqrt(3 * size^2)."""
    return L2_EPS / math.sqrt(3 * image_size * image_size)


def _variants_ablation(size: int) -> dict:
    """Each ablation as (method, overrides); an 'attack' override changes the training norm and eps.
    The reference (dpaat with gamma 0.1, batch_mean threshold, l2) is main28's dpaat run, same seeds."""
    return {
        "dpaat-linf": ("dpaat", {"attack": {"norm": "linf", "eps": linf_eps(size)}}),
        "pgd_at-linf": ("pgd_at", {"attack": {"norm": "linf", "eps": linf_eps(size)}}),
        "dpaat-thr_median": ("dpaat", {"threshold": "median"}),
        "dpaat-gamma0.3": ("dpaat", {"gamma": 0.3}),
    }


STUDIES = {
    # at 64 px the two component ablations run with seed 0 only (CPU time); at 28 px every run has three seeds
    "main64": dict(data=SAMPLE, size=64, variants={m: (m, {}) for m in METHODS}, seeds=(0, 1, 2), epochs=10,
                   patience=4, single_seed=("dpaat_nosync", "dpaat_fixed")),
    "main28": dict(data=HAM28, size=28, variants={m: (m, {}) for m in METHODS}, seeds=(0, 1, 2), epochs=5,
                   cross_norm=True),
    "ablate28": dict(data=HAM28, size=28, variants=_variants_ablation(28), seeds=(0, 1, 2), epochs=5, cross_norm=True),
    # second round: long enough for the eps memory to act (a sample's eps moves once per epoch)
    "long28": dict(data=HAM28, size=28, variants={m: (m, {}) for m in ("dpaat", "pgd_at", "dpaat_fixed")},
                   seeds=(0, 1, 2), epochs=40, patience=10, cross_norm=True),
    # ERM and TRADES at the same length: the references of the natural-corruption finding
    "long28x": dict(data=HAM28, size=28, variants={"erm": ("erm", {}), "trades": ("trades", {}),
                                                   "dpaat-gamma0.3": ("dpaat", {"gamma": 0.3})},
                    seeds=(0, 1, 2), epochs=40, patience=10, cross_norm=True),
}
# third round (issue: equal length): every method runs all 40 epochs (patience 40 never stops it) and keeps its
# best-on-validation checkpoint; evaluated on validation as well as test, with each image's outcome kept
# (per_image.csv) for bootstrap CIs over images and seeds. dpaat_cthr / dpaat_cnorm: docs/CLASS_AWARE.md
EQUAL28 = ("dpaat_cthr", "dpaat_cnorm", "pgd_at", "dpaat", "dpaat_fixed", "trades")
STUDIES["equal28"] = dict(data=HAM28, size=28, variants={m: (m, {}) for m in EQUAL28}, seeds=(0, 1, 2, 3, 4),
                          epochs=40, patience=40, val=True)
# randomized smoothing's base classifier beside the demo runs (same data, model, length and seed)
STUDIES["smooth64"] = dict(data=SAMPLE, size=64, variants={"gaussian": ("gaussian", {})}, seeds=(0,), epochs=10,
                           patience=4)
# the field's anchor (issue: MedMNIST anchor): ERM ResNet-18 at 28 px with MedMNIST v2's protocol: 100 epochs,
# batch 128, Adam at lr 0.001 x0.1 at epochs 50 and 75, no class weights, no augmentation, the checkpoint with the
# best validation AUC. resnet18 is torchvision's (7x7 stride-2 stem and max-pool: 1x1 at the last stage for 28 px);
# resnet18_small has the 3x3 stride-1 stem and no max-pool of MedMNIST v2's 28 px ResNet-18. The training attack
# runs only in validation's robust figure, so one step keeps validation cheap (the evaluation runs its own PGD-20).
MEDMNIST_PROTOCOL = dict(batch_size=128, lr=1e-3, schedule="step", imbalance="none", augment=False,
                         early_stop="auc", patience=100)
STUDIES["anchor28"] = dict(data=HAM28, size=28, epochs=100, seeds=(0,), val=True, train=MEDMNIST_PROTOCOL,
                           variants={f"erm-{m}": ("erm", {"model": m, "attack": {"steps": 1}})
                                     for m in ("resnet18", "resnet18_small")})
COMMON = dict(model="resnet8", steps=7, batch_size=32, patience=3)


def run_config(study: str, variant: str, seed: int) -> RunConfig:
    s = STUDIES[study]
    method, overrides = s["variants"][variant]
    overrides = dict(overrides)
    attack = {"norm": "l2", "eps": L2_EPS, "steps": COMMON["steps"], **overrides.pop("attack", {})}
    model = overrides.pop("model", COMMON["model"])
    train = {"batch_size": COMMON["batch_size"], "patience": s.get("patience", COMMON["patience"]), **s.get("train", {})}
    return RunConfig(data=DataConfig(spec=s["data"], image_size=s["size"]), model=ModelConfig(name=model),
                     attack=AttackConfig(**attack), method=method_config(method, **overrides),
                     train=TrainConfig(epochs=s["epochs"], seed=seed, **train))


def jobs(study: str, seeds=None) -> list[tuple[str, str, int]]:
    s = STUDIES[study]
    return [(study, v, seed) for seed in (seeds if seeds is not None else s["seeds"]) for v in s["variants"]
            if seed == s["seeds"][0] or v not in s.get("single_seed", ())]


def claim(store: Path, rid: str) -> bool:
    """Take job ``rid`` for this process (a file with our pid); a claim of a dead process is taken over."""
    claims = store / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    file = claims / rid
    for _ in range(2):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(file.read_text() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                file.unlink(missing_ok=True)
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run_id(study: str, variant: str, seed: int) -> str:
    return f"{study}-{variant}-s{seed}"


def ensure_trained(store: Path, study: str, variant: str, seed: int) -> Path:
    rid = run_id(study, variant, seed)
    run_dir = store / rid
    state = runs.load_run(run_dir).state if run_dir.is_dir() else None
    if state == "done":
        return run_dir
    t0 = time.time()
    if state in ("interrupted", "stopped", "failed") and (run_dir / "last.pt").is_file():
        print(f"[study] resuming {rid} ({state})", flush=True)
        resume(run_dir)
    else:
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        print(f"[study] training {rid}", flush=True)
        train(run_config(study, variant, seed), store=store, run_id=rid)
    print(f"[study] trained {rid} in {time.time() - t0:.0f} s", flush=True)
    return run_dir


def memory_by_class(run_dir: Path) -> pd.DataFrame:
    """Each class's eps memory at every epoch: mean eps, share at the floor and at the cap, share fragile."""
    record = runs.read_record(run_dir)
    eps0, lo, hi = eps_bounds(record.config)
    frames = [per_class(runs.load_dynamics(run_dir, e), record.classes, lo, hi).assign(epoch=e)
              for e in runs.dynamics_epochs(run_dir)]
    return pd.concat(frames, ignore_index=True)


def evaluate_run(run_dir: Path, cross_norm: bool = False, apgd_steps: int = 50, device: str = "cpu",
                 with_val: bool = False) -> dict:
    """The study's numbers for one finished run (cached in ``study.json``), computed on ``device``. ``with_val``:
    PGD-20 on the validation split too, and every test and validation image's outcome in ``per_image.csv``."""
    out_file = run_dir / "study.json"
    if out_file.is_file():
        return json.loads(out_file.read_text())
    t0 = time.time()
    record = runs.read_record(run_dir)
    config = record.config
    norm, eps = config.attack.norm, float(config.attack.eps)
    model = loading.load_model(run_dir, device=device)
    test = loading.load_run_data(run_dir, "test")
    pgd = evaluate(model, test, "pgd", norm, eps, 20)
    ifgsm = evaluate(model, test, "ifgsm", norm, eps, 10)
    strong = strong_robustness(model, test, norm, eps, steps=apgd_steps, survivors=pgd.samples["robust"].to_numpy())
    metrics = runs.read_metrics(run_dir)
    status = runs.read_status(run_dir)
    result = {
        "run": run_dir.name, "method": config.method.name, "seed": config.train.seed,
        "data": config.data.spec, "image_size": config.data.image_size, "norm": norm, "eps": eps,
        "gamma": config.method.gamma, "threshold": config.method.threshold,
        "memoryless": config.method.memoryless, "n_test": len(test),
        "clean_accuracy": pgd.accuracy, "balanced_accuracy": pgd.balanced_accuracy, "mAP": pgd.mean_average_precision,
        "auc": pgd.auc,
        "pgd20": pgd.robust_accuracy, "pgd20_balanced": pgd.robust_balanced_accuracy,
        "ifgsm": ifgsm.robust_accuracy, "ifgsm_balanced": ifgsm.robust_balanced_accuracy,
        "apgd": strong["robust_accuracy"], "apgd_balanced": strong["robust_balanced_accuracy"],
        "apgd_attacks": f"pgd20+{strong['attacks']} ({apgd_steps} steps)",
        "per_class": {row["class"]: {"n": int(row["n"]), "clean": row["accuracy"], "pgd20": row["robust_accuracy"]}
                      for row in pgd.per_class.to_dict("records")},
        "best_epoch": status.get("best_epoch"), "epochs_run": int(metrics["epoch"].max()) if len(metrics) else 0,
        "train_seconds": float(metrics["train_seconds"].sum()) if "train_seconds" in metrics else None,
    }
    if cross_norm:
        other = "linf" if norm == "l2" else "l2"
        other_eps = linf_eps(config.data.image_size) if other == "linf" else L2_EPS
        ev = evaluate(model, test, "pgd", other, other_eps, 20)
        result.update({f"pgd20_{other}": ev.robust_accuracy, f"pgd20_{norm}": pgd.robust_accuracy,
                       f"eps_{other}": other_eps})
    if with_val:
        val = evaluate(model, loading.load_run_data(run_dir, "val"), "pgd", norm, eps, 20)
        result.update({"n_val": len(val.samples), "val_clean_accuracy": val.accuracy,
                       "val_balanced_accuracy": val.balanced_accuracy, "val_auc": val.auc,
                       "val_pgd20": val.robust_accuracy, "val_pgd20_balanced": val.robust_balanced_accuracy,
                       "val_per_class": {row["class"]: {"n": int(row["n"]), "clean": row["accuracy"],
                                                        "pgd20": row["robust_accuracy"]}
                                         for row in val.per_class.to_dict("records")}})
        keep = ["index", "label", "correct_clean", "robust"]
        per_image = pd.concat([pgd.samples[keep].assign(split="test"), val.samples[keep].assign(split="val")])
        per_image.to_csv(run_dir / "per_image.csv", index=False)
        if config.method.adaptive and not config.method.memoryless:
            memory_by_class(run_dir).to_csv(run_dir / "memory_by_class.csv", index=False)
    result["eval_seconds"] = time.time() - t0
    runs.atomic_write_json(out_file, result)
    print(f"[study] evaluated {run_dir.name} in {result['eval_seconds']:.0f} s: clean {result['clean_accuracy']:.3f} "
          f"bal {result['balanced_accuracy']:.3f} pgd20 {result['pgd20']:.3f} apgd {result['apgd']:.3f}", flush=True)
    return result


def collect(store: Path, out: Path) -> pd.DataFrame:
    """Every evaluated run's numbers as ``study.csv`` and every epoch's metrics as ``epochs.csv``, merged into the
    files already in ``out``: a run found in ``store`` replaces its rows, the rows of other runs stay."""
    rows, epochs, images, memory = [], [], [], []
    for run_dir in sorted(p for p in store.iterdir() if (p / "study.json").is_file()):
        result = json.loads((run_dir / "study.json").read_text())
        result["study"], result["variant"] = run_dir.name.split("-", 1)[0], run_dir.name.split("-", 1)[1].rsplit("-s", 1)[0]
        for name, figures in result.pop("per_class", {}).items():   # flat columns: pgd20:<class>, clean:<class>
            result |= {f"{k}:{name}": v for k, v in figures.items()}
        for name, figures in result.pop("val_per_class", {}).items():   # val_pgd20:<class>, ...
            result |= {f"val_{k}:{name}": v for k, v in figures.items()}
        if (run_dir / "per_image.csv").is_file():
            images.append(pd.read_csv(run_dir / "per_image.csv").assign(run=run_dir.name))
        if (run_dir / "memory_by_class.csv").is_file():
            memory.append(pd.read_csv(run_dir / "memory_by_class.csv").assign(run=run_dir.name))
        rows.append(result)
        m = runs.read_metrics(run_dir)
        m.insert(0, "run", run_dir.name)
        epochs.append(m)
    out.mkdir(parents=True, exist_ok=True)
    order = {name: i for i, name in enumerate(STUDIES)}   # the main studies first: the Runs page opens on them
    frame = pd.DataFrame(rows)
    found = set(frame["run"]) if len(frame) else set()
    for name, parts in (("study.csv", None), ("epochs.csv", epochs)):   # rows of runs not in this store stay
        if (out / name).is_file():
            kept = pd.read_csv(out / name)
            kept = kept[~kept["run"].isin(found)]
            if parts is None:
                frame = pd.concat([kept, frame], ignore_index=True)
            else:
                parts.insert(0, kept)
    if len(frame):
        frame = frame.sort_values(["study", "run"], key=lambda c: c.map(order) if c.name == "study" else c,
                                  kind="stable", ignore_index=True)
    frame.to_csv(out / "study.csv", index=False)
    if epochs:
        pd.concat(epochs, ignore_index=True).to_csv(out / "epochs.csv", index=False)
    # equal28: each image's outcome (bootstrap CIs over images and seeds), each class's eps memory per epoch
    for name, parts in (("per_image.csv.gz", images), ("memory_by_class.csv", memory)):
        if parts:
            if (out / name).is_file():
                kept = pd.read_csv(out / name)
                parts.insert(0, kept[~kept["run"].isin(found)])
            pd.concat(parts, ignore_index=True).to_csv(out / name, index=False)
    return frame


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate the runs of one or more studies")
    r.add_argument("studies", nargs="+", choices=sorted(STUDIES))
    r.add_argument("--seeds", type=int, nargs="+")
    r.add_argument("--variants", nargs="+", help="only these variants")
    r.add_argument("--shard", default="0/1", help="i/n: take every n-th job starting at i (parallel workers)")
    r.add_argument("--queue", action="store_true", help="share the jobs with other --queue workers (claim files)")
    r.add_argument("--threads", type=int, default=None, help="torch threads of this worker")
    r.add_argument("--store", type=Path, default=ROOT / "study_runs")
    c = sub.add_parser("collect", help="gather study.json files into bench/results/")
    c.add_argument("--store", type=Path, default=ROOT / "study_runs")
    c.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.command == "collect":
        frame = collect(args.store, args.out)
        print(f"{len(frame)} runs -> {args.out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    i, n = (int(v) for v in args.shard.split("/"))
    todo = [j for s in args.studies for j in jobs(s, args.seeds) if not args.variants or j[1] in args.variants][i::n]
    for study, variant, seed in todo:
        if args.queue and not claim(args.store, run_id(study, variant, seed)):
            continue
        run_dir = ensure_trained(args.store, study, variant, seed)
        evaluate_run(run_dir, cross_norm=STUDIES[study].get("cross_norm", False),
                     with_val=STUDIES[study].get("val", False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
