"""Our l2 PGD against torchattacks' PGDL2, timed alternately in one process.

    python bench/attacks.py                       # resnet18, 64x64, batch 32, 7 steps, CPU
    python bench/attacks.py --device cuda --batch 128

Prints the median time of each variant over the rounds and its ratio to torchattacks
(lower is faster; target: the default ``pgd`` <= 0.8, never above 1.0), and checks that
the variants compute the same attack (max |difference| of the adversarial images).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpaat_core.attack.attacks import pgd
from dpaat_core.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torchattacks

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, 7).to(device).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 7, (args.batch,), device=device)
    alpha = args.eps / 2
    peer = torchattacks.PGDL2(model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=False)

    def ours(**kw):
        return lambda: pgd(model, x, y, args.eps, alpha, args.steps, random_start=False, **kw)

    def ours_bf16():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return pgd(model, x, y, args.eps, alpha, args.steps, random_start=False)

    variants = {
        "torchattacks PGDL2": lambda: peer(x, y),
        "pgd (default)": ours(),
        "pgd fold_bn=False": ours(fold_bn=False),
        "pgd under bf16 autocast": ours_bf16,
    }
    reference = peer(x, y)
    diffs = {name: (fn() - reference).abs().max().item() for name, fn in variants.items()}  # also warms up
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    base = statistics.median(times["torchattacks PGDL2"])
    print(f"{args.model} {args.size}x{args.size}, batch {args.batch}, {args.steps} steps l2 eps {args.eps}, "
          f"{device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"torchattacks {torchattacks.__version__}, median of {args.rounds} alternated rounds")
    print(f"{'variant':26s} {'median ms':>10s} {'ratio':>7s} {'max|diff|':>10s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:26s} {med * 1e3:10.1f} {med / base:7.3f} {diffs[name]:10.2e}")
    ratio = statistics.median(times["pgd (default)"]) / base
    print(f"ours/torchattacks (default pgd): {ratio:.3f}  (target <= 0.8, never above 1.0)")


if __name__ == "__main__":
    main()
