"""Before/after figure and table of the README's "Your own classifier" walk-through: the imported model against its
DPAAT-hardened run, from the tables ``audit`` wrote into each run (nothing is recomputed).

    python bench/byo_figure.py checkpoints/demo-imported-mobilenet_v3_small-ham10000 \
        checkpoints/demo-hardened-mobilenet_v3_small-ham10000 --out docs/byo_before_after.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from dpaat_core.report import RunTables

COLUMNS = ("clean", "balanced", "PGD-20 l2", "PGD-20 linf", "APGD l2", "Grad-CAM agreement", "saliency agreement",
           "saliency on lesion", "same map, other lesion", "saliency peak on lesion")


def figures(run_dir) -> dict:
    """The run's figures on its own test data, read as the report reads them (rows of that split, data and norm)."""
    run = RunTables(run_dir, "test", None)
    protocol, means = run.protocol.set_index("preset"), run.means
    return dict(zip(COLUMNS, (protocol.loc["pgd20_l2", "accuracy"], protocol.loc["pgd20_l2", "balanced_accuracy"],
                              protocol.loc["pgd20_l2", "robust_accuracy"], protocol.loc["pgd20_linf", "robust_accuracy"],
                              run.apgd.robust_accuracy.iloc[0], means.loc["spearman", "gradcam"],
                              means.loc["spearman", "saliency"], means.loc["energy_clean", "saliency"],
                              means.loc["energy_other_mask", "saliency"], means.loc["pointing_clean", "saliency"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--out", default="docs/byo_before_after.png")
    args = parser.parse_args()
    table = pd.DataFrame([figures(args.before), figures(args.after)], index=["imported", "hardened with DPAAT"])
    print("| | " + " | ".join(table.index) + " |\n| --- | " + " | ".join("---:" for _ in table.index) + " |")
    for column in table.columns:
        print(f"| {column} | " + " | ".join(f"{v:.3f}" for v in table[column]) + " |")
    fig, ax = plt.subplots(figsize=(11, 3.8), dpi=120)
    table.T.plot.bar(ax=ax, color=["#D55E00", "#0072B2"], width=0.75, rot=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test split, 666 images")
    ax.set_title("A MobileNetV3-Small trained outside DPAAT Lab, before and after DPAAT (HAM10000 sample, 64 px)")
    for bars in ax.containers:
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
