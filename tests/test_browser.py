"""End to end: `streamlit run` on a free local port, headless Chromium clicks through every page,
takes screenshots and times each page switch. Skips, saying why, without Chromium or Playwright."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import re
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpaat_core.__main__ import main
from dpaat_core.config import RunConfig, method_config
from dpaat_core.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGES = [("Runs", "Runs"), ("Training dynamics", "Training dynamics"), ("Robustness", "Robustness"),
         ("Attribution explorer", "Attribution explorer"), ("Gallery", "Gallery"), ("Tuning", "Tuning"),
         ("Train", "Train")]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(store: Path, viewer: bool = False):
    """``streamlit run dashboard/app.py`` on a free port over ``store`` (in viewer mode: ``DPAAT_VIEWER=1``): the
    process and its address, once healthy."""
    port = _free_port()
    env = dict(os.environ, DPAAT_STORE=str(store), **({"DPAAT_VIEWER": "1"} if viewer else {}))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
                             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, "streamlit did not start"
        time.sleep(0.3)


def _need_browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does this)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    _need_browser()
    store = tmp_path_factory.mktemp("store")
    cfg = RunConfig().replace(data={"spec": "synthetic:n=48,classes=3", "image_size": 32}, attack={"steps": 1},
                              method=method_config("dpaat"), train={"epochs": 3, "batch_size": 16, "device": "cpu"})
    run = train(cfg, store=store, run_id="browser-dpaat")
    assert main(["evaluate", str(run), "--steps", "2", "--eps-grid", "0,0.3,0.6,1.2", "--device", "cpu"]) == 0
    proc, url = _serve(store)
    yield SimpleNamespace(url=url, store=store)
    proc.terminate()
    proc.wait(timeout=20)


def _settled(page, title: str, timeout_ms: int = 60_000) -> None:
    """The page's title is shown and Streamlit has finished running the script."""
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=timeout_ms)
    # the app's own record of its script run: the status widget's Stop button shows only after a delay, so a page
    # read the moment a run starts could still show the previous run's elements
    page.wait_for_function("() => document.querySelector('[data-testid=\"stApp\"]')"
                           "?.getAttribute('data-test-script-state') === 'notRunning'", timeout=timeout_ms)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"] button')"
                           " && !document.querySelector('[data-testid=\"stSpinner\"]')", timeout=timeout_ms)
    # charts are drawn after the script has run: wait until each one has its plot
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
                           ".every(c => c.querySelector('.main-svg'))", timeout=timeout_ms)


SLIDERS = {"Training dynamics": "epoch", "Robustness": "eps", "Attribution explorer": "eps"}


FIRST_SLIDER = '[data-testid="stSlider"] input[type="range"]'


def _step_left(page, tries: int = 5) -> None:
    """One step left on the page's first slider, pressed again if the press was lost (a key sent while Streamlit
    re-renders the page after the last change can miss the thumb); the value moves at once, before the page reruns,
    so 5 s without a move means the press was lost, not late."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    thumb = page.locator(FIRST_SLIDER).first
    before = thumb.get_attribute("aria-valuetext")
    for _ in range(tries):
        thumb.focus()
        page.keyboard.press("ArrowLeft")
        try:
            page.wait_for_function(f"(v) => document.querySelector('{FIRST_SLIDER}').getAttribute('aria-valuetext')"
                                   " !== v", arg=before, timeout=5_000)
            return
        except PlaywrightTimeout:
            pass
    raise AssertionError(f"{tries} presses did not move the slider from {before}")


def _move_slider(page, title: str) -> float:
    """One step left on the page's first slider; seconds until the re-run has settled."""
    start = time.perf_counter()
    _step_left(page)
    try:   # the re-run shows the status widget while the script runs
        page.locator('[data-testid="stStatusWidget"]').wait_for(state="visible", timeout=500)
    except Exception:  # noqa: BLE001 - a fast re-run may finish before the widget shows
        pass
    _settled(page, title)
    return time.perf_counter() - start


