"""The trainer: a complete run folder, determinism, early stopping, resume after SIGKILL, DDP.

The tests marked ``device`` train on ``$DPAAT_TEST_DEVICE`` (see conftest.py); the others promise
bit-exact CPU runs (or use gloo) and train on the CPU whatever the variable says.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpaat_core.store import loading, runs
from dpaat_core.config import ConfigError, RunConfig, method_config
from dpaat_core.data import load_dataset
from dpaat_core.train.distributed import World
from dpaat_core.train.loop import class_weights, epoch_order, resume, train
from conftest import EXACT, TEST_DEVICE, TRAIN_COMPILE, TRAINED_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
SPEC = "synthetic:n=48,classes=3"


def small_config(method="dpaat", epochs=2, **train_overrides) -> RunConfig:
    return RunConfig().replace(data={"spec": SPEC, "image_size": 16}, attack={"steps": 2},
                               method=method_config(method),
                               train={"epochs": epochs, "batch_size": 16, "device": "cpu", **train_overrides})


def device_config(method="dpaat", epochs=2, **train_overrides) -> RunConfig:
    """:func:`small_config` training on TEST_DEVICE (on the CPU: small_config itself; on CUDA with compile off)."""
    on = {"device": TEST_DEVICE.type} | ({} if TRAIN_COMPILE is None else {"compile": TRAIN_COMPILE})
    return small_config(method, epochs, **(on | train_overrides))


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "dpaat_core", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _device_args(device: str) -> list[str]:
    """``--device``, and on CUDA ``--no-compile`` (as :func:`device_config`: the compiled path is test_fast_path's)."""
    return ["--device", device] + ([] if device == "cpu" else ["--no-compile"])


def _train_args(store, name, epochs=3, device="cpu"):
    return ["train", "--data", SPEC, "--model", "resnet8", "--method", "dpaat", "--epochs", str(epochs),
            "--image-size", "16", "--steps", "2", "--batch-size", "16", *_device_args(device), "--early-stop", "none",
            "--store", str(store), "--name", name, "--quiet"]


@pytest.mark.device
def test_a_run_leaves_a_complete_folder(tmp_path):
    run = train(device_config(), store=tmp_path, run_id="r1")
    assert run == tmp_path / "r1"
    for name in ("config.json", "metrics.jsonl", "status.json", "weights.safetensors", "last.pt"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp"))
    cfg = runs.read_config(run)
    assert RunConfig.from_dict(cfg) == device_config()         # the config re-makes the run
    assert cfg["dataset"]["classes"] and cfg["versions"]["torch"] == torch.__version__
    assert runs.read_status(run)["state"] == "done"

    metrics = runs.read_metrics(run)
    assert list(metrics["epoch"]) == [1, 2]
    train_set = load_dataset(SPEC, "train", 16)
    for col in ("train_loss", "val_accuracy", "val_balanced_accuracy", "val_robust_accuracy", "fragile_fraction",
                "eps_mean", "threshold", "seconds"):
        assert np.isfinite(metrics[col]).all(), col
    assert all(f"fragile_fraction_per_class.{c}" in metrics for c in train_set.classes)
    assert (metrics["val_robust_accuracy"] <= metrics["val_accuracy"] + 1e-9).all()

    assert runs.dynamics_epochs(run) == [1, 2]
    dyn1, dyn2 = runs.load_dynamics(run, 1), runs.load_dynamics(run, 2)
    assert sorted(dyn2["index"]) == list(range(len(train_set)))       # every training sample, once
    np.testing.assert_array_equal(dyn2["label"], train_set.labels.numpy()[dyn2["index"]])
    np.testing.assert_allclose(dyn1["eps"], 0.3, rtol=1e-6)            # epoch 1 starts at eps0
    assert metrics["fragile_fraction"].iloc[1] == pytest.approx(dyn2["fragile"].mean())
    # The memory moved each sample by its epoch-1 split: fragile down, stable up.
    e2 = dict(zip(dyn2["index"], dyn2["eps"]))
    for i, fragile in zip(dyn1["index"], dyn1["fragile"]):
        assert e2[i] == pytest.approx(0.3 * (0.9 if fragile else 1.1), rel=1e-5)
    moved = metrics.iloc[1]
    transitions = sum(moved[f"transitions.{k}"] for k in
                      ("fragile_to_stable", "stable_to_fragile", "fragile_to_fragile", "stable_to_stable"))
    assert transitions == len(train_set)
    assert moved["transitions.fragile_to_stable"] == int((dyn1["fragile"][np.argsort(dyn1["index"])] &
                                                         ~dyn2["fragile"][np.argsort(dyn2["index"])]).sum())
    # The memory saved for resume is the one after epoch 2.
    state = runs.load_checkpoint(run / "last.pt")
    mem = state["method_state"]["memory"]["eps"].numpy()
    for i, eps, fragile in zip(dyn2["index"], dyn2["eps"], dyn2["fragile"]):
        assert mem[i] == pytest.approx(eps * (0.9 if fragile else 1.1), rel=1e-5)

    model = loading.load_model(run)
    assert model.num_classes == train_set.num_classes and not model.training


def test_the_same_seed_gives_the_same_run(tmp_path):
    a = train(small_config(epochs=1), store=tmp_path, run_id="a")
    b = train(small_config(epochs=1), store=tmp_path, run_id="b")
    c = train(small_config(epochs=1, seed=1), store=tmp_path, run_id="c")
    wa, wb, wc = (runs.load_weights(r / "weights.safetensors") for r in (a, b, c))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].is_floating_point())
    np.testing.assert_array_equal(runs.load_dynamics(a, 1)["delta_loss"], runs.load_dynamics(b, 1)["delta_loss"])


