"""Shared fixtures for the test suite."""
from __future__ import annotations

from pathlib import Path

import pytest

#: The real HAM10000 sample data shipped beside the repository (``<repo>/../shared/data``).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared HAM10000 data folder; tests that use it are skipped when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared HAM10000 data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA
