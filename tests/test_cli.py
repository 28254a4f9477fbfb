"""python -m dpaat_core data: inspect a data spec; bad input exits 2 with one line."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dpaat_core", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_data_command_lists_splits_and_classes():
    out = _cli("data", "synthetic:n=40,classes=3", "--image-size", "16")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.strip().startswith("train") and " 40 images" in line for line in lines)
    assert "3x16x16" in out.stdout and "with lesion masks" in out.stdout


def test_bad_spec_exits_2_with_a_clear_line(tmp_path):
    out = _cli("data", f"npz:{tmp_path / 'nothing.npz'}")
    assert out.returncode == 2
    assert "nothing.npz: no such file" in out.stderr and "Traceback" not in out.stderr
    out = _cli("data", "mnist:foo")
    assert out.returncode == 2 and "unknown data source 'mnist'" in out.stderr
