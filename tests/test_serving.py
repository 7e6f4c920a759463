"""End-to-end tests of the served classifier behind a real `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.tracking import MlflowClient
from PIL import Image

from stages import classify, servers, serving
from stages.config import load_params
from stages.images import load_for_model
from stages.model import assemble, build_backbone, build_head, compile_for_training
from stages.registry import promote_if_better

IMAGE_SIZE = 96
PER_CLASS = 10
SEED = 42
EPOCHS = 30
CLASSES = load_params()["base"]["classes"]
TOLERANCE = 1e-5
HTTP_TIMEOUT = 120  # seconds for one request
FORMATS = ("dataframe_split", "dataframe_records", "inputs")
PROBABILITY_COLUMNS = [f"p_{name}" for name in CLASSES]

pytestmark = pytest.mark.slow  # a real model server and real training


def sample_images(folder: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` images of each class, resized, and their labels."""
    pixels, labels = [], []
    for index, name in enumerate(CLASSES):
        for path in sorted((folder / name).glob("*.jpg"))[:per_class]:
            pixels.append(load_for_model(path.read_bytes(), IMAGE_SIZE))
            labels.append(index)
    return np.stack(pixels), np.asarray(labels)


def train_small_model(dataset: Path) -> keras.Model:
    """The recipe's model at a small size: a random base whose BatchNorm is
    calibrated on the sample (as `base.weights: none` does), a head fitted."""
    pixels, labels = sample_images(dataset / "train", PER_CLASS)
    backbone = build_backbone(IMAGE_SIZE, "none", SEED, calibration=pixels)
    features = backbone.model(pixels, training=False).numpy()
    head = build_head(len(CLASSES), 32, 0.2)
    compile_for_training(head, 1e-3)
    onehot = keras.utils.to_categorical(labels, len(CLASSES))
    head.fit(features, onehot, epochs=EPOCHS, batch_size=16, verbose=0)
    return assemble(backbone.model, head)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A fresh MLflow SQLite store; MLFLOW_TRACKING_URI points at it meanwhile."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        experiment = mlflow.create_experiment(
            "serving-tests", artifact_location=(root / "artifacts").as_uri()
        )
        yield experiment
        mlflow.set_tracking_uri(None)  # classify.main sets it process-wide


@pytest.fixture(scope="module")
def model_uri(store: str, dataset_dir: Path, tmp_path_factory) -> str:
    """A small model trained on real images, logged with log_served_model."""
    keras_path = tmp_path_factory.mktemp("keras") / "classifier.keras"
    train_small_model(dataset_dir).save(keras_path)
    example = next((dataset_dir / "test" / "pants").glob("*.jpg"))
    with mlflow.start_run(experiment_id=store) as run:
        serving.log_served_model(keras_path, CLASSES, IMAGE_SIZE, example)
    return f"runs:/{run.info.run_id}/model"


@pytest.fixture(scope="module")
def local_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The same logged model, loaded in this process."""
    return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="module")
def server(model_uri: str, tmp_path_factory) -> str:
    """Base URL of `mlflow models serve` for the model, run outside the project."""
    cwd = tmp_path_factory.mktemp("server-cwd")
    with servers.scoring_server(model_uri, servers.free_port(), cwd=cwd) as url:
        yield url


@pytest.fixture(scope="module")
def test_images(dataset_dir: Path) -> list[Path]:
    """Four real test JPEGs of different classes."""
    return [next((dataset_dir / "test" / c).glob("*.jpg")) for c in CLASSES[:4]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def payload(images: list, fmt: str = "dataframe_split") -> dict:
    """A scoring request in one of the server's JSON formats."""
    if fmt == "dataframe_split":
        return {fmt: {"columns": ["image"], "data": [[v] for v in images]}}
    if fmt == "dataframe_records":
        return {fmt: [{"image": v} for v in images]}
    return {fmt: {"image": images}}


def post(url: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=body, timeout=HTTP_TIMEOUT)


def served_table(response: requests.Response) -> pd.DataFrame:
    assert response.status_code == 200, response.text[:2000]
    return pd.DataFrame(response.json()["predictions"])


def assert_same_predictions(served: pd.DataFrame, local: pd.DataFrame) -> None:
    assert list(served.columns) == list(local.columns)
    assert served["label"].tolist() == local["label"].tolist()
    for name in ["probability", *PROBABILITY_COLUMNS]:
        np.testing.assert_allclose(served[name], local[name], rtol=0, atol=TOLERANCE)


