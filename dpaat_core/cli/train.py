"""``python -m dpaat_core train`` and ``runs``: flags to a validated :class:`RunConfig`, a tqdm
bar driven by the trainer's progress callback, and the run store as a table."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, fields
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from dpaat_core.cli.args import add_device_arg
from dpaat_core.config import AUGMENTATIONS, EARLY_STOP, IMBALANCE, METHODS, SCHEDULES, SECTIONS, ConfigError, RunConfig, method_config
from dpaat_core.models import MODEL_NAMES

#: settings a resume may change; every other train flag describes the run, and ``--resume`` takes it from config.json
RESUME_OPTIONS = ("device", "compile", "max_minutes")


def field_flags(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """The train flags that set the config field of their own name, by section (``--image-size`` sets
    ``data.image_size``), read off config's dataclasses: a new field needs its flag and nothing else here.
    ``--name`` is the run's name, not ``model.name``; ``--data``, ``--model`` and ``--method`` are handled apart."""
    dests, defaults = set(vars(args)) - {"name"}, RunConfig()
    return {section: tuple(f.name for f in fields(getattr(defaults, section)) if f.name in dests)
            for section in SECTIONS}


def run_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags that describe a run (refused beside ``--resume``)."""
    return ("config", "data", "model", "method", "name", *(
        name for names in field_flags(args).values() for name in names if name not in RESUME_OPTIONS))


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model with ERM, PGD-AT, TRADES or DPAAT (or resume a run)",
                       description="Train a run into the run store. The last line printed is the run folder.")
    add_run_arguments(t)
    where = t.add_argument_group("where")
    add_device_arg(where, None, help="auto: CUDA if available (default, also for --resume; else the config file's)")
    where.add_argument("--store", default="checkpoints", help="run store folder (default checkpoints)")
    where.add_argument("--name", help="run id (default: time, method, model and data)")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last completed epoch; "
                                                          "takes every setting from its config.json")
    where.add_argument("--quiet", action="store_true", help="no progress bar (epoch summaries still print)")
    t.set_defaults(run=_train)


def add_run_arguments(t) -> None:
    """The flags that describe a run (data, model, attack, method, optimisation): ``train``'s and ``sweep``'s."""
    run = t.add_argument_group("what to train")
    run.add_argument("--config", metavar="FILE",
                     help="a config in the run store's config.json format; a partial one fills the rest with defaults "
                          "(a method section with its method's preset), and flags given beside it override it")
    run.add_argument("--data", help="data spec: npz:<file>, medmnist:<flag>[@size], ham10000:<dir>, folder:<dir> or synthetic[:n=..] (with --init-from: the source run's data, at its image size)")
    run.add_argument("--model", help=f"architecture: {', '.join(MODEL_NAMES)} (resnet8 is the small CPU model)")
    run.add_argument("--method", help=f"training method: {', '.join(METHODS)}")
    run.add_argument("--epochs", type=int, help="maximum number of epochs (early stopping may end sooner)")
    run.add_argument("--batch-size", type=int, help="images per batch and process (default 32)")
    run.add_argument("--image-size", type=int, help="square input size in pixels (default 64)")
    run.add_argument("--max-samples", type=int, help="keep at most N images of each split (a seeded draw, for quick runs)")
    run.add_argument("--root", help="folder of medmnist: files (default $DPAAT_DATA_ROOT, else ./data)")
    run.add_argument("--init-from", metavar="RUN", help="start from this run's weights (imported or trained here): "
                                                        "same architecture and classes; --model defaults to its")
    run.add_argument("--gradcam-layer", metavar="LAYER",
                     help="the layer Grad-CAM explains, a dotted module path of the architecture (features.8 of "
                          "mobilenet_v3_small gives an 8x8 map at 128 px); default: its last convolutional stage")
    run.add_argument("--pretrained", action="store_const", const=True,
                     help="start from ImageNet weights in torchvision's local cache (fails if they are not there)")
    atk = t.add_argument_group("training attack (PGD with a random start)")
    atk.add_argument("--norm", help="threat model: l2 (default, the paper's) or linf")
    atk.add_argument("--eps", type=float, help="eps0, the starting radius of each sample's ball (default 0.3, l2 on [0,1] pixels)")
    atk.add_argument("--alpha-ratio", type=float, help="step size as a fraction of each sample's eps (default 0.5)")
    atk.add_argument("--steps", type=int, help="PGD steps K per batch (default 7)")
    mth = t.add_argument_group("DPAAT settings (paper/METHOD.md)")
    mth.add_argument("--gamma", type=float, help="eps memory rate: fragile eps*(1-gamma), stable eps*(1+gamma) "
                                                  "(default 0.1; adaptive methods only)")
    mth.add_argument("--threshold", help="fragile/stable threshold on the loss change: batch_mean (default), ema, median, "
                                         "quantile:<q>, or class_mean (each sample against its class's running mean; "
                                         "docs/CLASS_AWARE.md)")
    mth.add_argument("--sync", help="synchronisation loss: sym_kl (default), js, l1_logprob, kl")
    mth.add_argument("--beta-clean", type=float, help="weight of the clean cross-entropy (default: the method's)")
    mth.add_argument("--lam", type=float, help="weight of the synchronisation loss (default: the method's)")
    mth.add_argument("--memoryless", action="store_const", const=True,
                     help="no eps memory: split each batch with a probe attack at eps0 (two attacks per batch)")
    mth.add_argument("--class-renorm", action="store_const", const=True,
                     help="rescale the eps memory so that each class's mean eps stays at eps0 (dpaat_cnorm's rule; "
                          "docs/CLASS_AWARE.md)")
    mth.add_argument("--sigma", type=float, help="gaussian method: std of the training noise per pixel in [0, 1] "
                                                  "units (default 0.25); certify the run at the same sigma")
    opt = t.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, help="Adam learning rate (default 3e-4, the paper's)")
    opt.add_argument("--weight-decay", type=float, help="Adam weight decay (default 0)")
    opt.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule over the epochs: cosine to 0, or step (x0.1 at half and three quarters of the "
                     "epochs, MedMNIST v2's); default none")
    opt.add_argument("--imbalance", choices=IMBALANCE,
                     help="class imbalance: weighted cross-entropy (default), class-balanced sampling, or nothing")
    opt.add_argument("--early-stop", choices=EARLY_STOP,
                     help="validation metric that picks the best epoch and stops training: balanced accuracy (default), robust "
                     "accuracy at eps0, clean one-vs-rest ROC AUC (macro), or none (the last epoch)")
    opt.add_argument("--patience", type=int, help="stop after this many epochs without improvement (default 5)")
    opt.add_argument("--augment", choices=AUGMENTATIONS,
                     help="random changes of training images: flips (default), dermoscopy (flips, any rotation, "
                          "zoom 0.85-1.15, 5%% shift, brightness/contrast/saturation jitter: for training without "
                          "pretrained weights) or none")
    opt.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                     help="the same as --augment none")
    opt.add_argument("--seed", type=int, help="seed of weights, split, order, attacks and flips (default 0)")
    opt.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the training forward passes (default auto: on for CUDA, off on CPU); "
                          "drops the last incomplete batch so every step has the same shape; "
                          "may also be given with --resume")
    opt.add_argument("--max-minutes", type=float, metavar="M",
                     help="wall-time budget: end the run at the first epoch boundary past M minutes, as a finished "
                          "run (status says why); --resume continues it with a new budget (may be given with --resume)")


def add_runs_parser(sub) -> None:
    r = sub.add_parser("runs", help="list the runs in the store with their status and headline metrics")
    r.add_argument("--store", default="checkpoints", help="run store folder (default checkpoints)")
    choose = r.add_mutually_exclusive_group()
    choose.add_argument("--set-default", metavar="RUN_ID", help="the run every dashboard page opens on (a finished "
                                                                "run with weights; written to STORE/default.json)")
    choose.add_argument("--clear-default", action="store_true", help="open on the best finished run again")
    r.set_defaults(run=_runs)


#: what a run's config.json holds beside the sections: written by the store, ignored when read back
RECORD_KEYS = ("format", "dataset", "versions", "init", "run_id")
CONFIG_KEYS = (*SECTIONS, *RECORD_KEYS)


def read_config_file(path: str) -> RunConfig:
    """A :class:`RunConfig` from a JSON file in ``config.json`` format (partial: defaults fill the rest)."""
    import json
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"--config {path}: not JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a run config") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS)) if isinstance(data, dict) else []
    if unknown:
        raise ConfigError(f"--config {path}: unknown section(s) {', '.join(map(repr, unknown))}; a run config has "
                          f"{', '.join(SECTIONS)} (and the {', '.join(RECORD_KEYS)} a run's config.json adds)")
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None


def _source_data(run_dir) -> dict:
    """The data spec, image size, root and split seed of the run ``--init-from`` names; a source that is not a
    readable run folder is a ConfigError that names it (not "train needs --data")."""
    from dpaat_core.store import runs
    if not Path(run_dir).is_dir():
        what = "no such folder" if not Path(run_dir).exists() else "a file, not a run folder"
        raise ConfigError(f"--init-from {run_dir}: {what}; give the run folder whose weights training starts from")
    try:
        record = runs.read_record(run_dir)
    except runs.RunError as exc:
        raise ConfigError(f"--init-from {run_dir}: not a run to start from ({exc})") from None
    return {**(asdict(record.data) if record.data else {}), "seed": None if record.imported else record.seed}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A validated :class:`RunConfig` from ``train`` flags: ``--config FILE`` (or the defaults) with every flag
    given beside it on top."""
    source = _source_data(args.init_from) if args.init_from is not None and args.config is None else {}
    if args.data is None and source.get("spec"):   # a start from a run trains on its data, at its size and split
        args.data = source["spec"]
        for flag in ("image_size", "root", "seed"):   # (the split seed: its test images stay unseen in training)
            if getattr(args, flag) is None and source.get(flag) is not None:
                setattr(args, flag, source[flag])
    if args.config is None:
        missing = [f"--{n}" for n in ("data", "model", "method", "epochs") if getattr(args, n) is None
                   and not (n == "model" and args.init_from is not None)]
        if missing:
            raise ConfigError(f"train needs {', '.join(missing)} (or --config FILE, or --resume RUN_DIR)")
    cfg = read_config_file(args.config) if args.config is not None else RunConfig()
    given = lambda name: getattr(args, name) is not None  # noqa: E731
    changes = {section: {name: getattr(args, name) for name in names if given(name)}
               for section, names in field_flags(args).items()}
    if given("data"):
        changes["data"]["spec"] = args.data
    if given("model"):
        changes["model"]["name"] = args.model
    # (--init-from without --model: the source run's architecture, ``train.init_source``)
    flags = changes.pop("method")
    if given("method"):                      # a method named on the command line starts from its own preset
        changes["method"] = method_config(args.method, **flags)
    elif flags:                              # flags on top of the config file's method
        changes["method"] = flags
    return cfg.replace(**changes)


