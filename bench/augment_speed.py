"""What the dermoscopy augmentation costs against the training step it feeds, timed alternately in one process.

    python bench/augment_speed.py                               # mobilenet_v3_small, 128 px, batch 64, one thread
    python bench/augment_speed.py --model resnet8 --size 64 --threads 2

Times, per batch: ``augment_batch`` with "flips" and with "dermoscopy" (kornia's affine warp and colour jitter), and
one ERM training step (forward, backward, Adam) of the model on the same batch. Prints the median seconds of each and
the share of a step that each policy adds (lower is cheaper).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpaat_core.models import build_model
from dpaat_core.train.augment import augment_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.rand((args.batch, 3, args.size, args.size), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 7, (args.batch,), generator=torch.Generator().manual_seed(1))
    model = build_model(args.model, 7, 3)
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    timed = {"flips": lambda: augment_batch(x, "flips", gen), "dermoscopy": lambda: augment_batch(x, "dermoscopy", gen),
             "training step": step}
    gen = torch.Generator().manual_seed(2)
    for f in timed.values():   # warm up
        f()
    seconds = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, f in timed.items():
            start = time.perf_counter()
            f()
            seconds[name].append(time.perf_counter() - start)
    med = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"{args.model}, {args.size} px, batch {args.batch}, {args.threads} thread(s), median of {args.rounds}:")
    for name, s in med.items():
        share = "" if name == "training step" else f"  ({s / med['training step']:.1%} of a training step)"
        print(f"  {name:14s} {s:.4f} s{share}")


if __name__ == "__main__":
    main()
