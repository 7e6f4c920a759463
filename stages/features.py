"""A cache of the frozen base's pooled features, one entry per image and view.

The base never changes during training, so an image's features (for a given
size, weights and augmentation draw) are computed once and reused. Entries
are keyed by everything that decides their values, so a stale entry can
never be served:

- the namespace folder: backbone, the sha256 of its weight values, image
  size, extraction precision and the version of the decoding code;
- the entry key inside it: the image's content hash and the view name
  (`clean`, or `aug<k>-<digest of the augmentation settings and seed>`).

Entries are written in shards, each atomically (write, then rename), so a
killed extraction keeps every finished shard and resumes after it; a shard
that fails to load or check is reported, moved aside and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from stages import datasets
from stages.augment import CLEAN_VIEW, Augmentation
from stages.config import PipelineError, atomic_path, write_json
from stages.model import FEATURE_SIZE, Backbone, bfloat16_copy

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when decoding, resizing or augmenting changes
SHARD_SIZE = 512
BATCH_SIZE = 32


@dataclass(frozen=True)
class Item:
    """One image view to extract: where the image is and which view."""

    path: str  # relative to the project root
    sha256: str
    view: str
    view_index: int

    @property
    def key(self) -> str:
        return f"{self.sha256}:{self.view}"


class FeatureCache:
    """Feature shards of one namespace (backbone, weights, size, precision)."""

    def __init__(self, root: Path, backbone: Backbone, size: int, precision: str):
        self.namespace = {
            "backbone": "xception",
            "weights": backbone.weights,
            "weights_sha256": backbone.weights_sha256,
            "image_size": size,
            "precision": precision,
            "pipeline_version": PIPELINE_VERSION,
        }
        identity = {k: v for k, v in self.namespace.items() if k != "weights"}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        self.folder = Path(root) / f"{size}px-{digest.hexdigest()[:16]}"
        self.entries: dict[str, np.ndarray] = {}

    def open(self) -> FeatureCache:
        """Create the folder if needed and load every intact shard.

        A shard being written is a hidden `.shard-*.tmp.npz` and is never
        read. One left by a `kill -9` stays on disk: it is not removed here,
        since another process may be writing it right now; removing those
        older than a day would lift this.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"cannot create cache {self.folder}: {err}") from err
        if not (self.folder / "namespace.json").exists():
            write_json(self.folder / "namespace.json", self.namespace)
        for shard in sorted(self.folder.glob("shard-*.npz")):
            self._load_shard(shard)
        log.info("feature cache %s: %d entries", self.folder, len(self.entries))
        return self

    def _load_shard(self, shard: Path) -> None:
        try:
            with np.load(shard, allow_pickle=False) as data:
                keys, features = data["keys"], data["features"]
                if features.shape != (len(keys), FEATURE_SIZE):
                    raise ValueError(f"features of shape {features.shape}")
                if data["digest"].item() != _digest(keys, features):
                    raise ValueError("content digest does not match")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            aside = shard.with_suffix(".corrupt")
            log.warning(
                "cache shard %s is unusable (%s); moved to %s", shard, err, aside.name
            )
            shard.rename(aside)
            return
        self.entries.update(zip(keys.tolist(), features, strict=True))

    def add(self, keys: list[str], features: np.ndarray) -> None:
        """Store a shard atomically and keep its entries in memory."""
        key_array = np.array(keys)
        shard = self.folder / f"shard-{uuid.uuid4().hex}.npz"
        with atomic_path(shard) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                keys=key_array,
                features=features,
                digest=np.array(_digest(key_array, features)),
            )
        self.entries.update(zip(keys, features, strict=True))

    def get(self, items: list[Item]) -> np.ndarray:
        """Features of `items`, in order, as an (n, 2048) array."""
        return np.stack([self.entries[item.key] for item in items])

    def missing(self, items: list[Item]) -> list[Item]:
        return [item for item in items if item.key not in self.entries]


def _digest(keys: np.ndarray, features: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(keys.tolist()).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()


def items_for(manifest, split: str, aug: Augmentation) -> list[Item]:
    """Every view of every image of a split, in manifest order."""
    rows = manifest[manifest["split"] == split]
    return [
        Item(row.path, row.sha256, view, index)
        for row in rows.itertuples()
        for index, view in enumerate(aug.view_names(split))
    ]


def extraction_model(backbone: Backbone, precision: str):
    """A compiled call of the base in float32 or in bfloat16 mixed precision."""
    model = backbone.model
    if precision == "bfloat16":
        model = bfloat16_copy(backbone)
    elif precision != "float32":
        raise PipelineError(
            f"train.extract_precision: {precision!r} is not float32 or bfloat16"
        )
    call = tf.function(
        lambda images: tf.cast(model(images, training=False), tf.float32),
        reduce_retracing=True,
    )
    return call


def _image_batches(items: list[Item], size: int, aug: Augmentation):
    """Decoded (and, for augmented views, warped) batches of `items`, in order."""
    table = {
        "path": np.array([item.path for item in items]),
        "sha256": np.array([item.sha256 for item in items]),
        "draw": np.array([item.view_index for item in items], dtype=np.int64),
        "augment": np.array([item.view != CLEAN_VIEW for item in items]),
        "target": np.zeros(len(items), dtype=np.float32),
    }
    dataset = tf.data.Dataset.from_tensor_slices(table)
    return datasets.image_batches(dataset, size, aug, BATCH_SIZE)


def extract(
    cache: FeatureCache, call, items: list[Item], aug: Augmentation, label: str
) -> float:
    """Compute and store the features of every item not cached; return images/s."""
    todo = cache.missing(items)
    log.info(
        "%s: %d of %d views cached, %d to extract",
        label,
        len(items) - len(todo),
        len(items),
        len(todo),
    )
    if not todo:
        return 0.0
    size = cache.namespace["image_size"]
    keys: list[str] = []
    rows: list[np.ndarray] = []
    start = time.perf_counter()
    done = 0
    with tqdm(total=len(todo), desc=f"extract {label}", unit="img") as bar:
        try:
            for images, _ in _image_batches(todo, size, aug):
                rows.append(call(images).numpy())
                keys.extend(item.key for item in todo[done : done + len(images)])
                done += len(images)
                bar.update(len(images))
                if len(keys) >= SHARD_SIZE:
                    cache.add(keys, np.concatenate(rows))
                    keys, rows = [], []
        except tf.errors.OpError as err:
            raise datasets.pipeline_error(err) from None
    if keys:
        cache.add(keys, np.concatenate(rows))
    return len(todo) / (time.perf_counter() - start)