#: what each page must show once settled: (CSS selector, at least how many)
EXPECT = {"Runs": [('[data-testid="stDataFrame"]', 1), ('[data-testid="stPlotlyChart"]', 1)],
          "Training dynamics": [('[data-testid="stPlotlyChart"]', 4)],
          "Robustness": [('[data-testid="stPlotlyChart"]', 1), ('[data-testid="stMetric"]', 3),
                         ('[data-testid="stImage"]', 12)],
          "Attribution explorer": [('[data-testid="stImage"]', 7), ('[data-testid="stMetric"]', 2)],
          "Gallery": [('[data-testid="stImage"]', 8), ('[data-testid="stMetric"]', 3),
                      ('button:has-text("Explore")', 8)],
          "Tuning": [('button:has-text("Start the sweep")', 1)],   # a store without sweeps: the form to start one
          "Train": [('button:has-text("Launch")', 1)]}


def _check_page(page, title: str) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, f"{title} shows an exception"
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0, f"{title} shows an error"
    for selector, least in EXPECT[title]:   # lazily loaded components (the data frame) may mount a moment later
        try:
            page.locator(selector).nth(least - 1).wait_for(state="attached", timeout=20_000)
        except Exception:  # noqa: BLE001 - say what is missing instead of a timeout
            raise AssertionError(f"{title}: {page.locator(selector).count()} of {least} {selector}") from None


def _walk(url: str, shots: Path, loading: dict | None = None) -> dict:
    """Every page in two rounds, the first visits (cold caches) and warm switches, each checked for what it should
    show, then one step of each page's slider; the seconds each took. ``loading``: {page title: text} that the
    first visit must show while it works (a progress bar's count), seen before the page settles."""
    from playwright.sync_api import sync_playwright
    shots.mkdir(parents=True, exist_ok=True)
    latencies = {"first visit": {}, "warm switch": {}, "slider": {}}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        _settled(page, "DPAAT Lab")
        page.screenshot(path=str(shots / "0-home.png"), full_page=True)
        for round_ in ("first visit", "warm switch"):
            for n, (link, title) in enumerate(PAGES, 1):
                start = time.perf_counter()
                page.get_by_role("link", name=link, exact=True).first.click()
                if round_ == "first visit" and title in (loading or {}):
                    try:
                        page.get_by_text(loading[title]).first.wait_for(timeout=30_000)
                    except Exception:  # noqa: BLE001 - say what was missing instead of a timeout
                        raise AssertionError(f"{title}: no {loading[title].pattern!r} while it loaded") from None
                _settled(page, title)
                latencies[round_][title] = time.perf_counter() - start
                if round_ == "first visit":
                    page.screenshot(path=str(shots / f"{n}-{title.lower().replace(' ', '-')}.png"), full_page=True)
                _check_page(page, title)
                if round_ == "warm switch" and title in SLIDERS:   # one step of the page's first slider
                    latencies["slider"][f"{title} ({SLIDERS[title]})"] = _move_slider(page, title)
                    _check_page(page, title)
        browser.close()
    return {k: {page: round(v, 2) for page, v in d.items()} for k, d in latencies.items()}


def _report(name: str, latencies: dict) -> None:
    """Print the latencies; with ``$DPAAT_LATENCY_FILE`` set, add them to that JSON file under ``name``."""
    import json
    print(f"latency (s), {name}: " + json.dumps(latencies))
    if os.environ.get("DPAAT_LATENCY_FILE"):
        file = Path(os.environ["DPAAT_LATENCY_FILE"])
        known = json.loads(file.read_text()) if file.is_file() else {}
        file.write_text(json.dumps(known | {name: latencies}, indent=1))


def test_click_through_every_page_with_screenshots(dashboard, tmp_path):
    shots = Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path)
    _report("a small synthetic run", _walk(dashboard.url, shots))
    assert all((shots / f).stat().st_size > 10_000 for f in os.listdir(shots) if f.endswith(".png"))


def test_the_shipped_demo_runs_in_the_browser(tmp_path, shared_data):
    """The same walk over a copy of checkpoints/ (six demo runs on the real HAM10000 sample): the figures the README
    reports for page latency."""
    import shutil
    _need_browser()
    store = tmp_path / "checkpoints"
    shutil.copytree(ROOT / "checkpoints", store)
    proc, url = _serve(store)
    try:
        # Training dynamics is the first page to read the 6,372 training JPEGs of the 128 px runs: a bar counts them
        counting = re.compile(r"Reading the train split's images: [\d,]+ of 6,372")
        _report("the demo runs", _walk(url, Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path / "shots"),
                                       loading={"Training dynamics": counting}))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


