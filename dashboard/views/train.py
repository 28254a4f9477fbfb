"""Train: configure a run, launch it as its own process, watch it and stop it."""
import time

import streamlit as st

from dashboard import charts
from dashboard.state import ROOT, list_runs, refuse_in_viewer_mode, store
from dpaat_core import launch, runs
from dpaat_core.config import (METHODS, AttackConfig, ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig,
                               method_config)
from dpaat_core.models import MODEL_NAMES

refuse_in_viewer_mode("Training")
st.title("Train")
SAMPLE = ROOT.parent / "shared" / "data" / "ham10000_sample.npz"
default_data = f"npz:{SAMPLE}" if SAMPLE.is_file() else "synthetic"

with st.form("configure"):
    st.caption("Launches `python -m dpaat_core train` as a separate process: it keeps running if you leave or reload "
               "this page, and shows up on the other pages while it runs.")
    c1, c2, c3 = st.columns(3)
    data = c1.text_input("Data spec", default_data, help="npz:<file>, medmnist:<flag>[@size], ham10000:<dir>, "
                                                         "folder:<dir> or synthetic[:n=..]")
    model_name = c2.selectbox("Model", MODEL_NAMES, index=MODEL_NAMES.index("resnet8"))
    method = c3.selectbox("Method", list(METHODS), index=list(METHODS).index("dpaat"))
    starts = {r.run_id: r for r in list_runs() if r.has_weights and r.config is not None}
    start = st.selectbox("Start from a run's weights (imported or trained here)", ["none (fresh weights)", *starts],
                         help="Same architecture and classes: the Model box is then the source run's. This is how "
                              "a model of your own is hardened with DPAAT: import it, then start from it.")
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Epochs", 1, 500, 3)
    batch_size = c2.number_input("Batch size", 1, 4096, 32)
    image_size = c3.number_input("Image size (px)", 8, 1024, 64)
    max_samples = c4.number_input("Max images per split (0: all)", 0, 10**7, 0)
    c1, c2, c3, c4 = st.columns(4)
    norm = c1.selectbox("Norm", ["l2", "linf"])
    eps = c2.number_input("eps0", 0.0001, 100.0, 0.3, format="%.4f")
    steps = c3.number_input("PGD steps K", 1, 100, 7)
    gamma = c4.number_input("gamma (adaptive methods)", 0.0, 0.99, 0.1)
    c1, c2, c3 = st.columns(3)
    threshold = c1.selectbox("Threshold", ["the method's own", "batch_mean", "ema", "median", "quantile:0.75",
                                         "class_mean"],
                             help="class_mean: each sample against its own class's running mean loss change "
                                  "(docs/CLASS_AWARE.md); the method's own is batch_mean except for dpaat_cthr")
    lr = c2.number_input("Learning rate", 1e-6, 1.0, 3e-4, format="%.6f")
    seed = c3.number_input("Seed", 0, 2**31 - 1, 0)
    name = st.text_input("Run name", f"{method}-{model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    submitted = st.form_submit_button("Launch", type="primary")

if submitted:
    try:
        cfg = RunConfig(
            data=DataConfig(spec=data, image_size=int(image_size), max_samples=int(max_samples) or None),
            model=ModelConfig(name=model_name) if start not in starts else ModelConfig(
                name=starts[start].model, init_from=str(starts[start].path)),
            attack=AttackConfig(norm=norm, eps=float(eps), steps=int(steps)),
            method=method_config(method, gamma=float(gamma) if METHODS[method].adaptive else None, 
                                 threshold=None if threshold == "the method's own" else threshold),
            train=TrainConfig(epochs=int(epochs), batch_size=int(batch_size), lr=float(lr), seed=int(seed)))
        pid = launch.launch(cfg, store(), name)
        st.session_state.setdefault("launched", []).append(name)
        st.success(f"Launched {name} (process {pid}).")
    except (ConfigError, runs.RunError) as exc:
        st.error(str(exc))


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
    if not active:
        st.info("No run is training right now.")
        return
    for run in active.values():
        s = run.status
        epochs, epoch = s.get("epochs") or 1, s.get("epoch") or 0
        batch, batches = s.get("batch") or 0, s.get("batches") or 1
        done = min(((epoch - 1) + batch / batches) / epochs, 1.0) if epoch else 0.0
        st.progress(done, text=f"{run.run_id}: epoch {epoch}/{epochs}, batch {batch}/{batches} ({s.get('phase', '')})")
        cols = st.columns([4, 1])
        if len(run.metrics):
            cols[0].plotly_chart(charts.metrics_chart(run.metrics), key=f"live-{run.run_id}")
        if cols[1].button("Stop", key=f"stop-{run.run_id}"):
            cols[1].write("stopping…" if launch.stop(run.path) else "not running on this machine")


st.subheader("Running")
watch()