def test_early_stopping_ends_a_run_that_does_not_improve(tmp_path):
    run = train(small_config(epochs=6, lr=1e-12, patience=2), store=tmp_path, run_id="flat")
    metrics = runs.read_metrics(run)
    assert list(metrics["epoch"]) == [1, 2, 3]          # best at 1, then two epochs without improvement
    assert list(metrics["is_best"]) == [True, False, False]
    assert metrics["stopped_early"].iloc[-1]
    assert runs.read_status(run)["state"] == "done"


@pytest.mark.device
def test_every_method_trains_end_to_end(tmp_path):
    for method in ("erm", "pgd_at", "trades", "dpaat_nosync", "dpaat_fixed"):
        run = train(device_config(method, epochs=1), store=tmp_path, run_id=method)
        dyn = runs.load_dynamics(run, 1)
        adaptive = method == "dpaat_nosync"
        state = runs.load_checkpoint(run / "last.pt")["method_state"]
        assert (state["memory"] is not None) == adaptive, method
        if method == "erm":
            assert (dyn["eps"] == 0).all() and not dyn["fragile"].any()
            np.testing.assert_array_equal(dyn["correct_adv"], dyn["correct_clean"])
        else:
            np.testing.assert_allclose(dyn["eps"], 0.3, rtol=1e-6)


def test_a_failure_is_recorded_in_the_status(tmp_path, monkeypatch):
    import dpaat_core.train.loop as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("out of cheese")
    monkeypatch.setattr(trainer, "training_step", broken)
    with pytest.raises(RuntimeError, match="out of cheese"):
        train(small_config(), store=tmp_path, run_id="broken")
    status = runs.read_status(tmp_path / "broken")
    assert status["state"] == "failed" and "out of cheese" in status["message"]


