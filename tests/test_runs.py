"""Run store: atomic files, strict JSON metrics, safe loading of hostile files, run listing under concurrent writes."""
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from dpaat_core.store import runs
from dpaat_core.models import build_model
from dpaat_core.store.loading import load_model
from dpaat_core.store.runs import (
    RUN_ID_PATTERN, RunError, append_metrics, atomic_write_bytes, atomic_write_json, create_run, default_run_id,
    dynamics_epochs, list_runs, load_checkpoint, load_dynamics, load_run, load_weights, read_config,
    read_metrics, read_status, runs_table, save_checkpoint, save_dynamics, save_weights, truncate_metrics,
    write_status,
)


def make_config(model="resnet8", num_classes=7, spec="npz:/data/ham10000_sample.npz"):
    return {
        "format": 1, "data": {"spec": spec, "image_size": 28, "max_samples": None, "root": None},
        "model": {"name": model, "pretrained": False},
        "attack": {"norm": "l2", "eps": 0.5, "alpha_ratio": 0.25, "steps": 3},
        "method": {"name": "dpaat", "gamma": 0.5},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "seed": 0},
        "dataset": {"classes": [f"c{i}" for i in range(num_classes)], "num_classes": num_classes, "in_channels": 3,
                    "image_size": 28, "train_size": 100, "val_size": 20},
        "versions": {},
    }


def record(epoch, **extra):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_accuracy": 0.5 + epoch / 100, "is_best": False, **extra}


def dynamics(n=5):
    return {"index": np.arange(n), "label": np.arange(n) % 3, "delta_loss": np.linspace(0, 1, n),
            "eps": np.full(n, 0.5), "fragile": np.arange(n) % 2 == 0, "correct_clean": np.ones(n, bool),
            "correct_adv": np.zeros(n, bool)}


def leftovers(folder):
    return [p.name for p in pathlib.Path(folder).rglob(".*.tmp")]


# --- atomic writes -------------------------------------------------------------------------------------------------

def test_atomic_write_round_trips_and_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01" * 1000)
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2.5, "s"], "n": np.float32(0.25), "nan": math.nan})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" * 1000
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2.5, "s"], "n": 0.25, "nan": None}
    assert leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "status.json"
    atomic_write_json(target, {"state": "old"})
    with pytest.raises(TypeError):  # json cannot encode a tensor: fails before the file is touched
        atomic_write_json(target, {"state": torch.zeros(2)})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):  # fails after the temp file was written in full
        atomic_write_json(target, {"state": "new"})
    assert json.loads(target.read_text()) == {"state": "old"}
    assert leftovers(tmp_path) == []


def test_remove_temp_files_clears_what_a_killed_writer_left(tmp_path):
    save_dynamics(tmp_path, 1, dynamics())
    atomic_write_json(tmp_path / "status.json", {"state": "running"})
    stale = [tmp_path / ".status.json.k3j2.tmp", tmp_path / "dynamics" / ".epoch_002.npz.x9.tmp"]
    for p in stale:
        p.write_bytes(b"half a fi")
    assert runs.remove_temp_files(tmp_path) == 2 and leftovers(tmp_path) == []
    assert json.loads((tmp_path / "status.json").read_text()) == {"state": "running"}
    assert dynamics_epochs(tmp_path) == [1] and runs.remove_temp_files(tmp_path) == 0


# --- metrics, status, config ---------------------------------------------------------------------------------------

def test_metrics_nan_is_strict_json_null_and_nested_dicts_flatten(tmp_path):
    append_metrics(tmp_path, record(1, val_robust_accuracy=math.nan, threshold=math.inf, eps_mean=math.nan,
                                    fragile_fraction_per_class={"akiec": 0.4, "nv": math.nan}))
    append_metrics(tmp_path, record(2, val_robust_accuracy=0.3, is_best=np.bool_(True), eps_mean=np.float32("nan"),
                                    fragile_fraction_per_class={"akiec": 0.2, "nv": 0.1}))
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in raw and "Infinity" not in raw and len(raw.splitlines()) == 2
    df = read_metrics(tmp_path)
    assert list(df["epoch"]) == [1, 2]
    assert math.isnan(df["val_robust_accuracy"][0]) and df["val_robust_accuracy"][1] == 0.3
    assert math.isnan(df["threshold"][0])
    assert df["eps_mean"].dtype == np.float64 and df["eps_mean"].isna().all()  # null in every row: still a number column
    assert df["fragile_fraction_per_class.akiec"].tolist() == [0.4, 0.2]
    assert math.isnan(df["fragile_fraction_per_class.nv"][0])


