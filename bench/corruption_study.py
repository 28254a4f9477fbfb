"""Natural-corruption robustness of the demo runs and of the 28 px study runs: does adversarial training change it?

    python bench/corruption_study.py run [--threads 1]   # the 15 x 5 grid of every run that has none yet
    python bench/corruption_study.py collect            # -> bench/results/corruptions*.{csv,md}, figures/*.png

``run`` evaluates each run's best weights on its own test split under MedMNIST-C's dermoscopy corruptions at
severities 1-5 (``dpaat_core.evaluate.corruption_eval``, seed 0) and merges the grid into the run's ``corruptions.csv``; a run
that has its full grid is skipped, so the command can be re-run after a kill. The runs are the six demo runs in
``checkpoints/`` (64 px, one seed) and the 28 px study runs of 40 epochs: ``long28-{dpaat,pgd_at}`` and
``long28x-{erm,trades}``, seeds 0-2 (``bench/study.py run long28`` / ``run long28x --variants erm trades``).
``collect`` writes the per-cell rows, the per-run summary (mean corrupted accuracy, mCE and relative mCE against
ERM of the same seed) and each method minus ERM per corruption, paired by seed with a 95% t interval.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.store import runs
from dpaat_core.__main__ import main as cli
from dpaat_core.evaluate import reproduction as rep
from dpaat_core.evaluate.corruption_eval import CLEAN, corruption_error
from dpaat_core.evaluate.corruptions import CORRUPTIONS, NAMES, SEVERITIES

from report import MAIN_METHODS, md  # bench/report.py's method order and Markdown tables

STUDY = {"dpaat": "long28-dpaat", "pgd_at": "long28-pgd_at", "erm": "long28x-erm", "trades": "long28x-trades"}
METHOD_ORDER = tuple(m for m in MAIN_METHODS if m in STUDY)
SEEDS = (0, 1, 2)


def run_dirs(store: Path, checkpoints: Path) -> list[tuple[str, str, int, Path]]:
    """(group, method, seed, run folder) of every run of the finding that has finished training."""
    out = [("demo64", p.name.split("-")[1], 0, p) for p in sorted(checkpoints.glob("demo-*-resnet8-ham10000"))
           if p.is_dir()]          # the six methods' demo runs (not the imported MobileNet and its hardened run)
    out += [("long28", m, s, store / f"{prefix}-s{s}") for m, prefix in STUDY.items() for s in SEEDS
            if (store / f"{prefix}-s{s}" / "status.json").is_file()
            and runs.read_status(store / f"{prefix}-s{s}")["state"] == "done"]
    return out


def has_grid(run_dir: Path, data: str) -> bool:
    return len(runs.read_corruptions(run_dir, "test", data)) >= 1 + len(NAMES) * len(SEVERITIES)


def evaluate(run_dir: Path) -> None:
    """The run's corruption grid on its test split, as ``evaluate --corruptions all`` writes it (skipped when saved)."""
    if has_grid(run_dir, runs.read_record(run_dir).spec):
        return
    t0 = time.time()
    if cli(["evaluate", str(run_dir), "--corruptions", "all", "--batch-size", "256", "--device", "cpu"]) != 0:
        raise SystemExit(f"evaluate --corruptions failed on {run_dir}")
    print(f"[corruptions] {run_dir.name}: {time.time() - t0:.0f} s", flush=True)


