"""``python -m dpaat_core evaluate RUN_DIR``: robustness curves of a run, printed and merged into
the run's ``robustness.csv``; with ``--corruptions``, accuracy under natural corruptions instead, merged into
``corruptions.csv``."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd

from dpaat_core.attack.attacks import ATTACKS, MAX_STEPS, NORMS, max_eps
from dpaat_core.cli.args import add_run_args
from dpaat_core.config import ConfigError
from dpaat_core.store.runs import RunError
from dpaat_core.evaluate.robustness import default_grid, protocol_evaluations, reference_eps, robustness_curve



def _csv(kind, allowed=None):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return values
    return parse


def _checked(parse):
    """An argparse type from a parser that raises ValueError with a message naming the allowed values."""
    def run(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    run.__name__ = parse.__name__
    return run


def add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="robustness curves of a run across eps; writes robustness.csv into the run",
                       description="Attack a run's best model over an eps grid and print accuracy against eps. "
                                   "The curves are merged into RUN_DIR/robustness.csv.")
    add_run_args(e, data_help="data spec to evaluate on (default: the run's own)", split_help="split to evaluate (default test)")
    e.add_argument("--attack", type=_csv(str, tuple(ATTACKS)), default=["pgd"],
                   help="attacks, comma-separated: pgd (random start, step eps/4), ifgsm (step eps/steps), fgsm "
                        "(default pgd)")
    e.add_argument("--norm", type=_csv(str, NORMS), default=["l2"], help="threat models, comma-separated: l2, linf "
                                                                         "(default l2)")
    e.add_argument("--eps-grid", type=_csv(float), help="eps values, comma-separated: linf from 0 to 1, l2 from 0 to "
                                                        "sqrt(C*H*W) (default: 0, 0.25, ..., 3 times the run's training "
                                                        "eps; 1/255 units for linf if it trained l2)")
    e.add_argument("--steps", type=int, help="attack steps, 1 to 1000 (default: PGD 20, I-FGSM 10, FGSM 1: the "
                                             "paper's protocol)")
    e.add_argument("--max-samples", type=int, help="evaluate at most N images (a seeded draw, for a quick look)")
    e.add_argument("--batch-size", type=int, default=128, help="images per attack batch (default 128)")
    e.add_argument("--raw", action="store_true", help="each eps's own attack result instead of the worst case over "
                                                      "the grid up to that eps (may then not be monotone)")
    e.add_argument("--protocol", action="store_true",
                   help="also run the paper's protocol at the training eps (PGD-20 and I-FGSM, l2 and linf) and "
                        "write it to RUN_DIR/protocol.csv")
    from dpaat_core.evaluate.corruptions import NAMES, parse_names, parse_severities
    e.add_argument("--corruptions", type=_checked(parse_names), metavar="all|NAME,...",
                   help="evaluate natural corruptions instead of attacks (MedMNIST-C's dermoscopy set, written to "
                        "RUN_DIR/corruptions.csv; robustness.csv is left as it is): 'all' or names from "
                        + ", ".join(NAMES))
    e.add_argument("--severities", type=_checked(parse_severities), metavar="1,2,...",
                   help="with --corruptions: severities from 1 to 5, comma-separated (default all five)")
    e.add_argument("--reference", metavar="RUN_DIR", help="with --corruptions: the run the corruption error (mCE) is "
                                                          "relative to, e.g. an ERM run (its corruptions.csv must hold "
                                                          "the same cells)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random starts and of the corruptions (default 0)")
    e.add_argument("--amp", action="store_true",
                   help="run the model under bf16 autocast in the attacks and for the logits (fast on GPUs; "
                        "accuracies match float32 to within a sample or two, see README)")
    e.set_defaults(run=_evaluate)


def _save_or_keep(save, table: pd.DataFrame, run_dir, what: str):
    """``save()``; if the store cannot be written (read-only, full disk), the computed table is printed and kept in
    a file of the temp folder, and the command ends with one line that says so (exit 2)."""
    try:
        return save()
    except OSError as exc:
        import tempfile
        kept = Path(tempfile.gettempdir()) / f"{Path(run_dir).name}-{what}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        try:
            kept.write_text(table.to_csv(index=False))
            where = f"kept in {kept}"
        except OSError:
            where = "printed below"
        print(table.to_csv(index=False), file=sys.stdout)
        raise RunError(f"could not write {what} into {run_dir} ({exc.strerror or exc}); the results are {where}") \
            from None


def _evaluate(args: argparse.Namespace) -> int:
    from dpaat_core.store import loading, runs
    from dpaat_core.train.loop import resolve_device

    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise ConfigError(f"--steps must be from 1 to {MAX_STEPS}, got {args.steps}")
    if args.eps_grid is not None and not all(math.isfinite(e) and e >= 0 for e in args.eps_grid):
        raise ConfigError(f"--eps-grid values must be >= 0 and finite, got {args.eps_grid}")
    if args.batch_size < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise ConfigError("--batch-size and --max-samples must be >= 1")
    if (args.reference or args.severities) and not args.corruptions:   # else an attack curve would run instead
        raise ConfigError(f"{'--reference' if args.reference else '--severities'} applies to --corruptions only")
    args.severities = args.severities or [1, 2, 3, 4, 5]
    if args.corruptions:
        clash = [f for f, on in (("--protocol", args.protocol), ("--raw", args.raw), ("--eps-grid", args.eps_grid),
                                 ("--steps", args.steps), ("--max-samples", args.max_samples)) if on]
        if clash:   # a grid is always on the whole split, so that its cells stay comparable
            raise ConfigError(f"{', '.join(clash)} do(es) not apply to --corruptions (an attack's settings; the "
                              "corruption grid always covers the whole split)")
    runs.check_not_training(args.run_dir, "evaluate")
    device = resolve_device(args.device)
    record = runs.read_record(args.run_dir)
    model = loading.load_model(args.run_dir, device=device)
    dataset = loading.load_run_data(args.run_dir, args.split, args.data, args.max_samples, progress=True)
    shape = (dataset.in_channels, dataset.image_size, dataset.image_size)
    for norm in args.norm:
        if args.eps_grid is not None and max(args.eps_grid) > max_eps(norm, shape):
            raise ConfigError(f"--eps-grid: {norm} eps above {max_eps(norm, shape):.4g} means nothing for "
                              f"{'x'.join(map(str, shape))} images in [0, 1] (got {max(args.eps_grid):g})")
    if args.corruptions:
        return _corruptions(args, model, dataset, record, device)
    frames = []
    for norm in args.norm:
        grid = args.eps_grid or default_grid(record, norm)
        for attack in args.attack:
            frame = robustness_curve(model, dataset, grid, attack, norm, args.steps, monotone=not args.raw,
                                     batch_size=args.batch_size, device=device, seed=args.seed, progress=True,
                                     amp=args.amp)
            frames.append(frame.assign(split=args.split, data=args.data or record.spec))
    curves = pd.concat(frames, ignore_index=True)
    path = _save_or_keep(lambda: runs.save_robustness(args.run_dir, curves), curves, args.run_dir, "robustness")
    print(f"accuracy on {len(dataset)} {args.split} images of {args.data or record.spec} "
          f"({'each eps on its own' if args.raw else 'worst case over the grid up to eps'})")
    for norm, part in curves.groupby("norm", sort=False):
        table = part.pivot_table(index=["eps", "eps_rms"], columns="attack", values=["accuracy", "balanced_accuracy"])
        print(f"\n{norm}  (eps_rms: per-pixel RMS change at {dataset.image_size}x{dataset.image_size})")
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {path}", file=sys.stderr)
    if args.protocol:
        eps = {norm: reference_eps(record, norm) for norm in ("l2", "linf")}
        from dpaat_core.evaluate.audit import protocol_rows, save_protocol  # merged: other splits' and data's rows (an audit's) kept
        where = dict(split=args.split, data=args.data or record.spec)
        rows = [protocol_rows(preset, ev, **where) for preset, ev in
                protocol_evaluations(model, dataset, eps, batch_size=args.batch_size, device=device, seed=args.seed,
                                     progress=True, amp=args.amp)]
        table = pd.DataFrame([row for row, _ in rows])
        per_class = pd.concat([classes for _, classes in rows], ignore_index=True)
        _save_or_keep(lambda: save_protocol(args.run_dir, table, per_class), table, args.run_dir, "protocol")
        print("\nthe paper's protocol at the training eps")
        print(table[["preset", "eps", "accuracy", "robust_accuracy", "balanced_accuracy", "robust_balanced_accuracy",
                     "mean_average_precision", "auc"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _corruptions(args: argparse.Namespace, model, dataset, record, device) -> int:
    from dpaat_core.store import runs
    from dpaat_core.evaluate.corruption_eval import CLEAN, corruption_error, corruption_grid

    data = args.data or record.spec
    reference = None
    if args.reference:      # read before the work: a bad reference fails in a second, not after the grid
        if not (Path(args.reference) / "config.json").is_file():
            raise RunError(f"--reference {args.reference}: not a run folder (no config.json there)")
        reference = runs.read_corruptions(args.reference, args.split, data)
        if not len(reference):
            raise RunError(f"--reference {args.reference}: its corruptions.csv has no rows for {args.split} of {data} "
                           "(run evaluate --corruptions on it first)")
    grid = corruption_grid(model, dataset, args.corruptions, args.severities, batch_size=args.batch_size,
                           device=device, seed=args.seed, progress=True, amp=args.amp)
    grid = grid.assign(split=args.split, data=data, seed=args.seed)
    path = _save_or_keep(lambda: runs.save_corruptions(args.run_dir, grid), grid, args.run_dir, "corruptions")
    clean = grid[grid.corruption == CLEAN].accuracy.iloc[0]
    print(f"accuracy on {len(dataset)} {args.split} images of {data} under corruption (clean {clean:.4g})")
    table = grid[grid.corruption != CLEAN].pivot_table(index="corruption", columns="severity", values="accuracy",
                                                         sort=False)
    table["mean"] = table.mean(axis=1)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    grids = {"this run": grid} if reference is None else {"reference": reference, "this run": grid}
    summary = corruption_error(grids, "reference" if reference is not None else None).set_index("run")
    line = f"\nmean corrupted accuracy {summary.loc['this run', 'mean_corrupted']:.4g}"
    if reference is not None:
        row = summary.loc["this run"]
        severities = set(grid.severity[grid.corruption != CLEAN])
        cells = reference[(reference.corruption != CLEAN) & reference.severity.isin(severities)]
        perfect = sorted(c for c, acc in cells.groupby("corruption").accuracy.min().items() if acc >= 1)
        mce = (f"mCE {row['mce']:.1f}" if math.isfinite(row["mce"]) else
               f"mCE undefined (the reference makes no error under {', '.join(perfect) or 'a corruption'}: an error "
               "ratio needs one)")
        relative = (f"relative mCE {row['relative_mce']:.1f}" if math.isfinite(row["relative_mce"]) else
                    "relative mCE undefined (no corruption lowers the reference's accuracy)")
        line += (f"; {mce} and {relative} against {args.reference} (100 = as the reference, "
                 f"over {row['cells']} cells)")
    print(line)
    print(f"wrote {path}", file=sys.stderr)
    return 0
