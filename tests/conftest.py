"""Shared fixtures: where the real data and the bad inputs are."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
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


@pytest.fixture(autouse=True)
def _forget_tracking_uri():
    """Undo mlflow.set_tracking_uri after each test.

    The stages (and some tests) set MLflow's process-wide URI, which also
    writes MLFLOW_TRACKING_URI into os.environ; left behind, it would send a
    later test's runs to an earlier test's store.
    """
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)  # clears the global and the variable
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved
