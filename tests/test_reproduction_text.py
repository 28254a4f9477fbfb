"""REPRODUCTION.md against its CSVs: every headline interval the text states is recomputed from
bench/results/ (study.csv, epochs.csv, corruptions_runs.csv) and must read exactly as written."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from dpaat_core.evaluate import reproduction as rep

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEXT = (ROOT / "REPRODUCTION.md").read_text()
FIRST_TWO_ROUNDS = ("main64", "main28", "ablate28", "long28", "long28x")


def num(x: float) -> str:
    """A signed figure as the prose writes it: one decimal, a true minus sign."""
    return f"{x:+.1f}".replace("-", "−")


def ci(d: dict) -> str:
    return f"(CI {num(d['ci_low'])} to {num(d['ci_high'])})"


@pytest.fixture(scope="module")
def results():
    return pd.read_csv(RESULTS / "study.csv")


@pytest.fixture(scope="module")
def long(results):
    """The second round as one study, as bench/report.py reads it."""
    return results[results["study"].isin(["long28", "long28x"])].assign(study="long28")


SEEDS = {"equal28": 5}   # every other study has 3


def diff(frame, a, b, metric, study="long28"):
    d = rep.paired_difference(frame, a, b, metric, study)
    assert d["n"] == SEEDS.get(study, 3), (a, b, metric, study)
    return d


def test_the_40_epoch_headline_against_pgd_at(long):
    pgd = diff(long, "dpaat", "pgd_at", "pgd20")
    claims = [
        f"**PGD-20: DPAAT {num(pgd['mean'])} points over PGD-AT** {ci(pgd)}",
        "I-FGSM gives {} {}".format(num(diff(long, "dpaat", "pgd_at", "ifgsm")["mean"]),
                                    ci(diff(long, "dpaat", "pgd_at", "ifgsm"))),
        "APGD worst case {} {}".format(num(diff(long, "dpaat", "pgd_at", "apgd")["mean"]),
                                       ci(diff(long, "dpaat", "pgd_at", "apgd"))),
        "higher than PGD-AT's:** {} {} and {} {}".format(
            num(diff(long, "dpaat", "pgd_at", "clean_accuracy")["mean"]), ci(diff(long, "dpaat", "pgd_at", "clean_accuracy")),
            num(diff(long, "dpaat", "pgd_at", "balanced_accuracy")["mean"]),
            ci(diff(long, "dpaat", "pgd_at", "balanced_accuracy"))),
    ]
    bal = diff(long, "dpaat", "pgd_at", "pgd20_balanced")
    means = long.groupby("variant")["pgd20_balanced"].agg(["mean", "std"]) * 100
    claims.append(f"lower on the test split: {num(bal['mean'])} points** {ci(bal)}, "
                  f"{means.loc['dpaat', 'mean']:.1f} ± {means.loc['dpaat', 'std']:.1f}% against "
                  f"{means.loc['pgd_at', 'mean']:.1f} ± {means.loc['pgd_at', 'std']:.1f}%")
    for claim in claims:
        assert claim in TEXT, claim


def test_the_40_epoch_comparisons_with_trades_and_the_memory_ablation(long):
    trades = diff(long, "dpaat", "trades", "pgd20")
    t = long[long["variant"] == "trades"]["pgd20"] * 100
    fixed = diff(long, "dpaat", "dpaat_fixed", "pgd20")
    clean = diff(long, "dpaat", "dpaat_fixed", "clean_accuracy")
    bal = diff(long, "dpaat", "dpaat_fixed", "pgd20_balanced")
    fixed_bal = long[long["variant"] == "dpaat_fixed"]["pgd20_balanced"] * 100
    trades_bal = diff(long, "dpaat", "trades", "pgd20_balanced")
    tb = long[long["variant"] == "trades"]["pgd20_balanced"] * 100
    claims = [
        f"(`long28x-trades`, {t.mean():.1f} ± {t.std():.1f}%): **{num(trades['mean'])}** {ci(trades)}",
        f"the same losses at a fixed eps): **{num(fixed['mean'])}** {ci(fixed)}",
        f"Against `dpaat_fixed` clean accuracy is {num(clean['mean'])} {ci(clean)}",
        f"Against `dpaat_fixed` ({fixed_bal.mean():.1f} ± {fixed_bal.std():.1f}%) it is {num(bal['mean'])} {ci(bal)}",
        f"TRADES reaches PGD-20 {t.mean():.1f} ± {t.std():.1f}% and PGD-20 balanced {tb.mean():.1f} ± {tb.std():.1f}%",
        f"DPAAT minus TRADES is\n{num(trades['mean'])} {ci(trades)[1:-1].replace('CI ', '(CI ')}) on PGD-20 and "
        f"{num(trades_bal['mean'])} {ci(trades_bal)} on PGD-20 balanced",
    ]
    for claim in claims:
        assert claim in TEXT, claim


def test_the_rare_class_effect_on_validation_at_the_same_checkpoints(results):
    epochs = pd.read_csv(RESULTS / "epochs.csv")
    rows = []
    for row in results[results["study"].isin(["long28", "long28x"])].itertuples():
        best = epochs[(epochs["run"] == row.run) & (epochs["epoch"] == row.best_epoch)].iloc[-1]
        rows.append({"study": "long28", "variant": row.variant, "seed": row.seed,
                     "val": best["val_robust_balanced_accuracy"]})
    d = diff(pd.DataFrame(rows), "dpaat", "pgd_at", "val")
    assert f"the same checkpoints give **{num(d['mean'])}** {ci(d)} against PGD-AT" in TEXT
    assert f"(test split; on validation {num(d['mean'])}, CI {num(d['ci_low'])} to {num(d['ci_high'])})" in TEXT


def test_the_linf_paragraph_compares_each_method_with_its_own_l2_run(results):
    both = pd.concat([results[results["study"] == "main28"], results[results["study"] == "ablate28"]])
    both = both.assign(study="x")
    pgd_linf = diff(both, "pgd_at-linf", "pgd_at", "pgd20_linf", "x")
    pgd_l2 = diff(both, "pgd_at-linf", "pgd_at", "pgd20_l2", "x")
    dp_linf = diff(both, "dpaat-linf", "dpaat", "pgd20_linf", "x")
    dp_l2 = diff(both, "dpaat-linf", "dpaat", "pgd20_l2", "x")
    claims = [
        f"{num(dp_linf['mean'])} (DPAAT) and\n  {num(pgd_linf['mean'])} (PGD-AT) points against each method's own l2 run",
        f"(DPAAT: CI {num(dp_linf['ci_low'])} to {num(dp_linf['ci_high'])};\n  PGD-AT: CI {num(pgd_linf['ci_low'])} "
        f"to {num(pgd_linf['ci_high'])})",
        f"about a point of l2 robustness: {num(dp_l2['mean'])} {ci(dp_l2)}",
        f"For PGD-AT the\n    l2 cost is {num(pgd_l2['mean'])} {ci(pgd_l2)}",
    ]
    for claim in claims:
        assert claim in TEXT, claim


def test_the_run_count_the_apgd_gap_and_the_corruption_lead(results):
    part = results[results["study"].isin(FIRST_TWO_ROUNDS)]
    gap = (part["pgd20"] - part["apgd"]) * 100
    second = gap[part["study"].isin(["long28", "long28x"]).to_numpy()]
    assert (f"{gap.min():.1f}–{gap.max():.1f} points below PGD-20 over all {len(part)} runs of the first two rounds"
            in TEXT)
    assert f"second: {second.min():.1f}–{second.max():.1f})" in TEXT
    corr = pd.read_csv(RESULTS / "corruptions_runs.csv").rename(columns={"group": "study", "method": "variant"})
    d = diff(corr, "dpaat", "pgd_at", "mean_corrupted")
    assert f"minus PGD-AT is {num(d['mean'])} {ci(d)}: not a measurable lead" in TEXT


# ------------------------------------------------------------------------------------ third round: equal28

FLAT = " ".join(TEXT.split())


def flat(text: str) -> str:
    """Text with its line breaks and indents as single spaces (the prose wraps where it likes)."""
    return " ".join(text.split())


def _equal(results):
    return results[results["study"] == "equal28"]


def claim(frame, a, b, metric, study="equal28") -> str:
    d = diff(frame, a, b, metric, study)
    return f"{num(d['mean'])} {ci(d)}"


def test_the_equal_length_headline(results):
    eq = _equal(results)
    assert len(eq) == 30 and all(sorted(seeds) == [0, 1, 2, 3, 4] for _, seeds in eq.groupby("variant")["seed"])
    pgd = diff(eq, "dpaat", "pgd_at", "pgd20", "equal28")
    means = eq.groupby("variant")["pgd20"].agg(["mean", "std"]) * 100
    claims = [
        "**5 seeds** (0–4) of each of six methods, 30 runs",
        f"PGD-20 **{num(pgd['mean'])}** {ci(pgd)}, {means.loc['dpaat', 'mean']:.1f} ± {means.loc['dpaat', 'std']:.1f}% "
        f"against {means.loc['pgd_at', 'mean']:.1f} ± {means.loc['pgd_at', 'std']:.1f}%",
        "APGD's worst case\n  " + claim(eq, "dpaat", "pgd_at", "apgd"),
    ]
    clean = diff(eq, "dpaat", "pgd_at", "clean_accuracy", "equal28")
    claims.append(f"Clean accuracy **{num(clean['mean'])}** {ci(clean)} and AUC "
                  + claim(eq, "dpaat", "pgd_at", "auc"))
    claims.append("balanced\n  accuracy " + claim(eq, "dpaat", "pgd_at", "balanced_accuracy"))
    test = diff(eq, "dpaat", "pgd_at", "pgd20_balanced", "equal28")
    val = diff(eq, "dpaat", "pgd_at", "val_pgd20_balanced", "equal28")
    claims.append(f"Robust balanced accuracy **{num(test['mean'])}** {ci(test)} on test and **{num(val['mean'])}** "
                  f"{ci(val)}\n  on validation")
    claims.append(f"the robustness gain over PGD-AT disappears (PGD-20 {num(pgd['mean'])}, CI {num(pgd['ci_low'])} "
                  f"to {num(pgd['ci_high'])}) and the rare-class cost stays (robust balanced {num(test['mean'])} on "
                  f"test, {num(val['mean'])} on validation)")
    memory = diff(eq, "dpaat", "dpaat_fixed", "pgd20_balanced", "equal28")
    claims.append(f"(against its ablation `dpaat_fixed`: {num(memory['mean'])}, CI {num(memory['ci_low'])} to "
                  f"{num(memory['ci_high'])})")
    cthr = diff(eq, "dpaat_cthr", "dpaat", "pgd20_balanced", "equal28")
    short = diff(eq, "dpaat_cthr", "pgd_at", "pgd20_balanced", "equal28")
    claims.append(f"recovers {num(cthr['mean'])} of it (CI {num(cthr['ci_low'])} to {num(cthr['ci_high'])})")
    claims.append(f"short of PGD-AT on robust balanced accuracy ({num(short['mean'])}, CI {num(short['ci_low'])} to "
                  f"{num(short['ci_high'])})")
    for text in claims:
        assert flat(text) in FLAT, text


@pytest.fixture(scope="module")
def c(results):
    """``c(a, b, metric)``: equal28's paired difference a minus b as the text writes it, ``+1.2 (CI +0.3 to +2.1)``."""
    return lambda a, b, metric: claim(_equal(results), a, b, metric)


