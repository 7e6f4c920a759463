"""tf.data input pipelines: images decoded, resized and augmented on the fly,
and cached features with a fresh view drawn for each image every epoch."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from stages.augment import IDENTITY, Augmentation, apply_transforms, transform_for
from stages.config import OUTPUTS_DIR, ROOT, PipelineError
from stages.images import ImageRejected, load_for_model

MANIFEST = OUTPUTS_DIR / "prepare" / "manifest.csv"
CALIBRATION_IMAGES = 32
AUTOTUNE = tf.data.AUTOTUNE
DECODERS = 2  # images decoded at once: decoded pixels stay within about a batch
DRAWS = 2**62  # reference-mode draws are random in [0, DRAWS); views are 0..K-1


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


def read_image(path: str, sha256: str, size: int) -> np.ndarray:
    """Read, check against the manifest's hash, decode and resize one image."""
    try:
        data = (ROOT / path).read_bytes()
    except OSError as err:
        raise PipelineError(f"{path}: cannot read ({err.strerror})") from err
    if hashlib.sha256(data).hexdigest() != sha256:
        raise PipelineError(f"{path}: changed since prepare; run dvc repro")
    try:
        return load_for_model(data, size)
    except ImageRejected as err:
        raise PipelineError(f"{path}: {err}") from err


def calibration_images(manifest: pd.DataFrame, size: int) -> np.ndarray:
    """Training images spread evenly over the manifest, for BatchNorm statistics."""
    rows = manifest[manifest["split"] == "train"]
    picks = np.linspace(0, len(rows) - 1, min(CALIBRATION_IMAGES, len(rows)))
    chosen = rows.iloc[picks.astype(int)]
    return np.stack([read_image(r.path, r.sha256, size) for r in chosen.itertuples()])


def image_batches(
    items: tf.data.Dataset, size: int, aug: Augmentation, batch_size: int
) -> tf.data.Dataset:
    """(images, targets) batches from items {path, sha256, draw, augment, target}.

    Decoding runs in tf.data's threads; each image's transform comes from its
    (content, draw) key, and the warp runs batched in TensorFlow.
    """

    def decode(path, sha256, draw, augment):
        sha = sha256.decode()
        pixels = read_image(path.decode(), sha, size)
        transform = transform_for(aug, sha, int(draw), size) if augment else IDENTITY
        return pixels, transform

    def load(item):
        pixels, transform = tf.numpy_function(
            decode,
            [item["path"], item["sha256"], item["draw"], item["augment"]],
            [tf.float32, tf.float32],
        )
        pixels.set_shape((size, size, 3))
        transform.set_shape((8,))
        return pixels, transform, item["target"]

    batches = items.map(load, num_parallel_calls=DECODERS, deterministic=True)
    batches = batches.batch(batch_size)
    warped = batches.map(lambda px, tr, y: (apply_transforms(px, tr), y))
    return warped.prefetch(1)  # the next batch decodes while this one computes


def split_table(manifest: pd.DataFrame, split: str, classes) -> dict[str, np.ndarray]:
    """Paths, hashes and one-hot targets of one split, in manifest order."""
    rows = manifest[manifest["split"] == split]
    return {
        "path": rows["path"].to_numpy(str),
        "sha256": rows["sha256"].to_numpy(str),
        "target": labels(manifest, split, classes),
    }


def reference_batches(manifest: pd.DataFrame, split: str, s, train: bool):
    """Images of a split for the reference mode; training ones reshuffled and
    freshly augmented on every pass over the data."""
    table = split_table(manifest, split, s.classes)
    items = tf.data.Dataset.from_tensor_slices(table)
    augment = train and s.augmentation.enabled
    if train:
        items = items.shuffle(
            len(table["path"]), seed=s.seed, reshuffle_each_iteration=True
        )
    if augment:
        draws = tf.data.Dataset.random(seed=s.seed, rerandomize_each_iteration=True)
        draws = draws.map(lambda r: tf.math.floormod(r, DRAWS))
    else:
        draws = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).repeat()
    items = tf.data.Dataset.zip(items, draws).map(
        lambda item, draw: {**item, "draw": draw, "augment": augment}
    )
    return image_batches(items, s.image_size, s.augmentation, s.batch_size)


def view_batches(
    features: np.ndarray, targets: np.ndarray, batch_size: int, seed: int
) -> tf.data.Dataset:
    """Shuffled batches of cached features (views, images, width): each pass
    draws a fresh random view for every image."""
    views, count = features.shape[:2]
    stacked = tf.constant(features)
    order = tf.data.Dataset.range(count).shuffle(
        count, seed=seed, reshuffle_each_iteration=True
    )
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    picks = tf.data.Dataset.zip(order, draws.map(lambda r: tf.math.floormod(r, views)))
    return (
        picks.batch(batch_size)
        .map(
            lambda rows, view: (
                tf.gather_nd(stacked, tf.stack([view, rows], axis=1)),
                tf.gather(targets, rows),
            )
        )
        .prefetch(AUTOTUNE)
    )


def view_stack(features: np.ndarray, views: int) -> np.ndarray:
    """Reshape per-(image, view) rows into (views, images, width)."""
    images = len(features) // views
    return features.reshape(images, views, -1).transpose(1, 0, 2)


def pipeline_error(err: tf.errors.OpError) -> PipelineError:
    """The PipelineError raised inside a tf.data function, out of TF's wrapping."""
    found = re.search(r"PipelineError: (.*)", err.message)
    return PipelineError(found.group(1) if found else err.message)
