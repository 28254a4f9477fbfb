"""Shared fixtures for the test suite, and the device the ``device``-marked tests run on.

``DPAAT_TEST_DEVICE`` (``cpu``, the default, or ``cuda``) picks where the tests marked ``device``
run their models and tensors: ``DPAAT_TEST_DEVICE=cuda python -m pytest -m device`` runs the
device path on a GPU. On the CPU every test is exactly what it is without the variable. Tests
import what they need from here: ``from conftest import EXACT, TEST_DEVICE, on_device``.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

#: The real HAM10000 sample data shipped beside the repository (``<repo>/../shared/data``).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]

DEVICE_ENV = "DPAAT_TEST_DEVICE"
DEVICE_NAMES = ("cpu", "cuda")
_NAME = os.environ.get(DEVICE_ENV, "").strip() or "cpu"

#: Where the ``device``-marked tests run (``$DPAAT_TEST_DEVICE``, default cpu).
TEST_DEVICE = torch.device(_NAME if _NAME in DEVICE_NAMES else "cpu")

#: Whether results that are bit for bit equal on the CPU may be compared exactly. CUDA kernels may
#: sum in a different order from run to run (atomics, split reductions), so a test that compares two
#: trainings exactly on the CPU compares them with a stated tolerance elsewhere.
EXACT = TEST_DEVICE.type == "cpu"

#: Where not :data:`EXACT`: how close the weights of two trainings that should be the same run must be
#: (``torch.testing.assert_close`` arguments). On CUDA the trainer runs under bf16 autocast (8-bit
#: mantissa: one rounding is a relative step of 2**-8 = 0.4%), so a float32 sum that comes out one ulp
#: different can flip a bf16 rounding and the difference grows from there. Measured on the CPU with
#: the runs of test_train.py (3 epochs of dpaat at lr 3e-4): random relative noise of 1e-4 on every
#: gradient element at every step (a thousand float32 ulps) moved no weight or BatchNorm statistic by
#: more than 1.1e-6; noise of 1e-3 (a quarter of a bf16 step on every element) moved a few by up to
#: 8e-4 and breaks this tolerance. So rtol 1e-3 / atol 1e-4 absorbs rounding noise with a wide margin
#: and still catches a resume that loses state (a resume that drops Adam's moments moves 45 of the
#: tensors of the time-budget test past it, by up to 2e-2). Losses of such runs are compared with its rtol.
TRAINED_TOLERANCE = dict(rtol=1e-3, atol=1e-4)

#: ``train.compile`` for runs the ``device`` tests start: the default (auto: eager on the CPU) on the
#: CPU. On CUDA auto would compile every run with inductor (the compiled path has its own tests in
#: test_fast_path.py, which reset dynamo between runs): off, so these runs see every batch, as on
#: the CPU, and do not pile up recompilations in one process.
TRAIN_COMPILE = None if EXACT else False


def run_cli(*argv) -> subprocess.CompletedProcess:
    """``python -m dpaat_core ARGV`` from the repository root, in this process (a new interpreter spends seconds
    importing torch): its exit status and what it printed, as ``subprocess.run`` gives them. ``SystemExit`` (bad
    flags) is an exit status like the interpreter's; torch's thread count, its global RNG and the SIGTERM handler
    (``train`` sets one) are put back for the tests after. Unlike a subprocess: any other exception propagates to
    the test (a traceback fails it), warnings may go to pytest's recorder rather than stderr, and there is no
    timeout; commands given hostile input that could hang or exhaust the process keep their own interpreter."""
    from dpaat_core.__main__ import main
    argv = [str(a) for a in argv]
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    sigterm = signal.getsignal(signal.SIGTERM)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(REPO_ROOT), \
            torch.random.fork_rng(devices=[]):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
            if not isinstance(code, (int, type(None))):   # a message: printed, status 1, as the interpreter does
                print(code, file=err)
                code = 1
        finally:
            torch.set_num_threads(threads)
            signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(["python", "-m", "dpaat_core", *argv], code or 0, out.getvalue(),
                                       err.getvalue())


def on_device(*tensors: torch.Tensor):
    """``tensors`` moved to :data:`TEST_DEVICE` (one tensor for one argument, else a tuple)."""
    moved = tuple(t.to(TEST_DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def pytest_configure(config):
    if _NAME not in DEVICE_NAMES:
        pytest.exit(f"{DEVICE_ENV} must be one of {', '.join(DEVICE_NAMES)}, got {_NAME!r}", returncode=2)
    if TEST_DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            pytest.exit(f"{DEVICE_ENV}=cuda but no CUDA device is available", returncode=2)
        # float32 means float32: TF32 matmuls/convolutions (10-bit mantissa) would make the float32
        # tolerances of the tests (set on the CPU) mean something else.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # cuDNN picks deterministic algorithms (same shapes, same sums in the same order): the tests
        # that compare two computations of the same thing should not see run-to-run noise.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


class SharedData(type(Path())):
    """The shared data folder as a path whose entries skip the test that asks for one that is absent: a checkout
    copied to a GPU machine may carry only part of ``../shared/data`` (``shared_data / "ham10000_28.npz"`` then
    skips, naming the file, instead of erroring). The entry comes back as a plain path: a test may look deeper for
    files that are not all there."""

    def __truediv__(self, key):
        child = Path(os.fspath(self)) / key
        if not child.exists():
            pytest.skip(f"shared data file {child} not found (see ../shared/data/README.md)")
        return child


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared HAM10000 data folder; a test that uses it is skipped when the folder, or the file it needs, is
    missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared HAM10000 data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SharedData(SHARED_DATA)


def _selects_device_only(config) -> bool:
    return (config.getoption("markexpr", "") or "").strip() == "device"


def pytest_ignore_collect(collection_path, config):
    """Under ``-m device`` only the modules that hold device tests are imported: the others may import what a bare
    GPU image lacks (plotly, streamlit, medmnist), and one failed import would stop the whole run."""
    if _selects_device_only(config) and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return "pytest.mark.device" not in collection_path.read_text(encoding="utf-8", errors="replace")
    return None
