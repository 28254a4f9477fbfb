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
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from dashboard import charts
from dpaat_core.evaluate import reproduction as rep
from dpaat_core.store import runs
from dpaat_core.evaluate.eps_dynamics import run_memory

MAIN_METHODS = ("erm", "pgd_at", "trades", "dpaat", "dpaat_nosync", "dpaat_fixed")
BASELINES = ("pgd_at", "trades")


md = rep.markdown_table


def ordered(frame: pd.DataFrame, order) -> pd.DataFrame:
    rank = {v: i for i, v in enumerate(order)}
    return frame.sort_values("variant", key=lambda s: s.map(lambda v: rank.get(v, len(rank))))


def main_table(results: pd.DataFrame, study: str, metrics=rep.METRICS, order=MAIN_METHODS) -> tuple[str, pd.DataFrame]:
    part = results[results["study"] == study]
    summary = ordered(rep.summarize(part, metrics=[m for m, _ in metrics]), order)
    return md(rep.format_table(summary, metrics=metrics).drop(columns=["study"])), summary


def differences(results: pd.DataFrame, study: str, baselines=BASELINES, metrics=rep.METRICS) -> str:
    rows = []
    for base in baselines:
        for m, label in metrics:
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


MEMORY_TABLES = ("memory_by_epoch", "memory_transitions", "memory_per_class", "memory_spread")
LONG_METHODS = ("pgd_at", "trades", "dpaat", "dpaat_fixed", "dpaat-gamma0.3")
LONG_BASELINES = ("pgd_at", "dpaat_fixed", "trades")
#: the second round adds robust *balanced* accuracy: the eps memory treats the classes very differently
LONG_METRICS = (*rep.METRICS, ("pgd20_balanced", "PGD-20 balanced"))


def long_results(results: pd.DataFrame) -> pd.DataFrame:
    """The second round's rows as one study, ``long28``: long28's runs and long28x's extra variants."""
    return results[results["study"].isin(["long28", "long28x"])].assign(study="long28")


def epochs_table(long: pd.DataFrame) -> str:
    frame = long.sort_values(["variant", "seed"])[["run", "epochs_run", "best_epoch", "train_seconds"]].copy()
    frame["train minutes"] = (frame.pop("train_seconds") / 60).map(lambda v: f"{v:.1f}")
    frame.columns = ["run", "epochs run (of 40)", "best epoch", "train minutes"]
    return md(frame)