class _Bar:
    """The trainer's progress callback as a tqdm bar per epoch and a summary line per epoch."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.loss_read = quiet, None, 0.0

    def __call__(self, p) -> None:
        if p.phase == "epoch_end":
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            m = p.metrics
            tqdm.write(f"epoch {p.epoch}/{p.epochs}  loss {m['train_loss']:.4f}  val acc {m['val_accuracy']:.3f}  "
                       f"balanced {m['val_balanced_accuracy']:.3f}  robust {m['val_robust_accuracy']:.3f}  "
                       f"fragile {m['fragile_fraction']:.2f}  eps {m['eps_mean']:.3f}  {m['seconds']:.1f} s"
                       + ("  *best" if m["is_best"] else ""), file=sys.stderr)
            return
        if self.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=p.batches, desc=f"epoch {p.epoch}/{p.epochs}", unit="batch", file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)
        self.bar.update(p.batch - self.bar.n)
        if p.phase == "val":
            self.bar.set_postfix_str(f"loss {float(p.loss):.4f}  validating")
        elif time.monotonic() - self.loss_read >= 1.0:  # reading the loss waits for the device: once a second
            self.loss_read = time.monotonic()
            self.bar.set_postfix_str(f"loss {float(p.loss):.4f}", refresh=False)


def _train(args: argparse.Namespace) -> int:
    from dpaat_core.train import loop as train
    if args.resume:
        clash = [f"--{n.replace('_', '-')}" for n in run_flags(args) if getattr(args, n, None) is not None]
        if clash:
            raise ConfigError(f"--resume takes every setting from the run's config.json; drop {', '.join(clash)}")
    else:
        config = config_from_args(args)
    main_process = os.environ.get("RANK", "0") == "0"   # under torchrun only rank 0 prints
    progress = _Bar(args.quiet) if main_process else None
    stop = threading.Event()   # SIGTERM (the dashboard's stop button) ends the run between batches
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        if args.resume:
            run_dir = train.resume(args.resume, progress=progress, device=args.device or "auto", should_stop=stop.is_set,
                                   compile=args.compile, max_minutes=args.max_minutes)
        else:
            run_dir = train.train(config, store=args.store, run_id=args.name, progress=progress, should_stop=stop.is_set)
    except (train.Stopped, KeyboardInterrupt):
        # status.json already says "stopped"; the last completed epoch is kept.
        print("\nstopped; the last completed epoch is kept: continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    if main_process:
        print(Path(run_dir))
    return 0


def _runs(args: argparse.Namespace) -> int:
    from dpaat_core.store.runs import RunError, list_runs, runs_table
    if Path(args.store).exists() and not Path(args.store).is_dir():
        raise RunError(f"{args.store}: the run store must be a folder, and this is a file")
    from dpaat_core.evaluate import defaults
    if args.set_default:
        print(f"{args.set_default} is the default of {args.store} ({defaults.set_default(args.store, args.set_default)})")
        return 0
    if args.clear_default:
        cleared = defaults.clear_default(args.store)
        print(f"{args.store} opens on its best finished run" + ("" if cleared else " (it had no default)"))
        return 0
    found = list_runs(args.store)
    if not found:
        print(f"no runs in {args.store}")
        return 0
    table = runs_table(found).rename(columns=RUNS_HEADERS)
    for column in ("sweep", "problem", "weakest robust class"):   # nothing to say: blank, not NaN or None
        table[column] = table[column].astype(object).where(table[column].notna(), "")
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    first = defaults.default_run(found, args.store)
    named = defaults.read_default(args.store) == first
    print(f"\npages open on: {first or 'none (no finished run yet)'}"
          + (" (set with --set-default)" if first and named else " (the best finished run)" if first else ""))
    return 0


#: the validation columns of ``runs`` under headers no wider than their numbers need (bal: balanced, the mean of
#: the classes' accuracies; robust: under the training attack at eps0)
RUNS_HEADERS = {"val_accuracy": "val acc", "val_balanced_accuracy": "val bal acc",
                "val_robust_accuracy": "val robust acc", "val_robust_balanced_accuracy": "val robust bal acc",
                "val_auc": "val auc", "val_weakest_robust_class": "weakest robust class"}
