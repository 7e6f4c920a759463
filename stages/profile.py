"""Run the pipeline under a named profile of parameter overrides.

`python -m stages.profile quick` runs every stage as a DVC experiment in a
temporary folder (`dvc exp run --temp`), so the workspace and the main run's
outputs stay as they are; MLflow runs still land in the project's store and
the result is listed by `dvc exp show`. `--apply` instead writes the
overrides into this checkout's params.yaml, for a throwaway clone.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from stages import tracking
from stages.config import PARAMS_FILE, ROOT, PipelineError

log = logging.getLogger(__name__)

PROFILES_DIR = ROOT / "profiles"


def overrides(name: str) -> dict[str, Any]:
    """The dotted-key overrides of profiles/<name>.yaml."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise PipelineError(f"no profile {name!r} in {PROFILES_DIR}; known: {known}")
    return yaml.safe_load(path.read_text()) or {}


def apply(params_path: Path, changes: dict[str, Any]) -> None:
    """Write the overrides into a params file; every key must already exist."""
    params = yaml.safe_load(params_path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = params
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict) or leaf not in section:
            raise PipelineError(f"{dotted}: not a key of {params_path}")
        section[leaf] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def run_experiment(name: str, changes: dict[str, Any]) -> None:
    """`dvc exp run --temp` with the overrides as -S options."""
    experiment = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = ["dvc", "exp", "run", "--temp", "--name", experiment]
    for key, value in changes.items():
        command += ["-S", f"{key}={yaml.safe_dump(value).splitlines()[0]}"]
    log.info("running %s", " ".join(command))
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode != 0:
        raise PipelineError(f"experiment {experiment} failed (exit {done.returncode})")
    log.info("done: `dvc exp show` lists %s; `mlflow ui` shows its runs", experiment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a profile in profiles/, e.g. quick")
    parser.add_argument(
        "--apply", action="store_true", help="write the overrides into params.yaml"
    )
    args = parser.parse_args()
    changes = overrides(args.name)
    if args.apply:
        apply(PARAMS_FILE, changes)
        log.info("params.yaml now holds profile %s", args.name)
    else:
        run_experiment(args.name, changes)


if __name__ == "__main__":
    tracking.run_stage(main)