def test_truncate_metrics_keeps_the_first_epochs(tmp_path):
    for epoch in range(1, 6):
        append_metrics(tmp_path, record(epoch))
    truncate_metrics(tmp_path, 3)
    assert list(read_metrics(tmp_path)["epoch"]) == [1, 2, 3]
    append_metrics(tmp_path, record(4))
    assert list(read_metrics(tmp_path)["epoch"]) == [1, 2, 3, 4]


def test_missing_metrics_is_an_empty_frame_and_a_bad_line_is_named(tmp_path):
    assert list(read_metrics(tmp_path).columns) == ["epoch"] and len(read_metrics(tmp_path)) == 0
    append_metrics(tmp_path, record(1))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_loss": 0.\n')
    with pytest.raises(RunError, match=r"metrics\.jsonl: line 2"):
        read_metrics(tmp_path)
    with pytest.raises(ValueError):
        append_metrics(tmp_path, {"train_loss": 1.0})  # no epoch


def test_status_round_trip_and_bad_state(tmp_path):
    write_status(tmp_path, "running", epoch=2, epochs=5, batch=7, batches=10)
    status = read_status(tmp_path)
    assert status["state"] == "running" and status["epoch"] == 2 and status["batches"] == 10
    assert status["pid"] == os.getpid() and abs(status["updated"] - time.time()) < 60
    assert (tmp_path / "status.json").read_text().startswith("{\n  ")  # indent=2: readable by hand
    with pytest.raises(ValueError, match="state"):
        write_status(tmp_path, "paused")
    (tmp_path / "status.json").write_text('{"state": "weird"}')
    with pytest.raises(RunError, match="status.json"):
        read_status(tmp_path)


def test_read_config_refuses_garbage_and_missing_sections(tmp_path):
    with pytest.raises(RunError, match="config.json: missing"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="config.json: not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model": {}, "data": {}}')
    with pytest.raises(RunError, match="method, dataset"):
        read_config(tmp_path)


# --- creating runs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,slug", [
    ("npz:/data/ham10000_sample.npz", "ham10000_sample"), ("folder:C:\\data\\derm lesions\\", "derm_lesions"),
    ("ham10000:/shared/data/ham10000_sample/", "ham10000_sample"), ("medmnist:dermamnist@64", "dermamnist"),
    ("synthetic:n=64,classes=3", "synthetic"), ("synthetic", "synthetic"),
])
def test_default_run_id(spec, slug):
    config = make_config(spec=spec)
    run_id = default_run_id(config, now=time.mktime((2026, 11, 25, 14, 25, 30, 0, 0, -1)))
    assert run_id == f"20261125-142530-dpaat-resnet8-{slug}"
    assert RUN_ID_PATTERN.fullmatch(run_id)


def test_create_run_writes_config_and_status_and_refuses_to_overwrite(tmp_path):
    config = make_config()
    run_dir = create_run(tmp_path / "store" / "nested", config, "demo")
    assert run_dir == tmp_path / "store" / "nested" / "demo"
    assert read_config(run_dir)["run_id"] == "demo" and "run_id" not in config
    assert read_status(run_dir)["state"] == "running"
    with pytest.raises(RunError, match="run 'demo' already exists.*--resume"):
        create_run(tmp_path / "store" / "nested", config, "demo")
    (tmp_path / "store" / "nested" / "empty").mkdir()  # an empty folder is free to use
    assert create_run(tmp_path / "store" / "nested", config, "empty").is_dir()
    assert default_run_id(config)[:8].isdigit() and create_run(tmp_path / "auto", config).parent == tmp_path / "auto"


@pytest.mark.parametrize("bad", ["../evil", "", "a/b", ".hidden", "-x", "a" * 101, "a b"])
def test_create_run_refuses_bad_ids(tmp_path, bad):
    with pytest.raises(RunError, match="bad run id"):
        create_run(tmp_path / "store", make_config(), bad)
    assert not (tmp_path / "evil").exists()


