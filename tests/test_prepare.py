"""Tests for the prepare stage on small real folders and on the whole dataset."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import stages.prepare as stage
from stages import tracking
from stages.config import SPLITS, PipelineError
from stages.prepare import MANIFEST_COLUMNS, PrepareResult, prepare

CLASSES = [
    "dress",
    "hat",
    "longsleeve",
    "outwear",
    "pants",
    "shirt",
    "shoes",
    "shorts",
    "skirt",
    "t-shirt",
]
BASE = {"seed": 42, "classes": CLASSES}
PARAMS = {"sample_per_class": 0, "on_reject": "skip", "on_leakage": "warn"}
PER_CLASS = 3
# bad input -> (split, class it is planted in, expected reason or conversion)
REJECTS = {
    "zero-bytes.jpg": ("train", "dress", "empty"),
    "truncated-half.jpg": ("train", "dress", "truncated"),
    "not-an-image.jpg": ("validation", "hat", "not_an_image"),
    "one-pixel.png": ("test", "pants", "too_small"),
}
CONVERTED = {
    "grayscale.jpg": ("train", "shirt", "grayscale"),
    "cmyk.jpg": ("train", "shirt", "cmyk"),
    "rgba.png": ("validation", "shoes", "alpha"),
    "exif-rotated.jpg": ("test", "pants", "exif_rotated"),
}
DEBRIS = [
    "train/.DS_Store",
    "train/dress/._x.jpg",
    "validation/shoes/Thumbs.db",
    "test/skirt/desktop.ini",
    "test/.hidden/copy.jpg",
]
LEAK = ("data/train/dress/{first}", "data/test/dress/leaked-copy.jpg")
WITHIN = ("data/train/hat/{first}", "data/train/hat/repeated-copy.jpg")


def _first(dataset_dir: Path, split: str, label: str) -> Path:
    return sorted((dataset_dir / split / label).iterdir())[0]


def _build(data: Path, dataset_dir: Path, bad_inputs_dir: Path) -> Path:
    for split in SPLITS:
        for label in CLASSES:
            (data / split / label).mkdir(parents=True)
            for image in sorted((dataset_dir / split / label).iterdir())[:PER_CLASS]:
                shutil.copyfile(image, data / split / label / image.name)
    for name, (split, label, _) in {**REJECTS, **CONVERTED}.items():
        shutil.copyfile(bad_inputs_dir / name, data / split / label / name)
    for name in DEBRIS:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(b"\x00\x05\x16\x07 not an image")
    shutil.copyfile(_first(dataset_dir, "train", "dress"), data / LEAK[1][5:])
    shutil.copyfile(_first(dataset_dir, "train", "hat"), data / WITHIN[1][5:])
    shutil.copyfile(_first(dataset_dir, "test", "shoes"), data / "test/.hidden/x.jpg")
    return data


@pytest.fixture
def small_data(tmp_path: Path, dataset_dir: Path, bad_inputs_dir: Path) -> Path:
    """3 real images per class and split, the bad inputs, debris and duplicates."""
    return _build(tmp_path / "data", dataset_dir, bad_inputs_dir)


def _run(data: Path, out: Path, **params: object) -> tuple[PrepareResult, Path]:
    out_dir, metrics = out / "prepare", out / "metrics.json"
    return prepare(data, out_dir, metrics, BASE, {**PARAMS, **params}), out_dir


@pytest.fixture(scope="module")
def prepared(
    tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path, bad_inputs_dir: Path
) -> Path:
    """The outputs folder of one default run on the small dataset (read only)."""
    root = tmp_path_factory.mktemp("prepared")
    _run(_build(root / "data", dataset_dir, bad_inputs_dir), root / "out")
    return root / "out"


def _read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "prepare" / name, keep_default_na=False)


def test_bad_inputs_are_rejected_with_their_reason(prepared: Path) -> None:
    rejected = _read(prepared, "rejected.csv")
    assert list(rejected.columns) == ["path", "split", "label", "reason", "detail"]
    assert dict(zip(rejected["path"], rejected["reason"], strict=True)) == {
        f"data/{s}/{c}/{name}": reason for name, (s, c, reason) in REJECTS.items()
    }
    assert rejected["detail"].str.len().gt(0).all()


def test_awkward_inputs_are_kept_with_their_conversion(prepared: Path) -> None:
    manifest = _read(prepared, "manifest.csv")
    by_path = manifest.set_index("path")
    for name, (split, label, code) in CONVERTED.items():
        row = by_path.loc[f"data/{split}/{label}/{name}"]
        assert row["conversions"] == code
        assert (row["width"], row["height"]) == (400, 534)
    plain = manifest[~manifest["path"].str.contains("|".join(CONVERTED))]
    assert set(plain["conversions"]) == {""}
    assert set(manifest["format"]) == {"JPEG", "PNG"}


def test_manifest_columns_order_and_class_file(prepared: Path) -> None:
    manifest = _read(prepared, "manifest.csv")
    assert list(manifest.columns) == MANIFEST_COLUMNS
    order = [
        (SPLITS.index(s), CLASSES.index(c), p)
        for s, c, p in zip(manifest.split, manifest.label, manifest.path, strict=True)
    ]
    assert order == sorted(order)
    assert json.loads((prepared / "prepare/classes.json").read_text()) == CLASSES
    chart = prepared / "prepare/class_distribution.png"
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_debris_is_ignored_and_counted(prepared: Path) -> None:
    manifest = _read(prepared, "manifest.csv")
    rejected = _read(prepared, "rejected.csv")
    for table in (manifest, rejected):
        assert not table["path"].str.contains("/[.]|Thumbs|desktop").any()
    metrics = json.loads((prepared / "metrics.json").read_text())
    assert metrics["debris_ignored"] == len(DEBRIS) + 1


def test_duplicates_and_leaks_are_reported(prepared: Path, dataset_dir: Path) -> None:
    leak = LEAK[0].format(first=_first(dataset_dir, "train", "dress").name)
    within = WITHIN[0].format(first=_first(dataset_dir, "train", "hat").name)
    duplicates = _read(prepared, "duplicates.csv")
    assert list(duplicates.columns) == ["sha256", "path", "split", "kind"]
    rows = {tuple(row) for row in duplicates[["path", "split", "kind"]].values}
    assert rows == {
        (leak, "train", "leak"),
        (LEAK[1], "test", "leak"),
        (within, "train", "within_split"),
        (WITHIN[1], "train", "within_split"),
    }
    assert duplicates.groupby("kind")["sha256"].nunique().to_dict() == {
        "leak": 1,
        "within_split": 1,
    }


def test_metrics_count_every_outcome(prepared: Path) -> None:
    metrics = json.loads((prepared / "metrics.json").read_text())
    kept = {"train": 30 + 2 + 1, "validation": 30 + 1, "test": 30 + 1 + 1}
    assert metrics["kept"] == {"total": sum(kept.values()), **kept}
    assert metrics["manifest"] == metrics["kept"]
    per_class = json.loads((prepared / "prepare" / "class_counts.json").read_text())
    assert per_class["train"]["shirt"] == PER_CLASS + 2
    assert per_class["validation"]["hat"] == PER_CLASS
    assert metrics["images_checked"] == 90 + 8 + 2
    assert metrics["files_seen"] == 90 + 8 + 2 + len(DEBRIS) + 1
    assert metrics["rejected"]["total"] == len(REJECTS)
    assert all(metrics["rejected"][r] == 1 for _, _, r in REJECTS.values())
    assert metrics["converted"]["total"] == len(CONVERTED)
    assert all(metrics["converted"][c] == 1 for _, _, c in CONVERTED.values())
    assert metrics["duplicates"] == {
        "leaked_groups": 1,
        "leaked_files": 2,
        "within_split_groups": 1,
        "within_split_files": 2,
    }


def test_rejects_and_leaks_are_logged_as_warnings(
    small_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stages.prepare")
    _run(small_data, tmp_path / "out")
    for name, (split, label, reason) in REJECTS.items():
        path = f"data/{split}/{label}/{name}"
        assert any(path in m and reason in m for m in caplog.messages), name
    assert any(m.startswith("rejected 4 of 100 images") for m in caplog.messages)
    assert any(LEAK[1] in m and "leak" in m for m in caplog.messages)
    assert any(WITHIN[1] in m and "within" in m for m in caplog.messages)


def test_on_reject_fail_names_every_rejected_path(
    small_data: Path, tmp_path: Path
) -> None:
    with pytest.raises(PipelineError) as error:
        _run(small_data, tmp_path / "out", on_reject="fail")
    for name, (split, label, reason) in REJECTS.items():
        assert f"data/{split}/{label}/{name}: {reason}" in str(error.value)
    report = pd.read_csv(tmp_path / "out/prepare/rejected.csv")
    assert len(report) == len(REJECTS)
    assert not (tmp_path / "out/prepare/manifest.csv").exists()


def test_on_leakage_fail_names_the_leaked_paths(
    small_data: Path, tmp_path: Path, dataset_dir: Path
) -> None:
    with pytest.raises(PipelineError, match="on_leakage") as error:
        _run(small_data, tmp_path / "out", on_leakage="fail")
    leak = LEAK[0].format(first=_first(dataset_dir, "train", "dress").name)
    assert f"{leak}, {LEAK[1]}" in str(error.value)
    assert "repeated-copy" not in str(error.value)
    assert (tmp_path / "out/prepare/duplicates.csv").exists()


def test_missing_class_folder_names_split_and_class(
    small_data: Path, tmp_path: Path
) -> None:
    shutil.rmtree(small_data / "validation" / "skirt")
    with pytest.raises(PipelineError, match="split 'validation': class folder 'skirt'"):
        _run(small_data, tmp_path / "out")


def test_extra_class_folder_is_an_error(small_data: Path, tmp_path: Path) -> None:
    (small_data / "train" / "socks").mkdir()
    with pytest.raises(PipelineError, match="split 'train': unexpected .* 'socks'"):
        _run(small_data, tmp_path / "out")


def test_missing_split_folder_is_an_error(small_data: Path, tmp_path: Path) -> None:
    shutil.rmtree(small_data / "test")
    with pytest.raises(PipelineError, match="split 'test': folder .* is missing"):
        _run(small_data, tmp_path / "out")


def test_all_layout_problems_are_reported_together(
    small_data: Path, tmp_path: Path
) -> None:
    (small_data / "train" / "notes.txt").write_text("stray")
    (small_data / "test" / "hat" / "more").mkdir()
    with pytest.raises(PipelineError) as error:
        _run(small_data, tmp_path / "out")
    assert "notes.txt is outside any class folder" in str(error.value)
    assert "class 'hat': subfolder" in str(error.value)


def test_class_with_only_rejected_files_is_an_error(
    small_data: Path, tmp_path: Path
) -> None:
    for image in (small_data / "test" / "shorts").iterdir():
        image.write_bytes(b"")
    with pytest.raises(PipelineError, match="split 'test', class 'shorts': no usable"):
        _run(small_data, tmp_path / "out")


def test_bad_policy_value_is_an_error(small_data: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="prepare.on_reject is 'ignore'"):
        _run(small_data, tmp_path / "out", on_reject="ignore")


def test_manifest_is_byte_identical_across_runs(
    small_data: Path, tmp_path: Path
) -> None:
    _run(small_data, tmp_path / "a")
    _run(small_data, tmp_path / "b")
    first = (tmp_path / "a/prepare/manifest.csv").read_bytes()
    assert first == (tmp_path / "b/prepare/manifest.csv").read_bytes()


def test_sampling_is_deterministic_and_per_class(
    small_data: Path, tmp_path: Path
) -> None:
    _run(small_data, tmp_path / "a", sample_per_class=2)
    _run(small_data, tmp_path / "b", sample_per_class=2)
    first = (tmp_path / "a/prepare/manifest.csv").read_bytes()
    assert first == (tmp_path / "b/prepare/manifest.csv").read_bytes()
    manifest = pd.read_csv(tmp_path / "a/prepare/manifest.csv")
    assert (manifest.groupby(["split", "label"]).size() == 2).all()
    assert len(manifest) == 2 * len(CLASSES) * len(SPLITS)
    other_seed = prepare(
        small_data,
        tmp_path / "c",
        tmp_path / "c.json",
        {**BASE, "seed": 7},
        {**PARAMS, "sample_per_class": 2},
    )
    assert set(other_seed.manifest["path"]) != set(manifest["path"])
    full = json.loads((tmp_path / "a/metrics.json").read_text())
    assert full["kept"]["total"] > full["manifest"]["total"] == len(manifest)


def test_real_dataset_is_clean_and_logged_to_mlflow(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Measured on clothing-dataset-small: all 3,781 files are JPEGs that decode
    # with no conversion; no file is rejected, none is debris, no two share content.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.stage_run("prepare", {"base": BASE, "prepare": PARAMS}) as run:
        result, out = _run(dataset_dir, tmp_path / "out")
    metrics = result.metrics
    assert metrics["kept"] == {
        "total": 3781,
        "train": 3068,
        "validation": 341,
        "test": 372,
    }
    assert metrics["rejected"]["total"] == metrics["converted"]["total"] == 0
    assert metrics["debris_ignored"] == 0
    assert set(metrics["duplicates"].values()) == {0}
    assert result.manifest["path"].str.startswith("clothing-dataset-small/").all()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run.info.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["kept.train"] == 3068
    assert logged.data.metrics["kept_per_class.validation.t-shirt"] == 81
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {
        "manifest.csv",
        "rejected.csv",
        "duplicates.csv",
        "class_distribution.png",
    } <= artifacts
    inputs = logged.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == [tracking.DATASET_NAME]
    assert {(t.key, t.value) for t in inputs[0].tags} >= {
        ("mlflow.data.context", "prepare")
    }


def test_main_fails_the_mlflow_run_and_exits_1_on_policy_failure(
    small_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = {"base": BASE, "prepare": {**PARAMS, "on_reject": "fail"}}
    monkeypatch.setattr(stage, "load_params", lambda: params)
    monkeypatch.setattr(stage, "DATA_DIR", small_data)
    monkeypatch.setattr(stage, "OUTPUTS_DIR", tmp_path / "outputs")
    monkeypatch.setattr(stage, "METRICS_DIR", tmp_path / "metrics")
    with pytest.raises(SystemExit) as exit_info:
        tracking.run_stage(stage.main)
    assert exit_info.value.code == 1
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.params["prepare.on_reject"] == "fail"
    assert (tmp_path / "outputs/prepare/rejected.csv").exists()
