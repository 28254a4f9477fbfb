"""Certification speed: ``dpaat_core.evaluate.certify`` against the reference implementation's loop, timed alternately in one
process on the same model and images.

    python bench/certify_speed.py                          # a demo run (resnet8, 64 px), n 10,000, 2 images, CPU
    python bench/certify_speed.py --device cuda --images 16
    python bench/certify_speed.py --n 1000 --rounds 1      # a quick look

The peer is locuslab/smoothing's ``Smooth._sample_noise``: for each image, batches of copies plus
``randn_like * sigma``, one forward pass each, predictions counted on the host with numpy. Ours: noise drawn per image
from seeded generators on the device, batches that hold several images, channels_last inputs, bf16 autocast on CUDA,
counts kept on the device. Prints images per second of CERTIFY (n0 + n draws per image) and the ratio (higher is
faster), and checks that both count the same share of the top class (they draw different noise).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dpaat_core.store import loading
from dpaat_core.evaluate.certify import certify
from dpaat_core.models import build_model


def reference_counts(model, x: torch.Tensor, num: int, sigma: float, num_classes: int, batch: int) -> np.ndarray:
    """locuslab/smoothing's loop (core.py, ``_sample_noise``), one image at a time."""
    out = np.zeros((len(x), num_classes), dtype=int)
    with torch.no_grad():
        for j in range(len(x)):
            remaining = num
            while remaining > 0:
                this = min(batch, remaining)
                remaining -= this
                copies = x[j:j + 1].repeat((this, 1, 1, 1))
                predictions = model(copies + torch.randn_like(copies) * sigma).argmax(1)
                out[j] += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="checkpoints/demo-gaussian-resnet8-ham10000",
                    help="a run whose model is certified (default the shipped gaussian demo run); '' for a random "
                         "resnet8")
    ap.add_argument("--size", type=int, default=64, help="image size without --run")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=1000, help="the peer's batch (its default, 1,000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.run:
        model = loading.load_model(args.run, device=device)
        data = loading.load_run_data(args.run, "test", max_samples=args.images)
        x, _ = data.batch(torch.arange(len(data)), device)
        num_classes, what = data.num_classes, args.run
    else:
        torch.manual_seed(0)
        model = build_model("resnet8", 7).to(device).eval()
        x, num_classes, what = torch.rand(args.images, 3, args.size, args.size, device=device), 7, "random resnet8"
    draws = args.n0 + args.n

    def peer():
        selection = reference_counts(model, x, args.n0, args.sigma, num_classes, args.batch)
        return reference_counts(model, x, args.n, args.sigma, num_classes, args.batch), selection.argmax(1)

    def ours():
        return certify(model, x, args.sigma, num_classes, n0=args.n0, n=args.n)

    times = {"peer (locuslab loop)": [], "dpaat_core.evaluate.certify": []}
    results = {}
    for _ in range(args.rounds):
        for name, fn in (("peer (locuslab loop)", peer), ("dpaat_core.evaluate.certify", ours)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    counts, top = results["peer (locuslab loop)"]
    share_peer = counts[np.arange(len(x)), top] / args.n
    share_ours = results["dpaat_core.evaluate.certify"]["count"].to_numpy() / args.n
    print(f"{what}: {len(x)} images {tuple(x.shape[1:])}, sigma {args.sigma}, n0 {args.n0}, n {args.n}, "
          f"{device.type} ({torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.rounds} "
          "alternated rounds")
    print(f"{'variant':22s} {'s/image':>9s} {'images/s':>9s} {'draws/s':>9s}")
    rate = {}
    for name, ts in times.items():
        per_image = statistics.median(ts) / len(x)
        rate[name] = 1 / per_image
        print(f"{name:22s} {per_image:9.2f} {rate[name]:9.3f} {draws * rate[name]:9.0f}")
    print(f"speed-up: {rate['dpaat_core.evaluate.certify'] / rate['peer (locuslab loop)']:.2f}x; top-class share per image, "
          f"peer {np.round(share_peer, 3).tolist()} ours {np.round(share_ours, 3).tolist()} (different noise: they "
          f"agree to about {3 / np.sqrt(args.n):.3f})")


if __name__ == "__main__":
    main()
