"""Tables and figures of the reproduction study, from its results and the demo runs.

    python bench/study.py collect      # study_runs/*/study.json -> bench/results/study.csv
    python bench/report.py             # -> bench/results/tables.md, bench/results/figures/*.png,
                                       #    checkpoints/reproduction.csv (the Runs page's table)

Figures are drawn by the dashboard's own chart code (dashboard/charts.py) and written as PNG with
kaleido, which drives the local Chromium (set BROWSER_PATH if it is not found).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dashboard import charts  # noqa: E402
from dpaat_core import reproduction as rep  # noqa: E402
from dpaat_core import runs  # noqa: E402

MAIN_METHODS = ("erm", "pgd_at", "trades", "dpaat", "dpaat_nosync", "dpaat_fixed")
BASELINES = ("pgd_at", "trades")


def md(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 3 decimals)."""
    if not len(frame):
        return "(no runs yet)"
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def ordered(frame: pd.DataFrame, order) -> pd.DataFrame:
    rank = {v: i for i, v in enumerate(order)}
    return frame.sort_values("variant", key=lambda s: s.map(lambda v: rank.get(v, len(rank))))


def main_table(results: pd.DataFrame, study: str) -> tuple[str, pd.DataFrame]:
    part = results[results["study"] == study]
    summary = ordered(rep.summarize(part), MAIN_METHODS)
    return md(rep.format_table(summary).drop(columns=["study"])), summary


def differences(results: pd.DataFrame, study: str) -> str:
    rows = []
    for base in BASELINES:
        for m, label in rep.METRICS:
            d = rep.paired_difference(results, "dpaat", base, m, study)
            if d["n"]:
                rows.append({"DPAAT minus": base, "metric": label, "seeds": d["n"],
                             "mean (points)": f"{d['mean']:+.2f}", "std": f"{d['std']:.2f}",
                             "95% CI (paired t)": f"[{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"})
    return md(pd.DataFrame(rows))


