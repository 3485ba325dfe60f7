"""Shared fixtures: tiny offline models and the path to the read-only MATH data beside the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import tiny_model, tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` from the repo root; skips the test when it is absent (e.g. outside this workplace)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real MATH data not found at {SHARED_DATA} (../shared/data is absent)")
    return SHARED_DATA
