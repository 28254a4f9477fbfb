"""One command for a GPU machine: check the device path, time it, and train at the paper's scale.

    python bench/gpu_check.py                          # on CUDA: the whole check, under 9 minutes on an H100
    python bench/gpu_check.py --device cpu --quick     # every stage on the CPU, small: a rehearsal (< 3 min)

Stages, in order, each in its own process under its own time cap (``--cap STAGE=SECONDS``); a stage
that fails or runs out of time is reported with its traceback or its output's tail, and the next
stage still runs:

1. ``env``     device, memory, torch / torchvision / CUDA / cuDNN versions, the bf16 matmul peak;
2. ``tests``   the device-path tests (``pytest -m device``) with ``DPAAT_TEST_DEVICE`` set to the device;
3. ``speed``   ``bench/gpu_speed.py`` at its four settings, the naive PGD-AT baseline timed in the same process;
4. ``pair``    DPAAT and PGD-AT, ResNet34 at 224 px, batch 32, Adam 3e-4, on a ``ham10000:`` folder, for the same
               number of epochs (as many as the first run completes in its share of the time, ``train.max_minutes``),
               then PGD-20 (overall, balanced and per class) and I-FGSM on the whole test split and the APGD check
               when time is left;
5. ``archive`` the pair's run folders as one ``runs.tar.gz`` (resume state left out; weights left out when
               larger than ``--max-weights-mb``), to be unpacked into a run store.

Everything is written as it goes into ``--out`` (default ``gpu_check_out/``): ``results.json`` (one entry
per stage), ``report.md`` (rewritten after every stage and every finished run, so a kill at the limit
leaves the figures made so far), ``stages.log`` (every stage's output) and ``runs.tar.gz``. The pair's run
store is ``--store`` (default ``gpu_check_runs/``), outside ``--out``. ``--minutes`` bounds the whole script
(default 8.5): a stage's cap shrinks to what is left of it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]

STAGES = ("env", "tests", "speed", "pair", "archive")
#: seconds per stage: on a GPU (the sum stays under 8.5 minutes) and in --quick mode on a CPU
CAPS = {"env": 25, "tests": 110, "speed": 120, "pair": 240, "archive": 10}
QUICK_CAPS = {"env": 30, "tests": 120, "speed": 120, "pair": 150, "archive": 15}
PAIR = ("dpaat", "pgd_at")
PAPER = {"dpaat": 65.46, "pgd_at": 63.14}   # robust accuracy under PGD-20, % (paper, HAM10000, ResNet34)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ham10000_200x150"
QUICK_DATA = ROOT.parent / "shared" / "data" / "ham10000_images"   # 56 JPEGs with their metadata
EVAL_RESERVE = {"cuda": 45.0, "cpu": 20.0}   # seconds kept per run for its evaluation after training


# --- results: one JSON file, one entry per stage -----------------------------------------------

def _results_file(out: Path) -> Path:
    return out / "results.json"


def read_results(out: Path) -> dict:
    file = _results_file(out)
    return json.loads(file.read_text()) if file.is_file() else {}


def record(out: Path, stage: str, **fields) -> dict:
    """Merge ``fields`` into ``stage``'s entry of results.json (atomic), then rewrite report.md."""
    from dpaat_core.store.runs import atomic_write_json
    results = read_results(out)
    results[stage] = results.get(stage, {}) | fields
    atomic_write_json(_results_file(out), results)
    write_report(out, results)
    return results[stage]


# --- the stages (each runs in its own process: ``--stage NAME``) --------------------------------