# --- dynamics ------------------------------------------------------------------------------------------------------

def test_dynamics_round_trip_and_epochs(tmp_path):
    for epoch in (7, 2, 12, 1, 10, 3, 5):  # shuffled: neither creation order nor directory order is sorted
        path = save_dynamics(tmp_path, epoch, dynamics())
    assert path.name == "epoch_005.npz" and dynamics_epochs(tmp_path) == [1, 2, 3, 5, 7, 10, 12]
    arrays = load_dynamics(tmp_path, 2)
    assert arrays["index"].dtype == np.int64 and arrays["delta_loss"].dtype == np.float32
    assert arrays["fragile"].dtype == np.bool_ and arrays["fragile"].tolist() == [True, False, True, False, True]
    np.testing.assert_allclose(arrays["delta_loss"], np.linspace(0, 1, 5), rtol=1e-6)
    assert dynamics_epochs(tmp_path / "nowhere") == []


def test_dynamics_checks_keys_and_lengths(tmp_path):
    arrays = dynamics()
    del arrays["eps"]
    with pytest.raises(ValueError, match=r"missing \['eps'\]"):
        save_dynamics(tmp_path, 1, arrays)
    with pytest.raises(ValueError, match="equally long"):
        save_dynamics(tmp_path, 1, {**dynamics(), "label": np.zeros(4)})
    with pytest.raises(RunError, match="epoch_003.npz: missing"):
        load_dynamics(tmp_path, 3)
    (tmp_path / "dynamics").mkdir(exist_ok=True)
    np.savez(tmp_path / "dynamics" / "epoch_004.npz", index=np.arange(3))
    with pytest.raises(RunError, match="lacks label"):
        load_dynamics(tmp_path, 4)


# --- weights and models --------------------------------------------------------------------------------------------

def trained_run(tmp_path, name="run", num_classes=7):
    """A run folder with config and weights of a resnet8 whose BatchNorm statistics are not the defaults."""
    run_dir = create_run(tmp_path, make_config(num_classes=num_classes), name)
    model = build_model("resnet8", num_classes).train()
    with torch.no_grad():
        model(torch.rand(8, 3, 16, 16))
    return run_dir, model.eval()


@pytest.mark.parametrize("half", [False, True])
def test_weights_round_trip(tmp_path, half):
    run_dir, model = trained_run(tmp_path)
    save_weights(run_dir / "weights.safetensors", model.state_dict(), half=half)
    state = load_weights(run_dir / "weights.safetensors")
    assert state["backbone.fc.weight"].dtype == (torch.float16 if half else torch.float32)
    assert state["backbone.bn1.num_batches_tracked"].dtype == torch.int64
    loaded = load_model(run_dir)
    assert not loaded.training and loaded.backbone.fc.weight.dtype == torch.float32
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=2e-2 if half else 1e-6, rtol=1e-2 if half else 1e-6)


def test_load_model_last_checkpoint(tmp_path):
    run_dir, model = trained_run(tmp_path)
    save_checkpoint(run_dir / "last.pt", {"model": model.state_dict(), "epoch": 2, "rng": [1, 2], "note": "x"})
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_model(run_dir, weights="last")(x), model(x))


def test_load_model_refuses_weights_of_another_shape(tmp_path):
    run_dir, _ = trained_run(tmp_path)
    save_weights(run_dir / "weights.safetensors", build_model("resnet8", 3).state_dict())
    with pytest.raises(RunError, match=r"weights\.safetensors: weights do not fit a resnet8 with 7 classes.*fc"):
        load_model(run_dir)
    save_weights(run_dir / "weights.safetensors", {"layer.weight": torch.zeros(2)})
    with pytest.raises(RunError, match="missing backbone"):
        load_model(run_dir)


def test_load_model_refuses_an_unknown_model(tmp_path):
    run_dir = create_run(tmp_path, make_config(model="vgg_from_the_future"), "r")
    with pytest.raises(RunError, match="config.json.*vgg_from_the_future"):
        load_model(run_dir)


