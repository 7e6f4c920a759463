"""The quick profile through `dvc repro` in a throwaway clone, on real images:
every stage's MLflow run, the DVC lock and metrics, serving the result, and
what happens when a stage is killed, the tracking server is unreachable or
the disk is full."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from stages import servers
from stages.serving import encode_file
from tests.pipeline_helpers import clean_env, make_clone, run

pytestmark = pytest.mark.slow

STAGES = ["prepare", "train-150", "train-299", "evaluate"]
CURVES = ["accuracy", "val_accuracy", "loss", "val_loss"]


@pytest.fixture(scope="module")
def clone(tmp_path_factory, dataset_dir) -> Path:
    """A clone that has run the quick profile through `dvc repro`."""
    project = make_clone(tmp_path_factory.mktemp("quick") / "project")
    run(project, "python", "-m", "stages.fetch", "--from", str(dataset_dir))
    run(project, "python", "-m", "stages.profile", "quick", "--apply")
    run(project, "git", "commit", "-qam", "quick profile")
    run(project, "dvc", "repro")
    return project


def client_for(project: Path) -> MlflowClient:
    uri = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def stage_runs(project: Path) -> dict[str, list]:
    client = client_for(project)
    experiment = client.get_experiment_by_name("clothing-classifier")
    runs = client.search_runs([experiment.experiment_id], order_by=["start_time"])
    found: dict[str, list] = {}
    for found_run in runs:
        found.setdefault(found_run.data.tags["stage"], []).append(found_run)
    return found


def params_of(project: Path) -> dict:
    return yaml.safe_load((project / "params.yaml").read_text())


def test_quick_profile_writes_lock_and_metrics(clone):
    lock = yaml.safe_load((clone / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == sorted(STAGES)
    prepare = json.loads((clone / "metrics/prepare.json").read_text())
    assert prepare  # counts written; their content is tested in test_prepare
    epochs = params_of(clone)["train_299"]["epochs"]
    trained = json.loads((clone / "metrics/train-299.json").read_text())
    assert 1 <= trained["best_epoch"] <= epochs
    assert 0 <= trained["best_val_accuracy"] <= 1
    evaluated = json.loads((clone / "metrics/evaluate.json").read_text())
    classes = params_of(clone)["base"]["classes"]
    assert set(evaluated["per_class"]) == set(classes)
    assert 0 <= evaluated["accuracy"] <= 1
    shown = run(clone, "dvc", "metrics", "show", "--json").stdout
    assert "best_val_accuracy" in shown and "macro_f1" in shown


def test_each_stage_has_a_tagged_mlflow_run(clone):
    runs = stage_runs(clone)
    assert sorted(runs) == sorted(STAGES)
    head = run(clone, "git", "rev-parse", "HEAD").stdout.strip()
    pinned = yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]["md5"]
    for stage in STAGES:
        (found,) = runs[stage]
        assert found.info.status == "FINISHED"
        tags = found.data.tags
        assert tags["git_commit"] == head
        assert tags["git_dirty"] == "False"
        assert tags["dataset_md5"] == pinned
        assert found.inputs.dataset_inputs, f"{stage} logged no dataset input"


def test_training_runs_log_curves_params_and_checkpoint(clone):
    client = client_for(clone)
    params = params_of(clone)
    for stage in ("train-150", "train-299"):
        (found,) = stage_runs(clone)[stage]
        assert found.data.tags["weights"] == "none"
        assert len(found.data.tags["weights_sha256"]) == 64
        assert float(found.data.params["train.learning_rate"]) == 0.0005
        epochs = params[stage.replace("-", "_")]["epochs"]
        for curve in CURVES:
            history = client.get_metric_history(found.info.run_id, curve)
            assert [m.step for m in history] == list(range(1, epochs + 1))
        artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
        assert {"checkpoint", "accuracy.png", "history.csv"} <= artifacts
        assert "best_val_accuracy" in found.data.metrics


def test_evaluate_logs_scores_and_promotes_the_model(clone):
    client = client_for(clone)
    (found,) = stage_runs(clone)["evaluate"]
    assert {"test_accuracy", "test_loss", "test_macro_f1"} <= set(found.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.csv"} <= artifacts
    registry = params_of(clone)["evaluate"]
    version = client.get_model_version_by_alias(
        registry["registered_model"], registry["alias"]
    )
    assert registry["registered_model"] == "clothing-classifier-quick"
    run_id = (clone / "outputs/train-299/run_id").read_text().strip()
    assert version.run_id == run_id


def test_repro_with_nothing_changed_does_nothing(clone):
    status = json.loads(run(clone, "dvc", "status", "--json").stdout)
    assert status == {}
    repro = run(clone, "dvc", "repro").stdout
    assert "didn't change" in repro and "Running stage" not in repro


def test_changing_a_299_parameter_reruns_only_299_and_evaluate(clone):
    params = params_of(clone)
    params["train_299"]["epochs"] += 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    repro = run(clone, "dvc", "repro").stdout
    ran = set(re.findall(r"Running stage '([\w-]+)'", repro))
    assert ran == {"train-299", "evaluate"}, repro


def test_logged_model_loads_and_predicts(clone, dataset_dir):
    client_for(clone)
    run_id = (clone / "outputs/train-299/run_id").read_text().strip()
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    image = next((dataset_dir / "test" / "pants").iterdir())
    import pandas as pd

    answer = model.predict(pd.DataFrame({"image": [encode_file(image)]}))
    assert answer["label"].iloc[0] in params_of(clone)["base"]["classes"]
    assert 0 < answer["probability"].iloc[0] <= 1


def test_mlflow_serve_answers_the_readme_request(clone, dataset_dir):
    run_id = (clone / "outputs/train-299/run_id").read_text().strip()
    model_uri = f"runs:/{run_id}/model"
    port = servers.free_port()
    with servers.scoring_server(model_uri, port, cwd=clone, env=clean_env()) as url:
        image = sorted((dataset_dir / "test" / "shoes").iterdir())[0]
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[encode_file(image)]]}
        }
        answer = requests.post(f"{url}/invocations", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    (row,) = answer.json()["predictions"]
    assert row["label"] in params_of(clone)["base"]["classes"]


def test_unreachable_tracking_server_fails_before_training(clone):
    uri = f"http://127.0.0.1:{servers.free_port()}"
    env = clean_env(MLFLOW_TRACKING_URI=uri)
    started = time.monotonic()
    done = run(
        clone,
        "python",
        "-m",
        "stages.train",
        "train-150",
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 1
    assert uri in done.stderr and "unreachable" in done.stderr
    assert "Epoch" not in done.stdout + done.stderr
    assert "extract" not in done.stderr
    assert time.monotonic() - started < 60


def _start_repro(project: Path, stage: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["dvc", "repro", "--single-item", stage],
        cwd=project,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_line(process: subprocess.Popen, marker: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"never saw {marker!r}:\n{''.join(seen)[-4000:]}")


def _set_150_epochs(project: Path, epochs: int) -> None:
    params = params_of(project)
    params["train_150"]["epochs"] = epochs
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize(
    ("sig", "rerun_epochs"),
    [(signal.SIGINT, 4), (signal.SIGTERM, 5), (signal.SIGKILL, 6)],
)
def test_killed_training_stage_reruns_to_completion(clone, sig, rerun_epochs):
    """Kill train-150 mid-fit (Ctrl-C, SIGTERM or kill -9), then `dvc repro`."""
    _set_150_epochs(clone, 400)  # long enough to be killed midway
    process = _start_repro(clone, "train-150")
    _wait_for_line(process, "Epoch 3/", timeout=300)
    os.killpg(process.pid, sig)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert not list((clone / "outputs/train-150").glob(".*tmp*"))
    _set_150_epochs(clone, rerun_epochs)  # a new value: the run cache can't help
    repro = run(clone, "dvc", "repro").stdout
    assert "Running stage 'train-150'" in repro
    assert json.loads(run(clone, "dvc", "status", "--json").stdout) == {}
    trained = json.loads((clone / "metrics/train-150.json").read_text())
    assert trained["epochs"] == rerun_epochs
    runs = stage_runs(clone)["train-150"]
    killed = [r for r in runs if r.data.params["train_150.epochs"] == "400"]
    assert killed[-1].info.status == "KILLED"
    assert runs[-1].info.status == "FINISHED"
    assert "RUNNING" not in {r.info.status for r in runs}


def test_stage_logs_to_a_real_tracking_server(clone, tmp_path):
    port = servers.free_port()
    with servers.tracking_server(tmp_path, port, env=clean_env()) as uri:
        run(
            clone,
            "python",
            "-m",
            "stages.train",
            "train-150",
            env=clean_env(MLFLOW_TRACKING_URI=uri),
        )
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("clothing-classifier")
        (found,) = client.search_runs([experiment.experiment_id])
        assert found.data.tags["stage"] == "train-150"
        assert found.info.status == "FINISHED"
        assert "best_val_accuracy" in found.data.metrics
        artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
        assert {"checkpoint", "accuracy.png", "history.csv"} <= artifacts


def test_full_disk_fails_clearly_and_keeps_earlier_outputs(clone):
    outputs = clone / "outputs" / "train-150"
    before = {p.name: p.read_bytes() for p in outputs.iterdir() if p.is_file()}
    other = (clone / "outputs/train-299/model.keras").read_bytes()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(outputs)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        _set_150_epochs(clone, 2)
        done = run(clone, "python", "-m", "stages.train", "train-150", check=False)
    finally:
        subprocess.run(["umount", str(outputs)], check=True)
    assert done.returncode == 1
    assert "No space left on device" in done.stderr
    assert "outputs/train-150/model.keras" in done.stderr
    assert "Traceback" not in done.stderr
    after = {p.name: p.read_bytes() for p in outputs.iterdir() if p.is_file()}
    assert after == before
    assert (clone / "outputs/train-299/model.keras").read_bytes() == other
    assert stage_runs(clone)["train-150"][-1].info.status == "FAILED"