#: text that gives a server's file system away: an absolute path of two or more folders
PATH_LIKE = re.compile(r"(?<![\w.:/])/(?:[\w.-]+/){2,}[\w.-]*")


def test_viewer_mode_shows_no_server_path_on_any_page(tmp_path, shared_data):
    """Every page of the shipped demo store served in viewer mode, read as a visitor sees it: no path of the server
    (store, data, run folders), no Deploy button, no main menu with "Clear cache", and no Train page."""
    import shutil
    from playwright.sync_api import sync_playwright
    _need_browser()
    store = tmp_path / "srv" / "clinic" / "checkpoints"
    shutil.copytree(ROOT / "checkpoints", store)
    proc, url = _serve(store, viewer=True)
    shots = Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    forbidden = (str(tmp_path), str(ROOT), "/srv/clinic", "../shared", "source_path")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            _settled(page, "DPAAT Lab")
            for link, title in [("Home", "DPAAT Lab"), *[(lk, t) for lk, t in PAGES if t != "Train"]]:
                page.get_by_role("link", name=link, exact=True).first.click()
                _settled(page, title)
                text = page.inner_text("body")
                page.screenshot(path=str(shots / f"viewer-{title.lower().replace(' ', '-')}.png"), full_page=True)
                assert not [f for f in forbidden if f in text], (title, [f for f in forbidden if f in text])
                assert not PATH_LIKE.findall(text), (title, PATH_LIKE.findall(text))
                assert page.locator('[data-testid="stAppDeployButton"]').count() == 0, title
                assert page.locator('[data-testid="stMainMenu"]').count() == 0, title
            assert page.get_by_role("link", name="Train", exact=True).count() == 0
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@contextlib.contextmanager
def _gallery(dashboard):
    """A browser page on the dashboard's Gallery."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(dashboard.url)
        _settled(page, "DPAAT Lab")
        page.get_by_role("link", name="Gallery", exact=True).first.click()
        _settled(page, "Gallery")
        page.locator('[data-testid="stImage"]', has_text="Predicted").first.wait_for(timeout=60_000)   # the tiles
        yield page
        browser.close()


def test_a_gallery_tile_opens_its_image_in_the_explorer(dashboard):
    """The gallery's worst image first; its button opens that very image in the Attribution explorer."""
    with _gallery(dashboard) as page:
        _check_page(page, "Gallery")
        tiles = [t.inner_text() for t in page.locator('[data-testid="stImage"]').all()]
        tiles = [t for t in tiles if t.startswith("#")]          # "#12 · Predicted nv ..." (not the colour bar)
        k, first = next((k, t) for k, t in enumerate(tiles) if not t.startswith("#0 "))   # not the default image
        index = int(first.split(" ")[0].lstrip("#"))
        page.get_by_role("button", name="Explore", exact=True).nth(k).click()
        _settled(page, "Attribution explorer")
        _check_page(page, "Attribution explorer")
        chosen = len(re.findall(rf"#{index} · [^<\"]+ · predicted", page.content()))   # the Image box shows it
    assert chosen >= 1, first


def test_a_gallery_tile_enlarges_in_a_dialog(dashboard, tmp_path):
    """Enlarge shows the tile's image and maps in a dialog, several times the tile's width, sharp (pixels repeated)."""
    with _gallery(dashboard) as page:
        tile = next(t for t in page.locator('[data-testid="stImage"]').all() if t.inner_text().startswith("#"))
        small = tile.locator("img").bounding_box()["width"]
        page.get_by_role("button", name="Enlarge").first.click()
        dialog = page.get_by_role("dialog")
        dialog.locator("img").first.wait_for(timeout=60_000)
        large = dialog.locator("img").first.bounding_box()["width"]
        said = dialog.inner_text()
        page.screenshot(path=str(Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path) / "4b-gallery-enlarged.png"))
    assert large > 2.5 * small and said.lstrip().startswith("One image, large") and "#" in said, (small, large, said)


