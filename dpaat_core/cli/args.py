"""The arguments every command on a run shares: the run folder, the data it is measured on, the split and the
device. Choices come from where they are declared (``data.SPLITS``, ``config.DEVICES``), never copied."""
from __future__ import annotations

import argparse

from dpaat_core.config import DEVICES
from dpaat_core.data import SPLITS


def add_run_args(parser: argparse.ArgumentParser, *, many: bool = False, default_device: str | None = "auto",
                 data_help: str = "data spec (default: the run's own)", split_help: str = "split (default test)") -> None:
    """RUN_DIR (one, or ``many`` for several), ``--data``, ``--split`` (default test) and ``--device``."""
    if many:
        parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders of the store")
    else:
        parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of the store, e.g. checkpoints/<run_id>")
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--split", default="test", choices=SPLITS, help=split_help)
    add_device_arg(parser, default_device)


def add_device_arg(parser, default: str | None = "auto", help: str = "auto: CUDA if available") -> None:
    parser.add_argument("--device", default=default, choices=DEVICES, help=help)
