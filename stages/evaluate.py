"""Evaluate the final model on the test split and promote it if it is the best.

Writes accuracy, loss, per-class precision/recall/F1 and a confusion matrix
(figure and table) to DVC metrics and plots and to the stage's MLflow run,
then registers the model and moves the champion alias only on improvement.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from tqdm import tqdm

from stages import datasets, tracking
from stages.config import (
    FINAL_STAGE,
    METRICS_DIR,
    OUTPUTS_DIR,
    PipelineError,
    atomic_path,
    load_params,
    save_figure,
    write_csv,
    write_json,
)

log = logging.getLogger(__name__)

BATCH_SIZE = 32


def predict_split(model: keras.Model, rows: pd.DataFrame) -> np.ndarray:
    """Class probabilities for manifest rows, read through the serving decoder."""
    size = model.input_shape[1]
    probabilities = []
    for start in tqdm(range(0, len(rows), BATCH_SIZE), desc="evaluate", unit="batch"):
        chunk = rows.iloc[start : start + BATCH_SIZE]
        batch = [
            datasets.read_image(row.path, row.sha256, size)
            for row in chunk.itertuples()
        ]
        logits = model(np.stack(batch), training=False)
        probabilities.append(keras.ops.convert_to_numpy(keras.ops.softmax(logits)))
    return np.concatenate(probabilities)


def score(actual: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, loss, macro-F1 and per-class precision, recall and F1."""
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(actual)), actual]
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=range(len(classes)), zero_division=0
    )
    per_class = {
        name: {"precision": p, "recall": r, "f1": f, "support": int(n)}
        for name, p, r, f, n in zip(
            classes, precision, recall, f1, support, strict=True
        )
    }
    return {
        "accuracy": float((predicted == actual).mean()),
        "loss": float(-np.log(np.clip(picked, 1e-12, 1)).mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            k: {m: float(v) for m, v in d.items()} for k, d in per_class.items()
        },
    }


def save_confusion(actual, predicted, classes: list[str], out_dir: Path) -> Path:
    """Write the confusion matrix as a CSV table and a PNG figure."""
    matrix = confusion_matrix(actual, predicted, labels=range(len(classes)))
    table = pd.DataFrame(matrix, index=classes, columns=classes)
    table.index.name = "actual"
    with atomic_path(out_dir / "confusion_matrix.csv") as tmp:
        table.to_csv(tmp)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="actual", title="Test confusion matrix")
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out_dir / "confusion_matrix.png")


def evaluate(
    model_path: Path,
    manifest: pd.DataFrame,
    classes: list[str],
    out_dir: Path,
    metrics_path: Path,
) -> dict:
    """Score the model on the test split; write predictions, tables and metrics."""
    try:
        model = keras.models.load_model(model_path)
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot load {model_path}: {err}") from err
    test = manifest[manifest["split"] == "test"].reset_index(drop=True)
    actual = np.array([classes.index(label) for label in test["label"]])
    probabilities = predict_split(model, test)
    predicted = probabilities.argmax(axis=1)
    metrics = score(actual, probabilities, classes)
    predictions = test[["path", "label"]].rename(columns={"label": "actual"})
    predictions["predicted"] = [classes[i] for i in predicted]
    predictions["probability"] = probabilities.max(axis=1).round(6)
    write_csv(out_dir / "predictions.csv", predictions)
    figure = save_confusion(actual, predicted, classes, out_dir)
    write_json(metrics_path, metrics)
    _log_to_mlflow(metrics, out_dir, figure)
    log.info(
        "test accuracy %.4f, macro-F1 %.4f", metrics["accuracy"], metrics["macro_f1"]
    )
    return metrics


def _log_to_mlflow(metrics: dict, out_dir: Path, figure: Path) -> None:
    flat = {f"test_{k}": v for k, v in metrics.items() if k != "per_class"}
    for name, values in metrics["per_class"].items():
        flat.update({f"{m}_{name}": v for m, v in values.items() if m != "support"})
    mlflow.log_metrics(flat)
    mlflow.log_artifact(str(figure))
    for table in ("confusion_matrix.csv", "predictions.csv"):
        mlflow.log_artifact(str(out_dir / table))


def test_set_digest(manifest: pd.DataFrame) -> str:
    """Names the images scored, so only scores on the same images are compared."""
    shas = sorted(manifest.loc[manifest["split"] == "test", "sha256"])
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()[:16]


def main() -> None:
    params = load_params()
    classes = list(params["base"]["classes"])
    manifest = datasets.read_manifest()
    run_id_file = OUTPUTS_DIR / FINAL_STAGE / "run_id"
    if not run_id_file.exists():
        raise PipelineError(f"{run_id_file} not found: run {FINAL_STAGE} first")
    train_run = run_id_file.read_text().strip()
    with tracking.stage_run("evaluate", {k: params[k] for k in ("base", "evaluate")}):
        mlflow.set_tag("model_run_id", train_run)
        tracking.log_dataset(manifest, context="evaluation")
        metrics = evaluate(
            OUTPUTS_DIR / FINAL_STAGE / "model.keras",
            manifest,
            classes,
            OUTPUTS_DIR / "evaluate",
            METRICS_DIR / "evaluate.json",
        )
        from stages.registry import promote_if_better

        settings = params["evaluate"]
        promote_if_better(
            f"runs:/{train_run}/model",
            metrics["accuracy"],
            settings["registered_model"],
            settings["alias"],
            test_set_digest(manifest),
        )


if __name__ == "__main__":
    tracking.run_stage(main)