def good_rows(test_images: list[Path]) -> list[str]:
    """Three test JPEGs and one test image converted to PNG, base64-encoded."""
    rows = [b64(p.read_bytes()) for p in test_images[:3]]
    return rows + [b64(png_bytes(Image.open(test_images[3])))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_served_equals_in_process(server, local_model, test_images, fmt):
    served = served_table(post(server, payload(good_rows(test_images), fmt)))
    local = local_model.predict(pd.DataFrame({"image": good_rows(test_images)}))
    assert_same_predictions(served, local)
    assert set(served["label"]) <= set(CLASSES)
    np.testing.assert_allclose(served[PROBABILITY_COLUMNS].sum(axis=1), 1, atol=1e-5)
    for k in (1, 2, 3):
        assert set(served[f"top{k}"]) <= set(CLASSES)
    assert (served["top1"] == served["label"]).all()
    assert (served["top1_probability"] >= served["top2_probability"]).all()


def test_model_tells_images_apart(local_model, test_images):
    table = local_model.predict(pd.DataFrame({"image": good_rows(test_images)}))
    assert np.ptp(table[PROBABILITY_COLUMNS].to_numpy(), axis=0).max() > 1e-3


def test_csv_request(server, local_model, test_images):
    frame = pd.DataFrame({"image": good_rows(test_images)})
    response = requests.post(
        f"{server}/invocations",
        data=frame.to_csv(index=False),
        headers={"Content-Type": "text/csv"},
        timeout=HTTP_TIMEOUT,
    )
    assert_same_predictions(served_table(response), local_model.predict(frame))


@pytest.mark.parametrize(
    "name",
    ["grayscale.jpg", "cmyk.jpg", "rgba.png", "exif-rotated.jpg", "one-pixel.png"],
)
def test_awkward_images_are_classified(server, local_model, bad_inputs_dir, name):
    row = b64((bad_inputs_dir / name).read_bytes())
    served = served_table(post(server, payload([row])))
    assert served["label"].iloc[0] in CLASSES
    assert_same_predictions(served, local_model.predict(pd.DataFrame({"image": [row]})))


def assert_rejected(response: requests.Response, expected: dict) -> dict:
    """A 400 whose message and `rejected` list name each expected row's reason."""
    assert response.status_code == 400, response.text[:2000]
    body = response.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    got = {r["row"]: r["reason"] for r in body["rejected"]}
    assert got == expected
    for row, reason in expected.items():
        where = "request" if row is None else f"row {row}"
        assert f"{where}: {reason}:" in body["message"]
    return body


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("zero-bytes.jpg", "empty"),
        ("truncated-half.jpg", "truncated"),
        ("not-an-image.jpg", "not_an_image"),
    ],
)
def test_bad_files_are_rejected(server, bad_inputs_dir, name, reason):
    row = b64((bad_inputs_dir / name).read_bytes())
    for fmt in FORMATS:
        assert_rejected(post(server, payload([row], fmt)), {0: reason})


def huge_png() -> str:
    """A 8000x6000 black PNG: a few kB of file, 48 M pixels once decoded."""
    return b64(png_bytes(Image.new("L", (8000, 6000))))


GARBAGE = {
    "not base64": (["this is not base64!"], "not_base64"),
    "empty string": ([""], "empty"),
    "whitespace": (["  \n "], "empty"),
    "a number": ([123], "not_a_string"),
    "a list": ([[1, 2, 3]], "not_a_string"),
    "null": ([None], "missing"),
    "text": ([b64(b"just some text, not pixels")], "not_an_image"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_client_garbage_is_rejected(server, case):
    rows, reason = GARBAGE[case]
    assert_rejected(post(server, payload(rows, "dataframe_records")), {0: reason})


def test_too_many_pixels_is_rejected(server):
    assert_rejected(post(server, payload([huge_png()])), {0: "too_large"})


def test_too_many_bytes_is_rejected_without_echo(server):
    row = "A" * (28 * 1024 * 1024)  # 21 MB once decoded
    response = post(server, payload([row], "inputs"))
    assert_rejected(response, {0: "too_many_bytes"})
    assert len(response.content) < 10_000  # the request is not echoed back


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"dataframe_records": [{"picture": "abc"}]}, "missing_column"),
        ({"dataframe_records": []}, "missing_column"),
        ({"dataframe_split": {"columns": ["image"], "data": []}}, "no_rows"),
        ({"inputs": {"image": ["x"] * (serving.MAX_ROWS + 1)}}, "too_many_rows"),
    ],
)
def test_malformed_requests_are_rejected(server, body, reason):
    assert_rejected(post(server, body), {None: reason})


def test_one_bad_row_rejects_the_batch(
    server, local_model, test_images, bad_inputs_dir
):
    good = b64(test_images[0].read_bytes())
    truncated = b64((bad_inputs_dir / "truncated-half.jpg").read_bytes())
    rows = [good, truncated, good, "%%%"]
    body = assert_rejected(
        post(server, payload(rows)), {1: "truncated", 3: "not_base64"}
    )
    assert "predictions" not in body
    assert body["message"].startswith("2 of 4 images rejected, nothing classified")
    served = served_table(post(server, payload([good])))  # still serving
    assert_same_predictions(
        served, local_model.predict(pd.DataFrame({"image": [good]}))
    )