@contextlib.contextmanager
def _demo_page(tmp_path, height: int, default: str | None = None):
    """A browser page on the home page of a dashboard serving a copy of checkpoints/ (the shipped runs), whose
    keeper named ``default`` the run the pages open on, if given."""
    import shutil
    from dpaat_core.evaluate.defaults import set_default
    _need_browser()
    store = tmp_path / "checkpoints"
    shutil.copytree(ROOT / "checkpoints", store)
    if default is not None:
        set_default(store, default)
    proc, url = _serve(store)
    try:
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url)
            _settled(page, "DPAAT Lab")
            yield page
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_the_corruption_view_of_the_demo_runs(tmp_path, shared_data):
    """The Robustness page's natural-corruption view over the shipped 64 px demo runs (the store's keeper named
    one the default): the heat map of the saved grid, the live view with its metrics and images, no error."""
    with _demo_page(tmp_path, 1600, default="demo-dpaat-resnet8-ham10000") as page:
        page.get_by_role("link", name="Robustness", exact=True).first.click()
        _settled(page, "Robustness")
        start = time.perf_counter()
        page.get_by_text("Natural corruptions", exact=True).first.click()
        page.get_by_text("images went from right to wrong under it", exact=False).first.wait_for(timeout=60_000)
        _settled(page, "Robustness")
        page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stImage\"]').length == 16",
                               timeout=30_000)   # the attack view's images are gone once the run has ended
        seconds = time.perf_counter() - start
        assert page.locator('[data-testid="stException"]').count() == 0
        assert page.locator('[data-testid="stAlertContentError"]').count() == 0
        heat = page.locator('[data-testid="stPlotlyChart"]').first
        assert "accuracy under natural corruptions" in heat.inner_text()
        assert page.locator('[data-testid="stMetric"]').count() == 2
        images = page.locator('[data-testid="stImage"]')
        assert images.count() == 16                            # every image of the batch, clean beside corrupted
        assert all(" · Predicted " in t.inner_text() for t in images.all())
        page.screenshot(path=str(Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path) / "3b-corruptions.png"))
    print(f"latency (s), the corruption view of a demo run: {seconds:.2f}")


def test_the_demo_sweep_on_the_tuning_page(tmp_path, shared_data):
    """The shipped demo study on the Tuning page in a real browser: its four figures and the trials table; a
    parameter slider narrows them; a trial opens on the Robustness page. Screenshots of both states."""
    shots = Path(os.environ.get("DPAAT_SCREENSHOTS") or tmp_path)
    with _demo_page(tmp_path, 1400) as page:
        page.get_by_role("link", name="Tuning", exact=True).first.click()
        _settled(page, "Tuning")
        assert page.locator('[data-testid="stException"]').count() == 0
        charts = page.locator('[data-testid="stPlotlyChart"]')
        charts.nth(3).wait_for(timeout=60_000)      # drawn once Optuna has computed the importances
        _settled(page, "Tuning")
        assert charts.count() == 4
        assert "Pareto" in charts.first.inner_text()
        assert "12 of 12 complete trials" in page.content()
        page.screenshot(path=str(shots / "7-tuning.png"), full_page=True)
        thumb = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"] input[type="range"]').first
        thumb.focus()
        for _ in range(15):          # the eps range's lower end up: fewer trials within it
            page.keyboard.press("ArrowRight")
        try:                         # the rerun the slider starts (read too early, the page still shows all 12)
            page.wait_for_function("() => /\\d+ of 12 complete trials/.test(document.body.innerText)"
                                   " && !document.body.innerText.includes('12 of 12 complete trials')", timeout=60_000)
        except Exception:  # noqa: BLE001 - the count is read and asserted on below
            pass
        _settled(page, "Tuning")
        kept = int(re.search(r"(\d+) of 12 complete trials", page.content()).group(1))
        assert kept < 12
        page.screenshot(path=str(shots / "7b-tuning-narrowed.png"), full_page=True)
        page.get_by_role("button", name="Open in Robustness").click()
        _settled(page, "Robustness")
        assert page.locator('[data-testid="stException"]').count() == 0
        assert "sweep-demo-eps-t" in page.locator('[data-testid="stSidebar"]').inner_text()


