"""``python -m dpaat_core import``: a torchvision model built outside the project becomes a run that gives the same
logits, every bad file gets one line and leaves nothing in the store, and the run works with the rest."""
import json

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torchvision

from dpaat_core.store import loading, runs
from dpaat_core.__main__ import main
from dpaat_core.models import find_gradcam_layer
from dpaat_core.models import Classifier, NoGradCamLayer, gradcam_layer

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
DATA = "synthetic:n=40,classes=3"


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A torchvision resnet18 with 3 classes, made and saved as a user would, outside the project."""
    folder = tmp_path_factory.mktemp("outside")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    with torch.no_grad():                      # BatchNorm statistics that are not the defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    state = model.state_dict()
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "ddp.pt")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, folder / "plain.safetensors")
    return model, state, folder


def _import(tmp_path, weights, *extra, name="mine"):
    return main(["import", "--arch", "resnet18", "--weights", str(weights), "--image-size", "32",
                 "--store", str(tmp_path / "store"), "--name", name, *extra])


@pytest.mark.parametrize("file", ["ddp.pt", "plain.safetensors"])
def test_an_imported_model_gives_the_same_logits_as_the_original(outside, tmp_path, capsys, file):
    model, _, folder = outside
    assert _import(tmp_path, folder / file, "--classes", "a,b,c", "--mean", ",".join(map(str, MEAN)),
                   "--std", ",".join(map(str, STD))) == 0
    run = tmp_path / "store" / "mine"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run)
    x = torch.rand(5, 3, 32, 32)
    mine = loading.load_model(run)                                   # takes [0, 1] images: normalisation inside
    expected = model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(mine(x), expected, rtol=1e-5, atol=1e-5)
    config = json.loads((run / "config.json").read_text())
    import hashlib
    assert config["origin"] == "imported" and config["model"]["name"] == "resnet18"
    assert config["source"]["sha256"] == hashlib.sha256((folder / file).read_bytes()).hexdigest()
    assert config["model"]["normalization"] == {"mean": list(MEAN), "std": list(STD)}
    assert config["dataset"]["classes"] == ["a", "b", "c"] and runs.load_run(run).state == "done"


def test_the_gradcam_layer_is_the_last_feature_map_before_pooling(outside, tmp_path):
    _, _, folder = outside
    assert main(["import", "--arch", "resnet18", "--weights", str(folder / "ddp.pt"), "--image-size", "64",
                 "--classes", "a,b,c", "--store", str(tmp_path / "store"), "--name", "r64"]) == 0
    model = loading.load_model(tmp_path / "store" / "r64")
    assert model.gradcam == "backbone.layer4" and gradcam_layer(model) is model.backbone.layer4   # 2x2 at 64 px
    assert _import(tmp_path, folder / "ddp.pt", "--classes", "a,b,c", "--gradcam-layer", "layer3", name="named") == 0
    assert loading.load_model(tmp_path / "store" / "named").gradcam == "backbone.layer3"


class _Tokens(nn.Module):
    """A vision-transformer-like model: a patch convolution, then tokens all the way to the head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        tokens = self.mix(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


def test_a_model_of_tokens_has_no_gradcam_layer_and_says_why():
    model = Classifier("timm:tiny_vit", _Tokens(), 3, 3, gradcam=find_gradcam_layer(Classifier("t", _Tokens(), 3, 3),
                                                                                      16))
    assert model.gradcam is None
    with pytest.raises(NoGradCamLayer, match="Grad-CAM does not apply; saliency, integrated gradients and occlusion"):
        gradcam_layer(model)
    from dpaat_core.evaluate.attribution import attribute
    assert attribute(model, torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), "saliency").shape == (2, 1, 16, 16)


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch /tmp/dpaat-import-was-unpickled",))


