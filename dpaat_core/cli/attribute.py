"""``python -m dpaat_core attribute RUN_DIR``: does the model look at the same place on clean and
attacked images, and at the lesion? Merges the means into the run's ``attribution.csv`` and each image's numbers
into ``attribution_images.csv`` (what the dashboard's gallery sorts by)."""
from __future__ import annotations

import argparse
import sys

from dpaat_core.attack.attacks import MAX_STEPS, NORMS
from dpaat_core.cli.args import add_run_args
from dpaat_core.config import ConfigError

DEFAULT_METHODS = ("gradcam", "saliency", "integrated_gradients")


def _count(text: str):
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'all', got {text!r}") from None


def add_attribute_parser(sub) -> None:
    from dpaat_core.evaluate.attribution import METHODS

    a = sub.add_parser("attribute", help="clean-vs-adversarial attribution agreement and lesion localisation of a run",
                       description="Explain the run's predictions on clean and attacked test images (same target "
                                   "class) and measure how far the maps agree (Spearman, top-10%% IoU, SSIM) and, "
                                   "where the data has lesion masks, how much of each map falls on the lesion. The "
                                   "means are merged into RUN_DIR/attribution.csv (per method) and each image's "
                                   "numbers into RUN_DIR/attribution_images.csv.")
    add_run_args(a)
    a.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"attribution methods, comma-separated, from {', '.join(METHODS)} "
                        f"(default {','.join(DEFAULT_METHODS)})")
    a.add_argument("--n", type=_count, default=256, help="images explained: a seeded draw of N, or 'all' the split in "
                                                          "index order (default 256)")
    a.add_argument("--eps", type=float, help="attack eps (default: the run's training eps in --norm)")
    a.add_argument("--norm", default="l2", choices=NORMS, help="threat model (default l2)")
    a.add_argument("--steps", type=int, default=10, help="PGD steps of the attack, 1 to 1000 (default 10)")
    a.add_argument("--seed", type=int, default=0, help="seed of the draw and the random starts (default 0)")
    a.set_defaults(run=_attribute)


def _attribute(args: argparse.Namespace) -> int:
    from dpaat_core.store import runs
    from dpaat_core.evaluate.attribution import METHODS, attribution_table
    from dpaat_core.train.loop import resolve_device

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"--methods: choose from {', '.join(METHODS)}; got {args.methods!r}")
    if (args.n is not None and args.n < 1) or not 1 <= args.steps <= MAX_STEPS:
        raise ConfigError(f"--n must be >= 1 and --steps from 1 to {MAX_STEPS}, got {args.n} and {args.steps}")
    if args.eps is not None and not 0 < args.eps <= 1000:
        raise ConfigError(f"--eps must be a number > 0, got {args.eps}")
    runs.check_not_training(args.run_dir, "attribute")
    runs.check_writable(args.run_dir, "attribute")
    table, images = attribution_table(args.run_dir, methods, args.n, args.split, args.data, args.eps, args.norm,
                                      args.steps, args.seed, resolve_device(args.device))
    path, images_path = runs.save_attribution(args.run_dir, table, images)
    wide = table.pivot_table(index="metric", columns="method", values="mean", sort=False)
    print(f"attribution on {int(table['n'].max())} {args.split} images, clean vs PGD-{args.steps} {args.norm} "
          f"eps {table['eps'].iloc[0]:g} (means)")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {path} and {images_path}", file=sys.stderr)
    return 0