def test_class_weights_and_balanced_order():
    ds = load_dataset("synthetic:n=40,classes=4", "train", 16)
    ds = ds.subset([i for i in range(len(ds)) if ds.labels[i] != 3 or i % 4 == 0])   # make class 3 rare
    w = class_weights(ds).numpy()
    counts = ds.class_counts
    np.testing.assert_allclose(w * counts, counts.sum() / 4, rtol=1e-6)          # each class weighs the same
    order = epoch_order(ds, epoch=1, seed=0, world=World(), balanced=True)
    drawn = np.bincount(ds.labels[order].numpy(), minlength=4)
    assert len(order) == len(ds) and drawn[3] > counts[3]                        # the rare class is drawn more
    assert not torch.equal(order, epoch_order(ds, epoch=2, seed=0, world=World(), balanced=True))
    torch.testing.assert_close(order, epoch_order(ds, epoch=1, seed=0, world=World(), balanced=True))
    for balanced in (False, True):
        halves = [epoch_order(ds, 3, 0, World(rank, 2), balanced) for rank in (0, 1)]
        assert len(halves[0]) == len(halves[1]) == (len(ds) + 1) // 2
        if not balanced:
            assert set(torch.cat(halves).tolist()) == set(range(len(ds)))


def _wait_for_epoch(run: Path, epoch: int, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "last.pt").exists() and runs.load_checkpoint(run / "last.pt")["epoch"] >= epoch:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} not reached")


