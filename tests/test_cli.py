"""python -m dpaat_core data: inspect a data spec; bad input exits 2 with one line."""
import re

from conftest import run_cli


def test_data_command_lists_splits_and_classes():
    out = run_cli("data", "synthetic:n=40,classes=3", "--image-size", "16")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.strip().startswith("train") and " 40 images" in line for line in lines)
    assert "3x16x16" in out.stdout and "with lesion masks" in out.stdout


def test_bad_spec_exits_2_with_a_clear_line(tmp_path):
    out = run_cli("data", f"npz:{tmp_path / 'nothing.npz'}")
    assert out.returncode == 2
    assert "nothing.npz: no such file" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("data", "mnist:foo")
    assert out.returncode == 2 and "unknown data source 'mnist'" in out.stderr


# --- train / runs ---------------------------------------------------------------------------

import contextlib  # noqa: E402

import pytest  # noqa: E402

from dpaat_core.__main__ import main  # noqa: E402

GOOD = ["train", "--data", "synthetic:n=24,classes=3", "--model", "resnet8", "--method", "dpaat", "--epochs", "1",
        "--image-size", "16", "--steps", "1", "--device", "cpu", "--quiet"]


def _with(*changes):
    """GOOD with flags replaced (``("--eps", "-1")``) or added."""
    argv = list(GOOD)
    for flag, value in changes:
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


@pytest.mark.parametrize("argv, says", [
    (_with(("--eps", "-0.1")), "attack.eps must be a number > 0"),
    (_with(("--model", "resnet9000")), "model.name must be one of"),
    (_with(("--steps", "0")), "attack.steps must be an integer >= 1"),
    (_with(("--data", "npz:/nowhere/x.npz")), "no such file"),
    (_with(("--data", "mnist:foo")), "unknown data source 'mnist'"),
    (_with(("--method", "madry")), "method.name must be one of"),
    (_with(("--method", "pgd_at"), ("--gamma", "0.2")), "pgd_at keeps eps fixed"),
    (_with(("--threshold", "quantile:2")), "method.threshold must be 'quantile:<q>'"),
    (_with(("--epochs", "0")), "train.epochs must be an integer >= 1"),
    (_with(("--norm", "l3")), "attack.norm must be one of l2, linf"),
    (_with(("--eps", "abc")), "invalid float value: 'abc'"),
    (_with(("--lr", "nan")), "train.lr must be a number > 0"),
    (["train", "--model", "resnet8"], "train needs --data, --method, --epochs"),
    (["train", "--resume", "x", "--data", "synthetic"], "drop --data"),
    (["train", "--resume", "/nowhere/run"], "no such run folder"),
    (_with(("--name", "../evil")), "../evil"),
    (_with(("--gradcam-layer", "fc")), "model.gradcam_layer fc: a Linear that gives (1, 3), not a feature map"),
    (_with(("--gradcam-layer", "layer9")), "model.gradcam_layer layer9: resnet8 has no such module"),
    (_with(("--gradcam-layer", " ")), "model.gradcam_layer must be a module's dotted path"),
    (["train", "--resume", "x", "--gradcam-layer", "layer2"], "drop --gradcam-layer"),
])
def test_bad_train_input_fails_before_any_work_with_one_line(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) if "invalid float" in says else contextlib.nullcontext():
        code = main(argv + ["--store", str(tmp_path / "store")])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_argparse_errors_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--eps", "abc"])
    assert exit_.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_every_train_flag_is_explained_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    flags = re.findall(r"^  (--[a-z-]+(?:, --[a-z-]+)?)(.*)$", text, flags=re.M)
    assert len(flags) >= 30
    lines = text.splitlines()
    for flag, rest in flags:
        if flag.startswith("--help"):
            continue
        at = next(i for i, ln in enumerate(lines) if ln.startswith(f"  {flag}"))
        following = lines[at + 1] if at + 1 < len(lines) else ""
        continued = following.startswith("    ") and not following.lstrip().startswith("-")   # its help's next line
        words = (rest + " " + following if continued else rest).split()
        explained = [w for w in words if not w.isupper() and not w.startswith(("{", "-"))]
        assert len(" ".join(explained)) > 15, flag


def test_train_prints_the_run_folder_last_and_runs_lists_it(tmp_path, capsys):
    store = tmp_path / "store"
    assert main(GOOD + ["--store", str(store), "--name", "cli-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(store / "cli-run")
    assert "epoch 1/1" in err and "val acc" in err
    assert main(["runs", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "cli-run" in listing and "done" in listing and "dpaat" in listing and "1/1" in listing
    (store / "junk").mkdir()
    (store / "junk" / "config.json").write_text("{not json")
    assert main(["runs", "--store", str(store)]) == 0
    listing = capsys.readouterr().out
    assert "junk" in listing and "corrupt" in listing and "cli-run" in listing
    # a finished run resumes to nothing and says where it is
    assert main(["train", "--resume", str(store / "cli-run"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(store / "cli-run")


def test_a_run_is_explained_at_the_grad_cam_layer_it_names_and_a_run_started_from_it_too(tmp_path, capsys):
    """``--gradcam-layer layer2``: resnet8's 8x8 stage at 16 px instead of its 4x4 last one, recorded in the config,
    used by every map of the run, and kept by a run that starts from its weights."""
    import torch
    from dpaat_core.evaluate.attribution import attribute
    from dpaat_core.models import gradcam_layer
    from dpaat_core.store import loading, runs
    store = tmp_path / "store"
    assert main(_with(("--gradcam-layer", "layer2")) + ["--store", str(store), "--name", "fine"]) == 0
    assert runs.read_record(store / "fine").model.gradcam_layer == "backbone.layer2"
    model = loading.load_model(store / "fine")
    assert gradcam_layer(model) is model.backbone.layer2
    maps = []
    hook = model.backbone.layer2.register_forward_hook(lambda _m, _i, out: maps.append(out.shape[-2:]))
    attribute(model, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), "gradcam")
    hook.remove()
    assert maps and tuple(maps[0]) == (8, 8)                           # the finer stage ran for the map
    assert main(["train", "--init-from", str(store / "fine"), "--method", "pgd_at", "--epochs", "1", "--steps", "1",
                 "--device", "cpu", "--quiet", "--store", str(store), "--name", "after"]) == 0
    assert runs.read_record(store / "after").model.gradcam_layer == "backbone.layer2"
    assert gradcam_layer(loading.load_model(store / "after")) is not None
    capsys.readouterr()
