"""The trainer: one loop for every method, writing the run store as it goes.

``train(config)`` starts a run, ``resume(run_dir)`` continues one from its last completed
epoch (bit for bit on CPU: every random draw comes from generators seeded by seed and epoch).
Under ``torchrun`` the same code trains with DistributedDataParallel; rank 0 alone writes.

On CUDA the training split lives on the device (moved once, see :func:`resident_split`) and the
training forward passes run through ``torch.compile`` (``train.compile``, see :func:`compile_model`);
with compile on, the last incomplete batch of an epoch is dropped so every step has the same shape.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from dpaat_core import __version__
from dpaat_core.train import distributed
from dpaat_core.train.augment import augment_batch
from dpaat_core.store import loading, locks, runs
from dpaat_core.config import ConfigError, ModelConfig, RunConfig
from dpaat_core.data import ImageDataset, load_dataset
from dpaat_core.models import check_gradcam_layer, model_from_config   # with a normalisation: started from another run's architecture
from dpaat_core.train.objectives import MethodState, training_step
from dpaat_core.train.validation import EARLY_STOP_METRIC, validate


@dataclass
class Progress:
    """What a progress callback receives: after every batch, and with ``metrics`` at an epoch's end."""

    run_dir: Path
    epoch: int
    epochs: int
    batch: int
    batches: int
    phase: str                          # "train", "val" or "epoch_end"
    loss: Optional[torch.Tensor] = None  # running mean training loss (a device tensor: read it sparingly)
    metrics: dict = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def class_weights(dataset: ImageDataset) -> torch.Tensor:
    """``N / (C * n_c)`` per class (0 for a class absent from training), float32 ``[C]``."""
    counts = torch.as_tensor(dataset.class_counts, dtype=torch.float32)
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def epoch_order(dataset: ImageDataset, epoch: int, seed: int, world: distributed.World, balanced: bool) -> torch.Tensor:
    """This process's sample indices for ``epoch``: a function of (seed, epoch) alone, so resume is exact.

    Uniform: :class:`DistributedSampler` (a shuffled permutation, padded to a multiple of the
    world size). Balanced: a class-balanced draw with replacement, split the same way.
    """
    if not balanced:
        sampler = DistributedSampler(dataset, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.tensor(list(iter(sampler)), dtype=torch.int64)
    counts = torch.as_tensor(dataset.class_counts, dtype=torch.float64)
    weights = (1.0 / counts.clamp(min=1))[dataset.labels]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.multinomial(weights, len(dataset), replacement=True, generator=gen)
    per_rank = math.ceil(len(order) / world.size)
    order = torch.cat([order, order[: per_rank * world.size - len(order)]])
    return order[world.rank::world.size]


#: environment variable naming a torch.compile backend to use instead of inductor ("aot_eager" and
#: "eager" need no compiler: tests use them to run the compiled path on the CPU).
COMPILE_BACKEND_ENV = "DPAAT_COMPILE_BACKEND"


def compile_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """``train.compile`` resolved: None (auto) is on for CUDA and off on the CPU."""
    return device.type == "cuda" if setting is None else bool(setting)


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)``: mode "reduce-overhead" (CUDA graphs) on CUDA, the default on the CPU.

    ``$DPAAT_COMPILE_BACKEND``, when set, names the backend (e.g. "aot_eager"); the mode applies to
    inductor only, as other backends take no mode.
    """
    backend = os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    return torch.compile(model, backend=backend, mode=mode)


def resident_split(dataset: ImageDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's uint8 images ``[N, C, H, W]`` and int64 labels ``[N]`` on ``device``, moved once.

    Batches are then indexed, converted to float and flipped where the data already is (see
    :func:`make_batch`), so a CUDA step never waits for a host-to-device copy. On the CPU these are
    the dataset's own tensors (no copy). uint8 keeps a split small: 10,000 images at 224 px are 1.5 GB.
    """
    return dataset.images.to(device), dataset.labels.to(device)


