"""The third round's tables: every method at the same 40 epochs (``equal28``), the class-aware variants, per-class
robust accuracy with bootstrap intervals over images and seeds on test, validation and both pooled.

    python bench/study.py collect            # -> bench/results/study.csv, per_image.csv.gz, memory_by_class.csv
    python bench/equal_report.py             # -> bench/results/equal28.md

DPAAT's reference: ``equal28-dpaat`` where it has run, else ``long28-dpaat`` (the same 40 epochs: with patience 10
it never stopped early, so its training and its best-on-validation checkpoint are those of patience 40; it lacks
the per-image outcomes, so the per-class intervals use equal28's runs only).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from dpaat_core.evaluate import reproduction as rep

ORDER = ("pgd_at", "dpaat", "dpaat_cthr", "dpaat_cnorm", "dpaat_fixed", "trades")
METRICS = (("clean_accuracy", "clean"), ("balanced_accuracy", "balanced"), ("auc", "AUC"), ("pgd20", "PGD-20"),
           ("apgd", "APGD (worst case)"), ("pgd20_balanced", "PGD-20 balanced"),
           ("val_pgd20_balanced", "val PGD-20 balanced"))
CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


md = rep.markdown_table


def equal_results(results: pd.DataFrame) -> pd.DataFrame:
    """equal28's rows, with long28's DPAAT for the seeds equal28 has not run DPAAT on (same 40 epochs)."""
    eq = results[results["study"] == "equal28"]
    have = set(eq.loc[eq["variant"] == "dpaat", "seed"])
    ref = results[(results["study"] == "long28") & (results["variant"] == "dpaat") & ~results["seed"].isin(have)]
    both = pd.concat([eq, ref.assign(study="equal28", reference="long28")], ignore_index=True)
    rank = {v: i for i, v in enumerate(ORDER)}
    return both.sort_values(["variant", "seed"], key=lambda s: s.map(lambda v: rank.get(v, 99)) if s.name == "variant"
                            else s).reset_index(drop=True)


def summary_table(eq: pd.DataFrame) -> str:
    metrics = [(m, label) for m, label in METRICS if m in eq]
    summary = rep.summarize(eq, metrics=[m for m, _ in metrics])
    table = rep.format_table(summary, metrics=metrics, paper=False).drop(columns=["study"])
    epochs = eq.groupby("variant", sort=False).agg(best=("best_epoch", lambda s: f"{int(s.min())}–{int(s.max())}"),
                                                   ran=("epochs_run", lambda s: f"{int(s.min())}–{int(s.max())}"))
    table.insert(2, "epochs run", [epochs.loc[v, "ran"] for v in table["variant"]])
    table.insert(3, "best epoch", [epochs.loc[v, "best"] for v in table["variant"]])
    return md(table.replace("nan", "–"))


def differences(eq: pd.DataFrame, base: str = "pgd_at") -> str:
    rows = []
    for variant in [v for v in ORDER if v != base and v in set(eq["variant"])]:
        row = {"minus " + base: variant}
        for m, label in METRICS:
            if m not in eq:
                continue
            d = rep.paired_difference(eq, variant, base, m, "equal28")
            row[label] = "" if d["n"] < 2 or d["mean"] != d["mean"] else f"{d['mean']:+.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}] (n={d['n']})"
        rows.append(row)
    return md(pd.DataFrame(rows))


def per_class(per_image: pd.DataFrame, eq: pd.DataFrame, base: str = "pgd_at", n_boot: int = 2000) -> list[str]:
    """Robust accuracy per class minus ``base``'s, paired by seed and image, with bootstrap CIs, per split."""
    out = []
    runs = eq[eq["run"].isin(set(per_image["run"]))]
    base_runs = runs[runs["variant"] == base].set_index("seed")["run"]
    for variant in [v for v in ORDER if v != base and v in set(runs["variant"])]:
        mine = runs[runs["variant"] == variant].set_index("seed")["run"]
        seeds = sorted(set(mine.index) & set(base_runs.index))
        if not seeds:
            continue
        cols = {}
        for split, part in (("test", per_image[per_image["split"] == "test"]),
                            ("val", per_image[per_image["split"] == "val"]), ("test + val", per_image)):
            boot = rep.class_bootstrap(part, mine.loc[seeds], base_runs.loc[seeds], classes=CLASSES, n_boot=n_boot)
            cols[split] = boot
        table = cols["test"][["class", "n"]].rename(columns={"n": "n test"})
        table.insert(2, "n val", cols["val"]["n"].to_numpy())
        for split, boot in cols.items():
            table[split] = [f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in
                            zip(boot["mean"], boot["ci_low"], boot["ci_high"])]
        out += [f"#### {variant} minus {base}: PGD-20 accuracy per class, points (seeds {', '.join(map(str, seeds))}; "
                "95% bootstrap CI over seeds and images)\n", md(table), ""]
    return out