def stage_env(args) -> dict:
    import torch
    import torchvision
    from gpu_speed import peak_flops
    device = torch.device(args.device)
    info = {"device": args.device, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "cuda": torch.version.cuda, "host": platform.node(),
            "cpu_count": os.cpu_count()}
    for name in ("captum", "torchattacks"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        props = torch.cuda.get_device_properties(device)
        info |= {"device_name": props.name, "memory_gib": props.total_memory / 2**30,
                 "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                 "bf16_supported": torch.cuda.is_bf16_supported()}
    else:
        info |= {"device_name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    info["peak_tflop_per_s"] = peak_flops(device, args.quick) / 1e12
    info["peak_dtype"] = "bf16" if device.type == "cuda" else "float32"
    return info


def stage_tests(args) -> dict:
    """``pytest -m device`` on the device; the figures are pytest's counts and the failures' names. The run
    stops a few seconds before the stage's cap, so a slow suite still reports what it got through."""
    select = ["tests/test_attacks.py"] if args.quick else []
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "device", "-rfE", "-p", "no:cacheprovider", *select]
    env = os.environ | {"DPAAT_TEST_DEVICE": args.device, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with tempfile.TemporaryFile("w+") as out:   # a file, not a pipe: a chatty suite cannot block on a full pipe
        code = run_capped(cmd, max(1.0, args.stage_deadline - time.time() - 2), env=env, stdout=out,
                          stderr=subprocess.STDOUT)
        out.seek(0)
        output = out.read()
    timed_out = code is None
    print(output)
    result = pytest_counts(output) | {"command": " ".join(cmd[2:]), "returncode": code,
                                      "pytest_seconds": time.time() - t0, "timed_out": timed_out}
    if timed_out:
        raise RuntimeError(f"pytest stopped at the stage's cap after {result['passed']} passed, "
                           f"{result['failed']} failed: {', '.join(result['failures']) or 'no failure so far'}")
    if code not in (0, 1):   # 1: some tests failed (listed); anything else: pytest itself failed
        raise RuntimeError(f"pytest exited with {code}: {_tail(output, 5)}")
    return result


_SUMMARY = re.compile(r"^=+ .*\d+ (passed|failed|errors?|skipped|deselected).* in [\d.]+s")
_VERDICT = re.compile(r"^\S+::\S.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def pytest_counts(output: str) -> dict:
    """Counts and failures from ``pytest -v -rfE`` output, complete or cut off."""
    lines = output.splitlines()
    verdicts = [m.group(1) for m in map(_VERDICT.search, lines) if m]
    failures = [ln.split(" ", 1)[1].split(" - ")[0] for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    summary = next((ln.strip("= ") for ln in reversed(lines) if _SUMMARY.match(ln)), "")
    return {"summary": summary, "passed": verdicts.count("PASSED"), "failed": verdicts.count("FAILED") +
            verdicts.count("ERROR"), "skipped": verdicts.count("SKIPPED"), "failures": failures}


def stage_speed(args) -> dict:
    """``bench/gpu_speed.py``'s grid, one setting at a time, each recorded as it ends; on a GPU with fewer
    steps than its own default (5 timed steps x 2 rounds after 2 warm-up steps) to fit the cap."""
    import gpu_speed
    argv = ["--device", args.device] + (["--quick"] if args.quick else ["--steps", "5", "--rounds", "2", "--warmup", "2"])
    opts = gpu_speed.parse_args(argv)
    torchattacks = gpu_speed.load_torchattacks()
    measured = read_results(args.out).get("env", {}).get("peak_tflop_per_s")   # the env stage timed it already
    peak = measured * 1e12 if measured else gpu_speed.peak_flops(opts.device, opts.quick)
    rows = []
    for setting in opts.settings:
        rows += gpu_speed.bench_setting(setting, opts, opts.device, peak, torchattacks)
        record(args.out, "speed", rows=rows, command="bench/gpu_speed.py " + " ".join(argv))
    gpu_speed.print_table(rows)
    gpu_speed.print_targets(rows)
    return {"rows": rows, "targets": targets(rows), "peak_tflop_per_s": peak / 1e12}


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets per setting, met or missed (gpu_speed's own rule)."""
    import gpu_speed
    out = []
    for r in rows:
        if r["variant"] != "dpaat":
            continue
        where = f"{r['model']} {r['size']} px batch {r['batch']}"
        if r["speedup_vs_naive"] is not None:
            out.append(f"{where}: dpaat {r['speedup_vs_naive']:.2f}x naive PGD-AT (target >= {gpu_speed.TARGET_SPEEDUP:g}: "
                       f"{'met' if r['speedup_vs_naive'] >= gpu_speed.TARGET_SPEEDUP else 'MISSED'})")
        out.append(f"{where}: dpaat/pgd_at {r['time_vs_pgd_at']:.3f} (target <= {gpu_speed.TARGET_RATIO:.2f}: "
                   f"{'met' if r['time_vs_pgd_at'] <= gpu_speed.TARGET_RATIO else 'MISSED'})")
        if (r["model"], r["size"], r["batch"]) == gpu_speed.MFU_SETTING:
            out.append(f"{where}: MFU {100 * r['mfu']:.1f}% (target >= {100 * gpu_speed.TARGET_MFU:.0f}%: "
                       f"{'met' if r['mfu'] >= gpu_speed.TARGET_MFU else 'MISSED'})")
    return out


def pair_config(method: str, args, max_minutes: Optional[float], epochs: Optional[int] = None):
    """The pair's setting: the paper's (ResNet34 at 224 px, batch 32, Adam 3e-4, l2 eps 0.3, PGD-7), or resnet8 at
    32 px in --quick mode. ``epochs`` (default the paper's 50) with patience as long, so that no run stops early:
    the checkpoint is still the best epoch on validation balanced accuracy."""
    from dpaat_core.config import RunConfig, method_config
    epochs = epochs or (2 if args.quick else 50)
    return RunConfig().replace(
        data={"spec": f"ham10000:{args.data}", "image_size": 32 if args.quick else 224},
        model={"name": "resnet8" if args.quick else "resnet34"}, method=method_config(method),
        attack={"steps": 2 if args.quick else 7},
        train={"epochs": epochs, "batch_size": 32, "lr": 3e-4, "patience": epochs,
               "device": args.device, "max_minutes": max_minutes})


def stage_pair(args) -> dict:
    """Train the pair for the same number of epochs: the first method under its share of the stage's time, the
    second for as many epochs as the first completed (the first epoch, which pays for data loading and compiling,
    is the first run's alone). Then the protocol on both, then the APGD check on both while time is left; every
    figure is recorded as soon as it exists."""
    from dpaat_core.train.loop import Stopped, train
    deadline, store = args.stage_deadline, Path(args.store)
    reserve = EVAL_RESERVE["cuda" if args.device == "cuda" else "cpu"]
    done, trained = {}, {}
    epochs = None     # fixed by the first run

    def save(method, figures):
        done[method] = done.get(method, {}) | figures
        record(args.out, "pair", runs=done, data=f"ham10000:{args.data}", store=str(store), epochs=epochs)

    for i, method in enumerate(PAIR):
        left = deadline - time.time()
        budget = (left - (len(PAIR) - len(trained)) * reserve) / (len(PAIR) - i)   # this run's training share
        if budget <= 5:
            save(method, {"error": f"not trained: {left:.0f} s left in the stage"})
            continue
        run_id = f"gpu-{method}-{'resnet8-32' if args.quick else 'resnet34-224'}"
        if (store / run_id).exists():
            import shutil
            shutil.rmtree(store / run_id)
        # the second run trains the first one's epochs: its cut-off is the time left, not its share
        hard = time.time() + (budget if epochs is None else left - reserve) + 0.5 * reserve
        t0 = time.time()
        try:
            config = (pair_config(method, args, budget / 60) if epochs is None
                      else pair_config(method, args, None, epochs))
            run_dir = train(config, store=store, run_id=run_id, should_stop=lambda: time.time() > hard)
        except Stopped:
            run_dir = store / run_id
        except Exception:
            save(method, {"error": traceback.format_exc()})
            continue
        trained[method] = run_dir
        summary = run_summary(run_dir, time.time() - t0)
        if epochs is None and summary["epochs_run"]:
            epochs = summary["epochs_run"]
        save(method, summary)
    robust = {}
    for method, run_dir in trained.items():
        try:
            figures, robust[method] = protocol(run_dir, args.device)
            save(method, figures)
        except Exception:
            save(method, {"eval_error": traceback.format_exc()})
    for method, survivors in robust.items():
        need = 2.5 * done[method]["pgd20_seconds"]     # APGD-CE + DLR, 50 steps each, on PGD-20's survivors
        if time.time() + need > deadline:
            save(method, {"apgd": None, "apgd_skipped": f"not enough time left (about {need:.0f} s needed)"})
            continue
        try:
            save(method, apgd_check(trained[method], args.device, survivors))
        except Exception:
            save(method, {"eval_error": traceback.format_exc()})
    for method, run_dir in trained.items():
        runs_json(run_dir, done[method])
    if not trained:
        raise RuntimeError(f"no run trained: {'; '.join(d['error'].strip().splitlines()[-1] for d in done.values())}")
    return {"runs": done, "data": f"ham10000:{args.data}", "store": str(store)}


def run_summary(run_dir: Path, wall: float) -> dict:
    from dpaat_core.store import runs
    record, status, metrics = runs.read_record(run_dir), runs.read_status(run_dir), runs.read_metrics(run_dir)
    config, n = record.config, len(metrics)
    return {"run": run_dir.name, "method": record.method, "model": record.model.name,
            "image_size": config.data.image_size, "train_size": record.dataset.train_size,
            "epochs_run": n, "epochs_max": config.train.epochs, "best_epoch": status.get("best_epoch"),
            "state": status["state"], "stopped_by": status.get("stopped_by"), "budget_minutes":
            config.train.max_minutes, "wall_seconds": wall,
            "train_seconds": float(metrics["train_seconds"].sum()) if n else 0.0,
            "seconds_per_epoch": float(metrics["seconds"].median()) if n else None,
            "images_per_second": float(metrics["images_per_second"].median()) if n else None,
            "data_seconds": float(metrics["data_seconds"].sum()) if n and "data_seconds" in metrics else None,
            "val_balanced_accuracy_best": float(metrics["val_balanced_accuracy"].max()) if n else None}


def _loaded(run_dir: Path, device: str):
    from dpaat_core.store import loading, runs
    attack = runs.read_record(run_dir).attack
    return (loading.load_model(run_dir, device=device), loading.load_run_data(run_dir, "test"), attack.norm,
            float(attack.eps))


def protocol(run_dir: Path, device: str) -> tuple[dict, object]:
    """The paper's protocol on the whole test split at the run's eps: clean, balanced, mAP, PGD-20 and I-FGSM;
    with PGD-20's robust mask for the APGD check."""
    from dpaat_core.evaluate.robustness import evaluate
    model, test, norm, eps = _loaded(run_dir, device)
    t0 = time.time()
    pgd = evaluate(model, test, "pgd", norm, eps, 20)
    pgd_seconds = time.time() - t0
    ifgsm = evaluate(model, test, "ifgsm", norm, eps, 10)
    per_class = {row["class"]: {"n": int(row["n"]), "clean": row["accuracy"], "pgd20": row["robust_accuracy"]}
                 for row in pgd.per_class.to_dict("records")}   # bench/study.py's study.json layout
    return {"n_test": len(test), "eps": eps, "norm": norm, "clean_accuracy": pgd.accuracy,
            "balanced_accuracy": pgd.balanced_accuracy, "mAP": pgd.mean_average_precision,
            "pgd20": pgd.robust_accuracy, "pgd20_balanced": pgd.robust_balanced_accuracy, "ifgsm": ifgsm.robust_accuracy,
            "per_class": per_class, "pgd20_seconds": pgd_seconds,
            "protocol_seconds": time.time() - t0}, pgd.samples["robust"].to_numpy()


def apgd_check(run_dir: Path, device: str, survivors) -> dict:
    """APGD-CE then APGD-DLR (50 steps) on PGD-20's survivors: the worst case per sample."""
    from dpaat_core.evaluate.strong import strong_robustness
    model, test, norm, eps = _loaded(run_dir, device)
    t0 = time.time()
    strong = strong_robustness(model, test, norm, eps, steps=50, survivors=survivors)
    return {"apgd": strong["robust_accuracy"], "apgd_attacks": f"pgd20+{strong['attacks']} (50 steps)",
            "apgd_seconds": time.time() - t0}


def runs_json(run_dir: Path, figures: dict) -> None:
    """The run's figures beside it, as ``study.json`` (what ``bench/study.py collect`` reads)."""
    from dpaat_core.store import runs
    runs.atomic_write_json(run_dir / "study.json", figures)


def stage_archive(args) -> dict:
    """The pair's run folders as one tar.gz: no resume state; weights only when small enough to ship."""
    store, out = Path(args.store), Path(args.out)
    folders = sorted(p for p in store.glob("gpu-*") if (p / "config.json").is_file())
    if not folders:
        raise RuntimeError(f"no run folders in {store} (the pair stage made none)")
    limit = args.max_weights_mb * 2**20
    kept_weights, left = [], []

    def keep(info: tarfile.TarInfo):
        name = Path(info.name).name
        if name == "last.pt" or name.endswith(".tmp"):
            return None
        if name == "weights.safetensors" and info.size > limit:
            left.append(f"{info.name} ({info.size / 2**20:.0f} MB)")
            return None
        if name == "weights.safetensors":
            kept_weights.append(info.name)
        return info

    target = out / "runs.tar.gz"
    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in folders:
            tar.add(folder, arcname=folder.name, filter=keep)
    os.replace(tmp, target)
    return {"file": target.name, "mb": target.stat().st_size / 2**20, "runs": [p.name for p in folders],
            "weights_kept": kept_weights, "weights_left_out": left,
            "unpack": f"tar -xzf {target.name} -C checkpoints/"}


STAGE_FUNCTIONS = {"env": stage_env, "tests": stage_tests, "speed": stage_speed, "pair": stage_pair,
                   "archive": stage_archive}


def run_stage(args) -> int:
    """The body of ``--stage NAME``: run it, record its result or its traceback."""
    out = Path(args.out)
    t0 = time.time()
    record(out, args.stage, status="running", started=t0)
    try:
        result = STAGE_FUNCTIONS[args.stage](args)
    except Exception:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        record(out, args.stage, status="failed", error=tb, seconds=time.time() - t0)
        return 1
    record(out, args.stage, **(result | {"status": "ok", "seconds": time.time() - t0}))
    return 0


# --- the driver ---------------------------------------------------------------------------------

def run_capped(argv: list, timeout: float, **popen) -> Optional[int]:
    """Run ``argv`` (from the repository root) in a process group of its own; its exit code, or None when it ran
    past ``timeout`` seconds and was killed with everything it started."""
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True, **popen)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "report.md", "stages.log", "runs.tar.gz"):
        (out / name).unlink(missing_ok=True)
    start = time.time()
    deadline = start + 60 * args.minutes
    caps = (QUICK_CAPS if args.quick else CAPS) | dict(args.cap)
    record(out, "check", started=start, device=args.device, quick=args.quick, minutes=args.minutes,
           stages=list(args.stages), caps=caps)
    failed = 0
    for stage in args.stages:
        cap = min(caps[stage], deadline - time.time() - 2)
        if cap < 1:
            record(out, stage, status="skipped", error=f"no time left of the {args.minutes:g} min budget")
            failed += 1
            continue
        argv = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--stage-deadline",
                str(time.time() + cap - 3), *args.passthrough]
        with open(out / "stages.log", "a") as log:
            log.write(f"\n===== {stage} (cap {cap:.0f} s) =====\n")
            log.flush()
            code = run_capped(argv, cap, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
        entry = read_results(out).get(stage, {})
        if code is None:
            log_tail = _tail((out / "stages.log").read_text())
            record(out, stage, status="timed out", error=f"killed at its cap of {cap:.0f} s; output's end:\n{log_tail}",
                   seconds=cap)
        elif entry.get("status") not in ("ok", "failed"):   # died without recording (e.g. a crash in CUDA)
            record(out, stage, status="failed", seconds=time.time() - entry.get("started", time.time()),
                   error=f"exited with {code} without a result; output's end:\n{_tail((out / 'stages.log').read_text())}")
        status = read_results(out)[stage]["status"]
        failed += status != "ok"
        print(f"[gpu_check] {stage}: {status} ({time.time() - start:.0f} s in)", flush=True)
    record(out, "check", seconds=time.time() - start, failed_stages=failed)
    print(f"[gpu_check] report: {out / 'report.md'}", flush=True)
    return 0 if failed == 0 else 1


# --- report.md ----------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def _status_line(stage: str, entry: dict) -> list[str]:
    head = f"## {stage}: {entry.get('status', 'not run')}"
    if "seconds" in entry:
        head += f" ({entry['seconds']:.0f} s)"
    lines = [head, ""]
    if entry.get("error"):
        lines += ["```", _tail(entry["error"], 40), "```", ""]
    return lines


def _env_lines(e: dict) -> list[str]:
    keys = ("device_name", "memory_gib", "capability", "python", "torch", "torchvision", "cuda", "cudnn", "captum",
            "torchattacks", "peak_tflop_per_s", "peak_dtype", "threads", "cpu_count")
    rows = [f"| {k} | {e[k]:.1f} |" if isinstance(e[k], float) else f"| {k} | {e[k]} |" for k in keys if k in e]
    return ["| | |", "|---|---|", *rows, ""] if rows else []


def _tests_lines(e: dict) -> list[str]:
    if "summary" not in e:
        return []
    lines = [f"`{e['command']}` with `DPAAT_TEST_DEVICE={e.get('device', 'the device')}`: **{e['summary']}**", ""]
    lines += [f"- failed: `{f}`" for f in e.get("failures", [])]
    return lines + ([""] if e.get("failures") else [])


def _speed_lines(e: dict) -> list[str]:
    if not e.get("rows"):
        return []
    lines = [f"`python {e.get('command', 'bench/gpu_speed.py')}`", "", "| model | px | batch | variant | ms/step | images/s | MFU % | x naive | /pgd_at |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in e["rows"]:
        fmt = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        lines.append(f"| {r['model']} | {int(r['size'])} | {int(r['batch'])} | {r['variant']} | {r['ms_per_step']:.1f} | "
                     f"{r['images_per_s']:.1f} | {100 * r['mfu']:.1f} | {fmt(r['speedup_vs_naive'], '.2f')} | "
                     f"{fmt(r['time_vs_pgd_at'], '.3f')} |")
    return lines + ["", *[f"- {t}" for t in e.get("targets", [])], ""]


def _pair_lines(e: dict) -> list[str]:
    done = e.get("runs") or {}
    if not done:
        return []
    lines = ["| method | epochs (best) | ended by | wall s | s/epoch | images/s | clean | balanced | mAP | PGD-20 | "
             "PGD-20 balanced | I-FGSM | APGD | paper PGD-20 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for method, r in done.items():
        if "run" not in r:
            notes.append(f"- {method}: failed\n```\n{_tail(r.get('error', ''), 30)}\n```")
            continue
        spe = r.get("seconds_per_epoch")
        ips = r.get("images_per_second")
        lines.append(f"| {method} | {r['epochs_run']}/{r['epochs_max']} ({r['best_epoch']}) | {r.get('stopped_by')} | "
                     f"{r['wall_seconds']:.0f} | {'-' if spe is None else f'{spe:.1f}'} | "
                     f"{'-' if ips is None else f'{ips:.0f}'} | {_pct(r.get('clean_accuracy'))} | "
                     f"{_pct(r.get('balanced_accuracy'))} | {_pct(r.get('mAP'))} | {_pct(r.get('pgd20'))} | "
                     f"{_pct(r.get('pgd20_balanced'))} | {_pct(r.get('ifgsm'))} | {_pct(r.get('apgd'))} | "
                     f"{PAPER.get(method, '-')} |")
        if spe:
            notes.append(f"- {method}: {r['epochs_max']} epochs at the median epoch time would take "
                         f"{r['epochs_max'] * spe / 60:.1f} min (target for a paper-scale run: 5 min with its evaluation; "
                         f"PGD-20 and I-FGSM took {r.get('protocol_seconds', 0):.0f} s, APGD {r.get('apgd_seconds') or 0:.0f} s)")
        if r.get("apgd_skipped"):
            notes.append(f"- {method}: APGD check skipped ({r['apgd_skipped']})")
        if r.get("eval_error"):
            notes.append(f"- {method}: evaluation failed\n```\n{_tail(r['eval_error'], 30)}\n```")
    first = next((r for r in done.values() if "run" in r), None)
    setting = ""
    if first:
        setting = (f"{first['model']} at {first['image_size']} px, batch 32, Adam 3e-4, l2 eps "
                   f"{first.get('eps', 0.3)}, {first['train_size']} training images of `{e.get('data', 'ham10000:')}`, "
                   f"test split n = {first.get('n_test', '-')}; accuracies in %. ")
        if first["image_size"] > 150:
            setting += (f"HAM10000's files are 200x150: the centre 150x150 square is upsampled to "
                        f"{first['image_size']} px (x{first['image_size'] / 150:.2f}). ")
    if e.get("epochs"):
        setting += f"Both methods train {e['epochs']} epochs (the first run's share of the time fixes the number). "
    return [setting + "The paper's PGD-20 is its ImageNet-pretrained ResNet34 after up to 50 epochs.", "",
            *lines, "", *_per_class_lines(done), *notes, ""]


def _per_class_lines(done: dict) -> list[str]:
    """Clean and PGD-20 accuracy per class, the methods side by side: whether robustness stops at the common class."""
    have = {m: r["per_class"] for m, r in done.items() if r.get("per_class")}
    if not have:
        return []
    classes = list(dict.fromkeys(c for per in have.values() for c in per))
    head = "| class | n | " + " | ".join(f"{m} clean | {m} PGD-20" for m in have) + " |"
    lines = ["Per class (test split, %):", "", head, "|---|---|" + "---|---|" * len(have)]
    for c in classes:
        n = next(per[c]["n"] for per in have.values() if c in per)
        cells = " | ".join(f"{_pct(per.get(c, {}).get('clean'))} | {_pct(per.get(c, {}).get('pgd20'))}"
                           for per in have.values())
        lines.append(f"| {c} | {n} | {cells} |")
    return [*lines, ""]


def _archive_lines(e: dict) -> list[str]:
    if "file" not in e:
        return []
    lines = [f"`{e['file']}`: {e['mb']:.1f} MB, runs {', '.join(e['runs'])}; unpack with `{e['unpack']}`."]
    if e.get("weights_left_out"):
        lines.append(f"Weights left out (over the size limit): {', '.join(e['weights_left_out'])}.")
    return lines + [""]


SECTION = {"env": _env_lines, "tests": _tests_lines, "speed": _speed_lines, "pair": _pair_lines,
           "archive": _archive_lines}


def write_report(out: Path, results: dict) -> None:
    from dpaat_core.store.runs import atomic_write_text
    check = results.get("check", {})
    lines = ["# GPU check", "",
             f"`python bench/gpu_check.py --device {check.get('device')}{' --quick' if check.get('quick') else ''}`"
             f" — budget {check.get('minutes')} min" + (f", took {check['seconds']:.0f} s" if "seconds" in check else
                                                        ", still running or killed") + ".", ""]
    for stage in check.get("stages", STAGES):
        entry = results.get(stage, {})
        if stage == "tests":
            entry = entry | {"device": check.get("device")}
        lines += _status_line(stage, entry) + SECTION[stage](entry)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


# --- command line -------------------------------------------------------------------------------

def _cap(text: str) -> tuple[str, float]:
    stage, _, seconds = text.partition("=")
    if stage not in STAGES:
        raise argparse.ArgumentTypeError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    try:
        value = float(seconds)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--cap {text}: seconds must be a number > 0")
    return stage, value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="small and short: resnet8 at 32 px, 2 epochs, the 56-JPEG "
                   "HAM10000 folder, a test subset, gpu_speed --quick; for a CPU rehearsal")
    p.add_argument("--out", type=Path, default=ROOT / "gpu_check_out", help="output folder (default gpu_check_out/)")
    p.add_argument("--store", type=Path, default=ROOT / "gpu_check_runs", help="run store of the pair (default gpu_check_runs/)")
    p.add_argument("--data", type=Path, default=None, help="HAM10000 folder in its original layout: JPEGs and "
                   f"HAM10000_metadata.csv (default {DEFAULT_DATA}; --quick: {QUICK_DATA})")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--cap", type=_cap, action="append", default=[], metavar="STAGE=SECONDS",
                   help=f"a stage's time cap (defaults: {CAPS}; --quick: {QUICK_CAPS})")
    p.add_argument("--minutes", type=float, default=8.5, help="budget of the whole script in minutes (default 8.5)")
    p.add_argument("--max-weights-mb", type=float, default=8.0,
                   help="weights larger than this stay out of runs.tar.gz (default 8)")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--stage-deadline", type=float, default=math.inf, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; use --device cpu")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    args.data = (args.data or (QUICK_DATA if args.quick else DEFAULT_DATA)).resolve()
    args.out, args.store = args.out.resolve(), args.store.resolve()
    args.passthrough = ["--device", args.device, "--out", str(args.out), "--store", str(args.store), "--data",
                        str(args.data), "--max-weights-mb", str(args.max_weights_mb)] + (["--quick"] if args.quick else [])
    args.stage_deadline = args.stage_deadline
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stage:
        return run_stage(args)
    return drive(args)


if __name__ == "__main__":
    raise SystemExit(main())
