"""The served clothing classifier: base64 image bytes in, class probabilities out."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from stages.config import ROOT, PipelineError
from stages.images import ImageRejected, Limits, decode, resize

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name the model is logged under in its run
IMAGE_COLUMN = "image"
TOP_K = 3
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # one image's file size, after base64 decoding
MAX_ROWS = 256  # images per request; bounds memory and keeps under the timeout
FORWARD_BATCH = 32  # images per forward pass
SERVING_LIMITS = Limits(min_side=1)  # serve tiny images; keep the pixel limits
LOCK_FILE = ROOT / "requirements.lock"
SERVED_PACKAGES = ("mlflow", "tensorflow-cpu", "keras", "numpy", "pandas", "pillow")
SERVED_PACKAGES += ("cloudpickle", "pyyaml")
SERVED_MODULES = ("__init__.py", "config.py", "images.py", "serving.py")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Rejection:
    """Why one row of a request could not be classified; row counts from 0."""

    row: int | None
    reason: str
    detail: str

    def __str__(self) -> str:
        where = "request" if self.row is None else f"row {self.row}"
        return f"{where}: {self.reason}: {self.detail}"


class RequestRejected(MlflowException):
    """A client error (HTTP 400) listing every rejected row of a request.

    The MLflow 3.17 scoring server prefixes the message of any MlflowException
    raised by predict with the whole request data; for the `inputs` format that
    repeats every base64 string in full, so one rejected 20 MB image would be
    echoed back. The message is therefore set once and later writes are ignored.
    """

    def __init__(self, rejections: Sequence[Rejection], n_rows: int | None = None):
        what = "request" if n_rows is None else f"{len(rejections)} of {n_rows} images"
        summary = f"{what} rejected, nothing classified; " + "; ".join(
            str(r) for r in rejections
        )
        rows = [dataclasses.asdict(r) for r in rejections]
        super().__init__(summary, error_code=INVALID_PARAMETER_VALUE, rejected=rows)
        self.rejections = list(rejections)

    @property
    def message(self) -> str:
        return self._fixed_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_fixed_message"):
            self._fixed_message = value


@dataclass(frozen=True)
class ServingConfig:
    """What the served model needs besides its weights; saved as an artifact."""

    classes: list[str]
    image_size: int
    min_side: int = SERVING_LIMITS.min_side
    max_side: int = SERVING_LIMITS.max_side
    max_pixels: int = SERVING_LIMITS.max_pixels
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_rows: int = MAX_ROWS

    @property
    def limits(self) -> Limits:
        return Limits(self.min_side, self.max_side, self.max_pixels)


def decode_row(value: Any, config: ServingConfig) -> np.ndarray:
    """Turn one base64 cell into the model's input array, or raise ImageRejected."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ImageRejected("missing", "no image given (null, or an empty CSV cell)")
    if not isinstance(value, str):
        kind = type(value).__name__
        raise ImageRejected("not_a_string", f"expected a base64 string, got {kind}")
    compact = "".join(value.split())  # base64 wrapped over lines is fine
    if not compact:
        raise ImageRejected("empty", "the image is an empty string")
    if len(compact) > 4 * math.ceil(config.max_image_bytes / 3):
        raise ImageRejected(
            "too_many_bytes",
            f"about {len(compact) * 3 // 4} bytes, over the limit of "
            f"{config.max_image_bytes}",
        )
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected(
            "not_base64", "not valid base64 (standard alphabet, with padding)"
        ) from None
    return resize(decode(data, config.limits).pixels, config.image_size)


def image_column(model_input: Any, max_rows: int) -> list[Any]:
    """The `image` values of a request, or RequestRejected for its shape."""
    if not isinstance(model_input, pd.DataFrame):
        model_input = pd.DataFrame(model_input)
    if IMAGE_COLUMN not in model_input.columns:
        detail = f"the request has no '{IMAGE_COLUMN}' column"
        raise RequestRejected([Rejection(None, "missing_column", detail)])
    values = model_input[IMAGE_COLUMN].tolist()
    if not values:
        raise RequestRejected([Rejection(None, "no_rows", "the request has no rows")])
    if len(values) > max_rows:
        detail = f"{len(values)} images, over the limit of {max_rows} a request"
        raise RequestRejected([Rejection(None, "too_many_rows", detail)])
    return values


