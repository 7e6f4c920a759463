"""The recipe's network: a frozen Xception base and a small trainable head.

The full model takes a batch of RGB images resized to the stage's size, as
float32 in 0..255, and returns class logits. Xception's own preprocessing
(scaling to -1..1) is a layer inside the model, so callers pass plain pixels.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from stages.config import PipelineError

log = logging.getLogger(__name__)

FEATURE_SIZE = 2048  # Xception's pooled output width
MIN_IMAGE_SIZE = 71  # the smallest input Xception accepts
RANDOM_WEIGHTS = "none"  # base.weights for seeded random initialisation
BATCHNORM_MOMENTUM = 0.99  # Keras' default, restored after calibration
IMAGENET_HELP = (
    "ImageNet weights could not be loaded ({error}). Either connect to the "
    "internet once (Keras keeps them in ~/.keras/models), or download "
    "xception_weights_tf_dim_ordering_tf_kernels_notop.h5 elsewhere and set "
    "base.weights in params.yaml to its path, or set base.weights: none to "
    "train from random initialisation."
)


@dataclass(frozen=True)
class Backbone:
    """A built base model and the identity of the weights it holds."""

    model: keras.Model
    weights: str  # what params asked for: imagenet, none or a path
    weights_sha256: str  # digest of the actual weight values


def build_backbone(
    image_size: int, weights: str, seed: int, calibration: np.ndarray | None = None
) -> Backbone:
    """Build the frozen Xception base with global average pooling.

    With `weights: none` the convolutions are randomly initialised from
    `seed`. Left at their initial values (mean 0, variance 1), the
    BatchNormalization statistics would let activations shrink layer after
    layer to about 1e-6, and the head could learn nothing; so, when
    `calibration` images are given, each BatchNormalization layer takes its
    statistics from them in one forward pass.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise PipelineError(
            f"image size {image_size} is under Xception's minimum of {MIN_IMAGE_SIZE}"
        )
    keras.utils.set_random_seed(seed)
    source = _weights_argument(weights)
    try:
        base, xception = _base(image_size, source)
    except Exception as err:  # Keras raises plain Exception on download errors
        if weights == "imagenet":
            raise PipelineError(IMAGENET_HELP.format(error=err)) from err
        raise PipelineError(f"cannot load Xception weights {weights}: {err}") from err
    if source is None and calibration is not None:
        _calibrate_batchnorm(xception, scaled_images(calibration))
    xception.trainable = False
    digest = weights_digest(base)
    log.info("backbone: Xception, weights=%s (sha256 %s)", weights, digest[:12])
    return Backbone(base, str(weights), digest)


def _base(image_size: int, source: str | None) -> tuple[keras.Model, keras.Model]:
    """The image-to-features model and the Xception model inside it."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1, name="xception_scale")(inputs)
    xception = keras.applications.Xception(
        include_top=False,
        weights=source,
        pooling="avg",
        input_shape=(image_size, image_size, 3),
    )
    return keras.Model(inputs, xception(scaled, training=False), name="base"), xception


def bfloat16_copy(backbone: Backbone) -> keras.Model:
    """The same base computing in bfloat16 (weights kept in float32).

    Built afresh under the mixed policy: a clone would keep each layer's
    float32 policy from its saved config.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model, xception = _base(backbone.model.input_shape[1], None)
    finally:
        keras.config.set_dtype_policy(previous)
    model.set_weights(backbone.model.get_weights())
    xception.trainable = False
    return model


def scaled_images(images: np.ndarray) -> np.ndarray:
    """Xception's own preprocessing: pixels 0..255 to -1..1."""
    return images / 127.5 - 1.0


def _calibrate_batchnorm(xception: keras.Model, images: np.ndarray) -> None:
    norms = [
        layer
        for layer in xception.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in norms:
        layer.momentum = 0.0  # moving statistics := this batch's statistics
    xception(images, training=True)
    for layer in norms:
        layer.momentum = BATCHNORM_MOMENTUM
    log.info("random weights: BatchNormalization calibrated on %d images", len(images))


def normalise_weights(value: str | None) -> str:
    """params' base.weights as a string: `none` (also YAML null) or as given."""
    return RANDOM_WEIGHTS if value is None else str(value)


def _weights_argument(weights: str) -> str | None:
    if weights == RANDOM_WEIGHTS:
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise PipelineError(f"base.weights: no weights file at {path}")
    return str(path)


def weights_digest(model: keras.Model) -> str:
    """sha256 of a model's weight values: the identity of what it computes."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(array.tobytes())
    return digest.hexdigest()


def build_head(n_classes: int, inner_size: int, dropout: float) -> keras.Model:
    """The recipe's head: Dense(inner, relu), Dropout, Dense(n_classes) logits."""
    features = keras.Input((FEATURE_SIZE,), name="features")
    inner = keras.layers.Dense(inner_size, activation="relu", name="inner")(features)
    dropped = keras.layers.Dropout(dropout, name="dropout")(inner)
    logits = keras.layers.Dense(n_classes, name="logits")(dropped)
    return keras.Model(features, logits, name="head")


def compile_for_training(model: keras.Model, learning_rate: float) -> None:
    """Adam and categorical cross-entropy from logits, as in the recipe."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def assemble(base: keras.Model, head: keras.Model) -> keras.Model:
    """Chain base and head into the full image-to-logits classifier."""
    return keras.Model(base.input, head(base.output), name="clothing_classifier")
