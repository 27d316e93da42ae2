"""Shared test helpers: where the read-only reference data lives (../shared beside the repository)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QKV_VIT_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
FIXTURE_NAMES = ("xcit_p8_d2_img64", "xcit_p16_d3_img96_tokensnorm")


def require_fixtures() -> Path:
    """The reference-output fixtures directory, or skip: it ships with the developers' ../shared, not the repo."""
    if not (FIXTURES / f"{FIXTURE_NAMES[0]}.npz").is_file():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (../shared is absent; set QKV_VIT_SHARED)")
    return FIXTURES