def _rank_agreements(page) -> list[str]:
    return [m.inner_text().split("\n")[-1] for m in page.locator('[data-testid="stMetric"]').all()
            if "rank agreement" in m.inner_text()]


def test_two_sessions_explain_the_same_run_at_once(dashboard):
    """Two people on the Attribution explorer of one run at the same moment each get the maps they would get
    alone: the cached model is shared, and the attack and Captum's hooks change it while they run."""
    from playwright.sync_api import sync_playwright

    from dpaat_core.store import loading
    from dpaat_core.attack.attacks import index_noise
    from dpaat_core.evaluate.attribution import clean_and_adversarial, spearman
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pages = [browser.new_context(viewport={"width": 1400, "height": 1000}).new_page() for _ in range(2)]
        for page in pages:
            page.goto(dashboard.url)
            _settled(page, "DPAAT Lab")
            page.get_by_role("link", name="Attribution explorer", exact=True).first.click()
            _settled(page, "Attribution explorer")
        thumbs = [page.locator(FIRST_SLIDER).first for page in pages]
        for step in range(4):                 # each moves to an eps no one has asked for yet, at the same moment, and
            for n, page in enumerate(pages):    # to a different one (one cache key each: both compute at once)
                if step < 3 + n:
                    _step_left(page)
        for page, thumb in zip(pages, thumbs):   # the maps on show are those of the slider's final eps
            # the caption of the perturbed image is written after its maps are computed: until it names the final
            # eps, the numbers on show may still be those of an earlier eps
            page.get_by_text(f"perturbed at eps {thumb.get_attribute('aria-valuetext')}").first.wait_for(timeout=60_000)
            _settled(page, "Attribution explorer")
        seen = [_rank_agreements(page) for page in pages]
        eps = [float(thumb.get_attribute("aria-valuetext")) for thumb in thumbs]
        browser.close()
    run = dashboard.store / "browser-dpaat"
    model = loading.load_model(run)
    x, y = loading.load_run_data(run, "test").batch([0])
    assert eps[0] != eps[1] and len(seen[0]) == len(seen[1]) == 2, (seen, eps)
    # The page shows agreement to 2 decimals; the eps it attacks at is the grid value its slider shows (eps_slider),
    # and the saliency map moves with eps's last bits. Maps of another image, or mixed with another session's, would be
    # far off.
    for shown, e in zip(seen, eps):
        out = clean_and_adversarial(model, x, y, e, attack="pgd", norm="l2", steps=10, methods=("gradcam", "saliency"),
                                    noise=index_noise(x.shape[1:], [0], "l2"))   # image #0's own seeded start
        alone = [spearman(a[0, 0], b[0, 0]) for a, b in out["maps"].values()]
        assert all(abs(float(v) - a) <= 0.0051 for v, a in zip(shown, alone)), (seen, eps, alone)


def test_the_runs_pages_report_downloads_and_opens_offline(dashboard, tmp_path):
    """The Runs page's report of the selected run: one file that opens with no console error and asks for nothing
    outside itself (plotly's script and every image are inside)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page.goto(dashboard.url)
        _settled(page, "DPAAT Lab")
        page.get_by_role("link", name="Runs", exact=True).first.click()
        _settled(page, "Runs")
        with page.expect_download(timeout=120_000) as download:
            page.get_by_role("button", name=re.compile("Download the audit report of browser-dpaat")).click()
        file = tmp_path / download.value.suggested_filename
        download.value.save_as(file)
        viewer = browser.new_page(viewport={"width": 1300, "height": 1000})
        errors, requests = [], []
        viewer.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        viewer.on("pageerror", lambda e: errors.append(str(e)))
        viewer.on("request", lambda r: requests.append(r.url))
        viewer.goto(file.as_uri())
        viewer.wait_for_function("() => document.querySelectorAll('.main-svg').length > 0", timeout=30_000)
        viewer.wait_for_timeout(1000)                  # plotly draws, and would fetch anything it wanted by now
        heading = viewer.locator("h1").inner_text()
        examples = viewer.locator(".examples img").count()
        browser.close()
    assert file.suffix == ".html" and "browser-dpaat" in heading
    assert not errors, errors
    assert requests == [file.as_uri()], requests
    assert examples == 6 * 4                           # 6 test images: clean, attacked and the map of each
