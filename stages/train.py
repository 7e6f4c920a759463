"""Train the recipe's head on a frozen Xception base at one image size.

`python -m stages.train train-150` and `... train-299` run the same code with
the size section of params.yaml. Two modes: `cached` trains the head on the
base's pooled features from the feature cache (one augmented view per image
drawn each epoch); `reference` pushes every image through the base every
epoch, as the recipe is written. Both keep the epoch with the best validation
accuracy as the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.figure import Figure

from stages import datasets, tracking
from stages.augment import Augmentation
from stages.config import (
    FINAL_STAGE,
    METRICS_DIR,
    OUTPUTS_DIR,
    ROOT,
    PipelineError,
    atomic_path,
    home_root,
    load_params,
    save_figure,
    write_csv,
    write_json,
)
from stages.features import FeatureCache, extract, extraction_model, items_for
from stages.model import (
    RANDOM_WEIGHTS,
    Backbone,
    assemble,
    build_backbone,
    build_head,
    compile_for_training,
    normalise_weights,
)

log = logging.getLogger(__name__)

CURVES = ("accuracy", "val_accuracy", "loss", "val_loss")


@dataclass(frozen=True)
class Settings:
    """Everything a training stage reads from params.yaml."""

    stage: str
    image_size: int
    epochs: int
    mode: str
    learning_rate: float
    inner_size: int
    dropout: float
    batch_size: int
    precision: str
    augmentation: Augmentation
    weights: str
    seed: int
    classes: tuple[str, ...]

    @classmethod
    def from_params(cls, stage: str, params: dict) -> Settings:
        base, train = params["base"], params["train"]
        sized = params[stage.replace("-", "_")]
        if train["mode"] not in ("cached", "reference"):
            raise PipelineError(
                f"train.mode: {train['mode']!r} is not cached or reference"
            )
        return cls(
            stage=stage,
            image_size=int(sized["image_size"]),
            epochs=int(sized["epochs"]),
            mode=train["mode"],
            learning_rate=float(train["learning_rate"]),
            inner_size=int(train["inner_size"]),
            dropout=float(train["dropout"]),
            batch_size=int(train["batch_size"]),
            precision=train["extract_precision"],
            augmentation=Augmentation.from_params(train["augment"], base["seed"]),
            weights=normalise_weights(base["weights"]),
            seed=int(base["seed"]),
            classes=tuple(base["classes"]),
        )


class BestEpoch(keras.callbacks.Callback):
    """Log each epoch's curves to MLflow and keep the head's best weights."""

    def __init__(self, head: keras.Model):
        super().__init__()
        self.head = head
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.best_weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {"epoch": epoch + 1, **{k: float(logs[k]) for k in CURVES}}
        self.history.append(row)
        mlflow.log_metrics({k: row[k] for k in CURVES}, step=epoch + 1)
        if self.best is None or row["val_accuracy"] > self.best["val_accuracy"]:
            self.best = row
            self.best_weights = [w.copy() for w in self.head.get_weights()]


def cached_features(s: Settings, backbone: Backbone, manifest) -> tuple:
    """Features of every training view and validation image, extracted where
    the cache lacks them; return (train views, validation, timings)."""
    cache = FeatureCache(
        home_root() / "cache" / "features", backbone, s.image_size, s.precision
    ).open()
    call = extraction_model(backbone, s.precision)
    start = time.perf_counter()
    items = {
        split: items_for(manifest, split, s.augmentation)
        for split in ("train", "validation")
    }
    rates = {
        split: extract(cache, call, split_items, s.augmentation, split)
        for split, split_items in items.items()
    }
    timings = {
        "extract_seconds": time.perf_counter() - start,
        **{f"extract_images_per_s_{k}": v for k, v in rates.items() if v},
    }
    views = len(s.augmentation.view_names("train"))
    train_views = datasets.view_stack(cache.get(items["train"]), views)
    return train_views, cache.get(items["validation"]), timings


def fit_cached(s: Settings, backbone: Backbone, head, manifest) -> tuple:
    """Train the head on cached features; return (callback, timings)."""
    train_views, valid_x, timings = cached_features(s, backbone, manifest)
    train = datasets.view_batches(
        train_views,
        datasets.labels(manifest, "train", s.classes),
        s.batch_size,
        s.seed,
    )
    valid = (valid_x, datasets.labels(manifest, "validation", s.classes))
    tracker, seconds = fit_keeping_best(head, head, train, valid, s)
    return tracker, {**timings, "fit_seconds": seconds}


def fit_reference(s: Settings, backbone: Backbone, head, manifest) -> tuple:
    """Train base + head on images, the base recomputed every epoch."""
    model = assemble(backbone.model, head)
    train = datasets.reference_batches(manifest, "train", s, train=True)
    valid = datasets.reference_batches(manifest, "validation", s, train=False)
    try:
        tracker, seconds = fit_keeping_best(model, head, train, valid, s)
    except tf.errors.OpError as err:
        raise datasets.pipeline_error(err) from None
    return tracker, {"extract_seconds": 0.0, "fit_seconds": seconds}


def fit_keeping_best(model, head, train, valid, s: Settings) -> tuple:
    """Compile and fit `model`, tracking `head`'s best epoch; (tracker, seconds)."""
    compile_for_training(model, s.learning_rate)
    tracker = BestEpoch(head)
    start = time.perf_counter()
    model.fit(
        train,
        validation_data=valid,
        epochs=s.epochs,
        callbacks=[tracker],
        verbose=2,
        shuffle=False,  # the tf.data pipelines shuffle themselves
    )
    return tracker, time.perf_counter() - start


