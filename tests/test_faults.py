"""Faults a careful user or a hostile visitor can cause, each with the run store holding up.

Run this file alone to see the list hold: a stale "running" status whose pid now belongs to another process
(Stop kills nothing), a heartbeat that proves a run alive, two merges of robustness.csv at the same instant
(no curve lost), and a second trainer on a live run (refused, one line)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from dpaat_core.cli import launch
from dpaat_core.store import liveness, locks, runs
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train.loop import _StatusWriter, train
from dpaat_core.train.distributed import World

ROOT = Path(__file__).resolve().parents[1]


def _tiny_run(store: Path, name="r") -> Path:
    cfg = RunConfig().replace(data={"spec": "synthetic:n=24,classes=3", "image_size": 16}, attack={"steps": 1},
                              method=method_config("erm"), train={"epochs": 1, "batch_size": 16, "device": "cpu"})
    return train(cfg, store=store, run_id=name)


def _claim_running(run: Path, **fields) -> None:
    """Make the run's status say "running" as a crashed trainer would have left it."""
    status = runs.read_status(run) | {"state": "running", "host": socket.gethostname(), "updated": time.time()}
    for key in ("pid_start", "boot_id"):
        status.pop(key, None)
    runs.atomic_write_json(run / "status.json", status | fields)


@pytest.fixture
def stranger():
    """An unrelated process, as the one that inherits a dead trainer's pid after a crash or a reboot."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_stale_status_with_a_reused_pid_is_listed_interrupted_and_stop_kills_nothing(tmp_path, stranger):
    run = _tiny_run(tmp_path)
    assert (run / locks.WRITER_LOCK).is_file()
    _claim_running(run, pid=stranger.pid)                 # fresh heartbeat, but nobody holds the run's writer lock
    listed = runs.load_run(run)
    assert listed.state == "interrupted" and "--resume" in listed.problem
    assert launch.stop(run) is False
    time.sleep(0.2)
    assert stranger.poll() is None                        # the stranger lives


def test_a_run_from_before_the_lock_is_judged_by_its_pid_start_time(tmp_path, stranger):
    run = _tiny_run(tmp_path)
    (run / locks.WRITER_LOCK).unlink()                    # as a run written by an older version
    real = liveness.process_identity(stranger.pid)
    assert real, "this test needs /proc"
    _claim_running(run, pid=stranger.pid, pid_start=real["pid_start"] + 1, boot_id=real["boot_id"])
    assert runs.load_run(run).state == "interrupted" and "belongs to another process" in runs.load_run(run).problem
    assert launch.stop(run) is False
    _claim_running(run, pid=stranger.pid, updated=time.time() - 2 * liveness.STALE_SECONDS)   # no identity, no heartbeat
    assert runs.load_run(run).state == "interrupted"
    assert launch.stop(run) is False
    time.sleep(0.2)
    assert stranger.poll() is None
    _claim_running(run, pid=stranger.pid, **real)         # the identity matches: that is the run's process
    assert runs.load_run(run).state == "running"


def test_the_heartbeat_refreshes_a_running_status_and_stops_with_the_run(tmp_path):
    run = tmp_path / "beat"
    run.mkdir()
    writer = _StatusWriter(run, World(), epochs=3, heartbeat=0.1)
    writer.epoch_end(1, 1)
    first = runs.read_status(run)["updated"]
    time.sleep(0.5)
    assert runs.read_status(run)["updated"] > first       # refreshed with no progress made
    assert runs.read_status(run)["epochs_done"] == 1
    writer.done(1)
    done = runs.read_status(run)
    time.sleep(0.4)
    assert runs.read_status(run) == done and done["state"] == "done"


MERGER = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from dpaat_core.store import runs
    run, who, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for k in range(10):
        while time.time() < start + 0.4 * k:      # both processes merge at the same instant, ten times
            pass
        curve = pd.DataFrame({"attack": "pgd", "norm": "l2", "steps": 100 + 2 * k + who, "monotone": True,
                              "split": "test", "data": "d", "eps": [0.0, 0.5], "accuracy": [0.9, 0.4]})
        runs.save_robustness(run, curve)
""")


