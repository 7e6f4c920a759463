"""Shared fixtures: where the real data and the bad inputs are."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(ROOT.parent / "shared")
DATASET = SHARED / "data" / "clothing-dataset-small"
BAD_INPUTS = SHARED / "bad-inputs"


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    """The real clothing-dataset-small beside the project."""
    if not (DATASET / "train").is_dir():
        pytest.fail(f"the real dataset is missing at {DATASET}")
    return DATASET


@pytest.fixture(scope="session")
def bad_inputs_dir() -> Path:
    """The shared folder of bad and awkward inputs."""
    return BAD_INPUTS
