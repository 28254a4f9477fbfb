"""Train: configure a run, launch it as its own process, watch it and stop it."""
import time

import streamlit as st

from dashboard import charts
from dashboard.state import ROOT, list_runs, refuse_in_viewer_mode, store
from dashboard.widgets import open_run_buttons
from dpaat_core import preview
from dpaat_core.cli import launch
from dpaat_core.store import runs
from dpaat_core.config import (AUGMENTATIONS, METHODS, AttackConfig, ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig,
                               method_config)
from dpaat_core.data import load_dataset
from dpaat_core.models import MODEL_NAMES

refuse_in_viewer_mode("Training")
st.title("Train")
SAMPLE = ROOT.parent / "shared" / "data" / "ham10000_sample.npz"
default_data = f"npz:{SAMPLE}" if SAMPLE.is_file() else "synthetic"

st.caption("Launches `python -m dpaat_core train` as a separate process: it keeps running if you leave or reload "
           "this page, and shows up on the other pages while it runs.")
c1, c2, c3 = st.columns(3)
data = c1.text_input("Data spec", default_data, key="train-data",
                     help="npz:<file>, medmnist:<flag>[@size], ham10000:<dir>, folder:<dir> or synthetic[:n=..]")
model_name = c2.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index("resnet8"), key="train-model")
method = c3.selectbox("Method", list(METHODS), index=list(METHODS).index("dpaat"), key="train-method")
preset = METHODS[method]
starts = {r.run_id: r for r in list_runs() if r.has_weights and r.record is not None}
start = st.selectbox("Start from a run's weights (imported or trained here)", ["none (fresh weights)", *starts],
                     help="Same architecture and classes: the Model box is then the source run's. This is how "
                          "a model of your own is hardened with DPAAT: import it, then start from it.")
c1, c2, c3, c4 = st.columns(4)
epochs = c1.number_input("Epochs", 1, 500, 3, key="train-epochs")
batch_size = c2.number_input("Batch size", 1, 4096, 32, key="train-batch")
image_size = c3.number_input("Image size (px)", 8, 1024, 64, key="train-size")
max_samples = c4.number_input("Max images per split (0: all)", 0, 10**7, 0, key="train-max")

st.subheader("Perturbation budget")
c1, c2, c3 = st.columns(3)
norm = c1.selectbox("Norm", ["l2", "linf"], key="train-norm")
top, default, step = (2.0, 0.3, 0.01) if norm == "l2" else (0.1, 0.031, 0.001)
eps = c2.slider(f"eps0 ({norm}, pixels in [0, 1])", step, top, default, step, key=f"train-eps-{norm}",
                format="%.3f")
steps = c3.slider("PGD steps K", 1, 20, 7, key="train-steps")
c1, c2, c3, c4 = st.columns(4)
adaptive = preset.adaptive
gamma = c1.slider("gamma (memory rate)", 0.0, 0.5, 0.1, 0.01, key="train-gamma", disabled=not adaptive,
                  help="fragile samples' eps times (1 - gamma), stable ones' times (1 + gamma), once per epoch")
floor = c2.slider("floor (× eps0)", 0.05, 1.0, 0.25, 0.05, key="train-floor", disabled=not adaptive)
cap = c3.slider("cap (× eps0)", 1.0, 4.0, 2.0, 0.1, key="train-cap", disabled=not adaptive)
lam = c4.slider("lam (sync loss; TRADES' beta)", 0.0, 10.0, float(preset.lam), 0.1, key=f"train-lam-{method}",
                disabled=preset.attack in ("none", "noise"))
if adaptive:
    band = preview.eps_band(eps, gamma, floor, cap, int(epochs))
    up, down = preview.epochs_to_bound(gamma, cap), preview.epochs_to_bound(gamma, floor)
    m1, m2, m3 = st.columns(3)
    m1.metric("eps range [floor, cap]", f"[{floor * eps:.3f}, {cap * eps:.3f}]")
    m2.metric("stable epochs to the cap", "never" if up == float("inf") else f"{up}")
    m3.metric(f"after {int(epochs)} epochs a sample's eps lies in",
              f"[{band['low'].iloc[-1]:.3f}, {band['high'].iloc[-1]:.3f}]")
    st.plotly_chart(charts.eps_band_chart(band, eps), key="eps-band")
    st.caption(f"Each sample's eps moves once per epoch. Fragile every epoch it reaches the floor after {down} "
               f"epochs, stable every epoch the cap after {up}; most samples wander inside the band.")
else:
    st.caption(f"{method} trains every sample at eps0 = {eps:.3f}: no memory, nothing moves.")
c1, c2, c3, c4 = st.columns(4)
threshold = c1.selectbox("Threshold", ["the method's own", "batch_mean", "ema", "median", "quantile:0.75",
                                     "class_mean"], key="train-threshold",
                         help="class_mean: each sample against its own class's running mean loss change "
                              "(docs/CLASS_AWARE.md); the method's own is batch_mean except for dpaat_cthr")
lr = c2.number_input("Learning rate", 1e-6, 1.0, 3e-4, format="%.6f", key="train-lr")
seed = c3.number_input("Seed", 0, 2**31 - 1, 0, key="train-seed")
augment = c4.selectbox("Augmentation", AUGMENTATIONS, index=AUGMENTATIONS.index("flips"), key="train-augment",
                       help="random changes of the training images: flips; dermoscopy adds any rotation, a zoom, a "
                            "shift and colour jitter (for models trained without pretrained weights)")