def cells(store: Path, checkpoints: Path) -> pd.DataFrame:
    frames = []
    for group, method, seed, path in run_dirs(store, checkpoints):
        grid = runs.read_corruptions(path, "test", runs.read_record(path).spec)
        if len(grid):
            frames.append(grid.assign(group=group, method=method, seed=seed, run=path.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def per_run(cells_: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """One row per run: clean, mean corrupted, per-family and per-corruption mean ``metric`` over the severities,
    and mCE / relative mCE against the ERM run of the same group and seed (demo runs: the demo ERM run)."""
    rows = []
    for (group, seed), part in cells_.groupby(["group", "seed"]):
        grids = {m: g for m, g in part.groupby("method")}
        errors = corruption_error(grids, "erm", metric).set_index("run") if "erm" in grids else None
        for method, g in grids.items():
            corrupted = g[g.corruption != CLEAN]
            row = {"group": group, "method": method, "seed": seed, "run": g["run"].iloc[0],
                   "clean": float(g.loc[g.corruption == CLEAN, metric].iloc[0]),
                   "mean_corrupted": float(corrupted[metric].mean()),
                   "mce": errors.loc[method, "mce"] if errors is not None else float("nan"),
                   "relative_mce": errors.loc[method, "relative_mce"] if errors is not None else float("nan")}
            by = corrupted.groupby("corruption")[metric].mean()
            row |= {f"family:{f}": float(by[[n for n in by.index if CORRUPTIONS[n].family == f]].mean())
                    for f in dict.fromkeys(c.family for c in CORRUPTIONS.values())}
            row |= {f"c:{n}": float(by.get(n, float("nan"))) for n in NAMES}
            rows.append(row)
    frame = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(MAIN_METHODS)}
    return frame.sort_values(["group", "method", "seed"], key=lambda c: c.map(order) if c.name == "method" else c)


def differences(runs_: pd.DataFrame, group: str = "long28") -> pd.DataFrame:
    """Each method minus ERM, paired by seed, in accuracy points: mean, std, n and the 95% t interval, per metric."""
    frame = runs_[runs_.group == group].rename(columns={"group": "study", "method": "variant"})
    metrics = ["clean", "mean_corrupted", *[c for c in frame if c.startswith(("family:", "c:"))]]
    rows = []
    for method in [m for m in METHOD_ORDER if m != "erm" and m in set(frame.variant)]:
        for metric in metrics:
            d = rep.paired_difference(frame, method, "erm", metric, group)
            rows.append({"method": method, "metric": metric} | d)
    return pd.DataFrame(rows)


def difference_chart(diffs: pd.DataFrame, metric: str = "accuracy"):
    """Method minus ERM per corruption (accuracy points, mean over seeds), a cell starred where the paired 95%
    interval excludes 0."""
    import numpy as np
    import plotly.graph_objects as go
    part = diffs[diffs.metric.str.startswith("c:")]
    table = part.pivot(index="method", columns="metric", values="mean")
    low = part.pivot(index="method", columns="metric", values="ci_low")
    high = part.pivot(index="method", columns="metric", values="ci_high")
    order = [f"c:{n}" for n in NAMES if f"c:{n}" in table.columns]
    methods = [m for m in METHOD_ORDER if m in table.index]
    table, low, high = (t.loc[methods, order] for t in (table, low, high))
    text = [[f"{v:+.1f}{'*' if (lo > 0 or hi < 0) else ''}" for v, lo, hi in zip(r, lr, hr)]
            for r, lr, hr in zip(table.values, low.values, high.values)]
    limit = float(np.nanmax(np.abs(table.values))) or 1.0
    fig = go.Figure(go.Heatmap(z=table.values, x=[c[2:].replace("_", " ") for c in order], y=methods,
                               zmin=-limit, zmax=limit, colorscale="RdBu", text=text, texttemplate="%{text}",
                               colorbar={"title": "points"}))
    fig.update_layout(title=f"{metric.replace('_', ' ').capitalize()} under each corruption minus ERM's (28 px, "
                            "40 epochs, mean of 3 seeds; * paired 95% CI excludes 0)", template="plotly_white",
                      height=330)
    return fig


def _pm(values: pd.Series, scale: float = 100) -> str:
    v = values.dropna() * scale
    return f"{v.mean():.1f}" if len(v) < 2 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def tables_md(by_run: pd.DataFrame, diffs: pd.DataFrame, metric: str = "accuracy") -> str:
    """The finding's tables in Markdown: each method's summary (accuracy in %, mCE in % of ERM's) per group, and
    each method minus ERM per family and per corruption, paired by seed, with the 95% interval."""
    out = []
    for group, part in by_run.groupby("group", sort=False):
        rows = []
        for method, g in part.groupby("method", sort=False):
            rows.append({"method": method, "seeds": len(g), "clean": _pm(g["clean"]),
                         "mean corrupted": _pm(g["mean_corrupted"]), "mCE vs ERM": _pm(g["mce"], 1),
                         "relative mCE vs ERM": _pm(g["relative_mce"], 1),
                         **{f[7:]: _pm(g[f]) for f in g.columns if f.startswith("family:")}})
        out += [f"### {group}: {metric.replace('_', ' ')} (%)\n", md(pd.DataFrame(rows)), ""]
    if len(diffs):
        fmt = lambda r: (f"{r['mean']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"  # noqa: E731
                         + (" *" if r["ci_low"] > 0 or r["ci_high"] < 0 else ""))
        diffs = diffs.assign(cell=diffs.apply(fmt, axis=1))
        table = diffs.pivot(index="metric", columns="method", values="cell")
        order = ["clean", "mean_corrupted", *[m for m in table.index if m.startswith("family:")],
                 *[f"c:{n}" for n in NAMES if f"c:{n}" in table.index]]
        table = table.loc[order, [m for m in METHOD_ORDER if m in table.columns]]
        table.index = [m.split(":", 1)[-1].replace("_", " ") for m in table.index]
        out += [f"### long28: method minus ERM, {metric.replace('_', ' ')} points, paired by seed [95% t interval] "
                "(* excludes 0)\n",
                md(table.rename_axis("accuracy").reset_index()), ""]
    return "\n".join(out)


def collect(store: Path, checkpoints: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    all_cells = cells(store, checkpoints)
    all_cells.to_csv(out / "corruptions.csv", index=False)
    tables = []
    for metric, suffix in (("accuracy", ""), ("balanced_accuracy", "_balanced")):
        by_run = per_run(all_cells, metric)
        by_run.to_csv(out / f"corruptions_runs{suffix}.csv", index=False)
        diffs = differences(by_run)
        diffs.to_csv(out / f"corruptions_vs_erm{suffix}.csv", index=False)
        tables.append(tables_md(by_run, diffs, metric))
        if len(diffs):
            from report import write_png  # bench/report.py: plotly -> PNG (kaleido, Debian's Chromium)
            (out / "figures").mkdir(exist_ok=True)
            write_png(difference_chart(diffs, metric), out / "figures" / f"corruptions_vs_erm{suffix}.png",
                      width=1300, height=330)
    (out / "corruptions.md").write_text("\n".join(tables))
    print(f"{len(by_run)} runs -> {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "collect"))
    p.add_argument("--store", type=Path, default=ROOT / "study_runs")
    p.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "run":
        for _, _, _, path in run_dirs(args.store, args.checkpoints):
            evaluate(path)
    collect(args.store, args.checkpoints, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