# --- hostile files -------------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this touches ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    control, marker = tmp_path / "control", tmp_path / "marker"
    torch.save({"model": Payload(str(control))}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload is live: a plain unpickle runs it
    assert control.exists()
    torch.save({"model": Payload(str(marker))}, tmp_path / "last.pt")
    with pytest.raises(RunError, match="last.pt: refused to load: not a plain tensor checkpoint"):
        load_checkpoint(tmp_path / "last.pt")
    assert not marker.exists()


def test_garbage_weights_and_object_arrays_are_refused(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RunError, match="weights.safetensors: not a readable safetensors file"):
        load_weights(tmp_path / "weights.safetensors")
    with pytest.raises(RunError, match="not a readable safetensors file"):
        load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "dynamics").mkdir()
    np.savez(tmp_path / "dynamics" / "epoch_001.npz", **{**dynamics(3), "index": np.array([{}, {}, {}], dtype=object)})
    with pytest.raises(RunError, match="epoch_001.npz: refused"):
        load_dynamics(tmp_path, 1)


# --- listing runs --------------------------------------------------------------------------------------------------

def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_list_runs_survives_a_messy_store(tmp_path):
    store = tmp_path / "store"
    good, model = trained_run(store, "good")
    for epoch, acc in ((1, 0.5), (2, 0.8), (3, 0.7)):
        append_metrics(good, record(epoch, val_accuracy=acc, val_balanced_accuracy=acc / 2, val_robust_accuracy=acc / 4,
                                    is_best=epoch == 2))
    save_weights(good / "weights.safetensors", model.state_dict())
    write_status(good, "done", epoch=3, epochs=3)
    (store / "garbage").mkdir()
    (store / "garbage" / "config.json").write_text("\x00\x01 not json")
    (store / "empty").mkdir()
    dead = create_run(store, make_config(), "dead")
    status = read_status(dead)
    atomic_write_json(dead / "status.json", {**status, "pid": dead_pid()})
    (store / ".trash").mkdir()
    (store / "_tmp").mkdir()
    (store / "README.md").write_text("not a run")
    later = time.time() + 100
    os.utime(good, (later, later))

    found = list_runs(store)
    by_id = {r.run_id: r for r in found}
    assert set(by_id) == {"good", "garbage", "empty", "dead"} and found[0].run_id == "good"
    assert by_id["good"].state == "done" and by_id["good"].has_weights and by_id["good"].epochs_done == 3
    assert by_id["good"].best["epoch"] == 2 and by_id["good"].problem is None
    assert by_id["garbage"].state == "corrupt" and by_id["garbage"].problem.startswith("config.json: not valid JSON")
    assert by_id["empty"].state == "incomplete" and "config.json" in by_id["empty"].problem
    assert by_id["dead"].state == "interrupted" and f"--resume {dead}" in by_id["dead"].problem

    table = runs_table(found).set_index("run_id")
    assert len(table) == 4
    row = table.loc["good"]
    assert (row["epochs"], row["method"], row["model"], row["norm"], row["eps"]) == ("3/3", "dpaat", "resnet8", "l2", 0.5)
    assert (row["val_accuracy"], row["val_balanced_accuracy"], row["val_robust_accuracy"]) == (0.8, 0.4, 0.2)
    assert math.isnan(row["val_auc"])            # a run logged before validation measured AUC
    assert table.loc["empty", "epochs"] == "0/?" and math.isnan(table.loc["empty", "val_accuracy"])
    assert row["origin"] == "trained" and table.loc["empty", "origin"] != table.loc["empty", "origin"]  # no config: NaN
    assert list_runs(tmp_path / "no_store") == [] and len(runs_table([])) == 0


@pytest.mark.parametrize("host_age,state", [(0, "running"), (3600, "interrupted")])
def test_a_run_on_another_host_is_interrupted_only_when_stale(tmp_path, host_age, state):
    run_dir = create_run(tmp_path, make_config(), "remote")
    atomic_write_json(run_dir / "status.json", {"state": "running", "message": None, "pid": 1, "host": "elsewhere.invalid",
                                                "updated": time.time() - host_age})
    assert load_run(run_dir).state == state