def assert_in_text(claims):
    for text in claims:
        assert flat(text) in FLAT, text


def test_the_memory_ablation_and_trades_at_equal_length(c):
    assert_in_text([
        f"DPAAT minus `dpaat_fixed`: robust balanced **{c('dpaat', 'dpaat_fixed', 'pgd20_balanced').replace(' (', '** (', 1)}"
        f" on test and {c('dpaat', 'dpaat_fixed', 'val_pgd20_balanced')} on validation; PGD-20 "
        f"{c('dpaat', 'dpaat_fixed', 'pgd20')}, clean {c('dpaat', 'dpaat_fixed', 'clean_accuracy')}",
        f"`dpaat_fixed` minus PGD-AT: robust balanced {c('dpaat_fixed', 'pgd_at', 'pgd20_balanced')}, PGD-20 "
        f"{c('dpaat_fixed', 'pgd_at', 'pgd20')}",
        f"minus PGD-AT, robust balanced {c('trades', 'pgd_at', 'pgd20_balanced')} on test and "
        f"{c('trades', 'pgd_at', 'val_pgd20_balanced')} on validation, for PGD-20 {c('trades', 'pgd_at', 'pgd20')}",
        f"DPAAT minus TRADES: PGD-20 {c('dpaat', 'trades', 'pgd20')}, robust balanced "
        f"{c('dpaat', 'trades', 'pgd20_balanced')}",
    ])