def _bad_files(state, folder):
    import os
    import pathlib
    pathlib.Path("/tmp/dpaat-import-was-unpickled").unlink(missing_ok=True)
    torch.save({"state_dict": state, "boom": _Boom()}, folder / "hostile.pt")
    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, folder / "missing.pt")
    torch.save(state | {"extra.weight": torch.zeros(1)}, folder / "unexpected.pt")
    torch.save(state | {"conv1.weight": torch.zeros(64, 3, 5, 5)}, folder / "shape.pt")
    (folder / "noise.pt").write_bytes(os.urandom(2000))
    torch.save({"epoch": 3, "note": "no weights"}, folder / "empty.pt")


@pytest.mark.parametrize("args, says", [
    (["--weights", "hostile.pt"], "refused to load: not a plain tensor checkpoint"),
    (["--weights", "missing.pt"], "missing keys layer1.0.conv1.weight"),
    (["--weights", "unexpected.pt"], "unexpected keys extra.weight"),
    (["--weights", "shape.pt"], "conv1.weight is [64, 3, 5, 5] where resnet18 has [64, 3, 7, 7]"),
    (["--weights", "ddp.pt", "--classes", "a,b,c,d"], "its head (fc.weight) predicts 3 classes, but 4 were given"),
    (["--weights", "noise.pt"], "noise.pt"),
    (["--weights", "empty.pt"], "not a checkpoint of model weights"),
    (["--weights", "ddp.pt", "--arch", "resnet1800"], "unknown architecture 'resnet1800'"),
    (["--weights", "ddp.pt", "--arch", "timm:vit_tiny_patch16_224"], "timm is not installed"),
    (["--weights", "ddp.pt", "--mean", "0.5,0.5"], "--mean needs 3 number(s)"),
    (["--weights", "ddp.pt", "--gradcam-layer", "layer9"], "--gradcam-layer layer9: resnet18 has no such module"),
])
def test_a_bad_import_is_one_line_and_leaves_nothing(outside, tmp_path, capsys, args, says):
    _, state, folder = outside
    _bad_files(state, folder)
    argv = ["import", "--arch", "resnet18", "--image-size", "32", "--classes", "a,b,c",
            "--store", str(tmp_path / "store"), "--name", "bad"]
    for k in range(0, len(args), 2):                       # the case's flags replace the defaults above
        flag, value = args[k], args[k + 1]
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    argv[argv.index("--weights") + 1] = str(folder / argv[argv.index("--weights") + 1])
    if "timm" in says:
        import importlib.util
        if importlib.util.find_spec("timm") is not None:
            pytest.skip("timm is installed here: its message is for machines without it")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "store" / "bad").exists()
    import pathlib
    assert not pathlib.Path("/tmp/dpaat-import-was-unpickled").exists()     # the pickle's code never ran


def test_an_imported_run_is_evaluated_explained_and_shown_like_any_other(outside, tmp_path, monkeypatch):
    _, _, folder = outside
    assert _import(tmp_path, folder / "ddp.pt", "--data", DATA, name="audit") == 0
    run = tmp_path / "store" / "audit"
    assert main(["evaluate", str(run), "--steps", "1", "--eps-grid", "0,0.3"]) == 0
    assert main(["attribute", str(run), "--n", "4", "--steps", "1", "--methods", "gradcam,saliency"]) == 0
    assert main(["evaluate", str(run), "--corruptions", "pixelate", "--severities", "1"]) == 0
    assert len(runs.read_robustness(run)) and len(runs.read_attribution(run)) and len(runs.read_corruptions(run))
    from pathlib import Path

    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("DPAAT_STORE", str(tmp_path / "store"))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py"), default_timeout=120).run()
    for page in ("runs", "dynamics", "robustness", "attribution", "gallery"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, at.exception)
    at.switch_page("views/dynamics.py").run()
    assert any("was imported from ddp.pt: it has no training history" in i.value for i in at.info)
    at.switch_page("views/runs.py").run()
    assert at.dataframe[0].value.set_index("run_id").loc["audit", ["method", "origin"]].tolist() == ["imported"] * 2


def _train_from(source, tmp_path, *extra, name="hardened"):
    return main(["train", "--init-from", str(source), "--data", DATA, "--image-size", "32", "--method", "dpaat",
                 "--epochs", "1", "--steps", "1", "--batch-size", "16", "--device", "cpu", "--store",
                 str(tmp_path / "store"), "--name", name, *extra])