def test_failed_run_reports_its_message_and_a_file_is_not_a_run(tmp_path):
    run_dir = create_run(tmp_path, make_config(), "f")
    write_status(run_dir, "failed", "CUDA out of memory")
    assert (load_run(run_dir).state, load_run(run_dir).problem) == ("failed", "CUDA out of memory")
    with pytest.raises(RunError):
        load_run(run_dir / "config.json")


def test_readers_see_whole_records_while_a_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # fsync is for crashes, not for what readers see: skip its cost
    run_dir = create_run(tmp_path, make_config(), "live")
    errors = []

    def writer():
        try:
            for epoch in range(1, 201):
                append_metrics(run_dir, record(epoch, fragile_fraction_per_class={"a": 0.1, "b": math.nan}))
                write_status(run_dir, "running", epoch=epoch, epochs=200, batch=epoch, batches=200)
        except Exception as exc:  # surfaced by the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen, reads = 0, 0
    while thread.is_alive() or reads == 0:
        (run,) = list_runs(tmp_path)
        assert run.state == "running" and run.problem is None
        df = read_metrics(run_dir)
        assert list(df["epoch"]) == list(range(1, len(df) + 1)) and len(df) >= seen
        seen = len(df)
        assert read_status(run_dir)["state"] == "running"
        reads += 1
    thread.join()
    assert errors == [] and len(read_metrics(run_dir)) == 200 and reads > 1
    assert leftovers(run_dir) == []


def test_a_run_record_types_a_trained_run_an_imported_one_and_refuses_a_bad_one(tmp_path):
    from dpaat_core.config import RunConfig, method_config
    from dpaat_core.store.record import ImportedModel, RunRecord
    dataset = {"classes": ["a", "b", "c"], "num_classes": 3, "in_channels": 3, "image_size": 16, "train_size": 30,
               "val_size": 6, "train_class_counts": [10, 10, 10], "source_path": "x.npz", "added_later": 1}
    trained = RunConfig().replace(data={"spec": "npz:x.npz", "image_size": 16}, method=method_config("pgd_at"),
                                  attack={"norm": "linf", "eps": 0.01}, train={"seed": 7})
    create_run(tmp_path, trained.to_dict() | {"dataset": dataset, "init": {"run_id": "src"}}, "t")
    imported = {"origin": "imported", "source": {"file": "w.pt", "sha256": "ab"}, "method": {"name": "imported"},
                "model": {"name": "convnext_tiny", "pretrained": False, "normalization": {"mean": [0.5] * 3,
                                                                                          "std": [0.5] * 3}},
                "data": {"spec": "npz:y.npz", "image_size": 32}, "dataset": dataset | {"image_size": 32}}
    create_run(tmp_path, imported, "i")
    t, i = runs.read_record(tmp_path / "t"), runs.read_record(tmp_path / "i")
    assert isinstance(t, RunRecord) and t.config == trained and not t.imported
    assert (t.method, t.spec, t.seed, t.judged_norm, t.attack.eps, t.classes, t.origin) == \
        ("pgd_at", "npz:x.npz", 7, "linf", 0.01, ["a", "b", "c"], "from src")
    assert t.dataset.train_class_counts == (10, 10, 10) and t.dataset.image_size == 16
    assert isinstance(i.config, ImportedModel) and i.imported and i.attack is None
    assert (i.method, i.spec, i.seed, i.judged_norm, i.origin, i.model.name, i.config.source["file"]) == \
        ("imported", "npz:y.npz", 0, "l2", "imported", "convnext_tiny", "w.pt")
    listed = {r.run_id: r for r in list_runs(tmp_path)}
    assert listed["t"].record == t and (listed["t"].eps, listed["t"].norm, listed["t"].epochs) == (0.01, "linf", 10)
    assert (listed["i"].eps, listed["i"].norm, listed["i"].origin) == (None, None, "imported")

    bad = trained.to_dict() | {"dataset": dataset}
    bad["attack"]["norm"] = "l7"
    create_run(tmp_path, bad, "bad")
    with pytest.raises(RunError, match=r"config.json: attack.norm must be one of l2, linf, got 'l7'"):
        runs.read_record(tmp_path / "bad")
    run = load_run(tmp_path / "bad")
    assert run.state == "corrupt" and run.record is None and "attack.norm" in run.problem
    assert run.method is None and run.classes is None
