"""bench/gpu_check.py, rehearsed on the CPU: every stage runs and reports its figures; a stage that fails or
overruns its cap is reported and the next one still runs; the run folders travel in one archive."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path, *args, timeout=600):
    out, store = tmp_path / "out", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out),
                           "--store", str(store), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    results = json.loads((out / "results.json").read_text())
    return proc, results, (out / "report.md").read_text(), out


@pytest.mark.slow
def test_quick_check_runs_every_stage_on_the_cpu(tmp_path, shared_data):
    proc, results, report, out = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("env", "tests", "speed", "pair", "archive"):
        assert results[stage]["status"] == "ok", (stage, results[stage].get("error"))
        assert f"## {stage}: ok" in report
    assert results["env"]["peak_tflop_per_s"] > 0 and results["env"]["torch"] in report
    tests = results["tests"]
    assert tests["passed"] > 0 and tests["failed"] == 0 and "-m device" in tests["command"]
    variants = {r["variant"] for r in results["speed"]["rows"]}
    assert {"erm", "pgd_at", "dpaat", "pgd20_eval", "naive_pgd_at"} <= variants
    pair = results["pair"]["runs"]
    assert set(pair) == {"dpaat", "pgd_at"}
    assert pair["dpaat"]["epochs_run"] == pair["pgd_at"]["epochs_run"] == results["pair"]["epochs"]   # equal length
    assert f"Both methods train {results['pair']['epochs']} epochs" in report and "Per class (test split" in report
    for method, r in pair.items():
        assert r["method"] == method and r["epochs_run"] >= 1 and r["stopped_by"] in ("epochs", "early_stop")
        for key in ("clean_accuracy", "balanced_accuracy", "mAP", "pgd20", "ifgsm"):
            assert 0 <= r[key] <= 1, (method, key)
        assert r["pgd20"] <= r["clean_accuracy"] and (r["apgd"] is None or r["apgd"] <= r["pgd20"])
        per_class = r["per_class"]
        assert sum(c["n"] for c in per_class.values()) == r["n_test"]
        assert all(0 <= c["pgd20"] <= 1 and 0 <= c["clean"] <= 1 for c in per_class.values() if c["n"])
        assert 0 <= r["pgd20_balanced"] <= 1
        assert f"| {method} | {r['epochs_run']}/" in report
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    for method in ("dpaat", "pgd_at"):
        run = f"gpu-{method}-resnet8-32"
        for file in ("config.json", "metrics.jsonl", "status.json", "study.json", "weights.safetensors"):
            assert f"{run}/{file}" in names, (run, file)
        assert any(n.startswith(f"{run}/dynamics/epoch_") for n in names)
    assert not any(n.endswith("last.pt") for n in names)          # resume state stays behind
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "runs.tar.gz", "stages.log"]


def test_a_stage_that_overruns_or_fails_is_reported_and_the_next_one_runs(tmp_path):
    proc, results, report, out = _check(tmp_path, "--stages", "env,tests,pair,archive", "--cap", "tests=1",
                                        "--data", str(tmp_path / "no-such-folder"))
    assert proc.returncode == 1
    assert results["env"]["status"] == "ok" and "peak_tflop_per_s" in report      # figures of the stage before
    assert results["tests"]["status"] == "timed out" and "killed at its cap of 1 s" in report
    assert results["pair"]["status"] == "failed" and "no-such-folder" in results["pair"]["error"]
    assert "Traceback" in results["pair"]["runs"]["dpaat"]["error"] and "## pair: failed" in report
    assert results["archive"]["status"] == "failed" and "no run folders" in report
    assert "=== archive" in (out / "stages.log").read_text()                    # it still ran


@pytest.mark.parametrize("args, says", [(["--cap", "tests=0"], "seconds must be a number > 0"),
                                        (["--cap", "train=5"], "unknown stage 'train'"),
                                        (["--stages", "env,gpu"], "--stages: unknown gpu")])
def test_bad_arguments_are_one_line(tmp_path, args, says):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and says in proc.stderr.strip().splitlines()[-1]


def test_device_selection_collects_on_an_image_without_plotly_streamlit_or_medmnist(tmp_path):
    """A bare GPU image has torch but not the dashboard's libraries: ``pytest -m device`` must still collect."""
    for name in ("plotly", "streamlit", "medmnist"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('no {name} on this image')\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}

    def collect(*marks):
        return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *marks, "tests"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)

    everything = collect()
    assert everything.returncode != 0 and "no plotly on this image" in everything.stdout   # the image is bare
    device = collect("-m", "device")
    assert device.returncode == 0, device.stdout[-3000:]
    collected = [line for line in device.stdout.splitlines() if "::" in line]
    assert collected and all(line.split("::")[0] in {
        "tests/test_attacks.py", "tests/test_attribution.py", "tests/test_evaluate.py", "tests/test_fast_path.py",
        "tests/test_objectives.py", "tests/test_strong.py", "tests/test_train.py"} for line in collected)


