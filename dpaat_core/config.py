"""Run configuration: small dataclasses with validation at the edge and a JSON round trip.

A :class:`RunConfig` is everything a training run needs; it is written to ``config.json`` with
every resolved default so a run can be re-made from its folder. Every section is validated when it
is built and cannot be changed afterwards (the dataclasses are frozen): a changed config is a new one,
made with :meth:`RunConfig.replace`, and is validated again. Validation names the bad field and the
allowed range, before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Optional

from dpaat_core.errors import ConfigError
from dpaat_core.models import MODEL_NAMES, check_normalization

NORMS = ("l2", "linf")
SYNC_LOSSES = ("sym_kl", "js", "l1_logprob", "kl")
THRESHOLDS = ("batch_mean", "ema", "median", "quantile:<q>", "class_mean")
SCHEDULES = ("none", "cosine", "step")   # step: x0.1 at half and three quarters of the epochs (MedMNIST v2)
IMBALANCE = ("none", "class_weights", "balanced_sampler")
AUGMENTATIONS = ("none", "flips", "dermoscopy")   # dpaat_core.train.augment; true/false in older runs
EARLY_STOP = ("balanced_accuracy", "robust_accuracy", "auc", "none")
DEVICES = ("auto", "cpu", "cuda")


class _Section:
    """A frozen config section: validated when built (``__post_init__``)."""

    def __post_init__(self):
        self.check()


@dataclass(frozen=True)
class MethodPreset:
    """One row of the family table in METHOD.md."""

    gamma: float          # eps memory rate; 0 keeps every sample at eps0
    beta_clean: float     # weight of CE on clean images
    lam: float            # weight of the synchronisation loss
    adv_weight: float     # weight of CE on adversarial images (0 for TRADES)
    attack: str           # "none", "ce" (maximise cross-entropy), "kl" (maximise KL to the clean prediction) or
                          # "noise" (Gaussian noise of std sigma instead of an attack: randomized smoothing's training)
    sync: str             # kind of synchronisation loss
    adaptive: bool        # per-sample eps from the memory
    sigma: float = 0.0    # std of the training noise ("noise" only), per pixel in [0, 1] units
    threshold: str = "batch_mean"   # the fragile/stable rule (class_mean: against each class's running mean ΔL)
    class_renorm: bool = False      # the eps memory rescaled so that each class's mean eps stays at eps0


METHODS = {
    "erm": MethodPreset(0.0, 1.0, 0.0, 0.0, "none", "sym_kl", False),
    "pgd_at": MethodPreset(0.0, 0.0, 0.0, 1.0, "ce", "sym_kl", False),
    "trades": MethodPreset(0.0, 1.0, 6.0, 0.0, "kl", "kl", False),
    "dpaat": MethodPreset(0.1, 1.0, 1.0, 1.0, "ce", "sym_kl", True),
    "dpaat_nosync": MethodPreset(0.1, 1.0, 0.0, 1.0, "ce", "sym_kl", True),
    "dpaat_fixed": MethodPreset(0.0, 1.0, 1.0, 1.0, "ce", "sym_kl", False),
    # Cohen et al. 2019: cross-entropy on x + N(0, sigma^2 I), the base classifier of randomized smoothing
    "gaussian": MethodPreset(0.0, 0.0, 0.0, 1.0, "noise", "sym_kl", False, sigma=0.25),
    # class-aware DPAAT, our own variants (docs/CLASS_AWARE.md); the paper's dpaat above is unchanged
    "dpaat_cthr": MethodPreset(0.1, 1.0, 1.0, 1.0, "ce", "sym_kl", True, threshold="class_mean"),
    "dpaat_cnorm": MethodPreset(0.1, 1.0, 1.0, 1.0, "ce", "sym_kl", True, class_renorm=True),
}


def _fail(section: str, name: str, value, allowed: str):
    raise ConfigError(f"{section}.{name} must be {allowed}, got {value!r}")


def _number(section: str, name: str, value, lo: float, hi: float = math.inf, *, lo_open=False, integer=False):
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo:g}" + ("" if hi == math.inf else f" and <= {hi:g}")
        _fail(section, name, value, f"{'an integer' if integer else 'a number'} {bound}")


def _choice(section: str, name: str, value, allowed):
    if value not in allowed:
        _fail(section, name, value, "one of " + ", ".join(allowed))


def parse_threshold(rule: str) -> tuple[str, Optional[float]]:
    """``"quantile:0.7"`` to ``("quantile", 0.7)``; other rules to ``(rule, None)``."""
    kind, _, arg = str(rule).partition(":")
    if kind == "quantile":
        try:
            q = float(arg)
        except ValueError:
            q = math.nan
        if not 0.0 < q < 1.0:
            _fail("method", "threshold", rule, "'quantile:<q>' with 0 < q < 1")
        return kind, q
    if arg or kind not in ("batch_mean", "ema", "median", "class_mean"):
        _fail("method", "threshold", rule, "one of " + ", ".join(THRESHOLDS))
    return kind, None


#: bounds on a model's own normalisation, in [0, 1] pixel units: beyond them (x - mean) / std overflows or is noise
@dataclass(frozen=True)
class DataConfig(_Section):
    spec: str = "synthetic"
    image_size: int = 64
    max_samples: Optional[int] = None   # cap on each split, for quick runs
    root: Optional[str] = None          # folder of medmnist: files

    def check(self):
        if not isinstance(self.spec, str) or not self.spec.strip():
            _fail("data", "spec", self.spec, "a data spec such as 'npz:<path>' or 'synthetic'")
        _number("data", "image_size", self.image_size, 8, 1024, integer=True)
        if self.max_samples is not None:
            _number("data", "max_samples", self.max_samples, 1, integer=True)


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = "resnet8"
    pretrained: bool = False
    # a run folder whose weights the run starts from (same architecture and classes): any run of the store,
    # imported or trained here. Its architecture may then be any torchvision/timm classifier, built with the
    # source's normalisation and Grad-CAM layer (recorded here by the trainer).
    init_from: Optional[str] = None
    normalization: Optional[dict] = None
    gradcam_layer: Optional[str] = None

    def check(self):
        if self.init_from is None and self.normalization is None:
            _choice("model", "name", self.name, MODEL_NAMES)
        elif not isinstance(self.name, str) or not self.name.strip():
            _fail("model", "name", self.name, "an architecture's name")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            _fail("model", "init_from", self.init_from, "a run folder")
        if self.gradcam_layer is not None and (not isinstance(self.gradcam_layer, str) or not self.gradcam_layer.strip()):
            _fail("model", "gradcam_layer", self.gradcam_layer, "a module's dotted path, such as 'features.8'")
        if self.init_from is not None and self.pretrained:
            raise ConfigError("model: pretrained and init_from both set; a run starts from one set of weights")
        if self.normalization is not None:
            if not isinstance(self.normalization, dict) or set(self.normalization) != {"mean", "std"}:
                _fail("model", "normalization", self.normalization, "an object with a mean and a std list")
            mean = check_normalization("model.normalization.mean", self.normalization["mean"])
            check_normalization("model.normalization.std", self.normalization["std"], len(mean))


@dataclass(frozen=True)
class AttackConfig(_Section):
    """The training attack: PGD with a random start, ``alpha = alpha_ratio * eps`` per sample."""

    norm: str = "l2"
    eps: float = 0.3
    alpha_ratio: float = 0.5
    steps: int = 7
    eval_mode: bool = True   # attack with BatchNorm statistics frozen

    def check(self):
        _choice("attack", "norm", self.norm, NORMS)
        _number("attack", "eps", self.eps, 0, 1000, lo_open=True)
        if self.norm == "linf" and self.eps >= 1:   # a change of 1 per pixel in [0, 1] can erase any image
            _fail("attack", "eps", self.eps, "a number > 0 and < 1 for linf (pixels are in [0, 1])")
        _number("attack", "alpha_ratio", self.alpha_ratio, 0, 10, lo_open=True)
        _number("attack", "steps", self.steps, 1, 1000, integer=True)


@dataclass(frozen=True)
class MethodConfig(_Section):
    """A row of the family table (``name``) with every setting resolved; see :func:`method_config`."""

    name: str = "dpaat"
    gamma: float = 0.1
    beta_clean: float = 1.0
    lam: float = 1.0
    adv_weight: float = 1.0
    attack: str = "ce"
    sync: str = "sym_kl"
    adaptive: bool = True
    memoryless: bool = False
    threshold: str = "batch_mean"
    ema_momentum: float = 0.9
    eps_min_ratio: float = 0.25
    eps_max_ratio: float = 2.0
    sigma: float = 0.0
    class_renorm: bool = False

    def check(self):
        _choice("method", "name", self.name, tuple(METHODS))
        if not self.adaptive and self.gamma != METHODS[self.name].gamma:   # it would silently do nothing
            raise ConfigError(f"method.gamma: {self.name} keeps eps fixed, so gamma does not apply "
                              "(use dpaat or dpaat_nosync for adaptive eps)")
        _number("method", "gamma", self.gamma, 0, 1, lo_open=False)
        if self.gamma >= 1:
            _fail("method", "gamma", self.gamma, "a number >= 0 and < 1")
        for name in ("beta_clean", "lam", "adv_weight"):
            _number("method", name, getattr(self, name), 0, 1000)
        _choice("method", "attack", self.attack, ("none", "ce", "kl", "noise"))
        if self.attack == "noise":
            _number("method", "sigma", self.sigma, 0, 10, lo_open=True)
        elif self.sigma != 0:   # it would silently do nothing
            raise ConfigError(f"method.sigma: {self.name} trains against an attack, not noise, so sigma does not "
                              "apply (use the gaussian method)")
        _choice("method", "sync", self.sync, SYNC_LOSSES)
        parse_threshold(self.threshold)
        _number("method", "ema_momentum", self.ema_momentum, 0, 1)
        _number("method", "eps_min_ratio", self.eps_min_ratio, 0, 1, lo_open=True)
        _number("method", "eps_max_ratio", self.eps_max_ratio, 1, 100)
        if self.memoryless and not self.adaptive:
            _fail("method", "memoryless", self.memoryless, "False for a method without adaptive eps")
        if not isinstance(self.class_renorm, bool):
            _fail("method", "class_renorm", self.class_renorm, "true or false")
        if self.class_renorm and (not self.adaptive or self.memoryless):
            raise ConfigError("method.class_renorm rescales the eps memory, so it needs a method with one "
                              "(dpaat, dpaat_nosync or dpaat_cnorm, not memoryless)")
        if self.adv_weight == 0 and self.beta_clean == 0 and self.lam == 0:
            raise ConfigError("method: adv_weight, beta_clean and lam are all 0, so there is nothing to train")


def method_config(name: str, **overrides) -> MethodConfig:
    """The family member ``name`` (erm, pgd_at, trades, dpaat, dpaat_nosync, dpaat_fixed, gaussian, dpaat_cthr,
    dpaat_cnorm) with overrides.

    ``gamma`` may only be overridden for methods with adaptive eps (:meth:`MethodConfig.check`).
    """
    if name not in METHODS:
        _fail("method", "name", name, "one of " + ", ".join(METHODS))
    preset = METHODS[name]
    values = dataclasses.asdict(preset)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MethodConfig(name=name, **values)


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.0
    schedule: str = "none"
    imbalance: str = "class_weights"
    early_stop: str = "balanced_accuracy"
    patience: int = 5
    # random changes of the training images: "none", "flips" (lesions have no orientation) or "dermoscopy"
    # (flips, rotation, zoom, shift and colour jitter; see dpaat_core.train.augment). true/false in older runs.
    augment: str = "flips"
    seed: int = 0
    device: str = "auto"
    # torch.compile the training forward passes: None is auto (on for CUDA, off on CPU). When on,
    # the last incomplete batch of an epoch is dropped so every step has the same shape.
    compile: Optional[bool] = None
    # wall-time budget in minutes (None: none): the run ends at the first epoch boundary past it, as a
    # finished run ("done", stopped_by "max_minutes"); a resume gets the budget afresh and continues it.
    max_minutes: Optional[float] = None

    def check(self):
        _number("train", "epochs", self.epochs, 1, 100000, integer=True)
        _number("train", "batch_size", self.batch_size, 1, 65536, integer=True)
        _number("train", "lr", self.lr, 0, 10, lo_open=True)
        _number("train", "weight_decay", self.weight_decay, 0, 10)
        _choice("train", "schedule", self.schedule, SCHEDULES)
        _choice("train", "imbalance", self.imbalance, IMBALANCE)
        _choice("train", "early_stop", self.early_stop, EARLY_STOP)
        _number("train", "patience", self.patience, 1, 100000, integer=True)
        _number("train", "seed", self.seed, 0, 2**63 - 1, integer=True)
        _choice("train", "device", self.device, DEVICES)
        if isinstance(self.augment, bool):
            object.__setattr__(self, "augment", "flips" if self.augment else "none")
        _choice("train", "augment", self.augment, AUGMENTATIONS)
        if self.compile is not None and not isinstance(self.compile, bool):
            _fail("train", "compile", self.compile, "true, false or null (auto: on for CUDA, off on CPU)")
        if self.max_minutes is not None:
            _number("train", "max_minutes", self.max_minutes, 0, 10**6, lo_open=True)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "attack": AttackConfig, "method": MethodConfig,
             "train": TrainConfig}
SECTIONS = tuple(_SECTIONS)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        for name, klass in _SECTIONS.items():
            if not isinstance(getattr(self, name), klass):
                raise ConfigError(f"{name}: expected a {klass.__name__}, got {type(getattr(self, name)).__name__}")
        self.check()

    def replace(self, **changes) -> "RunConfig":
        """A copy with sections changed, validated: each keyword names a section and gives a new section
        object or a dict of the fields to change, e.g. ``cfg.replace(train={"epochs": 3}, method=method_config(
        "erm"))``. A dict for ``method`` changes those fields only (use :func:`method_config` for a preset)."""
        unknown = sorted(set(changes) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(_SECTIONS)}")
        new = {}
        for name, value in changes.items():
            if isinstance(value, dict):
                if name == "method" and "name" in value:
                    raise ConfigError("method.name: a method is a preset of several settings; change it with "
                                      f"method=method_config({value['name']!r}, ...)")
                known = {f.name for f in fields(_SECTIONS[name])}
                bad = sorted(set(value) - known)
                if bad:
                    raise ConfigError(f"{name}: unknown setting(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
                value = dataclasses.replace(getattr(self, name), **value)
            new[name] = value
        return dataclasses.replace(self, **new)

    def check(self) -> None:
        """Check the settings that span sections (each section checked itself when built)."""
        top = math.sqrt(3) * self.data.image_size   # l2 diagonal of [0, 1]^(3 x size x size): no image is further
        if self.attack.norm == "l2" and self.attack.eps > top:
            _fail("attack", "eps", self.attack.eps, f"at most sqrt(3)*{self.data.image_size} = {top:.4g} for l2 at "
                  f"{self.data.image_size} px (the distance between the most different images)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """Rebuild from ``config.json`` (extra top-level keys such as ``dataset`` are ignored). A partial config
        fills the rest with defaults; a method section, with the preset of its ``name`` (METHODS)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a run config is a JSON object, got {type(data).__name__}")
        sections = {}
        for name, klass in _SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: expected an object, got {type(values).__name__}")
            known = {f.name for f in fields(klass)}
            unknown = sorted(set(values) - known)
            if unknown:
                raise ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            if name == "method":   # a partial method section is filled from its family member's preset
                values = dict(values)
                sections[name] = method_config(values.pop("name", MethodConfig.name), **values)
            else:
                sections[name] = klass(**values)
        return cls(**sections)
