"""End to end: `streamlit run` on a free local port, headless Chromium clicks through every page,
takes screenshots and times each page switch. Skips, saying why, without Chromium or Playwright."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dpaat_core.__main__ import main
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train import train

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = [("Runs", "Runs"), ("Training dynamics", "Training dynamics"), ("Robustness", "Robustness"),
         ("Attribution explorer", "Attribution explorer"), ("Train", "Train")]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does this)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    store = tmp_path_factory.mktemp("store")
    cfg = RunConfig()
    cfg.data.spec, cfg.data.image_size = "synthetic:n=48,classes=3", 32
    cfg.attack.steps, cfg.method = 1, method_config("dpaat")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.device = 3, 16, "cpu"
    run = train(cfg, store=store, run_id="browser-dpaat")
    assert main(["evaluate", str(run), "--steps", "2", "--eps-grid", "0,0.3,0.6,1.2", "--device", "cpu"]) == 0
    port = _free_port()
    env = dict(os.environ, DPAAT_STORE=str(store))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, "streamlit did not start"
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _settled(page, title: str, timeout_ms: int = 60_000) -> None:
    """The page's title is shown and Streamlit has finished running the script."""
    page.get_by_role("heading", name=title).first.wait_for(timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"] button')"
                           " && !document.querySelector('[data-testid=\"stSpinner\"]')", timeout=timeout_ms)
    # charts are drawn after the script has run: wait until each one has its plot
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
                           ".every(c => c.querySelector('.main-svg'))", timeout=timeout_ms)


SLIDERS = {"Training dynamics": "epoch", "Robustness": "eps", "Attribution explorer": "eps"}


def _move_slider(page, title: str) -> float:
    """Press the left arrow on the page's first slider; seconds until the re-run has settled."""
    thumb = page.locator('[data-testid="stSlider"] input[type="range"]').first
    before = thumb.get_attribute("aria-valuetext")
    start = time.perf_counter()
    thumb.focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("(v) => document.querySelector('[data-testid=\"stSlider\"] input[type=\"range\"]')"
                           ".getAttribute('aria-valuetext') !== v", arg=before, timeout=10_000)
    try:   # the re-run shows the status widget while the script runs
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="visible", timeout=500)
    except Exception:  # noqa: BLE001 - a fast re-run may finish before the widget shows
        pass
    _settled(page, title)
    return time.perf_counter() - start


def test_click_through_every_page_with_screenshots(dashboard, tmp_path):
    from playwright.sync_api import sync_playwright
    shots = Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    latencies = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(dashboard)
        _settled(page, "DPAAT Lab")
        page.screenshot(path=str(shots / "0-home.png"), full_page=True)
        for n, (link, title) in enumerate(PAGES, 1):
            start = time.perf_counter()
            page.get_by_role("link", name=link).first.click()
            _settled(page, title)
            latencies[title] = time.perf_counter() - start
            page.screenshot(path=str(shots / f"{n}-{title.lower().replace(' ', '-')}.png"), full_page=True)
            assert page.locator('[data-testid="stException"]').count() == 0, f"{title} shows an exception"
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0, f"{title} shows an error"
            if title in SLIDERS:   # move the page's first slider one step and time the re-run
                latencies[f"{title}: {SLIDERS[title]} slider"] = _move_slider(page, title)
                assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()
    print("page switch latency (s): " + ", ".join(f"{k} {v:.2f}" for k, v in latencies.items()))
    assert all((shots / f).stat().st_size > 10_000 for f in os.listdir(shots))