def save_curves(history: list[dict], out_dir: Path, title: str) -> Path:
    """Write history.csv and the accuracy-curve figure; return the figure."""
    frame = pd.DataFrame(history)
    write_csv(out_dir / "history.csv", frame)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(frame["epoch"], frame["accuracy"], label="train")
    ax.plot(frame["epoch"], frame["val_accuracy"], label="validation")
    ax.set(xlabel="epoch", ylabel="accuracy", title=title)
    ax.legend()
    return save_figure(fig, out_dir / "accuracy.png")


def train(
    s: Settings, manifest: pd.DataFrame, out_dir: Path, metrics_path: Path
) -> dict:
    """Train at one size; write the best checkpoint, curves and metrics."""
    calibration = None
    if s.weights == RANDOM_WEIGHTS:
        calibration = datasets.calibration_images(manifest, s.image_size)
    backbone = build_backbone(s.image_size, s.weights, s.seed, calibration)
    mlflow.set_tags(
        {
            "weights": s.weights,
            "weights_sha256": backbone.weights_sha256,
            "mode": s.mode,
            "image_size": str(s.image_size),
        }
    )
    tracking.log_dataset(manifest, context="training")
    keras.utils.set_random_seed(s.seed)
    head = build_head(len(s.classes), s.inner_size, s.dropout)
    fit = fit_cached if s.mode == "cached" else fit_reference
    tracker, timings = fit(s, backbone, head, manifest)
    head.set_weights(tracker.best_weights)
    with atomic_path(out_dir / "model.keras") as tmp:
        assemble(backbone.model, head).save(tmp)
    save_curves(tracker.history, out_dir, f"{s.stage} ({s.mode})")
    best = tracker.best
    metrics = {
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "best_train_accuracy": best["accuracy"],
        "epochs": len(tracker.history),
    }
    write_json(metrics_path, metrics)
    log.info("best epoch %d: val_accuracy %.4f", best["epoch"], best["val_accuracy"])
    return log_results(out_dir, {**metrics, **timings})


def log_results(out_dir: Path, figures: dict) -> dict:
    """Log figures, peak memory, checkpoint, curves and history to MLflow."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {**figures, "peak_rss_mb": peak_mb}
    mlflow.log_metrics(figures)
    mlflow.log_artifact(str(out_dir / "model.keras"), "checkpoint")
    mlflow.log_artifact(str(out_dir / "accuracy.png"))
    mlflow.log_artifact(str(out_dir / "history.csv"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["train-150", "train-299"])
    stage = parser.parse_args().stage
    params = load_params()
    settings = Settings.from_params(stage, params)
    manifest = datasets.read_manifest()
    section = stage.replace("-", "_")
    logged = {k: params[k] for k in ("base", "train", section)}
    with tracking.stage_run(stage, logged) as run:
        train(settings, manifest, OUTPUTS_DIR / stage, METRICS_DIR / f"{stage}.json")
        if stage == FINAL_STAGE:
            publish(settings, manifest, run.info.run_id)


def publish(s: Settings, manifest: pd.DataFrame, run_id: str) -> None:
    """Log the final model for serving and write its run id for users."""
    # Imported here so that only the final stage depends on the serving code.
    from stages.serving import log_served_model

    example = ROOT / manifest[manifest["split"] == "test"].iloc[0]["path"]
    log_served_model(
        OUTPUTS_DIR / s.stage / "model.keras", list(s.classes), s.image_size, example
    )
    with atomic_path(OUTPUTS_DIR / s.stage / "run_id") as tmp:
        tmp.write_text(run_id + "\n")
    log.info(
        "serve it: mlflow models serve -m runs:/%s/model --env-manager local", run_id
    )


if __name__ == "__main__":
    tracking.run_stage(main)
