"""Training-time augmentation: random shear, zoom and vertical flip.

Each draw comes from a generator seeded by (seed, image content, view or
epoch), so an augmented view is a pure function of its key: the feature cache
can store it, and the reference mode can draw a fresh one every epoch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

CLEAN_VIEW = "clean"
IDENTITY = np.array([1, 0, 0, 0, 1, 0, 0, 0], dtype=np.float32)


@dataclass(frozen=True)
class Augmentation:
    """The recipe's augmentation settings and the number of cached views."""

    views: int
    shear: float  # degrees
    zoom: float  # zoom factor drawn from [1 - zoom, 1 + zoom] per axis
    vertical_flip: bool
    seed: int

    @classmethod
    def from_params(cls, augment: dict, seed: int) -> Augmentation:
        return cls(
            views=int(augment["views"]),
            shear=float(augment["shear"]),
            zoom=float(augment["zoom"]),
            vertical_flip=bool(augment["vertical_flip"]),
            seed=int(seed),
        )

    @property
    def enabled(self) -> bool:
        return self.views > 0

    def tag(self) -> str:
        """A short digest of the settings; part of every augmented view's name."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def view_names(self, split: str) -> list[str]:
        """The cached views of an image: K augmented ones for training, else one."""
        if split != "train" or not self.enabled:
            return [CLEAN_VIEW]
        return [f"aug{k}-{self.tag()}" for k in range(self.views)]


def rng_for(aug: Augmentation, sha256: str, draw: int) -> np.random.Generator:
    """The generator of one draw (view index or epoch) for one image."""
    return np.random.default_rng([aug.seed, int(sha256[:16], 16), draw])


def transform_for(aug: Augmentation, sha256: str, draw: int, size: int) -> np.ndarray:
    """The output-to-input transform of one draw, in the layout TF expects:
    shear, then zoom per axis, then maybe a vertical flip, about the centre."""
    rng = rng_for(aug, sha256, draw)
    shear = np.deg2rad(rng.uniform(-aug.shear, aug.shear))
    zoom_x, zoom_y = rng.uniform(1 - aug.zoom, 1 + aug.zoom, size=2)
    matrix = np.array([[1.0, -np.sin(shear)], [0.0, np.cos(shear)]]) @ np.diag(
        [zoom_x, zoom_y]
    )
    if aug.vertical_flip and rng.random() < 0.5:
        matrix = matrix @ np.diag([1.0, -1.0])
    centre = np.array([(size - 1) / 2, (size - 1) / 2])
    offset = centre - matrix @ centre
    return np.array(
        [*matrix[0], offset[0], *matrix[1], offset[1], 0.0, 0.0], dtype=np.float32
    )


def apply_transforms(images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
    """Warp a batch (B, S, S, 3) by one transform each; edges repeat outward."""
    size = tf.shape(images)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32),
        transforms=tf.cast(transforms, tf.float32),
        output_shape=size,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="NEAREST",
    )
