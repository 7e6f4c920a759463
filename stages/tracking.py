"""MLflow tracking for every stage: where runs go, what they are tagged with,
and how they end when a stage fails or is killed."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import requests
import yaml
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from stages.config import ROOT, PipelineError, home_root, setup_logging

log = logging.getLogger(__name__)

EXPERIMENT = "clothing-classifier"
DATASET_NAME = "clothing-dataset-small"
PROBE_TIMEOUT_S = 10
# What DVC writes as the pipeline runs; a change there does not make the code
# and params that produced a run differ from the commit.
PIPELINE_OUTPUTS = (":!dvc.lock", ":!metrics", ":!outputs")


class StageKilled(KeyboardInterrupt):
    """Raised in the stage's main thread when it receives SIGTERM."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{home_root() / 'mlflow.db'}"
    )


def check_reachable(uri: str) -> None:
    """Fail fast, naming the URI, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
        try:
            answer = requests.get(
                url, params={"max_results": 1}, timeout=PROBE_TIMEOUT_S
            )
        except requests.RequestException as err:
            raise PipelineError(
                f"MLflow tracking server {uri} is unreachable: {err}"
            ) from None
        if answer.status_code >= 400:
            raise PipelineError(
                f"MLflow tracking server {uri} answered {answer.status_code}: "
                f"{answer.text[:200]}"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not os.access(folder, os.W_OK):
            raise PipelineError(f"MLflow store {uri}: cannot write in {folder}")


def experiment_id(uri: str) -> str:
    """The pipeline's one experiment; artifacts of a local store stay beside it."""
    found = mlflow.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        location = (db.parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(EXPERIMENT, artifact_location=location)


def end_dead_runs(exp_id: str) -> None:
    """Mark KILLED the runs of this host whose process is gone (kill -9)."""
    client = MlflowClient()
    running = client.search_runs(
        [exp_id], filter_string="attributes.status = 'RUNNING'", max_results=500
    )
    for run in running:
        tags = run.data.tags
        if tags.get("host") != socket.gethostname() or not tags.get("pid"):
            continue
        if not _pid_alive(int(tags["pid"])):
            log.warning(
                "run %s (%s) was killed; marking it KILLED",
                run.info.run_id,
                tags.get("stage"),
            )
            client.set_terminated(run.info.run_id, status="KILLED")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.strip()


def dataset_hash(root: Path = ROOT) -> str:
    """The md5 that data.dvc pins for the dataset, or 'unknown'."""
    try:
        pinned = yaml.safe_load((root / "data.dvc").read_text())
        return pinned["outs"][0]["md5"]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


def run_tags(stage: str) -> dict[str, str]:
    """Tags every stage run carries."""
    tags = {
        "stage": stage,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(
            bool(
                _git(
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    ".",
                    *PIPELINE_OUTPUTS,
                )
            )
        ),
        "dataset_md5": dataset_hash(),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = os.environ["DVC_EXP_NAME"]
    return tags


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become comma-joined strings."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = ",".join(map(str, value))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise StageKilled(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """Start the stage's MLflow run; end it FAILED or KILLED if the stage does."""
    uri = tracking_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    exp_id = experiment_id(uri)
    end_dead_runs(exp_id)
    tags = run_tags(stage)
    # Under `mlflow run`, MLFLOW_RUN_ID names the project's run: make each
    # stage a child of it instead of writing every stage into that one run.
    parent = os.environ.pop("MLFLOW_RUN_ID", None)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags)
    log.info("MLflow run %s in %s (%s)", run.info.run_id, EXPERIMENT, uri)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        with _sigterm_raises():
            mlflow.log_params(flatten(params))
            yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        mlflow.end_run(status=status)


def log_dataset(manifest: Any, context: str) -> None:
    """Record the dataset, with its pinned hash, as an input of the active run."""
    with warnings.catch_warnings():
        # MLflow hints about integer columns and guesses the source's kind;
        # neither concerns a manifest of file paths.
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            manifest,
            source=str(ROOT / "data"),
            name=DATASET_NAME,
            digest=dataset_hash()[:36],
        )
        mlflow.log_input(dataset, context=context)


def run_stage(main: Any) -> None:
    """Run a stage's main; print a PipelineError as one line and exit 1."""
    setup_logging()
    try:
        main()
    except PipelineError as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except StageKilled:
        log.error("stopped by SIGTERM")
        raise SystemExit(143) from None