def make_batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, augment: str, gen, channels_last: bool):
    """Float images in [0, 1] (changed by the ``augment`` policy, see :mod:`.augment`), labels and indices of
    one batch.

    ``images`` uint8 ``[N, C, H, W]`` and ``labels`` live where ``idx`` does (see
    :func:`resident_split`); the random draws come from ``gen``.
    """
    x = augment_batch(images[idx].float().div_(255.0), augment, gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, labels[idx], idx


def _versions(device: torch.device, world: distributed.World) -> dict:
    import torchvision
    return {"dpaat_core": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "world_size": world.size}


def _dataset_info(train_set: ImageDataset, val_set: ImageDataset) -> dict:
    return {"classes": train_set.classes, "num_classes": train_set.num_classes, "in_channels": train_set.in_channels,
            "image_size": train_set.image_size, "train_size": len(train_set), "val_size": len(val_set),
            "train_class_counts": train_set.class_counts.tolist(), "source_path": train_set.source.path}


def _epoch_metrics(stats: dict, prev_fragile: torch.Tensor, classes: list) -> dict:
    """Per-epoch summary of the per-sample arrays of one epoch (numpy, on rank 0)."""
    fragile, label, eps = stats["fragile"], stats["label"], stats["eps"]
    per_class = {c: (float(fragile[label == k].mean()) if (label == k).any() else math.nan) for k, c in enumerate(classes)}
    seen_before = prev_fragile[stats["index"]].numpy()
    both = seen_before >= 0
    was, now = seen_before[both] == 1, fragile[both]
    q = np.quantile(eps, [0.05, 0.5, 0.95]) if len(eps) else [math.nan] * 3
    return {
        "train_ce_clean": float(stats["ce_clean"].mean()), "train_ce_adv": float(stats["ce_adv"].mean()),
        "train_sync": float(stats["sync"].mean()), "threshold": stats["last_threshold"],
        "threshold_mean": float(stats["threshold"].mean()),
        "fragile_fraction": float(fragile.mean()),
        "fragile_fraction_per_class": per_class,
        "eps_mean": float(eps.mean()), "eps_min": float(eps.min()), "eps_max": float(eps.max()),
        "eps_q05": float(q[0]), "eps_q50": float(q[1]), "eps_q95": float(q[2]),
        "delta_loss_mean": float(stats["delta_loss"].mean()),
        "train_accuracy_clean": float(stats["correct_clean"].mean()),
        "train_accuracy_adv": float(stats["correct_adv"].mean()),
        "transitions": {"fragile_to_stable": int((was & ~now).sum()), "stable_to_fragile": int((~was & now).sum()),
                        "fragile_to_fragile": int((was & now).sum()), "stable_to_stable": int((~was & ~now).sum())},
    }


class Stopped(Exception):
    """The run was stopped on request (``should_stop`` said so); its completed epochs are kept."""


def init_source(config: RunConfig, train_set: ImageDataset) -> tuple[RunConfig, dict]:
    """For ``model.init_from``: the source run's weights, checked against this run's data and architecture, and
    the config with the source's architecture, normalisation and Grad-CAM layer filled in. A mismatch is a
    :class:`ConfigError` naming both sides."""
    source = Path(config.model.init_from)
    if not (source / "weights.safetensors").is_file():
        raise ConfigError(f"model.init_from: {source} is not a run with weights (no weights.safetensors)")
    source_record = runs.read_record(source)
    theirs = source_record.dataset
    if list(theirs.classes) != list(train_set.classes) or theirs.in_channels != train_set.in_channels:
        raise ConfigError(f"model.init_from: {source.name} predicts {', '.join(theirs.classes)} "
                          f"from {theirs.in_channels} channel(s); this data has "
                          f"{', '.join(map(str, train_set.classes))} from {train_set.in_channels}")
    arch = source_record.model.name
    if config.model.name not in (arch, ModelConfig.name):     # the default name stands for "the source's"
        raise ConfigError(f"model.init_from: {source.name} is a {arch}, the config asks for {config.model.name}")
    model = loading.load_model(source)
    changes = {"name": arch, "pretrained": False}
    if source_record.model.normalization:   # imported, or started from an imported run: its own normalisation
        changes |= {"normalization": source_record.model.normalization,
                    "gradcam_layer": source_record.model.gradcam_layer}
    elif source_record.model.gradcam_layer and not config.model.gradcam_layer:   # explained where the source is
        changes["gradcam_layer"] = source_record.model.gradcam_layer
    record = {"run": str(source), "run_id": source_record.run_id or source.name,
              "origin": "imported" if source_record.imported else "trained",
              "weights_sha256": runs.file_sha256(source / "weights.safetensors")}
    return config.replace(model=changes), {"state": model.state_dict(), "record": record}


def train(config: RunConfig, store: str | Path = "checkpoints", run_id: Optional[str] = None,
          progress: Optional[ProgressFn] = None, should_stop: Optional[Callable[[], bool]] = None) -> Path:
    """Train a new run described by ``config`` into ``store/run_id``; returns the run folder.

    ``should_stop`` is asked before every batch; when it says yes the run ends with status
    "stopped" and :class:`Stopped` is raised (files are never cut off in the middle of a write).
    """
    return _run(config, progress, should_stop, store=Path(store), run_id=run_id)


def resume(run_dir: str | Path, progress: Optional[ProgressFn] = None, device: Optional[str] = None,
           should_stop: Optional[Callable[[], bool]] = None, compile: Optional[bool] = None,
           max_minutes: Optional[float] = None, epochs: Optional[int] = None) -> Path:
    """Continue a killed, stopped or out-of-time run from its last completed epoch (its ``last.pt``), with the
    config :func:`resume_config` gives. A time budget counts from the start of this call: a run that ended on
    its budget continues for another one. ``epochs``: a new last epoch, so that a finished run trains on (as a
    study whose length is fixed after its first epoch does)."""
    run_dir = Path(run_dir)
    config = resume_config(run_dir, device, compile, max_minutes, epochs)
    return _run(config, progress, should_stop, run_dir=run_dir)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """The learning-rate schedule, stepped once per epoch: None for "none"; "cosine" anneals to 0 over the run;
    "step" multiplies the rate by 0.1 after half and after three quarters of the epochs (MedMNIST v2's protocol:
    epochs 50 and 75 of 100)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [epochs // 2, (3 * epochs) // 4], gamma=0.1)
    return None


def resume_config(run_dir: str | Path, device: Optional[str] = None, compile: Optional[bool] = None,
                  max_minutes: Optional[float] = None, epochs: Optional[int] = None) -> RunConfig:
    """The config a resume trains with: the run's own, where ``device``, ``compile``, ``max_minutes`` and
    ``epochs`` (when given) replace ``train.device``, ``train.compile``, ``train.max_minutes`` and ``train.epochs``;
    all but the device are also written to its ``config.json``. A run written before the compile switch existed
    keeps every batch (compile off). ``epochs`` below the epochs already trained, or with a cosine or step schedule
    (whose shape depends on the length), is refused."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise runs.RunError(f"{run_dir}: no such run folder")
    raw = runs.read_config(run_dir)
    config = RunConfig.from_dict(raw)
    if epochs is not None:
        done = len(runs.read_metrics(run_dir))
        if not isinstance(epochs, int) or epochs < max(done, 1):
            raise ConfigError(f"train.epochs: the run has trained {done} epoch(s), so a resume needs at least that "
                              f"many, got {epochs!r}")
        if config.train.schedule != "none" and epochs != config.train.epochs:
            raise ConfigError(f"train.epochs: a {config.train.schedule} schedule is shaped by the run's length "
                              f"({config.train.epochs} epochs); it cannot be changed on resume")
    given = {k: v for k, v in (("compile", compile), ("max_minutes", max_minutes), ("epochs", epochs))
             if v is not None}
    train_changes = ({"device": device} if device is not None else {}) | (
        {"compile": False} if "compile" not in (raw.get("train") or {}) else {}) | given
    config = config.replace(train=train_changes)
    if given:   # the run's config says what it now trains with
        runs.atomic_write_json(run_dir / "config.json", raw | {"train": (raw.get("train") or {}) | given})
    return config


def _run(config: RunConfig, progress: Optional[ProgressFn], should_stop, *, store=None, run_id=None,
         run_dir=None) -> Path:
    started = time.monotonic()   # the time budget (train.max_minutes) counts from here
    device = resolve_device(config.train.device)
    world = distributed.init_world(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    try:
        with contextlib.ExitStack() as held:   # the run's writer lock (rank 0), released however training ends
            if run_dir is not None and world.is_main:   # resume: locked before anything in the run is read
                held.enter_context(locks.WriterLock(run_dir))
            train_set, val_set = _load_splits(config, world)
            if run_dir is not None:
                init, resumed = None, _load_resume(run_dir, train_set)
                if world.is_main:
                    runs.remove_temp_files(run_dir)
            else:
                config, init = init_source(config, train_set) if config.model.init_from is not None else (config, None)
                config = _check_gradcam(config, train_set)
                resumed = None
                if world.is_main:
                    run_dir = _create_run(config, store, run_id, train_set, val_set, device, world, init)
                    held.enter_context(locks.WriterLock(run_dir))
            run_dir = Path(_broadcast(str(run_dir) if run_dir is not None else None, world))
            fit = _Fit.build(config, device, world, train_set, val_set, run_dir, init, resumed)
            return fit.run(progress, should_stop, started)
    finally:
        distributed.close_world(world)


def _load_splits(config: RunConfig, world: distributed.World) -> tuple[ImageDataset, ImageDataset]:
    load = dict(image_size=config.data.image_size, root=config.data.root, max_samples=config.data.max_samples,
                seed=config.train.seed, progress=world.is_main)
    return load_dataset(config.data.spec, "train", **load), load_dataset(config.data.spec, "val", **load)


def _check_gradcam(config: RunConfig, train_set: ImageDataset) -> RunConfig:
    """``config`` with its ``model.gradcam_layer`` as a path under the classifier (``backbone.features.8``), refused
    before a run folder exists when the architecture lacks it or it gives no feature map at the run's image size
    (an imported architecture's layer was checked on import)."""
    if not config.model.gradcam_layer or config.model.normalization:
        return config
    model = model_from_config(asdict(config.model), train_set.num_classes, train_set.in_channels)
    path = check_gradcam_layer(model, config.model.gradcam_layer, train_set.images.shape[-1], "model.gradcam_layer")
    return config.replace(model={"gradcam_layer": path})


def _create_run(config: RunConfig, store, run_id, train_set, val_set, device, world, init) -> Path:
    """A new run folder with its ``config.json`` (rank 0 only)."""
    cfg = config.to_dict() | {"format": 1, "dataset": _dataset_info(train_set, val_set),
                              "versions": _versions(device, world)} | ({"init": init["record"]} if init else {})
    return runs.create_run(store, cfg, run_id or runs.default_run_id(cfg))


def out_of_time(max_minutes: Optional[float], started: float, world: distributed.World) -> bool:
    """Whether ``max_minutes`` have passed since ``started`` (``time.monotonic``); rank 0 decides for all."""
    if max_minutes is None:
        return False
    return bool(_broadcast(time.monotonic() - started >= 60.0 * max_minutes, world))


def _stopped_by(finished: bool, epoch: int, tc, no_patience_left: bool) -> Optional[str]:
    """Why a run ended after ``epoch`` (None while it goes on): its last epoch, early stopping, or its time budget."""
    if not finished:
        return None
    return "epochs" if epoch == tc.epochs else "early_stop" if no_patience_left else "max_minutes"


@dataclass
class _Fit:
    """One run's training, set up: the model (``bare``, and ``model``: the same under DDP and compile, for the
    training forward passes), the optimiser and schedule, the method's state, the resident training split, and
    where a resumed run left off (``start``, ``best``, ``prev_fragile``)."""
    config: RunConfig
    device: torch.device
    world: distributed.World
    run_dir: Path
    train_set: ImageDataset
    val_set: ImageDataset
    bare: nn.Module
    model: nn.Module
    compiled: bool
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]
    state: MethodState
    weights: Optional[torch.Tensor]
    images: torch.Tensor
    labels: torch.Tensor
    prev_fragile: torch.Tensor
    best: dict
    start: int = 1

    @classmethod
    def build(cls, config, device, world, train_set, val_set, run_dir, init, resumed) -> "_Fit":
        tc, cuda = config.train, device.type == "cuda"
        torch.manual_seed(tc.seed)
        bare = model_from_config(asdict(config.model), train_set.num_classes, train_set.in_channels,
                                 config.model.pretrained)
        if init is not None:
            bare.load_state_dict(init["state"])
        bare = bare.to(device)
        if cuda:
            bare = bare.to(memory_format=torch.channels_last)
        model = DistributedDataParallel(bare, device_ids=[device.index] if cuda else None) if world.distributed else bare
        compiled = compile_enabled(tc.compile, device)
        if compiled:   # the training forward passes only: the attack and validation run on ``bare``
            model = compile_model(model, device)
        optimizer = torch.optim.Adam(bare.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=cuda or None)
        scheduler = make_scheduler(optimizer, tc.schedule, tc.epochs)
        state = MethodState.create(config.method, config.attack, len(train_set), device, labels=train_set.labels,
                                   num_classes=train_set.num_classes)
        weights = class_weights(train_set).to(device) if tc.imbalance == "class_weights" else None
        images, labels = resident_split(train_set, device)
        fit = cls(config, device, world, run_dir, train_set, val_set, bare, model, compiled, optimizer, scheduler,
                  state, weights, images, labels,
                  prev_fragile=torch.full((len(train_set),), -1, dtype=torch.int8),   # -1: not seen yet
                  best={"metric": -math.inf, "epoch": 0, "bad_epochs": 0})
        if resumed is not None:
            fit.restore(resumed)
        return fit

    def restore(self, resumed: dict) -> None:
        """Continue from ``last.pt``: weights, optimiser, schedule, the method's state, and the epoch after its own."""
        self.bare.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(resumed["scheduler"])
        self.state.load_state_dict(resumed["method_state"])
        self.prev_fragile = resumed["prev_fragile"].to(torch.int8)
        self.best = dict(resumed["best"])
        self.start = int(resumed["epoch"]) + 1
        if self.world.is_main:
            runs.truncate_metrics(self.run_dir, self.start - 1)

    def run(self, progress, should_stop, started: float) -> Path:
        """Train from ``start`` until the last epoch, early stopping or the time budget; returns the run folder."""
        tc = self.config.train
        finished = self.start > tc.epochs or self.best["bad_epochs"] >= tc.patience and tc.early_stop != "none"
        stopped_by = ("epochs" if self.start > tc.epochs else "early_stop") if finished else None   # resumed, done
        status = _StatusWriter(self.run_dir, self.world, tc.epochs)
        try:
            for epoch in range(self.start, tc.epochs + 1):
                if finished:
                    break
                t0, lr = time.perf_counter(), self.optimizer.param_groups[0]["lr"]
                stats, train_loss, data_seconds = self.train_epoch(epoch, status, progress, should_stop)
                train_seconds = time.perf_counter() - t0
                val = validate(self.bare, self.val_set, self.config.attack, self.device, batch_size=2 * tc.batch_size,
                               world=self.world, seed=tc.seed)
                improved, no_patience_left = self.judge(epoch, val)
                finished = epoch == tc.epochs or no_patience_left or out_of_time(tc.max_minutes, started, self.world)
                stopped_by = _stopped_by(finished, epoch, tc, no_patience_left)
                record = {"epoch": epoch, "lr": lr, "train_loss": train_loss,
                          **_epoch_metrics(stats, self.prev_fragile, self.train_set.classes), **val,
                          "seconds": time.perf_counter() - t0, "train_seconds": train_seconds,
                          "data_seconds": data_seconds, "images_per_second": len(stats["index"]) / train_seconds,
                          "is_best": improved, "early_stop_metric": tc.early_stop,
                          "stopped_early": stopped_by == "early_stop", "stopped_by": stopped_by}
                self.checkpoint(epoch, stats, record, improved)
                status.epoch_end(epoch, self.best["epoch"])
                if progress:
                    progress(Progress(self.run_dir, epoch, tc.epochs, 1, 1, "epoch_end", metrics=record))
            status.done(self.best["epoch"], stopped_by, tc.max_minutes)
        except BaseException as exc:
            status.failed(exc)
            raise
        return self.run_dir

    def train_epoch(self, epoch: int, status, progress, should_stop) -> tuple[dict, float, float]:
        """One pass over the training split: the epoch's per-sample stats, mean loss and data seconds.

        data_seconds: host time spent preparing batches (order, indexing, converting, flipping). On CUDA that work
        is queued asynchronously, so it is the host's share: the time the device may wait for data."""
        tc, device, cuda = self.config.train, self.device, self.device.type == "cuda"
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1_000_003 + epoch * 1009 + self.world.rank)
        batches = epoch_batches(self.train_set, epoch, tc, self.world, device, self.compiled)
        data_seconds = time.perf_counter() - t0
        self.model.train()
        parts, loss_sum, seen = [], torch.zeros((), device=device), 0
        for b, idx in enumerate(batches, 1):
            if should_stop is not None and should_stop():
                raise Stopped(f"stopped in epoch {epoch}")
            t_data = time.perf_counter()
            x, y, idx = make_batch(self.images, self.labels, idx, tc.augment, gen, cuda)
            data_seconds += time.perf_counter() - t_data
            if cuda and self.compiled:   # a new step for CUDA graphs: the last step's outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                step = training_step(self.model, x, y, idx, self.config.method, self.config.attack, self.state,
                                     class_weights=self.weights, generator=gen, attack_model=self.bare)
            self.optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            self.optimizer.step()
            loss_sum += step.loss.detach() * len(idx)
            seen += len(idx)
            parts.append(_step_stats(step, idx, y))
            status.batch(epoch, b, len(batches), "train", loss=lambda: loss_sum / seen)
            if progress:
                progress(Progress(self.run_dir, epoch, tc.epochs, b, len(batches), "train", loss_sum / seen))
        status.batch(epoch, len(batches), len(batches), "val")
        if progress:
            progress(Progress(self.run_dir, epoch, tc.epochs, len(batches), len(batches), "val", loss_sum / seen))
        stats, train_loss = _gather_epoch(parts, loss_sum, seen, self.state, device)
        if self.scheduler is not None:
            self.scheduler.step()
        return stats, train_loss, data_seconds

    def judge(self, epoch: int, val: dict) -> tuple[bool, bool]:
        """Early stopping's bookkeeping after validation: whether ``epoch`` is the best so far, and whether the
        patience ran out."""
        tc = self.config.train
        metric = val[EARLY_STOP_METRIC[tc.early_stop]]
        improved = tc.early_stop == "none" or metric > self.best["metric"]
        self.best = {"metric": float(metric), "epoch": epoch, "bad_epochs": 0} if improved else \
            self.best | {"bad_epochs": self.best["bad_epochs"] + 1}
        return improved, tc.early_stop != "none" and self.best["bad_epochs"] >= tc.patience

    def checkpoint(self, epoch: int, stats: dict, record: dict, improved: bool) -> None:
        """The epoch's fragile flags kept for the next epoch's transitions, and the epoch written (rank 0)."""
        self.prev_fragile[torch.from_numpy(stats["index"])] = torch.from_numpy(stats["fragile"]).to(torch.int8)
        if self.world.is_main:
            _save_epoch(self.run_dir, epoch, stats, record, self.bare, self.optimizer, self.scheduler, self.state,
                        self.prev_fragile, self.best, improved)


