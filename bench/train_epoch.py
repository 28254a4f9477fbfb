"""Seconds per training epoch of erm, pgd_at and dpaat (same data, model, K), as ratios.

Targets: dpaat / pgd_at <= 1.15 and pgd_at / erm <= (K + 1) * 1.1. Each method trains through
the real trainer; the time is the trainer's own ``train_seconds`` of a warm epoch (validation
excluded). Methods alternate over rounds so drift on a busy machine hits all of them alike.

    python bench/train_epoch.py                       # resnet8, HAM10000 sample at 64 px, CPU
    python bench/train_epoch.py --device cuda --model resnet18 --max-samples 4096
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


from dpaat_core.store import runs
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train.loop import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_sample.npz"
METHODS = ("erm", "pgd_at", "dpaat")


def epoch_seconds(method: str, args, store: Path, round_: int) -> tuple[float, float]:
    cfg = RunConfig().replace(
        data={"spec": args.data, "image_size": args.image_size, "max_samples": args.max_samples},
        model={"name": args.model}, attack={"steps": args.steps}, method=method_config(method),
        train={"epochs": 2, "batch_size": args.batch_size, "device": args.device, "early_stop": "none"})
    run = train(cfg, store=store, run_id=f"{method}-{round_}")
    metrics = runs.read_metrics(run)
    return float(metrics["train_seconds"].iloc[-1]), float(metrics["images_per_second"].iloc[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=f"npz:{SHARED}")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=7, help="PGD steps K")
    p.add_argument("--max-samples", type=int, default=512, help="training images per epoch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    times = {m: [] for m in METHODS}
    rates = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as store:
        for r in range(args.rounds):
            for m in METHODS:
                seconds, rate = epoch_seconds(m, args, Path(store), r)
                times[m].append(seconds)
                rates[m].append(rate)
                print(f"round {r + 1}/{args.rounds}  {m:7s} {seconds:7.2f} s/epoch  {rate:8.1f} images/s", file=sys.stderr)
    med = {m: statistics.median(v) for m, v in times.items()}
    k = args.steps
    print(f"\n{args.model} {args.image_size}px batch {args.batch_size} K={k} {args.max_samples} images, "
          f"{args.device}, median of {args.rounds} rounds")
    for m in METHODS:
        print(f"  {m:7s} {med[m]:7.2f} s/epoch  {statistics.median(rates[m]):8.1f} images/s")
    dp, pe = med["dpaat"] / med["pgd_at"], med["pgd_at"] / med["erm"]
    print(f"  dpaat / pgd_at = {dp:.3f}  (target <= 1.15: {'met' if dp <= 1.15 else 'MISSED'})")
    print(f"  pgd_at / erm   = {pe:.2f}  (target <= (K+1)*1.1 = {(k + 1) * 1.1:.1f}: "
          f"{'met' if pe <= (k + 1) * 1.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