@pytest.mark.slow
@pytest.mark.device
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    device = TEST_DEVICE.type
    whole = _cli(*_train_args(tmp_path, "whole", device=device))
    killed = _cli(*_train_args(tmp_path, "killed", device=device))
    _wait_for_epoch(tmp_path / "killed", 1, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    listed = {r.run_id: r for r in runs.list_runs(tmp_path)}
    assert listed["killed"].state == "interrupted" and "--resume" in listed["killed"].problem

    resumed = _cli("train", "--resume", str(tmp_path / "killed"), *_device_args(device), "--quiet")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "killed")
    assert runs.read_status(tmp_path / "killed")["state"] == "done"
    a, b = runs.read_metrics(tmp_path / "whole"), runs.read_metrics(tmp_path / "killed")
    assert list(b["epoch"]) == [1, 2, 3]
    # On the CPU as tight as ever; on CUDA float sums may come out in another order in the new process
    # (TRAINED_TOLERANCE, see conftest.py).
    loss_tol = dict(rtol=1e-5) if EXACT else dict(rtol=TRAINED_TOLERANCE["rtol"])
    weight_tol = dict(rtol=1e-5, atol=1e-6) if EXACT else TRAINED_TOLERANCE
    np.testing.assert_allclose(b["train_loss"], a["train_loss"], **loss_tol)
    wa = runs.load_checkpoint(tmp_path / "whole" / "last.pt")
    wb = runs.load_checkpoint(tmp_path / "killed" / "last.pt")
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, **weight_tol)
    # The splits are yes/no decisions: a tolerance cannot absorb a flipped one (its eps moves by 2 gamma),
    # so they must agree on every device.
    torch.testing.assert_close(wb["method_state"]["memory"]["eps"], wa["method_state"]["memory"]["eps"])
    np.testing.assert_array_equal(runs.load_dynamics(tmp_path / "killed", 3)["fragile"],
                                  runs.load_dynamics(tmp_path / "whole", 3)["fragile"])


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "dpaat_core", *_train_args(tmp_path, "ddp", epochs=2)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert proc.stdout.strip().splitlines() == [str(run)]          # rank 0 alone prints and writes
    assert runs.read_config(run)["versions"]["world_size"] == 2
    assert runs.read_status(run)["state"] == "done"
    train_set = load_dataset(SPEC, "train", 16)
    dyn1, dyn2 = runs.load_dynamics(run, 1), runs.load_dynamics(run, 2)
    assert sorted(dyn2["index"]) == list(range(len(train_set)))
    # One global memory: every sample, whichever process saw it, moved by its own split.
    e2 = dict(zip(dyn2["index"], dyn2["eps"]))
    for i, fragile in zip(dyn1["index"], dyn1["fragile"]):
        assert e2[i] == pytest.approx(0.3 * (0.9 if fragile else 1.1), rel=1e-5)
    # The threshold is global: the fragile fraction is measured against one T per (global) batch.
    assert 0 < runs.read_metrics(run)["fragile_fraction"].iloc[0] < 1


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly_and_it_can_resume(tmp_path):
    proc = _cli(*_train_args(tmp_path, "stop", epochs=40))
    _wait_for_epoch(tmp_path / "stop", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err
    status = runs.read_status(tmp_path / "stop")
    assert status["state"] == "stopped" and "--resume" in status["message"]
    done = runs.load_checkpoint(tmp_path / "stop" / "last.pt")["epoch"]
    assert list(runs.read_metrics(tmp_path / "stop")["epoch"]) == list(range(1, done + 1))


def test_should_stop_ends_a_run_between_batches(tmp_path):
    from dpaat_core.train.loop import Stopped
    asked = []

    def stop_in_epoch_two():
        asked.append(1)
        return len(asked) > 4          # 48 samples / batch 16 = 3 batches per epoch: stop in epoch 2
    with pytest.raises(Stopped):
        train(small_config(epochs=5), store=tmp_path, run_id="s", should_stop=stop_in_epoch_two)
    assert runs.read_status(tmp_path / "s")["state"] == "stopped"
    assert list(runs.read_metrics(tmp_path / "s")["epoch"]) == [1]
    assert runs.load_checkpoint(tmp_path / "s" / "last.pt")["epoch"] == 1


def test_cosine_schedule_and_balanced_sampler_train_and_log_the_lr_used(tmp_path):
    run = train(small_config(epochs=3, schedule="cosine", imbalance="balanced_sampler", early_stop="none"),
                store=tmp_path, run_id="cos")
    lr = runs.read_metrics(run)["lr"].tolist()
    assert lr[0] == pytest.approx(3e-4) and lr[0] > lr[1] > lr[2] > 0
    assert lr[1] == pytest.approx(3e-4 * (1 + np.cos(np.pi / 3)) / 2)
    dyn = runs.load_dynamics(run, 1)
    assert len(np.unique(dyn["index"])) == len(dyn["index"])       # a sample drawn twice is logged once


def test_the_step_schedule_divides_the_rate_by_ten_at_half_and_three_quarters_of_the_run(tmp_path):
    run = train(small_config("erm", epochs=4, schedule="step", early_stop="none"), store=tmp_path, run_id="step")
    assert runs.read_metrics(run)["lr"].tolist() == pytest.approx([3e-4, 3e-4, 3e-5, 3e-6])


def test_early_stopping_on_auc_keeps_the_epoch_with_the_best_validation_auc(tmp_path):
    """MedMNIST v2's rule: the checkpoint is the epoch whose clean one-vs-rest ROC AUC on validation is highest, and
    ``val_auc`` is the AUC the evaluation measures on that checkpoint."""
    from dpaat_core.evaluate.robustness import evaluate
    run = train(small_config("erm", epochs=4, lr=3e-3, early_stop="auc", patience=4), store=tmp_path, run_id="auc")
    metrics = runs.read_metrics(run)
    auc = metrics["val_auc"].to_numpy()
    assert np.isfinite(auc).all() and ((auc > 0) & (auc < 1)).all()
    assert list(metrics["is_best"]) == [bool(a > max(auc[:i], default=-1)) for i, a in enumerate(auc)]
    best = int(metrics["epoch"][np.argmax(auc)])
    assert runs.read_status(run)["best_epoch"] == best
    measured = evaluate(loading.load_model(run), loading.load_run_data(run, "val"), "pgd", "l2", 0.1, 1)
    assert measured.auc == pytest.approx(auc.max(), abs=1e-6)


@pytest.mark.device
def test_a_time_budget_ends_the_run_at_an_epoch_boundary_and_resume_continues_it(tmp_path):
    """``train.max_minutes``: the first epoch boundary past the budget ends the run as a finished one that says why;
    a resume gets a new budget, and the pieces add up to the uninterrupted run."""
    timed = train(device_config(epochs=3, early_stop="none", max_minutes=1e-6), store=tmp_path, run_id="timed")
    assert list(runs.read_metrics(timed)["epoch"]) == [1]                 # any epoch is past a budget of 60 µs
    status = runs.read_status(timed)
    assert status["state"] == "done" and status["stopped_by"] == "max_minutes"
    assert "time budget of 1e-06 min" in status["message"] and "--resume" in status["message"]
    assert runs.read_metrics(timed)["stopped_by"].iloc[-1] == "max_minutes"
    assert runs.read_config(timed)["train"]["max_minutes"] == 1e-6
    resume(timed)                                                          # the config's budget again: one more epoch
    assert list(runs.read_metrics(timed)["epoch"]) == [1, 2]
    resume(timed, max_minutes=60)                                          # a budget that lasts: to the last epoch
    assert list(runs.read_metrics(timed)["epoch"]) == [1, 2, 3]
    status = runs.read_status(timed)
    assert status["state"] == "done" and status["stopped_by"] == "epochs" and status["message"] == "finished"
    assert runs.read_config(timed)["train"]["max_minutes"] == 60
    whole = train(device_config(epochs=3, early_stop="none"), store=tmp_path, run_id="whole")
    a, b = runs.load_weights(timed / "weights.safetensors"), runs.load_weights(whole / "weights.safetensors")
    for k in a:   # bit for bit on the CPU; on CUDA within the tolerance of a bf16 training (see conftest.py)
        torch.testing.assert_close(a[k], b[k], **(dict(rtol=0, atol=0) if EXACT else TRAINED_TOLERANCE))


def test_a_bad_time_budget_is_one_line(tmp_path):
    for value in (0, -1, float("nan"), "5"):
        with pytest.raises(ConfigError, match="train.max_minutes must be a number > 0"):
            small_config(max_minutes=value)
    proc = _cli(*_train_args(tmp_path, "bad", epochs=1), "--max-minutes", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "train.max_minutes must be a number > 0" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_resume_with_more_epochs_trains_a_finished_run_on_as_if_it_had_asked_for_them(tmp_path):
    """A study fixes its length after the first epoch: one epoch then a resume to three is the three-epoch run."""
    straight = train(small_config(epochs=3), store=tmp_path, run_id="straight")
    first = train(small_config(epochs=1), store=tmp_path, run_id="extended")
    assert runs.read_status(first)["state"] == "done"
    resume(first, epochs=3)
    status = runs.read_status(first)
    assert status["state"] == "done" and status["stopped_by"] == "epochs"
    assert runs.read_config(first)["train"]["epochs"] == 3
    a, b = runs.read_metrics(straight), runs.read_metrics(first)
    assert list(b["epoch"]) == [1, 2, 3]
    if EXACT:
        np.testing.assert_array_equal(a["train_loss"].to_numpy(), b["train_loss"].to_numpy())
    with pytest.raises(ConfigError, match="has trained 3 epoch"):
        resume(first, epochs=2)
    cosine = train(small_config(epochs=1, schedule="cosine"), store=tmp_path, run_id="cosine")
    with pytest.raises(ConfigError, match="cosine schedule"):
        resume(cosine, epochs=2)
    step = train(small_config(epochs=1, schedule="step"), store=tmp_path, run_id="step")
    with pytest.raises(ConfigError, match="step schedule"):
        resume(step, epochs=2)


def test_validation_logs_each_classs_robust_accuracy_and_the_runs_table_names_the_weakest(tmp_path):
    run = train(small_config(epochs=1), store=tmp_path, run_id="weak")
    best = runs.read_metrics(run).iloc[-1]
    prefix = "val_per_class_robust_accuracy."
    per_class = {k[len(prefix):]: a for k, a in best.items() if k.startswith(prefix)}
    assert set(per_class) == set(runs.read_record(run).classes)
    assert np.nanmean(list(per_class.values())) == pytest.approx(best["val_robust_balanced_accuracy"])
    low = min(a for a in per_class.values() if a == a)
    first = next(c for c in runs.read_record(run).classes if per_class[c] == low)   # ties: the first in class order
    row = runs.runs_table(runs.list_runs(tmp_path)).set_index("run_id").loc["weak"]
    assert row["val_weakest_robust_class"] == f"{first} {low:.2f}"