def decode_rows(values: Sequence[Any], config: ServingConfig) -> np.ndarray:
    """Decode every row into one float32 batch, or reject them all."""
    size = config.image_size
    batch = np.empty((len(values), size, size, 3), dtype=np.float32)
    rejections = []
    for row, value in enumerate(values):
        try:
            batch[row] = decode_row(value, config)
        except ImageRejected as err:
            rejections.append(Rejection(row, err.reason, err.detail))
        except Exception as err:  # a decoder bug on odd bytes: still this row's fault
            log.exception("row %d: unexpected error while decoding", row)
            detail = f"the decoder failed ({type(err).__name__}: {err})"
            rejections.append(Rejection(row, "undecodable", detail))
    if rejections:
        error = RequestRejected(rejections, len(values))
        log.info("%s", error.message)  # a client error, not the server's
        raise error
    return batch


def compile_forward(keras_model: Any, image_size: int) -> Any:
    """A traced image-to-probabilities function: one graph for any batch size."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, image_size, image_size, 3), tf.float32)

    @tf.function(input_signature=[spec])
    def forward(images: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(keras_model(images, training=False), axis=-1)

    return forward


def probabilities(forward: Any, batch: np.ndarray) -> np.ndarray:
    """Run `forward` over `batch` in chunks of FORWARD_BATCH; float64 (N, classes)."""
    chunks = [
        forward(batch[start : start + FORWARD_BATCH]).numpy()
        for start in range(0, len(batch), FORWARD_BATCH)
    ]
    return np.concatenate(chunks).astype(np.float64)


def prediction_table(probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image: label, probability, top-k names and scores, p_<class>."""
    names = np.asarray(classes, dtype=object)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    top = np.take_along_axis(probs, order, axis=1)
    columns: dict[str, Any] = {"label": names[order[:, 0]], "probability": top[:, 0]}
    for k in range(TOP_K):
        columns[f"top{k + 1}"] = names[order[:, k]]
        columns[f"top{k + 1}_probability"] = top[:, k]
    for index, name in enumerate(classes):
        columns[f"p_{name}"] = probs[:, index]
    return pd.DataFrame(columns)