def epoch_batches(train_set: ImageDataset, epoch: int, tc, world: distributed.World, device: torch.device,
                  compiled: bool) -> list[torch.Tensor]:
    """This process's batches of sample indices for ``epoch``, on ``device``. With ``compiled`` the last
    incomplete batch is dropped (every step has the same shape): ``floor(n / batch_size) * batch_size`` samples,
    or all of them when there is only one, incomplete, batch."""
    order = epoch_order(train_set, epoch, tc.seed, world, tc.imbalance == "balanced_sampler")
    batches = list(order.to(device).split(tc.batch_size))
    if compiled and len(batches) > 1 and len(batches[-1]) < tc.batch_size:
        batches.pop()
    return batches


def _step_stats(step, idx: torch.Tensor, y: torch.Tensor) -> dict:
    """One step's per-sample statistics, as device tensors (read back once per epoch)."""
    n = len(idx)
    return {"index": idx, "label": y, "delta_loss": step.delta_loss, "eps": step.eps, "fragile": step.fragile,
            "correct_clean": step.correct_clean, "correct_adv": step.correct_adv,
            "threshold": step.threshold.expand(n), "ce_clean": step.ce_clean.expand(n), "ce_adv": step.ce_adv.expand(n),
            "sync": step.sync.expand(n)}