def memory_frames(store: Path, long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """What each DPAAT run's eps memory did (``eps_dynamics.run_memory``), as three flat tables: the spread per
    epoch, the transition rates per epoch, and per class at the best epoch with the class's test figures."""
    by_epoch, rates, classes, spreads = [], [], [], []
    for row in long[long["variant"].str.startswith("dpaat") & (long["gamma"] > 0)].itertuples():
        run_dir = store / row.run
        if not run_dir.is_dir():
            continue
        m = run_memory(run_dir)
        tag = dict(run=row.run, variant=row.variant, seed=row.seed)
        by_epoch.append(m["by_epoch"].assign(**tag))
        rates.append(m["transitions"].assign(**tag))
        spreads.append({**tag, "best_epoch": m["best_epoch"], **m["spread"]})
        pc = m["per_class"].assign(**tag)
        figures = long.set_index("run").loc[row.run]          # the run's test figures per class, from study.csv
        for fig in ("clean", "pgd20"):
            pc[fig] = [figures.get(f"{fig}:{c}", float("nan")) for c in pc["class"]]
        classes.append(pc)
    cat = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return {"memory_by_epoch": cat(by_epoch), "memory_transitions": cat(rates), "memory_per_class": cat(classes),
            "memory_spread": pd.DataFrame(spreads)}


def per_class_robustness(long: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Mean over seeds of each class's test PGD-20 accuracy per variant (percent), DPAAT minus PGD-AT beside."""
    cols = [f"pgd20:{c}" for c in classes if f"pgd20:{c}" in long]
    if not cols:
        return pd.DataFrame()
    table = (long.groupby("variant")[cols].mean() * 100).T
    table.index = [c.split(":", 1)[1] for c in table.index]
    if {"dpaat", "pgd_at"} <= set(table.columns):
        table["dpaat - pgd_at"] = table["dpaat"] - table["pgd_at"]
    return table.map(lambda v: f"{v:.1f}").reset_index(names="class")


def length_table(results: pd.DataFrame, long: pd.DataFrame) -> str:
    """DPAAT minus each baseline, paired by seed, at 5 epochs (main28) and at 40 (long28), on the same data."""
    both = pd.concat([results[results["study"] == "main28"], long])
    rows = []
    for base in ("pgd_at", "dpaat_fixed"):
        for m, label in (("pgd20", "PGD-20"), ("pgd20_balanced", "PGD-20 balanced"), ("apgd", "APGD"),
                         ("balanced_accuracy", "balanced"), ("mAP", "mAP")):
            row = {"DPAAT minus": base, "metric": label}
            for study, length in (("main28", "5 epochs"), ("long28", "40 epochs")):
                d = rep.paired_difference(both, "dpaat", base, m, study)
                row[length] = "" if not d["n"] else (f"{d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] "
                                                     f"(n={d['n']})" if d["n"] > 1 else f"{d['mean']:+.1f} (n=1)")
            rows.append(row)
    return md(pd.DataFrame(rows))


def memory_section(frames: dict[str, pd.DataFrame], long: pd.DataFrame) -> list[str]:
    out = []
    spread, pc, rates = frames["memory_spread"], frames["memory_per_class"], frames["memory_transitions"]
    if len(spread):
        cols = ["run", "best_epoch", "mean", "q05", "q25", "q50", "q75", "q95", "at_min", "at_max"]
        out += ["### Spread of the per-sample eps at the best epoch (eps0 0.3, bounds 0.075 and 0.6)\n",
                md(spread[cols].round(3)), ""]
    if len(rates):
        late = rates[rates["epoch"] >= 5].groupby("run")[["fragile_fraction", "stay_fragile", "become_fragile"]].mean()
        out += ["### Fragile → fragile against stable → fragile (mean over epochs 5 onwards)\n",
                md(late.round(3).reset_index()), ""]
    if len(pc):
        keep = ["n", "eps_mean", "at_min", "at_max", "fragile_fraction", "pgd20", "clean"]
        table = pc[pc["variant"] == "dpaat"].groupby("class", sort=False)[keep].mean().reset_index()
        table["n"] = table["n"].round().astype(int)
        for col in ("pgd20", "clean"):
            table[col] = (100 * table[col]).map(lambda v: f"{v:.1f}")
        table = table.rename(columns={"n": "training images", "pgd20": "test PGD-20 %", "clean": "test clean %"})
        out += ["### Per class at the best epoch (DPAAT, mean over seeds): training eps, fragile share, test accuracy\n",
                md(table.round(3)), ""]
    classes = list(dict.fromkeys(pc["class"])) if len(pc) else []
    robust = per_class_robustness(long, classes)
    if len(robust):
        out += ["### Test PGD-20 accuracy per class (%, mean over seeds)\n", md(robust), ""]
    return out


def write_png(fig, path: Path, width=1000, height=480) -> None:
    os.environ.setdefault("BROWSER_PATH", shutil.which("chromium") or "/usr/bin/chromium")
    fig.write_image(str(path), width=width, height=height, scale=1.5)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--store", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--runs", type=Path, default=ROOT / "study_runs",
                   help="the study's run folders, for what the eps memory did (default study_runs/); without them "
                        "the memory tables are read from bench/results/memory_*.csv")
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
    long = long_results(results)
    frames = {}
    if len(long):
        table, summaries["long28"] = main_table(long, "long28", LONG_METRICS, LONG_METHODS)
        frames = memory_frames(args.runs, long) if args.runs.is_dir() else {}
        for name, frame in frames.items():       # kept beside study.csv: the tables need no run folders then
            if len(frame):
                frame.to_csv(args.results / f"{name}.csv", index=False)
        frames = {name: (pd.read_csv(args.results / f"{name}.csv") if (args.results / f"{name}.csv").is_file()
                         else pd.DataFrame()) for name in MEMORY_TABLES}
        out += ["## long28: 28 px, 40 epochs, early stopping with patience 10 (second round)\n", table, "",
                "### long28: DPAAT minus baseline, paired by seed\n", differences(long, "long28", LONG_BASELINES, LONG_METRICS), "",
                "### long28: epochs each run reached\n", epochs_table(long), "",
                "### DPAAT minus baseline at 5 and at 40 epochs (28 px, paired by seed, 95% CI)\n",
                length_table(results, long), "", *memory_section(frames, long)]
        gap = (results["pgd20"] - results["apgd"]) * 100
        out += [f"APGD's worst case lies {gap.min():.1f}–{gap.max():.1f} points below PGD-20 over all "
                f"{len(results)} runs of study.csv.", ""]
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
    if len(long):
        write_png(charts.study_chart(summaries["long28"], LONG_METRICS,
                                     title="long28 (40 epochs): test split, mean ± std over seeds"), figures / "long28.png")
        if len(frames.get("memory_by_epoch", ())):
            write_png(charts.eps_spread_chart(frames["memory_by_epoch"], 0.075, 0.6,
                                              title="DPAAT's per-sample eps over 40 epochs (one colour per run)"),
                      figures / "long28_eps_spread.png")
        if len(frames.get("memory_transitions", ())):
            write_png(charts.transition_rate_chart(frames["memory_transitions"]), figures / "long28_transitions.png")
        if len(frames.get("memory_per_class", ())):
            pc = frames["memory_per_class"]
            write_png(charts.class_eps_chart(pc[pc["variant"] == "dpaat"]), figures / "long28_class_eps.png")
    abl = summaries["ablate28"]
    if len(abl):
        metrics = [("clean_accuracy", "clean"), ("balanced_accuracy", "balanced"), ("pgd20", "PGD-20 (training norm)"),
                   ("apgd", "APGD worst case"), ("pgd20_l2", "PGD-20 l2 0.3"), ("pgd20_linf", "PGD-20 linf 1.6/255")]
        write_png(charts.study_chart(abl, metrics, title="Ablations at 28 px: mean ± std over seeds"),
                  figures / "ablate28.png", width=1200)
    dpaat = args.store / "demo-dpaat-resnet8-ham10000"
    if dpaat.is_dir():   # DPAAT's own dynamics: the fragile share per class and the eps memory over epochs
        record = runs.read_record(dpaat)
        classes = record.classes
        write_png(charts.fragile_fraction_chart(runs.read_metrics(dpaat), classes), figures / "demo_dpaat_fragile.png")
        dyn = {e: charts.dynamics_frame(runs.load_dynamics(dpaat, e), classes) for e in runs.dynamics_epochs(dpaat)}
        write_png(charts.eps_distribution_chart(dyn, record.attack.eps), figures / "demo_dpaat_eps.png")
    curves = demo_curves(args.store)
    if len(curves):
        pgd = curves[curves["attack"] == "pgd"]
        write_png(charts.robustness_chart(pgd), figures / "demo_robustness_pgd20.png", width=1200)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
