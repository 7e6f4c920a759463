"""Batches for training: cached features with a fresh view each epoch, or
images decoded, augmented and resized on the fly for the reference mode."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from stages.augment import augment_batch, rng_for
from stages.config import OUTPUTS_DIR, ROOT, PipelineError
from stages.images import load_for_model

MANIFEST = OUTPUTS_DIR / "prepare" / "manifest.csv"
REFERENCE_DRAW_OFFSET = 1_000_000  # keeps epoch draws apart from cached views
CALIBRATION_IMAGES = 32


def read_manifest(path: Path = MANIFEST) -> pd.DataFrame:
    """The manifest `prepare` wrote: one row per kept image."""
    try:
        return pd.read_csv(
            path, dtype={"sha256": str, "conversions": str}, keep_default_na=False
        )
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the prepare stage first") from None


def labels(manifest: pd.DataFrame, split: str, classes: tuple[str, ...]) -> np.ndarray:
    """One-hot labels of a split, in manifest order."""
    names = manifest.loc[manifest["split"] == split, "label"]
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise PipelineError(f"manifest labels {unknown} are not in base.classes")
    return np.eye(len(classes), dtype=np.float32)[[index[n] for n in names]]


def view_stack(features: np.ndarray, views: int) -> np.ndarray:
    """Reshape per-(image, view) rows into (views, images, width)."""
    images = len(features) // views
    return features.reshape(images, views, -1).transpose(1, 0, 2)


def calibration_images(manifest: pd.DataFrame, size: int) -> np.ndarray:
    """Training images spread evenly over the manifest, for BatchNorm statistics."""
    paths = list(manifest.loc[manifest["split"] == "train", "path"])
    picks = np.linspace(0, len(paths) - 1, min(CALIBRATION_IMAGES, len(paths)))
    return np.stack(
        [load_for_model((ROOT / paths[int(i)]).read_bytes(), size) for i in picks]
    )


class ViewSampler(keras.utils.PyDataset):
    """Shuffled batches of cached features, one random view per image per epoch."""

    def __init__(
        self, features: np.ndarray, targets: np.ndarray, batch_size: int, seed: int
    ):
        super().__init__()
        self.features, self.targets = features, targets
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.features[self.views[rows], rows], self.targets[rows]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.targets))
        self.views = self.rng.integers(len(self.features), size=len(self.targets))


class ImageBatches(keras.utils.PyDataset):
    """Batches of decoded images of one split; training ones shuffled and
    freshly augmented every epoch (the reference mode)."""

    def __init__(self, manifest: pd.DataFrame, split: str, settings, augment: bool):
        super().__init__()
        rows = manifest[manifest["split"] == split]
        self.paths, self.shas = list(rows["path"]), list(rows["sha256"])
        self.targets = labels(manifest, split, settings.classes)
        self.size, self.batch_size = settings.image_size, settings.batch_size
        self.aug = settings.augmentation if augment else None
        self.rng = np.random.default_rng(settings.seed)
        self.epoch = -1
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = np.stack(
            [
                load_for_model((ROOT / self.paths[i]).read_bytes(), self.size)
                for i in rows
            ]
        )
        if self.aug is not None and self.aug.enabled:
            draw = REFERENCE_DRAW_OFFSET + self.epoch
            rngs = [rng_for(self.aug, self.shas[i], draw) for i in rows]
            images = augment_batch(images, self.aug, rngs)
        return images, self.targets[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        shuffle = self.aug is not None
        count = len(self.paths)
        self.order = self.rng.permutation(count) if shuffle else np.arange(count)
