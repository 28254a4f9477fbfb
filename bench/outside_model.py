"""A classifier trained the way a user trains one outside DPAAT Lab: plain PyTorch and torchvision, nothing of
dpaat_core. It is the model the README's "Your own classifier" walk-through imports, audits and hardens.

torchvision's MobileNetV3-Small (1.5 M parameters) on the HAM10000 sample (64 px, 7 classes), ImageNet
normalisation in the input pipeline, flips as augmentation, class-weighted cross-entropy, Adam with a cosine
schedule, the epoch of best validation balanced accuracy kept. It saves what such scripts save: a checkpoint dict
with the state dict under ``state_dict`` and the epoch, as ``torch.save`` writes it.

    python bench/outside_model.py --out study_runs/outside/mobilenet_v3_small_ham64.pt     # about 2 min on 2 cores
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000_sample.npz"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)       # ImageNet's, as most users keep them
CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def load(npz, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(npz[f"{split}_images"]).permute(0, 3, 1, 2).float().div(255)
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), \
        torch.from_numpy(npz[f"{split}_labels"].ravel()).long()


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(np.mean([(pred[y == k] == k).float().mean() for k in y.unique()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="study_runs/outside/mobilenet_v3_small_ham64.pt")
    parser.add_argument("--data", default=str(SAMPLE))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    npz = np.load(args.data)
    (x, y), (xv, yv) = load(npz, "train"), load(npz, "val")
    model = torchvision.models.mobilenet_v3_small(num_classes=len(CLASSES))
    weights = (len(y) / (len(CLASSES) * torch.bincount(y, minlength=len(CLASSES)).float()))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    best, best_state = -1.0, None
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            xb = torch.where((torch.rand(len(idx)) < 0.5).view(-1, 1, 1, 1), xb.flip(-2), xb)
            loss = F.cross_entropy(model(xb), y[idx], weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(b).argmax(1) for b in xv.split(256)])
        bal = balanced_accuracy(pred, yv)
        if bal > best:
            best, best_state = bal, {k: v.clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch:2d}  loss {loss.item():.3f}  val accuracy {(pred == yv).float().mean():.3f}  "
              f"balanced {bal:.3f}  ({time.time() - start:.0f} s)", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": args.epochs, "best_val_balanced_accuracy": best, "state_dict": best_state}, out)
    print(out)


if __name__ == "__main__":
    main()
