"""Command line: ``python -m dpaat_core <command>``.

``data SPEC``: load every split of a data spec and print what is in it, to check a dataset
before training on it. ``train``: train a run (or ``--resume`` one); ``evaluate RUN_DIR``:
robustness curves into the run's ``robustness.csv``; ``attribute RUN_DIR``:
clean-vs-adversarial attribution numbers into ``attribution.csv``; ``certify RUN_DIR``: randomized smoothing's
certified l2 radius per image into ``certified.csv``; ``import``: a classifier trained elsewhere as a
run; ``audit RUN_DIR``: all of a run's numbers and its report; ``report RUN_DIR...``: the shareable HTML report;
``runs``: list the run store; ``sweep NAME``: tune training settings with Optuna, each trial a run.
Bad arguments and unusable data exit with status 2 and one line.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from dpaat_core.cli.attribute import add_attribute_parser
from dpaat_core.cli.audit import add_audit_parsers
from dpaat_core.cli.certify import add_certify_parser
from dpaat_core.cli.import_model import add_import_parser
from dpaat_core.cli.evaluate import add_evaluate_parser
from dpaat_core.cli.sweep import add_sweep_parser
from dpaat_core.cli.train import add_runs_parser, add_train_parser
from dpaat_core.config import ConfigError
from dpaat_core.data import SOURCES, SPLITS, DataError, DataWarning, load_dataset
from dpaat_core.store.runs import RunError


def _data(args: argparse.Namespace) -> int:
    print(f"{args.spec}  (image size {args.image_size or 'native'})")
    for split in args.splits:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            ds = load_dataset(args.spec, split, args.image_size, root=args.root, seed=args.seed, progress=True)
        for w in caught:
            print(f"  warning: {w.message}", file=sys.stderr)
        counts = ", ".join(f"{c} {n}" for c, n in zip(ds.classes, ds.class_counts))
        masks = "with lesion masks" if ds.masks is not None else "no masks"
        print(f"  {split:5s} {len(ds):6d} images  {ds.in_channels}x{ds.image_size}x{ds.image_size}  {masks}  [{counts}]")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad flags exit 2 with one line (argparse's usage block buries the problem)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dpaat_core", description="DPAAT Lab command line.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    data = sub.add_parser("data", help="show the splits, sizes and class counts of a data spec")
    data.add_argument("spec", help=f"data spec: {', '.join(s + ':...' for s in SOURCES[:-1])} or synthetic[:n=..,classes=..,seed=..]")
    data.add_argument("--image-size", type=int, default=None, help="resize to this square size in pixels (needed for JPEG folders)")
    data.add_argument("--split", dest="splits", action="append", choices=SPLITS, help="only this split (repeatable; default all)")
    data.add_argument("--root", default=None, help="folder of MedMNIST npz files (default $DPAAT_DATA_ROOT, else ./data)")
    data.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split for ham10000: and folder: (default 0)")
    data.set_defaults(run=_data)
    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_attribute_parser(sub)
    add_certify_parser(sub)
    add_import_parser(sub)
    add_audit_parsers(sub)
    add_sweep_parser(sub)
    add_runs_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # sweep --workers starts its workers with these
    if getattr(args, "splits", None) is None:
        args.splits = list(SPLITS)
    try:
        return args.run(args)
    except (DataError, ConfigError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # a read-only store, a full disk, a folder where a file should be: one line, no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