def test_the_class_aware_variants_against_dpaat_pgd_at_and_the_ablation(c):
    assert_in_text([
        f"robust balanced accuracy **{c('dpaat_cthr', 'dpaat', 'pgd20_balanced').replace(' (', '** (', 1)} on test "
        f"and {c('dpaat_cthr', 'dpaat', 'val_pgd20_balanced')} on validation, PGD-20 "
        f"{c('dpaat_cthr', 'dpaat', 'pgd20')}, clean {c('dpaat_cthr', 'dpaat', 'clean_accuracy')}",
        f"robust balanced {c('dpaat_cthr', 'pgd_at', 'pgd20_balanced')} on test and "
        f"{c('dpaat_cthr', 'pgd_at', 'val_pgd20_balanced')} on validation; PGD-20 {c('dpaat_cthr', 'pgd_at', 'pgd20')}, "
        f"clean {c('dpaat_cthr', 'pgd_at', 'clean_accuracy')}, AUC {c('dpaat_cthr', 'pgd_at', 'auc')}",
        f"the fair test of a memory: PGD-20 {c('dpaat_cthr', 'dpaat_fixed', 'pgd20')}, APGD "
        f"{c('dpaat_cthr', 'dpaat_fixed', 'apgd')}, robust balanced {c('dpaat_cthr', 'dpaat_fixed', 'pgd20_balanced')} "
        f"on test and {c('dpaat_cthr', 'dpaat_fixed', 'val_pgd20_balanced')} on validation",
        f"robust balanced **{c('dpaat_cnorm', 'dpaat', 'pgd20_balanced').replace(' (', '** (', 1)} on test, "
        f"{c('dpaat_cnorm', 'dpaat', 'val_pgd20_balanced')} on validation; PGD-20 {c('dpaat_cnorm', 'dpaat', 'pgd20')}",
        f"Against PGD-AT: robust balanced {c('dpaat_cnorm', 'pgd_at', 'pgd20_balanced')}, PGD-20 "
        f"{c('dpaat_cnorm', 'pgd_at', 'pgd20')}",
        f"Against `dpaat_fixed`: robust balanced {c('dpaat_cnorm', 'dpaat_fixed', 'pgd20_balanced')}, PGD-20 "
        f"{c('dpaat_cnorm', 'dpaat_fixed', 'pgd20')}",
    ])