def _gather_epoch(parts: list, loss_sum: torch.Tensor, seen: int, state: MethodState, device) -> tuple[dict, float]:
    """Every process's per-sample statistics of the epoch (numpy, one row per sample, by index) and the mean
    training loss; the eps memory is checked to be the same on every process."""
    if state.memory is not None:
        distributed.check_same(state.memory.eps, "the eps memory")
    total = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=device)]))
    stats = {k: distributed.all_gather_cat(torch.cat([p[k] for p in parts])).cpu().numpy() for k in parts[0]}
    last_threshold = float(stats["threshold"][-1])
    _, first = np.unique(stats["index"], return_index=True)   # DDP padding repeats a few samples
    stats = {k: v[first] for k, v in stats.items()}
    stats["last_threshold"] = last_threshold
    return stats, float(total[0] / total[1])


def _broadcast(value, world: distributed.World):
    """Rank 0's ``value`` on every process (a small picklable object, e.g. the run folder)."""
    if not world.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _load_resume(run_dir: Path, train_set: ImageDataset) -> dict:
    """``last.pt`` of a run, checked against the data it is resumed on."""
    path = run_dir / "last.pt"
    if not path.is_file():
        raise runs.RunError(f"{path}: missing; the run has no completed epoch to resume from (start it again)")
    dataset = runs.read_record(run_dir).dataset
    if dataset.num_classes != train_set.num_classes:
        raise runs.RunError(f"{run_dir}: the run was trained on {dataset.num_classes} classes and its data now gives "
                            f"{train_set.num_classes} (was the data spec in config.json changed?); resume it on the "
                            "data it was trained on")
    state = runs.load_checkpoint(path)
    missing = {"epoch", "model", "optimizer", "method_state", "prev_fragile", "best"} - set(state)
    if missing:
        raise runs.RunError(f"{path}: not a resume state (missing {', '.join(sorted(missing))})")
    if len(state["prev_fragile"]) != len(train_set):
        raise runs.RunError(f"{path}: saved for a training set of {len(state['prev_fragile'])} samples, "
                            f"the data now gives {len(train_set)}; resume it on the same data")
    return state


