"""Augmentation, the feature cache, the backbone's weights and the training
stage's own behaviour, on small samples of the real images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from stages import features, train
from stages.augment import CLEAN_VIEW, Augmentation, apply_transforms, transform_for
from stages.config import PipelineError, load_params
from stages.datasets import calibration_images
from stages.images import load_for_model
from stages.model import (
    assemble,
    bfloat16_copy,
    build_backbone,
    build_head,
    compile_for_training,
)

SIZE = 80
AUG = Augmentation(views=3, shear=10.0, zoom=0.1, vertical_flip=True, seed=7)


@pytest.fixture(scope="module")
def manifest(dataset_dir) -> pd.DataFrame:
    """Four real images per class in train and validation, as prepare lists them."""
    rows = []
    classes = load_params()["base"]["classes"]
    for split in ("train", "validation"):
        for label in classes:
            for path in sorted((dataset_dir / split / label).iterdir())[:4]:
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
                rows.append(
                    {"path": str(path), "split": split, "label": label, "sha256": sha}
                )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def backbone(manifest):
    return build_backbone(SIZE, "none", 3, calibration_images(manifest, SIZE))


def test_augmented_views_are_a_function_of_their_key(manifest):
    image = load_for_model(Path(manifest.path[0]).read_bytes(), SIZE)[None]
    sha = manifest.sha256[0]

    def view(draw: int) -> np.ndarray:
        transform = transform_for(AUG, sha, draw, SIZE)[None]
        return apply_transforms(image, transform).numpy()

    first, again, other = view(0), view(0), view(1)
    assert first.shape == image.shape
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1
    assert np.abs(first - image).mean() > 1


def test_only_training_images_get_augmented_views():
    assert len(AUG.view_names("train")) == 3
    assert all(AUG.tag() in view for view in AUG.view_names("train"))
    assert AUG.view_names("validation") == [CLEAN_VIEW]
    assert AUG.view_names("test") == [CLEAN_VIEW]
    off = Augmentation(views=0, shear=10.0, zoom=0.1, vertical_flip=True, seed=7)
    assert off.view_names("train") == [CLEAN_VIEW]
    changed = Augmentation(views=3, shear=5.0, zoom=0.1, vertical_flip=True, seed=7)
    assert set(changed.view_names("train")).isdisjoint(AUG.view_names("train"))


def test_cache_namespace_depends_on_weights_size_and_precision(tmp_path, backbone):
    names = {
        features.FeatureCache(tmp_path, backbone, SIZE, "float32").folder,
        features.FeatureCache(tmp_path, backbone, SIZE + 1, "float32").folder,
        features.FeatureCache(tmp_path, backbone, SIZE, "bfloat16").folder,
    }
    other = build_backbone(SIZE, "none", 4)
    names.add(features.FeatureCache(tmp_path, other, SIZE, "float32").folder)
    assert len(names) == 4


def _extract(tmp_path, backbone, items):
    cache = features.FeatureCache(tmp_path, backbone, SIZE, "float32").open()
    call = features.extraction_model(backbone, "float32")
    features.extract(cache, call, items, AUG, "test")
    return cache


def test_extraction_resumes_after_a_failure_and_reuses_shards(
    tmp_path, backbone, manifest, monkeypatch
):
    monkeypatch.setattr(features, "SHARD_SIZE", 8)
    monkeypatch.setattr(features, "BATCH_SIZE", 8)
    items = features.items_for(manifest, "train", AUG)[:40]
    broken = list(items)
    broken[30] = features.Item("/nonexistent.jpg", "0" * 64, CLEAN_VIEW, 0)
    with pytest.raises(PipelineError, match="nonexistent.jpg"):
        _extract(tmp_path, backbone, broken)
    cache = features.FeatureCache(tmp_path, backbone, SIZE, "float32").open()
    assert len(cache.entries) == 24  # three whole shards survived
    assert len(cache.missing(items)) == 16
    resumed = _extract(tmp_path, backbone, items)
    fresh = _extract(tmp_path / "fresh", backbone, items)
    np.testing.assert_allclose(resumed.get(items), fresh.get(items), atol=1e-5)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip"])
def test_a_damaged_shard_is_moved_aside_and_recomputed(
    tmp_path, backbone, manifest, damage
):
    items = features.items_for(manifest, "validation", AUG)[:6]
    cache = _extract(tmp_path, backbone, items)
    (shard,) = cache.folder.glob("shard-*.npz")
    data = shard.read_bytes()
    if damage == "garbage":
        shard.write_bytes(b"not a shard")
    elif damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    else:  # a flipped byte inside the stored features: the digest catches it
        middle = len(data) // 2
        shard.write_bytes(
            data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
        )
    reopened = features.FeatureCache(tmp_path, backbone, SIZE, "float32").open()
    assert reopened.entries == {}
    assert list(reopened.folder.glob("*.corrupt"))
    again = _extract(tmp_path, backbone, items)
    np.testing.assert_allclose(again.get(items), cache.get(items), atol=1e-5)


def test_backbone_loads_a_local_weights_file_and_names_a_missing_one(tmp_path):
    xception = keras.applications.Xception(
        include_top=False, weights=None, pooling="avg", input_shape=(SIZE, SIZE, 3)
    )
    path = tmp_path / "xception.weights.h5"
    xception.save_weights(path)
    loaded = build_backbone(SIZE, str(path), 0)
    expected = build_backbone(SIZE, "none", 0)
    assert loaded.weights == str(path)
    assert loaded.weights_sha256 != expected.weights_sha256
    with pytest.raises(PipelineError, match="missing.h5"):
        build_backbone(SIZE, str(tmp_path / "missing.h5"), 0)


def test_imagenet_weights_offline_stop_with_a_way_to_supply_them():
    try:
        build_backbone(SIZE, "imagenet", 0)
    except PipelineError as err:
        assert "base.weights" in str(err) and "none" in str(err)
    else:
        pytest.skip("ImageNet weights are available here; nothing to refuse")


def test_random_weights_are_calibrated_so_features_carry_signal(manifest, backbone):
    images = calibration_images(manifest, SIZE)
    raw = build_backbone(SIZE, "none", 3).model(images[:8], training=False)
    calibrated = backbone.model(images[:8], training=False)
    assert float(np.std(raw)) < 1e-3  # uncalibrated: activations vanish
    assert float(np.std(calibrated)) > 1e-2


def test_head_overfits_one_batch(backbone, manifest):
    batch = manifest[manifest.split == "train"].iloc[::2].head(20)
    images = np.stack([load_for_model(Path(p).read_bytes(), SIZE) for p in batch.path])
    classes = sorted(set(manifest.label))
    targets = np.eye(len(classes))[[classes.index(x) for x in batch.label]]
    keras.utils.set_random_seed(0)
    head = build_head(len(classes), 100, 0.5)
    model = assemble(backbone.model, head)
    compile_for_training(model, 0.005)
    history = model.fit(images, targets, batch_size=20, epochs=100, verbose=0)
    loss, accuracy = model.evaluate(images, targets, verbose=0)  # dropout off
    assert accuracy == 1.0
    assert loss < 0.1 * history.history["loss"][0]


def _settings(mode: str) -> train.Settings:
    params = load_params()
    params["base"]["weights"] = "none"
    params["train"]["mode"] = mode
    params["train"]["augment"]["views"] = 2
    params["train_150"].update(image_size=SIZE, epochs=3)
    return train.Settings.from_params("train-150", params)


def _train(tmp_path: Path, manifest, mode: str, monkeypatch) -> dict:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "home"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run():
        return train.train(
            _settings(mode), manifest, tmp_path / "out", tmp_path / "metrics.json"
        )


def test_same_seed_and_data_give_the_same_metrics(tmp_path, manifest, monkeypatch):
    """On CPU, two runs agree to 1e-6 (fresh cache each: extraction included)."""
    first = _train(tmp_path / "a", manifest, "cached", monkeypatch)
    second = _train(tmp_path / "b", manifest, "cached", monkeypatch)
    for key in (
        "best_epoch",
        "best_val_accuracy",
        "best_val_loss",
        "best_train_accuracy",
    ):
        assert first[key] == pytest.approx(second[key], abs=1e-6)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["best_val_accuracy"] == first["best_val_accuracy"]
    model = keras.models.load_model(tmp_path / "a" / "out" / "model.keras")
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert model.output_shape == (None, 10)


def test_reference_mode_trains_the_same_head_on_images(tmp_path, manifest, monkeypatch):
    result = _train(tmp_path, manifest, "reference", monkeypatch)
    assert result["epochs"] == 3 and result["extract_seconds"] == 0.0
    history = pd.read_csv(tmp_path / "out" / "history.csv")
    assert list(history.epoch) == [1, 2, 3]
    assert not list((tmp_path / "home").glob("cache"))


def test_settings_refuse_an_unknown_mode():
    params = load_params()
    params["train"]["mode"] = "fast"
    with pytest.raises(PipelineError, match="train.mode"):
        train.Settings.from_params("train-150", params)


def test_bfloat16_extraction_computes_in_bfloat16_and_stays_close(manifest, backbone):
    images = calibration_images(manifest, SIZE)[:8]
    exact = features.extraction_model(backbone, "float32")(images).numpy()
    mixed_model = bfloat16_copy(backbone)
    assert {layer.dtype_policy.name for layer in mixed_model.layers[2].layers} == {
        "mixed_bfloat16"
    }
    mixed = features.extraction_model(backbone, "bfloat16")(images).numpy()
    assert mixed.dtype == np.float32
    cosine = (
        (exact * mixed).sum(1)
        / np.linalg.norm(exact, axis=1)
        / np.linalg.norm(mixed, axis=1)
    )
    assert cosine.min() > 0.99
    assert np.abs(exact - mixed).max() > 0  # really a different computation