def test_train_init_from_starts_from_an_imported_runs_weights(outside, tmp_path):
    _, _, folder = outside
    assert _import(tmp_path, folder / "ddp.pt", "--data", DATA, "--image-size", "32", name="theirs") == 0
    source = tmp_path / "store" / "theirs"
    assert _train_from(source, tmp_path, "--lr", "1e-12") == 0          # a step too small to move: the start shows
    run = tmp_path / "store" / "hardened"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["init_from"] == str(source) and config["model"]["name"] == "resnet18"
    assert config["init"]["origin"] == "imported" and config["init"]["run_id"] == "theirs"
    assert runs.load_run(run).origin == "from theirs"
    assert config["model"]["normalization"] == json.loads((source / "config.json").read_text())["model"]["normalization"]
    mine, theirs = dict(loading.load_model(run).named_parameters()), dict(loading.load_model(source).named_parameters())
    assert mine.keys() == theirs.keys()          # every weight where it started (BatchNorm statistics move in training)
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("extra, says", [(["--model", "resnet34"], "theirs is a resnet18, the config asks for resnet34"),
                                         (["--pretrained"], "pretrained and init_from both set")])
def test_a_mismatched_start_is_one_line_and_makes_no_run(outside, tmp_path, capsys, extra, says):
    _, _, folder = outside
    assert _import(tmp_path, folder / "ddp.pt", "--data", DATA, name="theirs") == 0
    assert _train_from(tmp_path / "store" / "theirs", tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "store" / "hardened").exists()


def test_a_start_with_other_classes_is_refused(outside, tmp_path, capsys):
    _, _, folder = outside
    assert _import(tmp_path, folder / "ddp.pt", "--classes", "x,y,z", name="theirs") == 0
    assert _train_from(tmp_path / "store" / "theirs", tmp_path) == 2
    err = capsys.readouterr().err
    assert "theirs predicts x, y, z from 3 channel(s); this data has" in err
    assert not (tmp_path / "store" / "hardened").exists()


def test_a_start_without_data_trains_on_the_source_runs_data_at_its_size(outside, tmp_path, capsys):
    _, _, folder = outside
    assert _import(tmp_path, folder / "ddp.pt", "--data", DATA, name="theirs") == 0          # 32 px (see _import)
    assert main(["train", "--init-from", str(tmp_path / "store" / "theirs"), "--method", "dpaat", "--epochs", "1",
                 "--steps", "1", "--batch-size", "16", "--device", "cpu", "--store", str(tmp_path / "store"),
                 "--name", "hardened", "--quiet"]) == 0
    config = json.loads((tmp_path / "store" / "hardened" / "config.json").read_text())
    assert config["data"]["spec"] == DATA and config["data"]["image_size"] == 32
    assert _import(tmp_path, folder / "ddp.pt", "--classes", "x,y,z", name="nodata") == 0     # the source names none
    assert main(["train", "--init-from", str(tmp_path / "store" / "nodata"), "--method", "dpaat", "--epochs", "1",
                 "--store", str(tmp_path / "store"), "--name", "other"]) == 2
    assert "train needs --data" in capsys.readouterr().err


def test_a_start_from_a_trained_run_keeps_its_split_seed(tmp_path):
    """Without --data and --seed, a start from a run trained here uses its data, size and split seed, so the images
    the source never saw in training stay unseen."""
    store = str(tmp_path / "store")
    common = ["--method", "erm", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--store", store, "--quiet"]
    assert main(["train", "--data", "synthetic:n=40,classes=3", "--image-size", "24", "--seed", "3", "--name", "src",
                 "--model", "resnet8",
                 *common]) == 0
    assert main(["train", "--init-from", f"{store}/src", *common, "--name", "next"]) == 0
    config = json.loads((tmp_path / "store" / "next" / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["data"]["image_size"] == 24
    assert config["data"]["spec"] == "synthetic:n=40,classes=3"
