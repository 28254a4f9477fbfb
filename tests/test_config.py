"""Config sections: validated when built, never changed afterwards, changed copies validated again."""
import dataclasses

import pytest

from dpaat_core.config import AttackConfig, ConfigError, DataConfig, RunConfig, TrainConfig, method_config


@pytest.mark.parametrize("build, field", [
    (lambda: TrainConfig(epochs=0), "train.epochs"),
    (lambda: AttackConfig(norm="l3"), "attack.norm"),
    (lambda: DataConfig(image_size=4), "data.image_size"),
    (lambda: method_config("dpaat", gamma=1.5), "method.gamma"),
    (lambda: RunConfig(attack=AttackConfig(eps=100.0), data=DataConfig(image_size=16)), "attack.eps"),
])
def test_a_section_is_checked_when_built(build, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build()


def test_a_section_cannot_be_changed_after_it_is_built():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = method_config("erm")
    assert cfg.train.epochs == TrainConfig().epochs


def test_replace_makes_a_validated_copy_and_leaves_the_original():
    cfg = RunConfig()
    new = cfg.replace(train={"epochs": 3, "lr": 1e-3}, method=method_config("erm"), data={"image_size": 28})
    assert (new.train.epochs, new.train.lr, new.method.name, new.data.image_size) == (3, 1e-3, "erm", 28)
    assert (cfg.train.epochs, cfg.method.name, cfg.data.image_size) == (10, "dpaat", 64)
    assert new.train.batch_size == cfg.train.batch_size          # fields not named are kept
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        cfg.replace(train={"epochs": -1})
    with pytest.raises(ConfigError, match="unknown setting.*epoch"):
        cfg.replace(train={"epoch": 3})
    with pytest.raises(ConfigError, match="unknown section.*trian"):
        cfg.replace(trian={"epochs": 3})
    with pytest.raises(ConfigError, match=r"attack\.eps"):       # the check across sections runs again
        cfg.replace(data={"image_size": 8}, attack={"eps": 20.0})


def test_a_method_is_changed_through_its_preset_not_by_name_alone():
    with pytest.raises(ConfigError, match=r"method\.name: .*method_config\('erm'"):
        RunConfig().replace(method={"name": "erm"})
    assert RunConfig().replace(method=method_config("erm")).method.adaptive is False


def test_a_section_of_the_wrong_kind_is_refused():
    with pytest.raises(ConfigError, match="train: expected a TrainConfig, got dict"):
        RunConfig(train={"epochs": 3})
