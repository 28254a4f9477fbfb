"""``python -m dpaat_core import``: a classifier trained elsewhere as a run of the store (origin ``imported``)."""
from __future__ import annotations

import argparse

from dpaat_core.cli.evaluate import _csv


def add_import_parser(sub) -> None:
    i = sub.add_parser("import", help="bring a torchvision or timm classifier's weights into the store, to audit it",
                       description="Make a run folder (origin 'imported') from a weights file, so that evaluate, "
                                   "attribute, --corruptions and the dashboard work on it. The run folder is printed "
                                   "as the last line.")
    i.add_argument("--arch", required=True, help="a torchvision classification model's name (resnet50, "
                                                 "efficientnet_b0, vit_b_16, ...) or timm:<name>")
    i.add_argument("--weights", required=True, help=".safetensors, or a PyTorch checkpoint (read with "
                                                    "weights_only=True: a state dict, or one under state_dict/model)")
    i.add_argument("--image-size", type=int, required=True, help="the square input size the model was trained at")
    who = i.add_mutually_exclusive_group(required=True)
    who.add_argument("--classes", help="class names in the order of the model's outputs, comma-separated")
    who.add_argument("--data", help="a data spec whose classes the model predicts (and the run's data)")
    i.add_argument("--mean", type=_csv(float), help="per-channel mean the model was trained with (default ImageNet's)")
    i.add_argument("--std", type=_csv(float), help="per-channel std (default ImageNet's)")
    i.add_argument("--channels", type=int, default=3, choices=(1, 3), help="input channels (default 3)")
    i.add_argument("--gradcam-layer", help="the module Grad-CAM uses (default: the last 4-D feature map before "
                                           "global pooling)")
    i.add_argument("--store", default="checkpoints", help="run store (default checkpoints)")
    i.add_argument("--name", help="run id (default imported-<arch>-<first 8 hex of the file's SHA-256>)")
    i.set_defaults(run=_import)


def _import(args: argparse.Namespace) -> int:
    from dpaat_core.store.importing import import_model
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    if classes is None:
        from dpaat_core.data import load_dataset
        classes = list(load_dataset(args.data, "test", args.image_size).classes)
    run_dir = import_model(args.arch, args.weights, args.image_size, classes, args.store, args.name, args.mean,
                           args.std, args.channels, args.gradcam_layer, args.data)
    print(f"imported {args.arch} ({len(classes)} classes: {', '.join(classes)})")
    print(run_dir)
    return 0
