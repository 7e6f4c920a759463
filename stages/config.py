"""Project paths, params loading, logging and atomic file writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"
DATA_DIR = ROOT / "data"
OUTPUTS_DIR = ROOT / "outputs"
METRICS_DIR = ROOT / "metrics"
SPLITS = ("train", "validation", "test")
FINAL_STAGE = "train-299"
_UMASK = os.umask(0)
os.umask(_UMASK)


class PipelineError(Exception):
    """An error a user can act on; stage entry points print it without a trace."""


def home_root() -> Path:
    """Return the repository that owns the MLflow store and the feature cache.

    Under `dvc exp run --temp` or `--queue` the code runs in a temporary copy;
    DVC then sets DVC_ROOT to the original repository, where results belong.
    """
    return Path(os.environ.get("DVC_ROOT", ROOT)).resolve()


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml into a dict."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise PipelineError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from None


def setup_logging() -> None:
    """Log to stderr with the stage's module name, once per process."""
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place on success.

    A reader never sees a half-written file: it sees the old file or the new
    one. On any error the temporary file is removed and the old file stays.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix
        )
    except OSError as err:
        raise PipelineError(f"cannot write {path}: {err.strerror}") from err
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise PipelineError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path, frame: Any) -> None:
    """Write a pandas DataFrame as CSV without its index, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib Figure as PNG, atomically; return the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
