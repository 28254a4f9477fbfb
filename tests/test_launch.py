"""Launching training as a separate process, and stopping it."""
import time

import pytest

from dpaat_core.cli import launch
from dpaat_core.store import runs
from dpaat_core.__main__ import build_parser
from dpaat_core.cli.train import config_from_args
from dpaat_core.config import AttackConfig, DataConfig, ModelConfig, RunConfig, TrainConfig, method_config


def _config(epochs=1, **method) -> RunConfig:
    return RunConfig().replace(
        data={"spec": "synthetic:n=24,classes=3", "image_size": 16, "max_samples": 20},
        attack={"steps": 1, "norm": "linf", "eps": 0.05}, method=method_config("dpaat", **method),
        train={"epochs": epochs, "batch_size": 8, "device": "cpu", "augment": False})


def _everything_off_default(pretrained=False, init_from=None) -> RunConfig:
    """A config in which every field differs from its default: ``pretrained`` where asked (training with it needs
    torchvision's cached ImageNet weights), else ``init_from`` where given (a run to start from; the two exclude
    each other)."""
    return RunConfig(
        data=DataConfig(spec="synthetic:n=24,classes=3", image_size=16, max_samples=20, root="/r"),
        model=ModelConfig(name="resnet18", pretrained=pretrained, init_from=init_from),
        attack=AttackConfig(norm="linf", eps=0.05, alpha_ratio=0.4, steps=2, eval_mode=False),
        method=method_config("dpaat", gamma=0.2, beta_clean=0.5, lam=2.0, adv_weight=0.9, sync="js",
                             memoryless=True, threshold="quantile:0.7", ema_momentum=0.8, eps_min_ratio=0.3,
                             eps_max_ratio=1.5, attack="kl"),
        train=TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=1e-4, schedule="cosine",
                          imbalance="balanced_sampler", early_stop="robust_accuracy", patience=2, augment=False,
                          seed=3, device="cpu", compile=False, max_minutes=30.0))


#: filled in by the trainer from ``model.init_from`` (the source run's), not settings a config gives; the noise's
#: sigma, which a dpaat config cannot set (the gaussian method's alone: test_the_command_line_carries_gaussian_sigma);
#: and class_renorm, which excludes the memoryless dpaat above (test_the_command_line_carries_class_renorm)
DERIVED = {("model", "normalization"), ("model", "gradcam_layer"), ("method", "sigma"), ("method", "class_renorm")}


def _off_default(cfg: RunConfig, skip=()) -> list[str]:
    """The fields of ``cfg`` that still hold their default (the method's against the dpaat preset)."""
    default = RunConfig().to_dict()
    return [f"{sec}.{k}" for sec, values in cfg.to_dict().items() for k, v in values.items()
            if v == default[sec][k] and (sec, k) not in {("method", "name"), ("method", "adaptive"), *DERIVED, *skip}]


@pytest.mark.parametrize("model, skip", [({"pretrained": True}, {("model", "init_from")}),
                                         ({"init_from": "/runs/theirs"}, {("model", "pretrained")})])
def test_the_command_line_carries_every_field(tmp_path, model, skip):
    cfg = _everything_off_default(**model)
    assert _off_default(cfg, skip) == []              # the test would see a field the launch dropped
    file = launch.config_path(tmp_path, "x")
    file.parent.mkdir(parents=True)
    runs.atomic_write_json(file, cfg.to_dict())
    args = build_parser().parse_args(launch.train_argv(file, tmp_path, "x")[3:])
    assert config_from_args(args) == cfg and args.store == str(tmp_path) and args.name == "x"


def test_the_command_line_carries_gaussian_sigma(tmp_path):
    cfg = _everything_off_default().replace(method=method_config("gaussian", sigma=0.4))
    file = launch.config_path(tmp_path, "x")
    file.parent.mkdir(parents=True)
    runs.atomic_write_json(file, cfg.to_dict())
    args = build_parser().parse_args(launch.train_argv(file, tmp_path, "x")[3:])
    assert config_from_args(args) == cfg and config_from_args(args).method.sigma == 0.4


def test_the_command_line_carries_class_renorm(tmp_path):
    cfg = _everything_off_default().replace(method=method_config("dpaat", class_renorm=True, threshold="class_mean"))
    file = launch.config_path(tmp_path, "x")
    file.parent.mkdir(parents=True)
    runs.atomic_write_json(file, cfg.to_dict())
    args = build_parser().parse_args(launch.train_argv(file, tmp_path, "x")[3:])
    assert config_from_args(args) == cfg and config_from_args(args).method.class_renorm is True
    flags = build_parser().parse_args(["train", "--data", "synthetic", "--model", "resnet8", "--method", "dpaat",
                                       "--epochs", "1", "--class-renorm"])
    assert config_from_args(flags).method.class_renorm is True


@pytest.mark.slow
def test_a_launched_run_trains_with_every_field_of_its_config(tmp_path):
    from dpaat_core.train.loop import train
    source = train(RunConfig().replace(data={"spec": "synthetic:n=24,classes=3", "image_size": 16},
                                       model={"name": "resnet18"}, method=method_config("erm"),
                                       train={"epochs": 1, "batch_size": 8, "device": "cpu"}),
                   store=tmp_path / "sources", run_id="theirs")          # the run it starts from
    cfg = _everything_off_default(init_from=str(source))
    assert _off_default(cfg, {("model", "pretrained")}) == []
    launch.launch(cfg, tmp_path, "every")
    assert _wait(tmp_path / "every", {"done", "failed"})["state"] == "done", launch.log_path(tmp_path, "every").read_text()
    saved = runs.read_config(tmp_path / "every")
    for section, values in cfg.to_dict().items():
        assert {k: saved[section][k] for k in values} == values, section


def test_a_partial_config_file_fills_the_rest_and_flags_override_it(tmp_path):
    file = tmp_path / "partial.json"
    file.write_text('{"data": {"spec": "synthetic:n=24"}, "method": {"name": "pgd_at"}, "train": {"epochs": 2}}')
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(file), "--epochs", "3", "--lr", "1e-3"]))
    assert cfg.data.spec == "synthetic:n=24" and cfg.train.epochs == 3 and cfg.train.lr == 1e-3
    assert cfg.method == method_config("pgd_at") and cfg.attack == RunConfig().attack
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(file), "--method", "dpaat",
                                                      "--gamma", "0.3"]))
    assert cfg.method == method_config("dpaat", gamma=0.3)


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


@pytest.mark.parametrize("text, says", [(None, "cannot read it"), ("{oops", "not JSON"),
                                        ('{"train": {"epochz": 2}}', "unknown setting(s) epochz"),
                                        ('{"attack": {"eps": -1}}', "attack.eps must be")])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, says):
    from dpaat_core.__main__ import main
    file = tmp_path / "c.json"
    if text is not None:
        file.write_text(text)
    assert main(["train", "--config", str(file), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and not (tmp_path / "store").exists()
