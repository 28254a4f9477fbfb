"""The GPU fast path, on the CPU: the compile switch (config, CLI, a compiled run equals an eager
one and drops the last incomplete batch), device-resident data, bf16 evaluation, bench/gpu_speed.py.

The tests marked ``device`` run on ``$DPAAT_TEST_DEVICE`` (see conftest.py): on CUDA the compiled
runs go through inductor (mode reduce-overhead, CUDA graphs) and train under bf16 autocast."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpaat_core.store import runs
from dpaat_core.__main__ import build_parser
from dpaat_core.cli.train import config_from_args
from dpaat_core.config import ConfigError, RunConfig, method_config
from dpaat_core.data import load_dataset
from dpaat_core.evaluate.robustness import evaluate, robustness_curve
from dpaat_core.attack.folding import folded_eval_view
from dpaat_core.models import build_model
from dpaat_core.train.loop import COMPILE_BACKEND_ENV, compile_enabled, make_batch, resident_split, train
from test_evaluate import trained  # noqa: F401  (the module's trained resnet8 and its test split)
from conftest import EXACT, TEST_DEVICE

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("train_loss", "train_ce_clean", "train_ce_adv", "train_sync", "delta_loss_mean", "val_loss")
# A compiled run against an eager one. On the CPU both are float32 and agree to float rounding. On CUDA
# both train under bf16 autocast, and inductor fuses what eager rounds to bf16 op by op (it may keep a
# fused intermediate in float32), so the two differ by bf16 rounding: 8 mantissa bits, a relative step
# of 2**-8 = 0.4% per rounding, compounded over a few layers and two optimizer steps. Losses here are
# O(1) (cross-entropies of 3 classes) and ΔL is a difference of two of them, hence atol as well as rtol.
COMPILED_LOSS_TOL = dict(rtol=1e-4) if EXACT else dict(rtol=2e-2, atol=2e-2)
COMPILED_DELTA_LOSS_TOL = dict(rtol=1e-4, atol=1e-6) if EXACT else dict(rtol=2e-2, atol=2e-2)


def run_config(n: int, compile=None, epochs=1, device=TEST_DEVICE.type) -> RunConfig:
    return RunConfig().replace(data={"spec": f"synthetic:n={n},classes=3", "image_size": 16}, attack={"steps": 2},
                               method=method_config("dpaat"), train={"epochs": epochs, "batch_size": 16,
                                                                     "device": device, "early_stop": "none",
                                                                     "compile": compile})


# --- the switch -------------------------------------------------------------------------------

def test_compile_setting_validates_and_round_trips():
    assert RunConfig().train.compile is None
    for value in (None, True, False):
        cfg = run_config(32, value)
        assert RunConfig.from_dict(cfg.to_dict()).train.compile is value
    for bad in ("yes", 1, 0, "true"):
        with pytest.raises(ConfigError, match="train.compile"):
            run_config(32, bad)
    old = run_config(32).to_dict()
    del old["train"]["compile"]                          # a config.json written before the switch existed
    assert RunConfig.from_dict(old).train.compile is None
    assert compile_enabled(None, torch.device("cpu")) is False and compile_enabled(None, torch.device("cuda")) is True
    assert compile_enabled(True, torch.device("cpu")) is True and compile_enabled(False, torch.device("cuda")) is False


@pytest.mark.parametrize("flag, value", [([], None), (["--compile"], True), (["--no-compile"], False)])
def test_compile_flag_reaches_the_config(flag, value, capsys):
    args = build_parser().parse_args(["train", "--data", "synthetic:n=24", "--model", "resnet8", "--method", "erm",
                                      "--epochs", "1", *flag])
    assert config_from_args(args).train.compile is value
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-compile" in help_text and "drops the last incomplete batch" in help_text


# --- a compiled run -------------------------------------------------------------------------

@pytest.fixture
def compile_backend(monkeypatch):
    """On the CPU torch.compile without an inductor build (aot_eager), on CUDA the real one (inductor, as
    training picks it); and a fresh compile cache (the recompile limit counts per code object)."""
    if TEST_DEVICE.type == "cpu":
        monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    else:
        monkeypatch.delenv(COMPILE_BACKEND_ENV, raising=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.device
def test_a_compiled_run_has_the_eager_runs_losses(tmp_path, compile_backend):
    eager = train(run_config(32, False), store=tmp_path, run_id="eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    compiled = train(run_config(32, True), store=tmp_path, run_id="compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1     # the compiled path did run
    a, b = runs.read_metrics(eager), runs.read_metrics(compiled)
    for col in LOSSES:
        np.testing.assert_allclose(b[col], a[col], **COMPILED_LOSS_TOL, err_msg=col)
    da, db = runs.load_dynamics(eager, 1), runs.load_dynamics(compiled, 1)
    np.testing.assert_array_equal(da["index"], db["index"])
    np.testing.assert_allclose(db["delta_loss"], da["delta_loss"], **COMPILED_DELTA_LOSS_TOL)
    for m in (a, b):
        assert (m["data_seconds"] >= 0).all() and (m["data_seconds"] <= m["train_seconds"]).all()


@pytest.mark.device
def test_a_compiled_run_drops_the_last_incomplete_batch(tmp_path, compile_backend):
    n, batch = 40, 16
    run = train(run_config(n, True), store=tmp_path, run_id="compiled")
    dyn = runs.load_dynamics(run, 1)
    assert len(dyn["index"]) == len(set(dyn["index"])) == (n // batch) * batch    # 32 of 40
    assert runs.read_metrics(run)["data_seconds"].notna().all()


# --- device-resident data -------------------------------------------------------------------

def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_resident_split_batches_equal_host_batches(device):
    ds = load_dataset("synthetic:n=24,classes=3", "train", 16)
    images, labels = resident_split(ds, torch.device(device))
    assert images.device.type == device and labels.device.type == device
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    if device == "cpu":
        assert images.data_ptr() == ds.images.data_ptr()       # no copy on the CPU
    idx = torch.tensor([5, 0, 17, 3, 3, 11])
    host = make_batch(ds.images, ds.labels, idx, "flips", torch.Generator().manual_seed(4), False)
    gen = torch.Generator(device=device).manual_seed(4)
    on_device = make_batch(images, labels, idx.to(device), "flips", gen, device == "cuda")
    if device == "cpu":
        for h, d in zip(host, on_device):
            torch.testing.assert_close(d, h, rtol=0, atol=0)
    else:   # CUDA draws other flips from the same seed: compare each image with its flips
        x = on_device[0].cpu()
        plain = ds.images[idx].float() / 255
        assert all(any(torch.equal(x[i], v) for v in (p, p.flip(2), p.flip(1), p.flip(1).flip(2)))
                   for i, p in enumerate(plain))
        torch.testing.assert_close(on_device[1].cpu(), host[1], rtol=0, atol=0)
    x, y, i = host
    assert x.shape == (6, 3, 16, 16) and 0 <= x.min() and x.max() <= 1 and torch.equal(y, ds.labels[idx])


# --- bf16 evaluation ------------------------------------------------------------------------

@pytest.mark.device
def test_bf16_evaluation_is_close_to_float32(trained):  # noqa: F811
    _, model, ds = trained
    ref = evaluate(model, ds, "pgd", "l2", eps=0.5, steps=5)
    amp = evaluate(model, ds, "pgd", "l2", eps=0.5, steps=5, amp=True)
    assert abs(amp.accuracy - ref.accuracy) <= 0.05 and abs(amp.robust_accuracy - ref.robust_accuracy) <= 0.05
    assert 0 < ref.robust_accuracy < ref.accuracy                     # the attack does something to compare
    assert amp.samples.margin_adv.dtype == np.float32                 # logits come back in float32
    curve = robustness_curve(model, ds, [0, 0.25, 0.5], "pgd", "l2", steps=5)
    curve_amp = robustness_curve(model, ds, [0, 0.25, 0.5], "pgd", "l2", steps=5, amp=True)
    assert (curve_amp.accuracy - curve.accuracy).abs().max() <= 0.05
    assert len(ds) >= 24


@pytest.mark.device
def test_bn_folding_survives_bf16_autocast():
    model = build_model("resnet8", 3).to(TEST_DEVICE).eval()
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        assert folded_eval_view(model, torch.rand(4, 3, 16, 16, device=TEST_DEVICE)) is not None


# --- the benchmark --------------------------------------------------------------------------

@pytest.mark.slow
def test_gpu_speed_quick_prints_the_table(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_speed.py", "--device", "cpu", "--quick", "--csv",
                          str(tmp_path / "speed.csv")], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    for word in ("erm", "pgd_at", "dpaat", "pgd20_eval", "naive", "images/s", "MFU", "dpaat/pgd_at"):
        assert word in out.stdout, word
    assert (tmp_path / "speed.csv").read_text().count("\n") == 6      # header + 5 variants


def test_resuming_a_run_from_before_the_switch_keeps_every_batch(tmp_path, compile_backend):
    """A config.json without ``train.compile`` (written before the switch) resumes eager, seeing every sample;
    an explicit ``compile=True`` still compiles and drops the last incomplete batch."""
    import json

    from dpaat_core.train.loop import resume, resume_config
    cfg = run_config(40, compile=None, epochs=3, device="cpu")
    cfg = cfg.replace(train={"max_minutes": 1e-6})               # one epoch per call
    run = train(cfg, store=tmp_path, run_id="old")
    assert resume_config(run).train.compile is None              # written with the key: stays auto
    config = json.loads((run / "config.json").read_text())
    del config["train"]["compile"]                               # as written before the switch existed
    (run / "config.json").write_text(json.dumps(config))
    assert resume_config(run).train.compile is False             # auto would compile on CUDA: off, every batch
    resume(run)
    resume(run, compile=True)
    seen = [len(runs.load_dynamics(run, e)["index"]) for e in (1, 2, 3)]
    assert seen == [40, 40, 32]                                  # eager, eager (kept every batch), compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_evaluate_command_passes_amp_to_the_curves(trained, monkeypatch, capsys):  # noqa: F811
    from dpaat_core.cli import evaluate as cli_evaluate
    from dpaat_core.__main__ import main

    run, _, _ = trained
    seen = []
    real = cli_evaluate.robustness_curve
    monkeypatch.setattr(cli_evaluate, "robustness_curve", lambda *a, **k: seen.append(k["amp"]) or real(*a, **k))
    assert main(["evaluate", str(run), "--eps-grid", "0,0.2", "--max-samples", "8", "--amp"]) == 0
    assert main(["evaluate", str(run), "--eps-grid", "0,0.2", "--max-samples", "8"]) == 0
    assert seen == [True, False]
