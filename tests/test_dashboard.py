"""The dashboard starts and renders (placeholder home page for now)."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def test_dashboard_starts_and_says_what_is_coming():
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert at.title[0].value == "DPAAT Lab"
    text = " ".join(m.value for m in at.markdown)
    for page in ("Runs", "Training dynamics", "Robustness", "Attribution explorer", "Train"):
        assert page in text