def ablation_table(results: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """28 px: main28's DPAAT, its component ablations and PGD-AT beside ablate28's variants, mean ± std over
    seeds, with each variant's PGD-20 (l2 0.3 and linf 0.3/sqrt(d), whatever it trained in) and balanced
    accuracy minus DPAAT's, paired by seed. 'PGD-20' and 'APGD' are in each run's own training norm."""
    ref = results[(results["study"] == "main28") & results["variant"].isin(["dpaat", "pgd_at", "dpaat_nosync",
                                                                               "dpaat_fixed"])]
    both = pd.concat([ref, results[results["study"] == "ablate28"]]).assign(study="ablate28")
    if not len(both):
        return md(both), pd.DataFrame()
    metrics = [(m, label) for m, label in rep.METRICS if m != "ifgsm"]
    metrics += [(c, label) for c, label in (("pgd20_l2", "PGD-20 l2 0.3"), ("pgd20_linf", "PGD-20 linf 1.6/255"))
                if c in both]
    summary = rep.summarize(both, metrics=[m for m, _ in metrics])
    table = rep.format_table(summary, metrics=metrics, paper=False).drop(columns=["study"])
    for m, label in (("pgd20_l2", "PGD-20 l2"), ("pgd20_linf", "PGD-20 linf"), ("balanced_accuracy", "balanced")):
        diffs = [rep.paired_difference(both, v, "dpaat", m, "ablate28") for v in summary["variant"]]
        table[f"{label} minus dpaat (95% CI)"] = [
            "" if v == "dpaat" or d["n"] < 2 else f"{d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]"
            for v, d in zip(summary["variant"], diffs)]
    config = both.groupby("variant", sort=False)[["norm", "threshold", "gamma"]].first()
    table.insert(1, "training", [f"{config.loc[v, 'norm']}, {config.loc[v, 'threshold']}, gamma {config.loc[v, 'gamma']:g}"
                                 for v in summary["variant"]])
    return md(table), summary


def attribution_table(store: Path) -> str:
    rows = []
    for method in MAIN_METHODS:
        summary = runs.read_attribution(store / f"demo-{method}-resnet8-ham10000")
        if not len(summary):
            continue
        t = summary.pivot_table(index="method", columns="metric", values="mean")
        for attr, r in t.iterrows():
            rows.append({"training": method, "attribution": attr, "spearman": r["spearman"], "top-10% IoU": r["topk_iou"],
                         "SSIM": r["ssim"], "energy in lesion (clean)": r["energy_clean"],
                         "energy in lesion (adv)": r["energy_adv"], "energy, another image's mask":
                         r["energy_other_mask"], "pointing (clean)": r["pointing_clean"],
                         "pointing (adv)": r["pointing_adv"], "mask fraction": r["mask_fraction"]})
    frame = pd.DataFrame(rows)
    return md(frame.round(3)) if len(frame) else "(no attribution.csv in the demo runs yet)"


def demo_curves(store: Path) -> pd.DataFrame:
    frames = []
    for method in MAIN_METHODS:
        run_dir = store / f"demo-{method}-resnet8-ham10000"
        if (run_dir / "robustness.csv").is_file():
            frames.append(runs.read_robustness(run_dir).assign(run=method))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_png(fig, path: Path, width=1000, height=480) -> None:
    os.environ.setdefault("BROWSER_PATH", shutil.which("chromium") or "/usr/bin/chromium")
    fig.write_image(str(path), width=width, height=height, scale=1.5)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--store", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    results = rep.read_results(args.results / "study.csv")
    figures = args.results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    out = ["# Study tables (generated by bench/report.py)\n"]
    summaries = {}
    for study, title in (("main64", "HAM10000 sample, 64 px"), ("main28", "HAM10000 at 28 px (ham10000_28.npz)")):
        table, summaries[study] = main_table(results, study)
        out += [f"## {study}: {title}\n", table, "", f"### {study}: DPAAT minus baseline, paired by seed\n",
                differences(results, study), ""]
    table, summaries["ablate28"] = ablation_table(results)
    out += ["## ablate28: ablations at 28 px beside main28's DPAAT and PGD-AT (same seeds)\n", table, ""]
    out += ["## Attribution on the demo runs (test split, clean vs PGD-10 l2 eps 0.3)\n", attribution_table(args.store), ""]
    (args.results / "tables.md").write_text("\n".join(out))
    print(f"wrote {args.results / 'tables.md'}")
    runs.atomic_write_text(args.store / rep.REPRODUCTION_FILE, results.to_csv(index=False))
    if args.no_figures:
        return 0
    for study in ("main64", "main28"):
        if len(summaries[study]):
            write_png(charts.study_chart(summaries[study], rep.METRICS, title=f"{study}: test split, mean ± std over seeds"),
                      figures / f"{study}.png")
    abl = summaries["ablate28"]
    if len(abl):
        metrics = [("clean_accuracy", "clean"), ("balanced_accuracy", "balanced"), ("pgd20", "PGD-20 (training norm)"),
                   ("apgd", "APGD worst case"), ("pgd20_l2", "PGD-20 l2 0.3"), ("pgd20_linf", "PGD-20 linf 1.6/255")]
        write_png(charts.study_chart(abl, metrics, title="Ablations at 28 px: mean ± std over seeds"),
                  figures / "ablate28.png", width=1200)
    dpaat = args.store / "demo-dpaat-resnet8-ham10000"
    if dpaat.is_dir():   # DPAAT's own dynamics: the fragile share per class and the eps memory over epochs
        config = runs.read_config(dpaat)
        classes = config["dataset"]["classes"]
        write_png(charts.fragile_fraction_chart(runs.read_metrics(dpaat), classes), figures / "demo_dpaat_fragile.png")
        dyn = {e: charts.dynamics_frame(runs.load_dynamics(dpaat, e), classes) for e in runs.dynamics_epochs(dpaat)}
        write_png(charts.eps_distribution_chart(dyn, float(config["attack"]["eps"])), figures / "demo_dpaat_eps.png")
    curves = demo_curves(args.store)
    if len(curves):
        pgd = curves[curves["attack"] == "pgd"]
        write_png(charts.robustness_chart(pgd), figures / "demo_robustness_pgd20.png", width=1200)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