def test_a_missing_shared_file_skips_the_test_that_needs_it(tmp_path):
    from conftest import SharedData
    (tmp_path / "here.npz").write_bytes(b"")
    folder = SharedData(tmp_path)
    assert folder / "here.npz" == tmp_path / "here.npz"
    with pytest.raises(pytest.skip.Exception, match="missing.npz not found"):
        folder / "missing.npz"
    deeper = folder / "here.npz" / "not-there"          # below an entry, paths are plain: a test may probe them
    assert type(deeper) is type(tmp_path) and not deeper.exists()


def test_a_study_fits_as_many_epochs_as_the_slowest_first_epoch_allows():
    from gpu_study import pick_epochs
    assert pick_epochs([10.0, 12.0], 100.0, 50) == 1 + 8      # the slowest first epoch sets the pace
    assert pick_epochs([10.0], 1000.0, 50) == 50             # never past the most asked for
    assert pick_epochs([10.0], -5.0, 50) == 1                # the first epoch is always kept


@pytest.mark.slow
def test_study_rehearsal_trains_every_run_at_once_for_the_same_length_and_writes_study_rows(tmp_path, shared_data):
    out, store = tmp_path / "out", tmp_path / "runs"
    proc = subprocess.run([sys.executable, "bench/gpu_study.py", "--device", "cpu", "--quick", "--methods", "dpaat",
                           "pgd_at", "--seeds", "0", "1", "--epochs", "2", "--minutes", "5", "--out", str(out),
                           "--store", str(store)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 2 and len(results["runs"]) == 4
    for rid, r in results["runs"].items():
        assert r["epochs_run"] == 2 and r["method"] in ("dpaat", "pgd_at"), rid
        assert sum(c["n"] for c in r["per_class"].values()) == r["n_test"]
        for key in ("clean_accuracy", "pgd20", "pgd20_balanced", "ifgsm", "apgd"):
            assert 0 <= r[key] <= 1, (rid, key)
        assert (store / rid / "study.json").is_file()
        assert runs_state(store / rid) == "done"
    assert results["solo_images_per_second"] > 0 and results["aggregate_images_per_second"] > 0
    import pandas as pd
    rows = pd.read_csv(out / "collect" / "study.csv")                 # bench/study.py collect's own format
    assert sorted(rows["run"]) == sorted(results["runs"]) and set(rows["study"]) == {"quick32"}
    assert "pgd20:akiec" in rows.columns
    report = (out / "report.md").read_text()
    assert "Every run trains 2 epochs" in report and "One run alone" in report and "PGD-20 per class" in report


def runs_state(run_dir):
    from dpaat_core.store import runs
    return runs.read_status(run_dir)["state"]


def test_study_refuses_a_folder_without_metadata_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_study.py", "--device", "cpu", "--data", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no HAM10000_metadata.csv" in proc.stderr.strip().splitlines()[-1]
