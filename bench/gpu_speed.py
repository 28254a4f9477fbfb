"""Training and evaluation speed on one device: images/s and model-FLOP utilisation (MFU) of the
erm, pgd_at and dpaat training steps and of PGD-20 evaluation, beside a naive PGD-AT baseline
timed in the same process (torchattacks ``PGDL2(model, eps=0.3, alpha=0.15, steps=7)`` and a
plain float32 cross-entropy step).

    python bench/gpu_speed.py                          # the issue's grid on CUDA
    python bench/gpu_speed.py --device cpu --quick     # resnet8 32 px batch 16: a smoke run (< 1 min)
    python bench/gpu_speed.py --settings resnet34:224:128 --steps 20 --csv speed.csv

Our steps are the trainer's: a batch from the device-resident uint8 split (``train.make_batch``),
``objectives.training_step`` under bf16 autocast on CUDA (PGD with K = 7 on the bare model, the
training forward passes through ``torch.compile`` when compile is on), backward and an Adam step.
FLOPs per image come from ``FlopCounterMode`` (convolutions and matmuls) on the model's forward and
backward, times the passes each step makes: an attack pass is a forward and a backward to the input
only, a training pass a forward and a backward to the weights, a no-grad pass a forward alone
(pgd_at: K attack + 1 training + 1 no-grad clean pass; dpaat: K attack + 2 training passes).
The peak is a large matmul timed in the same process (bf16 on CUDA, float32 on the CPU), so MFU
is "model FLOP/s over what this device's matmul reaches", not the datasheet figure.

Targets (for CUDA): dpaat step >= 3x naive PGD-AT; dpaat >= 30% MFU at resnet34 224 px batch 128;
dpaat / pgd_at time <= 1.10.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dpaat_core.config import AttackConfig, method_config
from dpaat_core.attack.attacks import perturb
from dpaat_core.models import build_model
from dpaat_core.train.objectives import MethodState, training_step
from dpaat_core.train.loop import compile_enabled, compile_model, make_batch

GRID = ("resnet34:224:32", "resnet34:224:128", "resnet18:64:32", "resnet18:64:512")
QUICK = ("resnet8:32:16",)
METHODS = ("erm", "pgd_at", "dpaat")
ADVERSARIAL = ("pgd_at", "dpaat", "naive_pgd_at")   # the rows compared with the naive baseline
CLASSES, K, EPS = 7, 7, 0.3
TARGET_SPEEDUP, TARGET_MFU, TARGET_RATIO, MFU_SETTING = 3.0, 0.30, 1.10, ("resnet34", 224, 128)


def parse_setting(text: str) -> tuple[str, int, int]:
    """``"resnet34:224:128"`` to ``("resnet34", 224, 128)`` (model, image size, batch)."""
    try:
        name, size, batch = text.split(":")
        return name, int(size), int(batch)
    except ValueError:
        raise SystemExit(f"--settings: expected model:size:batch such as resnet34:224:128, got {text!r}") from None


class Timer:
    """Wall-clock seconds of a block: CUDA events on CUDA (the device's own time), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return time.perf_counter() - t0


def peak_flops(device: torch.device, quick: bool) -> float:
    """FLOP/s of a large matmul on ``device``: bf16 on CUDA, float32 on the CPU."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timer, mm = Timer(device), lambda: torch.mm(a, b)
    timer(mm, 3)
    repeats = 50 if cuda else 5
    return max(2 * n**3 * repeats / timer(mm, repeats) for _ in range(3))


class OurStep:
    """One training step of ``method`` as the trainer takes it, on a device-resident batch pool."""

    def __init__(self, method: str, name: str, size: int, batch: int, device: torch.device, compiled: bool):
        cuda = device.type == "cuda"
        self.passes = method_passes(method)
        torch.manual_seed(0)
        self.bare = build_model(name, CLASSES).to(device)
        if cuda:
            self.bare = self.bare.to(memory_format=torch.channels_last)
        self.model = compile_model(self.bare, device) if compiled else self.bare
        self.optimizer = torch.optim.Adam(self.bare.parameters(), lr=3e-4, fused=cuda or None)
        self.method, self.attack = method_config(method), AttackConfig(steps=K)
        pool = 4 * batch   # a few batches of distinct samples, so the eps memory is indexed as in training
        self.state = MethodState.create(self.method, self.attack, pool, device)
        gen = torch.Generator(device=device).manual_seed(0)
        self.images = torch.randint(0, 256, (pool, 3, size, size), generator=gen, device=device, dtype=torch.uint8)
        self.labels = torch.randint(0, CLASSES, (pool,), generator=gen, device=device)
        self.batches = torch.arange(pool, device=device).split(batch)
        self.weights = torch.ones(CLASSES, device=device)
        self.gen, self.device, self.cuda, self.compiled, self.i = gen, device, cuda, compiled, 0

    def __call__(self) -> None:
        idx = self.batches[self.i % len(self.batches)]
        self.i += 1
        x, y, idx = make_batch(self.images, self.labels, idx, "flips", self.gen, self.cuda)
        if self.cuda and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            step = training_step(self.model, x, y, idx, self.method, self.attack, self.state,
                                 class_weights=self.weights, generator=self.gen, attack_model=self.bare)
        self.optimizer.zero_grad(set_to_none=True)
        step.loss.backward()
        self.optimizer.step()


class EvalStep:
    """PGD-20 (l2, eps 0.3, the evaluation protocol) of one batch with ``evaluate.perturb``."""

    passes = (20, 0, 0)

    def __init__(self, name: str, size: int, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.model = build_model(name, CLASSES).to(device).eval()
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.x = torch.rand(batch, 3, size, size, device=device)
        self.y = torch.randint(0, CLASSES, (batch,), device=device)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.amp = device.type == "cuda"

    def __call__(self) -> None:
        perturb(self.model, self.x, self.y, "pgd", "l2", EPS, 20, generator=self.gen, validate=False, amp=self.amp)


class NaiveStep:
    """The naive PGD-AT step: torchattacks PGDL2 (K = 7) and a plain float32 CE step, no tricks."""

    passes = (K, 1, 0)

    def __init__(self, torchattacks, name: str, size: int, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.model = build_model(name, CLASSES).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-4)
        self.attack = torchattacks.PGDL2(self.model, eps=EPS, alpha=EPS / 2, steps=K)
        self.x = torch.rand(batch, 3, size, size, device=device)   # its batch comes for free
        self.y = torch.randint(0, CLASSES, (batch,), device=device)

    def __call__(self) -> None:
        self.model.train()
        x_adv = self.attack(self.x, self.y)
        loss = F.cross_entropy(self.model(x_adv), self.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def method_passes(method: str) -> tuple[int, int, int]:
    """(attack, training, no-grad) passes of one ``training_step`` of ``method`` (see objectives.py)."""
    m = method_config(method)
    if m.attack == "none":
        return 0, 1, 0
    clean_grad, adv_grad = m.beta_clean > 0 or m.lam > 0, m.adv_weight > 0 or m.lam > 0
    return K, int(clean_grad) + int(adv_grad), int(not clean_grad) + int(not adv_grad)


def pass_flops(name: str, size: int, device: torch.device) -> tuple[float, float, float]:
    """Model FLOPs per image of an attack pass, a training pass and a no-grad forward pass."""
    torch.manual_seed(0)
    model = build_model(name, CLASSES).to(device)
    x = torch.rand(2, 3, size, size, device=device)   # FLOPs are linear in the batch: count 2 images

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / len(x)

    model.train()
    train = count(lambda: model(x).sum().backward())
    model.eval().requires_grad_(False)
    forward = count(lambda: model(x))
    attack = count(lambda: model(x.clone().requires_grad_(True)).sum().backward())
    return attack, train, forward


def flops_per_step(step, batch: int, per_pass: tuple[float, float, float]) -> float:
    return batch * sum(n * f for n, f in zip(step.passes, per_pass))


def bench_setting(setting: str, args, device: torch.device, peak: float, torchattacks) -> list[dict]:
    name, size, batch = parse_setting(setting)
    compiled = compile_enabled(args.compile, device)
    torch._dynamo.reset()   # a fresh compile cache per setting (the recompile limit counts per code object)
    variants = {m: OurStep(m, name, size, batch, device, compiled) for m in METHODS}
    variants["pgd20_eval"] = EvalStep(name, size, batch, device)
    if torchattacks is not None:
        variants["naive_pgd_at"] = NaiveStep(torchattacks, name, size, batch, device)
    timer, per_pass = Timer(device), pass_flops(name, size, device)
    flops = {v: flops_per_step(step, batch, per_pass) for v, step in variants.items()}
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    seconds = {v: [] for v in variants}
    for _ in range(args.rounds):   # variants alternate, so drift on a busy machine hits all of them alike
        for v, step in variants.items():
            seconds[v].append(timer(step, args.steps) / args.steps)
    rows = []
    naive = statistics.median(seconds["naive_pgd_at"]) if "naive_pgd_at" in seconds else None
    pgd_at = statistics.median(seconds["pgd_at"])
    for v, ts in seconds.items():
        s = statistics.median(ts)
        train = v != "pgd20_eval"
        rows.append({"model": name, "size": size, "batch": batch, "variant": v, "ms_per_step": 1e3 * s,
                     "images_per_s": batch / s, "gflop_per_image": flops[v] / batch / 1e9,
                     "tflop_per_s": flops[v] / s / 1e12, "mfu": flops[v] / s / peak,
                     "speedup_vs_naive": naive / s if naive is not None and v in ADVERSARIAL else None,
                     "time_vs_pgd_at": s / pgd_at if train else None,
                     "device": device.type, "compile": compiled, "peak_tflop_per_s": peak / 1e12})
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _fmt(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def print_table(rows: list[dict]) -> None:
    head = (f"{'model':10s} {'px':>4s} {'batch':>5s}  {'variant':13s} {'ms/step':>9s} {'images/s':>9s} "
            f"{'GFLOP/img':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'x naive':>7s} {'/pgd_at':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:10s} {r['size']:4d} {r['batch']:5d}  {r['variant']:13s} {r['ms_per_step']:9.1f} "
              f"{r['images_per_s']:9.1f} {r['gflop_per_image']:9.3f} {r['tflop_per_s']:8.3f} "
              f"{100 * r['mfu']:5.1f}% {_fmt(r['speedup_vs_naive'], '.2f', 'x'):>7s} "
              f"{_fmt(r['time_vs_pgd_at'], '.3f'):>7s}")


def print_targets(rows: list[dict]) -> None:
    def verdict(ok):
        return "met" if ok else "MISSED"

    print(f"\ntargets (for CUDA): dpaat >= {TARGET_SPEEDUP:g}x naive PGD-AT, dpaat/pgd_at <= {TARGET_RATIO:.2f}, "
          f"dpaat MFU >= {100 * TARGET_MFU:.0f}% at {MFU_SETTING[0]} {MFU_SETTING[1]} px batch {MFU_SETTING[2]}")
    for r in rows:
        if r["variant"] != "dpaat":
            continue
        where = f"{r['model']} {r['size']} px batch {r['batch']}:"
        parts = []
        if r["speedup_vs_naive"] is not None:
            parts.append(f"dpaat/naive-pgd_at speedup {r['speedup_vs_naive']:.2f}x "
                         f"({verdict(r['speedup_vs_naive'] >= TARGET_SPEEDUP)})")
        else:
            parts.append("dpaat/naive-pgd_at speedup n/a (no torchattacks)")
        parts.append(f"dpaat/pgd_at time {r['time_vs_pgd_at']:.3f} ({verdict(r['time_vs_pgd_at'] <= TARGET_RATIO)})")
        if (r["model"], r["size"], r["batch"]) == MFU_SETTING:
            parts.append(f"MFU {100 * r['mfu']:.1f}% ({verdict(r['mfu'] >= TARGET_MFU)})")
        print(f"  {where:28s} " + ";  ".join(parts))


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (default if any) or cpu")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {', '.join(QUICK)}, 2 steps, 1 warmup, 1 round")
    p.add_argument("--settings", help=f"comma-separated model:size:batch (default: {','.join(GRID)})")
    p.add_argument("--steps", type=int, help="timed steps per variant and round (default 10; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant first (default 3, compile included; quick 1)")
    p.add_argument("--rounds", type=int,
                   help="timed rounds, variants alternating; the median is reported (default 3; quick 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our training forward passes (default auto: on for CUDA, off on CPU)")
    p.add_argument("--csv", metavar="PATH", help="also write the table to this CSV file")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
    args.settings = [s.strip() for s in args.settings.split(",")] if args.settings else list(QUICK if args.quick else GRID)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 3)
    return args


def load_torchattacks():
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed (pip install torchattacks): the naive PGD-AT baseline is skipped",
              file=sys.stderr)
        return None
    return torchattacks


def main(argv=None) -> None:
    args = parse_args(argv)
    device, torchattacks = args.device, load_torchattacks()
    peak = peak_flops(device, args.quick)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}, torch {torch.__version__}, compile {'on' if compile_enabled(args.compile, device) else 'off'}, "
          f"PGD K={K} l2 eps {EPS}, {args.steps} steps x {args.rounds} rounds (median), "
          f"peak {'bf16' if device.type == 'cuda' else 'float32'} matmul {peak / 1e12:.2f} TFLOP/s\n")
    rows = []
    for setting in args.settings:
        rows += bench_setting(setting, args, device, peak, torchattacks)
    print_table(rows)
    print_targets(rows)
    if args.csv:
        write_csv(rows, args.csv)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
