"""A run's ``config.json`` parsed once into typed records, so no reader guards against two dict shapes.

A run folder holds one of two configs:

* a trained run (the trainer wrote it): a :class:`~dpaat_core.config.RunConfig`;
* an imported model (``import`` wrote it, method ``imported``): an :class:`ImportedModel`, a model and the data it
  was judged on, without attack, method or training settings.

Both carry the :class:`DatasetInfo` the run was made with (classes, channels, size). :class:`RunRecord` holds the
config, the dataset and where the weights come from, and answers the questions every reader asks (the data spec,
the classes, the seed, the training norm and eps where there is one) as attributes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Union

from dpaat_core.config import ConfigError, DataConfig, ModelConfig, RunConfig
from dpaat_core.errors import RunError

IMPORTED = "imported"


@dataclass(frozen=True)
class DatasetInfo:
    """What the run's data was when the run was made (``config.json``'s ``dataset`` section)."""

    classes: tuple[str, ...]      # empty for a run written before the class names were kept
    num_classes: int
    in_channels: int = 3
    image_size: Optional[int] = None
    train_size: Optional[int] = None
    val_size: Optional[int] = None
    train_class_counts: Optional[tuple[int, ...]] = None
    source_path: Optional[str] = None

    @classmethod
    def from_dict(cls, raw: dict) -> "DatasetInfo":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}   # older and newer writers add keys of their own
        classes = [str(c) for c in values.pop("classes", None) or []]
        num_classes = values.pop("num_classes", None) or len(classes)
        if not num_classes:
            raise ConfigError("dataset: neither class names nor a class count")
        counts = values.pop("train_class_counts", None)
        return cls(classes=tuple(classes), num_classes=int(num_classes),
                   train_class_counts=None if counts is None else tuple(int(c) for c in counts), **values)


@dataclass(frozen=True)
class ImportedModel:
    """The config of an imported model: its architecture (with normalisation and Grad-CAM layer) and the data it is
    judged on. ``data`` is None for a model imported with its class names only (``import --classes``): every
    command on it then needs ``--data``."""

    model: ModelConfig
    data: Optional[DataConfig]
    source: dict = field(default_factory=dict)   # {"file": the weights file as given, "sha256": its digest}

    @classmethod
    def from_dict(cls, raw: dict) -> "ImportedModel":
        data = raw.get("data") or {}
        try:
            return cls(model=ModelConfig(**raw["model"]), data=DataConfig(**data) if data.get("spec") else None,
                       source=dict(raw.get("source") or {}))
        except TypeError as exc:   # an unknown or missing setting
            raise ConfigError(f"an imported run's config: {exc}") from None


@dataclass(frozen=True)
class RunRecord:
    """One run's config.json, typed: ``config`` is a RunConfig (trained) or an ImportedModel (imported)."""

    config: Union[RunConfig, ImportedModel]
    dataset: DatasetInfo
    run_id: Optional[str] = None
    init: Optional[dict] = None   # a run started from another's weights: {"run_id", "run", "origin", ...}

    @property
    def imported(self) -> bool:
        return isinstance(self.config, ImportedModel)

    model = property(lambda self: self.config.model, doc="the ModelConfig (architecture, normalisation, Grad-CAM)")
    data = property(lambda self: self.config.data, doc="the DataConfig the run was made on (None: an import without)")
    spec = property(lambda self: None if self.data is None else self.data.spec,
                    doc="the data spec the run was made on (None for a model imported with its class names only)")
    image_size = property(lambda self: (self.data and self.data.image_size) or self.dataset.image_size,
                          doc="the image size the model takes")
    root = property(lambda self: None if self.data is None else self.data.root, doc="where medmnist files are")
    classes = property(lambda self: list(self.dataset.classes) or [str(i) for i in range(self.dataset.num_classes)],
                       doc="the class names (their indices for a run written before the names were kept)")
    attack = property(lambda self: None if self.imported else self.config.attack,
                      doc="the training attack (None for an imported model)")
    method = property(lambda self: IMPORTED if self.imported else self.config.method.name)
    seed = property(lambda self: 0 if self.imported else self.config.train.seed,
                    doc="the training seed (0 for an imported model): it draws the run's split")

    @property
    def judged_norm(self) -> str:
        """The norm the run is judged in (its APGD check, its report): its training norm, l2 for an imported model.
        ``attack.norm`` is the training norm itself (no attack for an imported model)."""
        return "l2" if self.imported else self.config.attack.norm

    @property
    def origin(self) -> str:
        """``imported``, ``from <run_id>`` (``train --init-from``) or ``trained``."""
        if self.imported:
            return IMPORTED
        start = (self.init or {}).get("run_id")
        return f"from {start}" if start else "trained"


def parse_record(raw: dict, where: str = "config.json") -> RunRecord:
    """The typed record of a config.json's contents; a config neither shape accepts is a :class:`RunError` naming
    ``where`` and the setting."""
    try:
        if not isinstance(raw.get("dataset"), dict):
            raise ConfigError("the config lacks its dataset section")
        imported = raw.get("origin") == IMPORTED or (raw.get("method") or {}).get("name") == IMPORTED
        config = ImportedModel.from_dict(raw) if imported else RunConfig.from_dict(raw)
        init = raw.get("init")
        return RunRecord(config, DatasetInfo.from_dict(raw["dataset"]), raw.get("run_id"),
                         init if isinstance(init, dict) else None)
    except (ConfigError, TypeError, ValueError) as exc:
        raise RunError(f"{where}: {exc}") from None