def test_the_per_class_figures_are_the_bootstrap_tables_of_equal28_md():
    """The per-class intervals in the text are the pooled (test + val) column of bench/results/equal28.md."""
    report = (RESULTS / "equal28.md").read_text()

    def pooled(variant: str, cls: str) -> tuple[str, str, str]:
        block = report.split(f"#### {variant} minus pgd_at")[1].split("####")[0]
        row = next(line for line in block.splitlines() if line.startswith(f"| {cls} |"))
        m = re.findall(r"([+-]\d+\.\d) \[([+-]\d+\.\d), ([+-]\d+\.\d)\]", row)[-1]
        return tuple(v.replace("-", "−") for v in m)

    for variant, cls in (("dpaat", "akiec"), ("dpaat", "bcc"), ("dpaat", "bkl"), ("dpaat", "nv"),
                         ("dpaat_cthr", "akiec"), ("dpaat_cthr", "bcc")):
        mean, lo, hi = pooled(variant, cls)
        assert f"{cls} {mean}" in FLAT and f"(CI {lo} to {hi}" in FLAT, (variant, cls, mean, lo, hi)
    for cls in ("akiec", "bcc", "vasc", "nv"):   # TRADES: the points only
        assert f"{cls} {pooled('trades', cls)[0]}" in FLAT, cls


def test_the_anchor_row_is_the_anchor_run_in_study_csv(results):
    """The MedMNIST v2 comparison: the anchor run's test accuracy, AUC, balanced accuracy and best epoch as the table
    and the answer give them, and the differences from the published 0.735 / 0.917."""
    (row,) = results[(results["study"] == "anchor28") & (results["variant"] == "erm-resnet18")].itertuples()
    assert (row.epochs_run, row.seed, row.image_size) == (100, 0, 28)
    assert (f"| ours, torchvision ResNet-18 (`resnet18`) | {row.clean_accuracy:.3f} | {row.auc:.3f} | "
            f"{row.balanced_accuracy:.3f} | {int(row.best_epoch)} of 100 |") in TEXT
    assert flat(f"reaches test accuracy {row.clean_accuracy:.3f} and AUC {row.auc:.3f}, against their 0.735 and "
                f"0.917") in FLAT
    assert flat(f"accuracy {num((row.clean_accuracy - 0.735) * 100)} points above MedMNIST v2's, AUC "
                f"{abs(row.auc - 0.917) * 100:.1f} points below") in FLAT
    assert flat(f"balanced accuracy {row.balanced_accuracy:.3f}, robust accuracy under PGD-20 {row.pgd20:.3f} and "
                f"robust balanced accuracy {row.pgd20_balanced:.3f}") in FLAT
    erm = results[(results["study"] == "long28x") & (results["variant"] == "erm")]
    assert flat(f"reaches {erm.clean_accuracy.mean():.3f} accuracy but {erm.balanced_accuracy.mean():.3f} balanced "
                "accuracy") in FLAT
