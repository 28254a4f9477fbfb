"""Turn the study's seed-0 runs on the HAM10000 sample into the demo runs in ``checkpoints/``.

    python bench/demo_runs.py [--store study_runs] [--dest checkpoints]

For each method: copy the run (config, metrics, dynamics, best weights, status, study numbers;
not ``last.pt``, the resume state a finished demo does not need), store the weights as float16
when that changes no prediction and no robust outcome on the test split (else float32), then add
robustness curves (PGD-20 and I-FGSM, l2 and linf, on a seeded draw of 128 test images:
``robustness.csv``), the attribution numbers (``attribution.csv``) and certified radii under randomized smoothing
(``certified.csv``, sigma 0.25, n 500: every test image for the gaussian run, the curves' 128 for the others) with the
project's CLI; the
full test split's protocol numbers (PGD-20, I-FGSM, APGD) are the study's, in ``study.json``.
``bench/make_demo_runs.sh`` trains the runs first.

    python bench/demo_runs.py --certify checkpoints/demo-* [--certify-n 128]

certifies shipped runs in place with the same settings (about 2 minutes per resnet8 run on one idle core for 128
images, 11 for all 666).
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.data.dataset import cap_samples
from dpaat_core.store import loading, runs
from dpaat_core.__main__ import main as cli
from dpaat_core.evaluate.robustness import clean_logits, evaluate, reference_eps

METHODS = ("erm", "pgd_at", "trades", "dpaat", "dpaat_nosync", "dpaat_fixed", "gaussian")
#: the study run each demo is made from (bench/study.py)
SOURCES = {**{m: f"main64-{m}-s0" for m in METHODS}, "gaussian": "smooth64-gaussian-s0"}
#: the shipped certificates: Cohen et al.'s sigma 0.25 and n0 100, n 500 (a radius up to 0.55 = 2.2 sigma; n 10,000
#: would take 20 times as long on a CPU); the gaussian run, the one made to be certified, on every test image
CERTIFY = ["--sigma", "0.25", "--n0", "100", "--n", "500"]
CERTIFY_ALL = ("gaussian",)
COPY = ("config.json", "metrics.jsonl", "status.json", "study.json", "weights.safetensors", "dynamics")


def demo_id(method: str) -> str:
    return f"demo-{method}-resnet8-ham10000"


def fp16_is_lossless(run_dir: Path, pgd_samples=None) -> dict:
    """Does rounding the weights to float16 change any clean prediction or PGD-20 outcome on the test
    split? (PGD-20 runs only when every clean prediction is unchanged, on a seeded draw of ``pgd_samples`` test
    images when given: the draw of ``evaluate --max-samples``.)"""
    record = runs.read_record(run_dir)
    test = loading.load_run_data(run_dir, "test")
    full = loading.load_model(run_dir)
    half = copy.deepcopy(full)
    half.load_state_dict({k: v.half().to(v.dtype) if v.is_floating_point() else v for k, v in full.state_dict().items()})
    a, b = (clean_logits(m, test).argmax(1) for m in (full, half))
    check = {"n": len(test), "changed_clean_predictions": int((a != b).sum()), "changed_pgd20_outcomes": None}
    if check["changed_clean_predictions"] == 0:
        norm = record.judged_norm                   # the training norm; l2 for an imported model
        eps = reference_eps(record, norm)
        few = cap_samples(test, pgd_samples)
        a, b = (evaluate(m, few, "pgd", norm, eps, 20).samples["robust"] for m in (full, half))
        check["changed_pgd20_outcomes"], check["pgd20_n"] = int((a != b).sum()), len(few)
    check["lossless"] = check["changed_clean_predictions"] == 0 and check["changed_pgd20_outcomes"] == 0
    return check


def halve_if_lossless(run_dir: Path, pgd_samples=None, always: bool = False) -> dict:
    """Store the run's weights as float16 when :func:`fp16_is_lossless` says so (``always``: whatever it says, to
    keep a store small); the check goes to ``fp16_check.json`` either way and is returned."""
    check = fp16_is_lossless(run_dir, pgd_samples)
    if check["lossless"] or always:
        runs.save_weights(run_dir / "weights.safetensors", runs.load_weights(run_dir / "weights.safetensors"), half=True)
    runs.atomic_write_json(run_dir / "fp16_check.json", check)
    return check


def certify_flags(method: str, curve_n: int) -> list[str]:
    """The shipped certify settings: every test image for the gaussian run, the robustness curves' draw else."""
    return CERTIFY + ([] if method in CERTIFY_ALL else ["--max-samples", str(curve_n)])


def make_demo(src: Path, dest: Path, attribution_n, curve_n: int, method: str) -> dict:
    if runs.load_run(src).state != "done":
        raise SystemExit(f"{src}: not a finished run; train it first (bench/study.py run main64 --seeds 0)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPY:
        if (src / name).is_dir():
            shutil.copytree(src / name, tmp / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    config = runs.read_config(tmp)
    config["run_id"] = dest.name
    runs.atomic_write_json(tmp / "config.json", config)
    check = halve_if_lossless(tmp)
    for argv in (["evaluate", str(tmp), "--attack", "pgd,ifgsm", "--norm", "l2,linf", "--max-samples", str(curve_n)],
                 ["attribute", str(tmp), "--methods", "gradcam,saliency", "--n", str(attribution_n)],
                 ["evaluate", str(tmp), "--corruptions", "all"],
                 ["certify", str(tmp), *certify_flags(method, curve_n)]):
        if cli(argv) != 0:
            raise SystemExit(f"{' '.join(argv)} failed")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=ROOT / "study_runs")
    p.add_argument("--dest", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--attribution-n", default="all", help="test images explained: a number or 'all' (default all: "
                                                         "every image's numbers for the dashboard's Gallery)")
    p.add_argument("--curve-n", type=int, default=128, help="test images of the robustness curves (default 128)")
    p.add_argument("--threads", type=int)
    p.add_argument("--certify", nargs="+", type=Path, metavar="RUN_DIR",
                   help="only certify these runs in place with the shipped settings")
    p.add_argument("--certify-n", default="128", help="with --certify: test images, a number or 'all' (default 128, "
                                                      "the curves' draw)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for run_dir in args.certify or ():
        if cli(["certify", str(run_dir), *CERTIFY,
                *([] if args.certify_n == "all" else ["--max-samples", args.certify_n])]) != 0:
            raise SystemExit(f"certify {run_dir} failed")
    if args.certify:
        return 0
    for method in args.methods:
        check = make_demo(args.store / SOURCES[method], args.dest / demo_id(method), args.attribution_n,
                           args.curve_n, method)
        print(f"[demo] {demo_id(method)}: float16 weights {'kept' if check['lossless'] else 'NOT lossless, float32'} "
              f"({json.dumps(check)})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