def _config() -> RunConfig:
    return RunConfig(
        data=DataConfig(spec=data, image_size=int(image_size), max_samples=int(max_samples) or None),
        model=ModelConfig(name=model_name) if start not in starts else ModelConfig(
            name=starts[start].model, init_from=str(starts[start].path)),
        attack=AttackConfig(norm=norm, eps=float(eps), steps=int(steps)),
        method=method_config(method, gamma=float(gamma) if adaptive else None, lam=None if preset.attack in ("none", "noise") else float(lam),
                             eps_min_ratio=float(floor) if adaptive else None,
                             eps_max_ratio=float(cap) if adaptive else None,
                             threshold=None if threshold == "the method's own" else threshold),
        train=TrainConfig(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), seed=int(seed),
                          augment=augment))


@st.cache_data(show_spinner="Timing a few training steps on this machine…", max_entries=32)
def _step_seconds(model: str, size: int, batch: int, k: int, method_name: str, norm_: str) -> float:
    cfg = RunConfig().replace(data={"image_size": size}, model={"name": model}, attack={"steps": k, "norm": norm_},
                              method=method_config(method_name), train={"batch_size": batch})
    return preview.step_seconds(cfg)


@st.cache_data(show_spinner=False, max_entries=16)
def _train_size(spec: str, size: int, max_n: int) -> int:
    n = len(load_dataset(spec, "train", size))
    return min(n, max_n) if max_n else n


if st.button("Time an epoch on this machine", key="train-time"):
    try:
        per_step = _step_seconds(model_name, int(image_size), int(batch_size), int(steps), method, norm)
        n = _train_size(data, int(image_size), int(max_samples))
        batches = -(-n // int(batch_size))
        st.info(f"About {per_step * batches:.0f} s per epoch on this machine's CPU ({per_step:.2f} s a step × "
                f"{batches} batches of {int(batch_size)}, {n} training images); validation adds a little.")
    except Exception as exc:   # noqa: BLE001 - an unreadable data spec or an unknown model: say which
        st.error(f"Cannot time it: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
# The name suggested follows the method and model until it is typed over; a typed name is kept on every rerun.
auto = f"{method}-{model_name}-{st.session_state.setdefault('train-stamp', time.strftime('%Y%m%d-%H%M%S'))}"
if st.session_state.get("train-name") in (None, st.session_state.get("train-name-auto")):
    st.session_state["train-name"] = auto
st.session_state["train-name-auto"] = auto
name = st.text_input("Run name", key="train-name")
submitted = st.button("Launch", type="primary", key="train-launch")

if submitted:
    try:
        cfg = _config()
        pid = launch.launch(cfg, store(), name)
        st.session_state.setdefault("launched", []).append(name)
        st.session_state.pop("train-stamp", None)          # the next suggestion gets a fresh time
        st.success(f"Launched {name} (process {pid}).")
    except (ConfigError, runs.RunError) as exc:
        st.error(str(exc))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


@st.fragment(run_every=2.0)
def watch() -> None:
    """Every running run in the store (and this session's launches), refreshed every two seconds."""
    active = {r.run_id: r for r in list_runs() if r.state == "running"}
    for name in st.session_state.get("launched", []):
        if name not in active and not (store() / name).exists():
            log = launch.log_path(store(), name)
            text = log.read_text(errors="replace").strip() if log.is_file() else ""
            if text:   # the process ended before making its run folder: say why
                st.error(f"{name} did not start: {text.splitlines()[-1]}")
    finished = [r for r in list_runs() if r.run_id in st.session_state.get("launched", []) and r.state != "running"]
    for run in finished:   # this session's launches that ended: what they reached, and where to look at them
        best = run.best.get("val_balanced_accuracy")
        st.success(f"{run.run_id} is {run.state} after {run.epochs_done}/{run.epochs or '?'} epochs"
                   + (f" (best validation balanced accuracy {best:.3f})" if best == best and best is not None else ""))
        open_run_buttons(run.run_id, f"finished-{run.run_id}")
    if not active:
        st.info("No run is training right now.")
        return
    for run in active.values():
        s = run.status
        epochs, epoch = s.get("epochs") or 1, s.get("epoch") or 0
        batch, batches = s.get("batch") or 0, s.get("batches")
        if not epoch or not batches:      # before the first batch: loading data, building, compiling
            st.progress(0.0, text=f"{run.run_id}: starting (reading the data and building the model)…")
        else:
            done = min(((epoch - 1) + batch / batches) / epochs, 1.0)
            elapsed = s.get("elapsed")
            left = (f", about {_duration(elapsed / done * (1 - done))} left" if elapsed and done > 0.02 else "")
            phase = {"train": "training", "val": "validating"}.get(s.get("phase"), s.get("phase") or "")
            st.progress(done, text=f"{run.run_id}: {done:.0%} · epoch {epoch} of {epochs}, batch {batch} of {batches} "
                                   f"({phase}){left}")
        cols = st.columns([2, 2, 1])
        if s.get("trace"):
            cols[0].plotly_chart(charts.loss_trace_chart(s["trace"], epochs), key=f"loss-{run.run_id}")
        if len(run.metrics):
            cols[1].plotly_chart(charts.metrics_chart(run.metrics), key=f"live-{run.run_id}")
        elif epoch:
            cols[1].caption("Validation accuracy appears here when the first epoch ends.")
        if cols[2].button("Stop", key=f"stop-{run.run_id}"):
            cols[1].write("stopping…" if launch.stop(run.path) else "not running on this machine")


st.subheader("Running")
watch()
