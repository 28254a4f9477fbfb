"""Launching training as a separate process, and stopping it."""
import time

import pytest

from dpaat_core import launch, runs
from dpaat_core.__main__ import build_parser
from dpaat_core.cli_train import config_from_args
from dpaat_core.config import RunConfig, method_config


def _config(epochs=1, **method) -> RunConfig:
    cfg = RunConfig()
    cfg.data.spec, cfg.data.image_size, cfg.data.max_samples = "synthetic:n=24,classes=3", 16, 20
    cfg.attack.steps, cfg.attack.norm, cfg.attack.eps = 1, "linf", 0.05
    cfg.method = method_config("dpaat", **method)
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device, cfg.train.augment = epochs, 8, "cpu", False
    return cfg.validate()


@pytest.mark.parametrize("method", [dict(), dict(gamma=0.2, memoryless=True, threshold="quantile:0.7", lam=2.0)])
def test_the_command_line_re_makes_the_config(method, tmp_path):
    cfg = _config(**method)
    argv = launch.train_argv(cfg, tmp_path, "x")
    args = build_parser().parse_args(argv[3:])
    assert config_from_args(args) == cfg and args.store == str(tmp_path) and args.name == "x"


def _wait(run_dir, states, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "status.json").exists() and runs.read_status(run_dir).get("state") in states:
            return runs.read_status(run_dir)
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} did not reach {states}")


@pytest.mark.slow
def test_launch_trains_in_its_own_process_and_stop_ends_it(tmp_path):
    launch.launch(_config(), tmp_path, "quick")
    assert _wait(tmp_path / "quick", {"done"})["state"] == "done"
    assert runs.load_run(tmp_path / "quick").has_weights and launch.log_path(tmp_path, "quick").is_file()
    with pytest.raises(runs.RunError, match="already exists"):
        launch.launch(_config(), tmp_path, "quick")

    launch.launch(_config(epochs=500), tmp_path, "long")
    deadline = time.time() + 120
    while not (tmp_path / "long" / "last.pt").exists():     # at least one epoch done
        assert time.time() < deadline
        time.sleep(0.1)
    assert launch.stop(tmp_path / "long")
    status = _wait(tmp_path / "long", {"stopped"})
    assert "--resume" in status["message"] and not launch.stop(tmp_path / "long")   # nothing left to stop