def upright_and_sideways(path: Path) -> tuple[bytes, bytes]:
    """PNGs of a JPEG's stored pixels, turned upright per its EXIF tag and not."""
    transposes = {
        2: [Image.Transpose.FLIP_LEFT_RIGHT],
        3: [Image.Transpose.ROTATE_180],
        4: [Image.Transpose.FLIP_TOP_BOTTOM],
        5: [Image.Transpose.TRANSPOSE],
        6: [Image.Transpose.ROTATE_270],
        7: [Image.Transpose.TRANSVERSE],
        8: [Image.Transpose.ROTATE_90],
    }
    stored = Image.open(path)
    orientation = stored.getexif().get(0x0112)
    assert orientation in transposes, f"{path} has EXIF orientation {orientation}"
    stored = stored.convert("RGB")
    upright = stored
    for step in transposes[orientation]:
        upright = upright.transpose(step)
    return png_bytes(upright), png_bytes(stored)


def test_exif_rotated_is_classified_upright(server, bad_inputs_dir):
    path = bad_inputs_dir / "exif-rotated.jpg"
    upright, sideways = upright_and_sideways(path)
    rows = [b64(path.read_bytes()), b64(upright), b64(sideways)]
    probs = served_table(post(server, payload(rows)))[PROBABILITY_COLUMNS].to_numpy()
    np.testing.assert_allclose(probs[0], probs[1], rtol=0, atol=TOLERANCE)
    assert np.abs(probs[0] - probs[2]).max() > 1e-4


@pytest.mark.parametrize("content_type", ["json", "csv"])
def test_mlflow_models_predict(
    model_uri, local_model, test_images, tmp_path, content_type
):
    frame = pd.DataFrame({"image": good_rows(test_images)})
    source = tmp_path / f"input.{content_type}"
    if content_type == "json":
        source.write_text(json.dumps(payload(frame["image"].tolist())))
    else:
        frame.to_csv(source, index=False)
    output = tmp_path / "predictions.json"
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "predict"]
    command += ["-m", model_uri, "-i", str(source), "-o", str(output)]
    command += ["-t", content_type, "--env-manager", "local"]
    subprocess.run(command, check=True, cwd=tmp_path, timeout=300)
    served = pd.DataFrame(json.loads(output.read_text())["predictions"])
    assert_same_predictions(served, local_model.predict(frame))


def test_classify_cli_on_a_folder(
    model_uri, test_images, bad_inputs_dir, tmp_path, capsys
):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    good = folder / "nested" / "good.jpg"
    good.write_bytes(test_images[0].read_bytes())
    bad = folder / "broken.jpg"
    bad.write_bytes((bad_inputs_dir / "truncated-half.jpg").read_bytes())
    (folder / "notes.txt").write_text("not an image file, so not picked up")
    assert classify.main(["-m", model_uri, str(folder)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # the header, then one line per image file
    good_line = next(line for line in lines if str(good) in line)
    assert good_line.split()[1] in CLASSES
    bad_line = next(line for line in lines if str(bad) in line)
    assert "REJECTED" in bad_line and "truncated" in bad_line


def test_promote_if_better_moves_alias_only_on_improvement(store, model_uri):
    name, alias = "clothing-classifier-test", "champion"
    client = MlflowClient()
    decisions = []
    for accuracy in (0.5, 0.4, 0.7):
        with mlflow.start_run(experiment_id=store) as run:
            decisions.append(
                promote_if_better(model_uri, accuracy, name, alias, "set-a")
            )
        champion = client.get_model_version_by_alias(name, alias)
        best = max(d["version"] for d in decisions if d["promoted"])
        assert int(champion.version) == best
    first, worse, better = decisions
    assert first["promoted"] and first["champion_version"] is None
    assert not worse["promoted"] and worse["champion_test_accuracy"] == 0.5
    assert better["promoted"] and better["champion_version"] == first["version"]
    assert (
        client.get_model_version(name, str(worse["version"])).tags["test_accuracy"]
        == "0.4"
    )
    logged = client.get_run(run.info.run_id).data
    assert logged.tags["registry.decision"] == "promoted"
    assert logged.metrics["registry.champion_test_accuracy"] == 0.5
    assert logged.metrics["registry.candidate_test_accuracy"] == 0.7


def test_scores_on_another_test_set_do_not_move_the_alias(store, model_uri):
    name, alias = "clothing-classifier-test-sets", "champion"
    with mlflow.start_run(experiment_id=store):
        first = promote_if_better(model_uri, 0.2, name, alias, "small-sample")
    with mlflow.start_run(experiment_id=store) as run:
        other = promote_if_better(model_uri, 0.9, name, alias, "full-test-split")
    assert first["promoted"]
    assert not other["promoted"] and not other["comparable"]
    champion = MlflowClient().get_model_version_by_alias(name, alias)
    assert int(champion.version) == first["version"]
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["registry.decision"] == "kept: not comparable"


def test_unexpected_decoder_error_rejects_only_its_row(monkeypatch, test_images):
    def failing_decode(data, limits):
        raise RuntimeError("a decoder bug")

    config = serving.ServingConfig(classes=CLASSES, image_size=IMAGE_SIZE)
    monkeypatch.setattr(serving, "decode", failing_decode)
    with pytest.raises(serving.RequestRejected) as caught:
        serving.decode_rows([b64(test_images[0].read_bytes()), "%%"], config)
    reasons = {r.row: r.reason for r in caught.value.rejections}
    assert reasons == {0: "undecodable", 1: "not_base64"}