def test_two_merges_of_robustness_csv_at_the_same_instant_lose_no_curve(tmp_path):
    run = tmp_path / "merge"
    run.mkdir()
    start = time.time() + 6                               # time for both interpreters to import pandas
    procs = [subprocess.Popen([sys.executable, "-c", MERGER, str(run), str(who), str(start)], cwd=ROOT)
             for who in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    curves = runs.read_robustness(run)
    assert sorted(curves["steps"].unique()) == list(range(100, 120))      # 20 curves: every one of both writers
    assert len(curves) == 40 and not list(run.glob(".*.tmp"))


def _train_cli(store: Path, name: str, epochs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dpaat_core", "train", "--data", "synthetic:n=96,classes=3",
                             "--model", "resnet8", "--method", "dpaat", "--epochs", str(epochs), "--image-size", "16",
                             "--steps", "2", "--batch-size", "16", "--device", "cpu", "--early-stop", "none",
                             "--store", str(store), "--name", name, "--quiet"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_second_trainer_on_a_live_run_is_refused_and_the_run_stays_whole(tmp_path):
    first = _train_cli(tmp_path, "live", epochs=30)
    run = tmp_path / "live"
    deadline = time.time() + 120
    while not (run / "last.pt").is_file():                # one epoch done: a resume would have state to take
        assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "dpaat_core", "train", "--resume", str(run), "--device", "cpu",
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "already being trained by process" in second.stderr and str(first.pid) in second.stderr
    assert runs.load_run(run).state == "running"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert runs.load_run(run).state == "interrupted"      # the lock died with its holder
    resumed = subprocess.run([sys.executable, "-m", "dpaat_core", "train", "--resume", str(run), "--device", "cpu",
                              "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))                   # every epoch once: no 1, 2, 3, 3


# --- bad inputs: one clear line, nothing saved is lost -------------------------------------------------------------

def _cli_main(*argv) -> tuple[int, str, str]:
    """``python -m dpaat_core ARGV`` in this process: exit code, stdout, stderr."""
    import contextlib
    import io

    from dpaat_core.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _one_line(err: str) -> bool:
    """The command's refusal is one ``error:`` line (progress bars aside) and no traceback."""
    lines = err.strip().splitlines()
    return bool(lines) and lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1 \
        and "Traceback" not in err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny_run(tmp_path_factory.mktemp("tiny"), "tiny")


def test_a_store_that_cannot_be_written_keeps_the_computed_curves(tiny, monkeypatch, tmp_path):
    import os
    real = os.replace

    def full_disk(src, dst, *a, **k):
        if str(dst).endswith("robustness.csv"):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "replace", full_disk)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    before = set(tiny.iterdir())
    code, out, err = _cli_main("evaluate", str(tiny), "--steps", "1", "--eps-grid", "0,0.5", "--device", "cpu")
    assert code == 2 and _one_line(err) and "No space left on device" in err
    kept = list(tmp_path.glob("tiny-robustness-*.csv"))
    assert len(kept) == 1 and str(kept[0]) in err
    curve = pd.read_csv(kept[0])
    assert list(curve["eps"]) == [0.0, 0.5] and "attack,norm" in out        # printed too
    assert set(tiny.iterdir()) <= before | {tiny / locks.MERGE_LOCK}       # no .tmp left in the run


def test_a_killed_writers_temp_file_is_cleared_by_the_next_merge(tiny):
    stale = tiny / ".robustness.csv.k1ll3d.tmp"
    stale.write_text("attack,norm\npgd,l2")
    curve = pd.DataFrame({"attack": "pgd", "norm": "l2", "steps": 1, "monotone": True, "split": "test", "data": "d",
                          "eps": [0.0], "accuracy": [1.0]})
    runs.save_robustness(tiny, curve)
    assert not stale.exists() and len(runs.read_robustness(tiny)) >= 1


def _png(path: Path, array, mode=None) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_a_symlink_loop_in_a_folder_dataset_counts_each_image_once(tmp_path):
    import numpy as np

    from dpaat_core.data import load_dataset
    rng = np.random.default_rng(0)
    for c in ("mel", "nv"):
        for i in range(4):
            _png(tmp_path / "d" / c / f"{i}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "d" / "mel" / "loop").symlink_to("..")                # mel/loop -> d: a way back up
    (tmp_path / "d" / "nv" / "again").symlink_to(tmp_path / "d" / "nv")
    splits = [load_dataset(f"folder:{tmp_path / 'd'}", s, 16, progress=False) for s in ("train", "val", "test")]
    ids = [i for ds in splits for i in ds.source_ids]
    assert len(ids) == 8 and len(set(ids)) == 8


def test_a_walk_over_a_huge_tree_stops_at_its_bound(monkeypatch):
    from dpaat_core.data import DataError, folder, load_dataset
    monkeypatch.setattr(folder, "MAX_ENTRIES", 2000)
    t0 = time.time()
    with pytest.raises(DataError, match="without finishing: point the spec at a dataset folder"):
        load_dataset("folder:/", "train", 16, progress=False)
    assert time.time() - t0 < 30


def test_16_bit_and_transparent_and_mpo_images_are_read_as_they_look(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from dpaat_core.data import load_dataset
    from dpaat_core.data.images import decode_upload
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    for c in ("a", "b"):
        for i in range(5):
            _png(tmp_path / "d" / c / f"{i}.png", ramp)
    images = load_dataset(f"folder:{tmp_path / 'd'}", "train", 16, progress=False).images
    assert images.min() < 20 and images.max() > 235 and 100 < images.float().mean() < 155     # a ramp, not white
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    upload = decode_upload(buf.getvalue(), 16)
    assert upload.min() < 20 and upload.max() > 235
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:8, :, 3] = 200, 255                              # top half opaque red, bottom transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    x = decode_upload(buf.getvalue(), 16)
    assert tuple(x[:, 2, 2]) == (200, 0, 0) and tuple(x[:, 13, 2]) == (255, 255, 255)
    buf = io.BytesIO()
    first, second = (Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (90, 10))
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    assert abs(float(decode_upload(buf.getvalue(), 16).mean()) - 90) < 2


def _npz(path: Path, train_labels, classes=None) -> Path:
    import numpy as np
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8) for s in ("train", "val", "test")}
    arrays |= {"train_labels": np.array(train_labels), "val_labels": np.array([0, 1, 2] * 2),
               "test_labels": np.array([0, 1, 2] * 2)}
    if classes is not None:
        arrays["classes"] = np.array(classes)
    np.savez(path, **arrays)
    return path


def test_a_mistyped_label_is_an_error_that_names_it(tmp_path):
    code, _, err = _cli_main("data", f"npz:{_npz(tmp_path / 'typo.npz', [0, 1, 2, 99, 0, 1])}")
    assert code == 2 and "labels run from 0 to 99" in err and "99" in err and _one_line(err)


def test_evaluating_on_data_with_other_class_names_is_refused(tiny, tmp_path):
    other = _npz(tmp_path / "other.npz", [0, 1, 2] * 2, classes=["mel", "nv", "bcc"])
    code, _, err = _cli_main("evaluate", str(tiny), "--data", f"npz:{other}", "--steps", "1", "--device", "cpu")
    assert code == 2 and "mel, nv, bcc" in err and _one_line(err)
    assert ", ".join(runs.read_config(tiny)["dataset"]["classes"]) in err


@pytest.mark.parametrize("argv, says", [
    (["train", "--norm", "linf", "--eps", "5"], "attack.eps must be a number > 0 and < 1 for linf"),
    (["train", "--eps", "100", "--image-size", "16"], "at most sqrt(3)*16 = 27.71 for l2 at 16 px"),
    (["evaluate", "--norm", "linf", "--eps-grid", "0,2"], "linf eps above 1 means nothing"),
    (["evaluate", "--eps-grid", "0,50"], "l2 eps above 27.71 means nothing for 3x16x16 images"),
    (["evaluate", "--eps-grid", "nan"], "--eps-grid values must be >= 0 and finite"),
    (["evaluate", "--eps-grid", "0,inf"], "--eps-grid values must be >= 0 and finite"),
    (["evaluate", "--eps-grid", "1e9"], "l2 eps above 27.71"),
    (["evaluate", "--steps", "1000000000"], "--steps must be from 1 to 1000"),
    (["attribute", "--steps", "1000000000"], "--steps from 1 to 1000"),
])
def test_out_of_range_attack_settings_are_one_line(tiny, tmp_path, argv, says):
    command, *rest = argv
    if command == "train":
        rest = ["--data", "synthetic:n=24,classes=3", "--model", "resnet8", "--method", "pgd_at", "--epochs", "1",
                "--store", str(tmp_path), *rest]
    else:
        rest = [str(tiny), *rest, "--device", "cpu"] if command == "evaluate" else [str(tiny), *rest]
    code, _, err = _cli_main(command, *rest)
    assert code == 2 and says in err and _one_line(err), err
    assert not list(tmp_path.iterdir())                                       # nothing was made


def test_help_says_the_step_bound():
    import contextlib
    import io

    from dpaat_core.__main__ import build_parser
    for command in ("evaluate", "attribute"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "1 to 1000" in " ".join(out.getvalue().split())


def test_a_store_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = _cli_main("train", "--data", "synthetic:n=24,classes=3", "--model", "resnet8", "--method", "erm",
                             "--epochs", "1", "--device", "cpu", "--store", str(tmp_path / "file"), "--quiet")
    assert code == 2 and "must be a folder" in err and _one_line(err)
    code, _, err = _cli_main("runs", "--store", str(tmp_path / "file"))
    assert code == 2 and "must be a folder" in err and _one_line(err)


def test_npz_headers_are_read_before_their_data(tmp_path):
    import io
    import zipfile

    import numpy as np

    def npy(shape, descr="|u1", data=b""):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
        return buf.getvalue() + data

    labels = npy((2,), "<i8", np.zeros(2, np.int64).tobytes())
    for shape, says in (((140_000, 300, 300, 3), "35.2 GiB, over the 16 GiB limit"),
                        ((15_000, 300, 300, 3), "corrupt or truncated")):     # 4 GB declared, no data behind it
        path = tmp_path / "h.npz"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("train_images.npy", npy(shape))
            for split in ("train", "val", "test"):
                z.writestr(f"{split}_labels.npy", labels)
        code, _, err = _cli_main("data", f"npz:{path}", "--split", "train")
        assert code == 2 and says in err and "unpickl" not in err and _one_line(err)


def test_resume_on_data_of_another_class_count_is_one_line(tmp_path):
    run = _tiny_run(tmp_path)
    config = runs.read_config(run)
    config["data"]["spec"] = "synthetic:n=24,classes=5"                   # edited by hand after training
    runs.atomic_write_json(run / "config.json", config)
    runs.write_status(run, "stopped", "stopped on request")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    code, _, err = _cli_main("train", "--resume", str(run), "--device", "cpu", "--quiet")
    assert code == 2 and "trained on 3 classes and its data now gives 5" in err and _one_line(err)


def test_a_run_with_broken_weights_or_resume_state_is_listed_with_its_problem(tmp_path):
    truncated, garbage = _tiny_run(tmp_path, "truncated"), _tiny_run(tmp_path, "garbage")
    data = (truncated / "weights.safetensors").read_bytes()
    (truncated / "weights.safetensors").write_bytes(data[: len(data) // 2])
    (garbage / "last.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")      # a pickle, not a checkpoint
    listed = {r.run_id: r for r in runs.list_runs(tmp_path)}
    assert listed["truncated"].state == "corrupt" and "weights.safetensors is unreadable" in listed["truncated"].problem
    assert listed["garbage"].state == "corrupt" and "last.pt is unreadable" in listed["garbage"].problem
    code, out, _ = _cli_main("runs", "--store", str(tmp_path))
    assert code == 0 and "corrupt" in out


def test_bad_files_are_warnings_on_the_pages_that_read_them(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dpaat_core.models import build_model
    cfg = RunConfig().replace(data={"spec": "synthetic:n=32,classes=3", "image_size": 16}, attack={"steps": 1},
                              method=method_config("dpaat"), train={"epochs": 2, "batch_size": 16, "device": "cpu"})
    run = train(cfg, store=tmp_path, run_id="hurt")
    (run / "dynamics" / "epoch_001.npz").write_bytes(b"PK\x03\x04 not really")
    monkeypatch.setenv("DPAAT_STORE", str(tmp_path))
    app = ROOT / "dashboard" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120).run()
    at.switch_page("views/dynamics.py").run()
    assert not at.exception
    assert any("dynamics/epoch_001.npz cannot be read" in w.value for w in at.warning)
    assert len(at.get("plotly_chart")) >= 3                                   # epoch 2 still drawn
    other = {k: v for k, v in build_model("resnet8", 5).state_dict().items()}      # another model's weights
    runs.save_weights(run / "weights.safetensors", other)
    for page in ("robustness", "attribution"):
        at = AppTest.from_file(str(app), default_timeout=120).run()
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, page
        assert any("its weights cannot be loaded" in w.value for w in at.warning), page
        assert not any(str(tmp_path) in w.value for w in at.warning), page           # no server path shown


def test_a_served_dashboard_shows_no_tracebacks():
    import tomllib
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"