class ClothingClassifier(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper: a DataFrame of base64 images to a table of predictions."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the Keras model and config, trace the forward pass, warm it up."""
        import keras

        raw = json.loads(Path(context.artifacts["config"]).read_text())
        self.config = ServingConfig(**raw)
        keras_model = keras.saving.load_model(
            context.artifacts["keras_model"], compile=False
        )
        self.forward = compile_forward(keras_model, self.config.image_size)
        size = self.config.image_size
        self.forward(np.zeros((1, size, size, 3), dtype=np.float32))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Classify every row of `model_input`, or raise RequestRejected."""
        values = image_column(model_input, self.config.max_rows)
        batch = decode_rows(values, self.config)
        return prediction_table(probabilities(self.forward, batch), self.config.classes)


def served_signature(classes: Sequence[str]) -> ModelSignature:
    """Input: an `image` string column (base64). Output: the prediction table.

    `image` is optional in the schema only so that the model itself, not
    MLflow's schema check, answers a request without it (with a clean 400).
    """
    outputs = [ColSpec("string", "label"), ColSpec("double", "probability")]
    for k in range(1, TOP_K + 1):
        outputs += [
            ColSpec("string", f"top{k}"),
            ColSpec("double", f"top{k}_probability"),
        ]
    outputs += [ColSpec("double", f"p_{name}") for name in classes]
    inputs = Schema([ColSpec("string", IMAGE_COLUMN, required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def pinned_requirements(lock_file: Path = LOCK_FILE) -> list[str]:
    """The serving packages' pins, copied from the lock file."""
    pins = {}
    for line in lock_file.read_text().splitlines():
        name, sep, _ = line.strip().partition("==")
        if sep and not line.startswith("#"):
            pins[name.lower().replace("_", "-")] = line.strip()
    missing = [p for p in SERVED_PACKAGES if p not in pins]
    if missing:
        raise PipelineError(f"{lock_file}: no pin for {', '.join(missing)}")
    return [pins[p] for p in SERVED_PACKAGES]


def encode_file(path: Path) -> str:
    """The base64 text of a file's bytes, as a request carries it."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def log_served_model(
    keras_path: Path, classes: list[str], image_size: int, example_image: Path
) -> ModelInfo:
    """Log the pyfunc model as `model` in the active run; return its ModelInfo."""
    if mlflow.active_run() is None:
        raise PipelineError("log_served_model needs an active MLflow run")
    config = ServingConfig(classes=list(classes), image_size=int(image_size))
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp, "serving_config.json")
        config_path.write_text(json.dumps(dataclasses.asdict(config), indent=2))
        code_dir = Path(tmp, "stages")
        code_dir.mkdir()
        for module in SERVED_MODULES:
            shutil.copy(Path(__file__).parent / module, code_dir / module)
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=ClothingClassifier(),
            artifacts={"keras_model": str(keras_path), "config": str(config_path)},
            code_paths=[str(code_dir)],
            signature=served_signature(classes),
            input_example=pd.DataFrame({IMAGE_COLUMN: [encode_file(example_image)]}),
            pip_requirements=pinned_requirements(),
        )


@dataclass(frozen=True)
class FileResult:
    """The prediction for one file, or why it has none."""

    path: Path
    label: str | None = None
    probability: float | None = None
    error: str | None = None


def predict_files(
    model: mlflow.pyfunc.PyFuncModel, paths: Sequence[Path]
) -> list[FileResult]:
    """Classify image files with a loaded served model; a bad file fails alone."""
    results: list[FileResult] = []
    for start in range(0, len(paths), FORWARD_BATCH):
        results += _predict_chunk(
            model, [Path(p) for p in paths[start : start + FORWARD_BATCH]]
        )
    return results


def _predict_chunk(model: Any, paths: list[Path]) -> list[FileResult]:
    failed: dict[int, str] = {}
    encoded: dict[int, str] = {}
    for index, path in enumerate(paths):
        try:
            size = path.stat().st_size
            if size == 0:
                raise ImageRejected("empty", "the file has no bytes")
            if size > MAX_IMAGE_BYTES:
                raise ImageRejected("too_many_bytes", f"over {MAX_IMAGE_BYTES} bytes")
            encoded[index] = encode_file(path)
        except OSError as err:
            failed[index] = f"unreadable: {err.strerror or err}"
        except ImageRejected as err:
            failed[index] = str(err)
    table = _predict_valid(model, encoded, failed)
    return [
        FileResult(path, error=failed[i])
        if i in failed
        else FileResult(path, table.at[i, "label"], float(table.at[i, "probability"]))
        for i, path in enumerate(paths)
    ]


def _predict_valid(
    model: Any, encoded: dict[int, str], failed: dict[int, str]
) -> pd.DataFrame:
    """Predict the encoded rows; rejected ones move to `failed`. Index: row ids."""
    for _ in range(2):  # the second try has every rejected row removed
        rows = [i for i in encoded if i not in failed]
        if not rows:
            return pd.DataFrame(columns=["label", "probability"])
        frame = pd.DataFrame({IMAGE_COLUMN: [encoded[i] for i in rows]})
        try:
            return model.predict(frame).set_axis(rows)
        except MlflowException as err:
            rejected = err.json_kwargs.get("rejected") or []
            if not rejected or any(r["row"] is None for r in rejected):
                raise
            for r in rejected:
                failed[rows[r["row"]]] = f"{r['reason']}: {r['detail']}"
    raise RuntimeError("the model rejected rows it had accepted")
