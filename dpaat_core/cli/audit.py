"""``python -m dpaat_core audit RUN``: the protocol, both norms' curves, the APGD check and the attribution numbers
of a run in one go, then its report; ``python -m dpaat_core report RUN [RUN ...] -o FILE.html``: the shareable
report of one run or the comparison of several."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpaat_core.store import runs
from dpaat_core.attack.attacks import MAX_STEPS
from dpaat_core.cli.args import add_run_args
from dpaat_core.config import ConfigError


def add_audit_parsers(sub) -> None:
    a = sub.add_parser("audit", help="protocol, curves, APGD check and attribution numbers of a run, then its report",
                       description="Audit a run (trained here or imported): the paper's protocol (PGD-20 and "
                                   "I-FGSM, l2 and linf) with per-class figures, PGD robustness curves in both norms, "
                                   "the APGD check and the clean-vs-attacked attribution numbers, each merged into the "
                                   "run folder as it finishes; then RUN_DIR/report.html.")
    add_run_args(a, data_help="data spec (default: the run's own; needed for a run imported with --classes)")
    a.add_argument("--max-samples", type=int, help="audit at most N images (a seeded draw, for a quick look)")
    a.add_argument("--attribution-images", type=int, help="images whose maps are measured: a seeded draw of N "
                                                            "(default all, which the dashboard's gallery sorts)")
    a.add_argument("--curve-samples", type=int, help="the curves and the APGD check on a seeded draw of N of the "
                                                     "audited images (the protocol and the maps use them all; "
                                                     "default all): the costly parts, cut short on a CPU")
    a.add_argument("--apgd-steps", type=int, default=50, help="APGD steps (default 50)")
    a.add_argument("--batch-size", type=int, default=128, help="images per attack batch (default 128)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random starts and draws (default 0)")
    a.add_argument("--no-report", action="store_true", help="compute and save the tables only")
    a.set_defaults(run=_audit)
    r = sub.add_parser("report", help="one self-contained HTML file of the audit of one run, or comparing several",
                       description="Write the audit report of RUN_DIR(s) as one HTML file that opens offline: origin, "
                                   "accuracy clean and under attack with per-class figures, curves, the APGD check, "
                                   "attribution numbers and example images; several runs are compared first. It "
                                   "reads the tables 'audit' wrote.")
    add_run_args(r, many=True, data_help="data spec of the tables to show (default: each run's own)")
    r.add_argument("-o", "--output", required=True, help="the HTML file to write")
    r.add_argument("--examples", type=int, default=6, help="example test images per run (default 6, 0 for none)")
    r.set_defaults(run=_report)


def _audit(args: argparse.Namespace) -> int:
    from dpaat_core.evaluate.audit import audit
    from dpaat_core.report import write_report
    from dpaat_core.train.loop import resolve_device

    for flag, value in (("--max-samples", args.max_samples), ("--curve-samples", args.curve_samples)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if (args.attribution_images is not None and args.attribution_images < 1) or args.batch_size < 1 or not 1 <= args.apgd_steps <= MAX_STEPS:
        raise ConfigError(f"--attribution-images and --batch-size must be >= 1 and --apgd-steps from 1 to {MAX_STEPS}")
    runs.check_not_training(args.run_dir, "audit")
    runs.check_writable(args.run_dir, "audit")
    device = resolve_device(args.device)
    audit(args.run_dir, args.data, args.split, args.max_samples, args.attribution_images, args.apgd_steps,
          args.batch_size, device, args.seed, log=lambda line: print(line, file=sys.stderr),
          curve_samples=args.curve_samples)
    if not args.no_report:
        path = write_report([args.run_dir], Path(args.run_dir) / "report.html", data=args.data, split=args.split,
                            device=device, seed=args.seed)
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from dpaat_core.report import write_report
    from dpaat_core.train.loop import resolve_device

    if args.examples < 0:
        raise ConfigError(f"--examples must be >= 0, got {args.examples}")
    out = Path(args.output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"-o {out}: the report is an HTML file; name it .html")
    path = write_report(args.run_dirs, out, data=args.data, split=args.split, n_examples=args.examples,
                        device=resolve_device(args.device))
    print(path)
    return 0
