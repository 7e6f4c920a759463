"""Atomic writes, params overrides of profiles, and the project files a user
runs: MLproject, dvc.yaml."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from stages import profile
from stages.config import ROOT, PipelineError, atomic_path, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert yaml.safe_load(target.read_text()) == {"accuracy": 0.5}
    assert list(tmp_path.iterdir()) == [target]


def test_an_unwritable_output_folder_is_named(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(PipelineError, match="outputs/train-150/model.keras"):
        write_json(blocker / "train-150" / "model.keras", {})
    assert blocker.read_text() == "a file where a folder should be"


def test_outputs_get_ordinary_permissions(tmp_path):
    write_json(tmp_path / "m.json", {})
    assert (tmp_path / "m.json").stat().st_mode & 0o044 == 0o044


def test_profile_overrides_apply_to_existing_keys_only(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    profile.apply(params, profile.overrides("quick"))
    applied = yaml.safe_load(params.read_text())
    assert applied["base"]["weights"] == "none"
    assert applied["train"]["augment"]["views"] == 2
    with pytest.raises(PipelineError, match="train.no_such_key"):
        profile.apply(params, {"train.no_such_key": 1})
    with pytest.raises(PipelineError, match="no profile 'nope'"):
        profile.overrides("nope")


def test_mlproject_entry_points_load():
    from mlflow.projects._project_spec import load_project

    project = load_project(str(ROOT))
    assert {"main", "quick", "stage"} <= set(project._entry_points)
    assert project.env_type == "python_env"


def test_every_stage_depends_on_the_code_it_imports():
    """Every stages/ module a stage's command imports is one of its dvc.yaml deps."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2]
        listed = subprocess.run(
            [sys.executable, "-c", f"import sys, {module}; print(*sys.modules)"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        used = {f"{m.replace('.', '/')}.py" for m in listed if m.startswith("stages.")}
        missing = used - set(stage["deps"])
        assert not missing, f"stage {name} imports {sorted(missing)} undeclared"