def _save_epoch(run_dir, epoch, stats, record, model, optimizer, scheduler, state, prev_fragile, best, improved):
    """Write one epoch to the store. ``last.pt`` goes last: it is what makes the epoch count as done."""
    runs.save_dynamics(run_dir, epoch, {k: stats[k] for k in runs.DYNAMICS_KEYS})
    weights = {k: v for k, v in model.state_dict().items()}
    if improved:
        runs.save_weights(run_dir / "weights.safetensors", weights)
    runs.append_metrics(run_dir, record)
    runs.save_checkpoint(run_dir / "last.pt", {
        "format": 1, "epoch": epoch, "model": weights, "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "method_state": state.state_dict(), "prev_fragile": prev_fragile.clone(), "best": dict(best),
        "torch_rng": torch.get_rng_state(),
    })


class _StatusWriter:
    """``status.json`` for the dashboard: at most every ``every`` seconds during an epoch (rank 0), and a heartbeat:
    a thread that refreshes it every ``heartbeat`` seconds while the run is running, through validation and
    compilation too, so a listing can tell a live run from a dead one (``runs.writer_gone``)."""

    def __init__(self, run_dir: Path, world: distributed.World, epochs: int, every: float = 2.0,
                 heartbeat: float = 30.0):
        self.run_dir, self.main, self.epochs, self.every = run_dir, world.is_main, epochs, every
        self.last = 0.0
        self.best_epoch = None
        self.started = time.time()
        self.trace: list = []        # (epochs done as a fraction, mean training loss so far in the epoch), for a live curve
        self._payload = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        if self.main:
            threading.Thread(target=self._beat, args=(heartbeat,), daemon=True, name="dpaat-heartbeat").start()

    def _beat(self, every: float) -> None:
        while not self._stopped.wait(every):
            with self._lock:
                if self._payload is not None and self._payload[0] == "running" and not self._stopped.is_set():
                    try:
                        runs.write_status(self.run_dir, *self._payload[:2], **self._payload[2])
                    except OSError:   # the folder went away (removed, or a full disk): the main thread will say so
                        return

    def _write(self, state, message=None, **fields):
        if self.main:
            fields = dict(epochs=self.epochs, best_epoch=self.best_epoch, elapsed=round(time.time() - self.started, 1),
                          trace=self.trace, **fields)
            with self._lock:
                self._payload = (state, message, fields)
                runs.write_status(self.run_dir, state, message, **fields)
            if state != "running":
                self._stopped.set()

    #: the most points of the live loss curve kept in status.json (older ones are thinned out)
    TRACE = 240

    def batch(self, epoch, batch, batches, phase, loss=None):
        """A progress write (at most every ``every`` seconds); ``loss``: a callable giving the epoch's running mean
        training loss, read only when the status is written (a device sync on a GPU)."""
        now = time.monotonic()
        if now - self.last >= self.every or batch == batches:
            self.last = now
            if loss is not None and batch > 0 and self.main:
                value = float(loss())
                if math.isfinite(value):
                    self.trace.append([round(epoch - 1 + batch / batches, 4), round(value, 5)])
                    if len(self.trace) > self.TRACE:
                        self.trace = self.trace[::2]
            self._write("running", epoch=epoch, batch=batch, batches=batches, phase=phase)

    def epoch_end(self, epoch, best_epoch):
        self.best_epoch = best_epoch
        self._write("running", epoch=epoch, epochs_done=epoch, phase="epoch_end")

    def done(self, best_epoch, stopped_by=None, max_minutes=None):
        self.best_epoch = best_epoch
        if stopped_by == "max_minutes":
            message = (f"time budget of {max_minutes:g} min reached at an epoch boundary; "
                       "continue with --resume RUN_DIR")
        else:
            message = {"early_stop": "finished (early stopping)"}.get(stopped_by, "finished")
        self._write("done", message, phase="done", stopped_by=stopped_by)

    def failed(self, exc: BaseException):
        if isinstance(exc, (KeyboardInterrupt, Stopped)):
            self._write("stopped", "stopped on request; continue with --resume", phase="stopped")
        else:
            self._write("failed", f"{type(exc).__name__}: {exc}", phase="failed")
