"""``python -m dpaat_core certify RUN_DIR --sigma S``: randomized smoothing's certified l2 radius for each image of a
split (:mod:`dpaat_core.evaluate.certify`), printed as a summary and merged into the run's ``certified.csv``."""
from __future__ import annotations

import argparse
import sys

from dpaat_core.cli.args import add_run_args
from dpaat_core.config import ConfigError


def add_certify_parser(sub) -> None:
    c = sub.add_parser("certify", help="certified l2 radius per image by randomized smoothing; writes certified.csv",
                       description="Certify the run's smoothed classifier (Cohen et al. 2019): for each image, the "
                                   "class that Gaussian noise of std SIGMA leaves on top, and an l2 radius within "
                                   "which no perturbation can change it (with probability 1 - ALPHA over the "
                                   "noise), or 'abstain'. Rows are merged into RUN_DIR/certified.csv.")
    add_run_args(c)
    c.add_argument("--sigma", type=float, required=True,
                   help="noise std per pixel, images in [0, 1] (use the sigma a gaussian run trained at, e.g. 0.25)")
    c.add_argument("--n0", type=int, default=100, help="noise draws that select the top class (default 100)")
    c.add_argument("--n", type=int, default=10_000, help="noise draws that bound its probability (default 10000; "
                                                         "the largest radius certifiable grows with n)")
    c.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate (default "
                                                              "0.001)")
    c.add_argument("--max-samples", type=int, help="certify a seeded draw of N images, the same N images as evaluate "
                                                    "--max-samples N (default: the whole split)")
    c.add_argument("--batch-size", type=int, help="noisy images per forward pass (default 1000 on CUDA, 100 on the CPU)")
    c.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    c.set_defaults(run=_certify)


def _certify(args: argparse.Namespace) -> int:
    from dpaat_core.store import loading, runs
    from dpaat_core.data import sample_indices
    from dpaat_core.evaluate.certify import certify_dataset, check_settings, per_class, summary
    from dpaat_core.cli.evaluate import _save_or_keep
    from dpaat_core.train.loop import resolve_device

    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max-samples must be >= 1, got {args.max_samples}")
    try:
        check_settings(args.sigma, args.n0, args.n, args.alpha, args.batch_size)
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
    runs.check_not_training(args.run_dir, "certify")
    device = resolve_device(args.device)
    record = runs.read_record(args.run_dir)
    model = loading.load_model(args.run_dir, device=device)
    dataset = loading.load_run_data(args.run_dir, args.split, args.data, progress=True)
    data = args.data or record.spec
    # the draw evaluate makes (load_run_data caps with the run's split seed): both commands see the same images
    indices = sample_indices(len(dataset), args.max_samples, record.seed).numpy()
    try:
        frame = certify_dataset(model, dataset, args.sigma, n0=args.n0, n=args.n, alpha=args.alpha, indices=indices,
                                seed=args.seed, batch_size=args.batch_size, progress=True)
    except ValueError as exc:   # non-finite logits: nothing is written
        raise runs.RunError(f"{args.run_dir}: {exc}") from None
    frame = frame.assign(split=args.split, data=data)
    path = _save_or_keep(lambda: runs.save_certified(args.run_dir, frame), frame, args.run_dir, "certified")
    numbers = summary(frame)
    print(f"certified on {len(frame)} {args.split} images of {data}: sigma {args.sigma:g}, n0 {args.n0}, n {args.n}, "
          f"alpha {args.alpha:g} (each certificate holds with probability {1 - args.alpha:g})")
    print(f"abstains on {numbers['abstain_rate']:.1%}; median radius of the right images "
          f"{numbers['median_radius_correct']:.3g}")
    print("certified accuracy: " + ", ".join(f"{key.split('@')[1]}: {value:.3f}" for key, value in numbers.items()
                                             if key.startswith("certified_accuracy@")))
    print(per_class(frame, dataset.classes).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {path}", file=sys.stderr)
    return 0