def robust_per_class(per_image: pd.DataFrame, eq: pd.DataFrame, n_boot: int = 2000) -> str:
    """Each variant's test PGD-20 accuracy per class, mean over seeds, with its bootstrap CI."""
    rows = {}
    test = per_image[per_image["split"] == "test"]
    for variant in [v for v in ORDER if v in set(eq["variant"])]:
        mine = [r for r in eq.loc[eq["variant"] == variant, "run"] if r in set(test["run"])]
        if mine:
            boot = rep.class_bootstrap(test, mine, classes=CLASSES, n_boot=n_boot)
            rows[f"{variant} (n={len(mine)})"] = [f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in
                                                  zip(boot["mean"], boot["ci_low"], boot["ci_high"])]
            names = list(boot["class"])
    if not rows:
        return "(no per-image outcomes yet)"
    return md(pd.DataFrame({"class": names, **rows}))


def memory_table(memory: pd.DataFrame, eq: pd.DataFrame, epochs=(10, 20, 30, 40)) -> str:
    """Each class's mean eps and share at the floor / at the cap at a few epochs, mean over seeds, per variant."""
    if not len(memory):
        return "(no memory_by_class.csv yet)"
    variant = dict(zip(eq["run"], eq["variant"]))
    m = memory.assign(variant=memory["run"].map(variant)).dropna(subset=["variant"])
    m = m[m["epoch"].isin(epochs)]
    g = m.groupby(["variant", "class", "epoch"])[["eps_mean", "at_min", "at_max"]].mean().reset_index()
    g["cell"] = [f"{e:.3f} ({lo:.0%} / {hi:.0%})" for e, lo, hi in zip(g["eps_mean"], g["at_min"], g["at_max"])]
    table = g.pivot_table(index=["variant", "class"], columns="epoch", values="cell", aggfunc="first").reset_index()
    table.columns = [c if isinstance(c, str) else f"epoch {c}" for c in table.columns]
    return md(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap draws (default 2000)")
    args = p.parse_args(argv)
    results = pd.read_csv(args.results / "study.csv")
    eq = equal_results(results)
    per_image = pd.read_csv(args.results / "per_image.csv.gz") if (args.results / "per_image.csv.gz").is_file() \
        else pd.DataFrame(columns=["run", "split", "index", "label", "robust", "correct_clean"])
    memory = pd.read_csv(args.results / "memory_by_class.csv") if (args.results / "memory_by_class.csv").is_file() \
        else pd.DataFrame()
    ref = eq[eq.get("reference", pd.Series(dtype=object)).eq("long28")]["run"].tolist() if "reference" in eq else []
    out = ["# equal28: every method 40 epochs at 28 px (generated by bench/equal_report.py)\n",
           "DPAAT rows from long28 (same 40 epochs, no per-image outcomes): " + (", ".join(ref) or "none") + "\n",
           "## Mean ± std over seeds (test split; the last column on validation)\n", summary_table(eq), "",
           "## Minus PGD-AT, paired by seed (points, 95% t interval)\n", differences(eq), "",
           "## Minus DPAAT, paired by seed (points, 95% t interval)\n", differences(eq, "dpaat"), "",
           "## Test PGD-20 accuracy per class (%, 95% bootstrap CI over seeds and images)\n",
           robust_per_class(per_image, eq, args.boot), "",
           "## Per class against PGD-AT, on test, validation and both\n", *per_class(per_image, eq, n_boot=args.boot),
           "## Each class's eps memory: mean eps (share at the floor / at the cap), mean over seeds\n",
           memory_table(memory, eq), ""]
    (args.results / "equal28.md").write_text("\n".join(out))
    print(f"wrote {args.results / 'equal28.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
