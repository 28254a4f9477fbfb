"""What a page opens on: the store's named default, else its best finished model; never a stub, a running or a
failed run unless the user picks it."""
from pathlib import Path

import pytest

from dpaat_core.evaluate import defaults
from dpaat_core.store import runs
from dpaat_core.__main__ import main
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train.loop import train


def _run(store: Path, name: str, method: str, epochs: int, seed: int = 0) -> Path:
    cfg = RunConfig().replace(data={"spec": "synthetic:n=32,classes=3", "image_size": 16}, attack={"steps": 1},
                              method=method_config(method),
                              train={"epochs": epochs, "batch_size": 16, "device": "cpu", "seed": seed})
    return train(cfg, store=store, run_id=name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store")
    for name, method, epochs, seed in (("erm-a", "erm", 3, 0), ("erm-b", "erm", 3, 1), ("pgd", "pgd_at", 3, 0),
                                       ("stub", "dpaat", 1, 0)):
        _run(path, name, method, epochs, seed)
    return path


def _val(store, name):
    return runs.load_run(store / name).best["val_balanced_accuracy"]


def test_without_a_named_default_the_best_finished_model_opens_never_a_stub(store):
    found = runs.list_runs(store)
    best = max(_val(store, n) for n in ("erm-a", "erm-b", "pgd"))
    assert _val(store, defaults.default_run(found, store)) == best           # (ties: any of the best)
    assert not defaults.showable(runs.load_run(store / "stub"))              # one epoch: opened only when picked
    failed = runs.load_run(store / "erm-a")
    failed.state = "failed"
    assert not defaults.showable(failed)


def test_a_test_split_figure_outranks_a_validation_one(store, tmp_path):
    import shutil
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    worst = min(("erm-a", "erm-b", "pgd"), key=lambda n: _val(store, n))
    assert main(["evaluate", str(copy / worst), "--eps-grid", "0", "--max-samples", "8"]) == 0   # a test figure
    assert defaults.default_run(runs.list_runs(copy), copy) == worst


def test_the_keeper_names_the_default_with_the_cli_and_can_clear_it(store, tmp_path, capsys):
    import shutil
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    assert main(["runs", "--store", str(copy), "--set-default", "pgd"]) == 0
    assert defaults.read_default(copy) == "pgd" and defaults.default_run(runs.list_runs(copy), copy) == "pgd"
    assert main(["runs", "--store", str(copy)]) == 0
    assert "pages open on: pgd (set with --set-default)" in capsys.readouterr().out
    assert main(["runs", "--store", str(copy), "--set-default", "missing"]) == 2
    assert "missing: not a run folder" in capsys.readouterr().err and defaults.read_default(copy) == "pgd"
    runs.write_status(copy / "stub", "failed", "boom")
    assert main(["runs", "--store", str(copy), "--set-default", "stub"]) == 2
    assert "only a finished run with weights can be the default" in capsys.readouterr().err
    assert main(["runs", "--store", str(copy), "--clear-default"]) == 0
    assert defaults.read_default(copy) is None
    (copy / defaults.DEFAULT_FILE).write_text("{not json")                  # a damaged file: the best run again
    assert defaults.default_run(runs.list_runs(copy), copy) in ("erm-a", "erm-b", "pgd")


def test_the_comparison_is_the_best_run_of_each_method(store):
    chosen = defaults.comparison(runs.list_runs(store), store)
    methods = {runs.load_run(store / c).method: c for c in chosen}
    assert len(chosen) == 2 and set(methods) == {"erm", "pgd_at"}                # the stub's dpaat is not shown
    assert _val(store, methods["erm"]) == max(_val(store, "erm-a"), _val(store, "erm-b"))
    assert chosen[0] == defaults.default_run(runs.list_runs(store), store)


def test_a_short_run_started_from_a_trained_model_is_shown_one_started_from_a_stub_is_not(store, tmp_path):
    import shutil
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    common = ["--method", "dpaat", "--epochs", "1", "--steps", "1", "--device", "cpu", "--quiet", "--store", str(copy)]
    assert main(["train", "--init-from", str(copy / "erm-a"), "--name", "tuned", *common]) == 0   # 3 + 1 epochs
    assert main(["train", "--init-from", str(copy / "stub"), "--name", "stubby", *common]) == 0   # 1 + 1
    found = runs.list_runs(copy)
    by_id = {r.run_id: r for r in found}
    assert defaults.trained_epochs(by_id["tuned"], found) == 4 and defaults.showable(by_id["tuned"], found)
    assert defaults.trained_epochs(by_id["stubby"], found) == 2 and not defaults.showable(by_id["stubby"], found)
    assert "tuned" in defaults.comparison(found, copy) and "stubby" not in defaults.comparison(found, copy)
