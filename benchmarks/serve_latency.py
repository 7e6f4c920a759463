"""Latency and throughput of `mlflow models serve` against the bare Keras model.

Run from the repository root: python -m benchmarks.serve_latency [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import requests

from stages import servers, serving
from stages.config import ROOT, load_params
from stages.images import load_for_model
from stages.model import assemble, build_backbone, build_head

IMAGE_SIZE = 299
BATCH = 32
HTTP_TIMEOUT = 300  # seconds for one request


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, default=ROOT / "data" / "test")
    parser.add_argument("--requests", type=int, default=50, help="single requests")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="batches of 32")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


Call = Callable[[int], object]


def alternating(calls: dict[str, Call], count: int, warmup: int) -> dict:
    """Seconds per call for each of `calls`, taking turns call by call.

    Turns keep both sides under the same background load, which drifts on a
    shared machine; `warmup` rounds are run first and not counted.
    """
    for i in range(warmup):
        for call in calls.values():
            call(i)
    spent: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(count):
        for name, call in calls.items():
            start = time.perf_counter()
            call(i)
            spent[name].append(time.perf_counter() - start)
    return spent


def summary(singles: list[float], batches: list[float]) -> dict[str, float]:
    """p50 and p95 single latency in ms, and batch throughput in images/s."""
    cuts = statistics.quantiles(singles, n=20)
    return {
        "single_p50_ms": 1000 * statistics.median(singles),
        "single_p95_ms": 1000 * cuts[18],
        "batch32_images_per_s": BATCH / statistics.median(batches),
    }


def bare_calls(keras_path: Path, pixels: np.ndarray) -> tuple[Call, Call]:
    """Single and batch calls of the traced Keras forward pass, on ready pixels."""
    import keras

    model = keras.saving.load_model(keras_path, compile=False)
    forward = serving.compile_forward(model, IMAGE_SIZE)
    n = len(pixels)
    return (
        lambda i: forward(pixels[i % n : i % n + 1]).numpy(),
        lambda i: forward(pixels[:BATCH]).numpy(),
    )


def served_calls(url: str, encoded: list[str]) -> tuple[Call, Call]:
    """Single and batch requests of the same images, as base64 JPEGs."""
    session = requests.Session()

    def body(rows: list[str]) -> str:
        return json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[r] for r in rows]}}
        )

    def post(data: str) -> None:
        answer = session.post(
            f"{url}/invocations",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=HTTP_TIMEOUT,
        )
        answer.raise_for_status()

    singles = [body([e]) for e in encoded]
    batch = body(encoded)
    return lambda i: post(singles[i % len(singles)]), lambda i: post(batch)


def measure(
    url: str, keras_path: Path, paths: list[Path], args: argparse.Namespace
) -> dict:
    """Bare and served figures, measured in turns."""
    pixels = np.stack([load_for_model(p.read_bytes(), IMAGE_SIZE) for p in paths])
    bare_single, bare_batch = bare_calls(keras_path, pixels)
    served_single, served_batch = served_calls(
        url, [serving.encode_file(p) for p in paths]
    )
    singles = alternating(
        {"bare": bare_single, "served": served_single}, args.requests, args.warmup
    )
    batches = alternating({"bare": bare_batch, "served": served_batch}, args.batches, 1)
    return {side: summary(singles[side], batches[side]) for side in singles}


def log_model(workdir: Path, keras_path: Path, example: Path) -> str:
    """A 299 px model with a random head, logged into a store under `workdir`."""
    classes = load_params()["base"]["classes"]
    base = build_backbone(IMAGE_SIZE, "none", 0).model
    assemble(base, build_head(len(classes), 100, 0.5)).save(keras_path)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    experiment = mlflow.create_experiment(
        "serve-latency", artifact_location=(workdir / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        serving.log_served_model(keras_path, classes, IMAGE_SIZE, example)
    return f"runs:/{run.info.run_id}/model"


def report(figures: dict) -> None:
    for side in ("bare", "served"):
        line = ", ".join(f"{k} {v:.1f}" for k, v in figures[side].items())
        print(f"{side:>6}: {line}")
    print(f"served p50 / bare p50: {figures['latency_ratio']:.2f} (target <= 1.5)")
    print(
        f"bare / served batch throughput: {figures['throughput_ratio']:.2f} "
        "(target <= 1.3)"
    )


def main() -> None:
    args = parse_args()
    paths = sorted(args.images.rglob("*.jpg"))[:BATCH]
    if len(paths) < BATCH:
        sys.exit(f"need {BATCH} JPEGs under {args.images}, found {len(paths)}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        keras_path = workdir / "model.keras"
        uri = log_model(workdir, keras_path, paths[0])
        port = servers.free_port()
        with servers.scoring_server(uri, port, cwd=workdir) as url:
            figures = measure(url, keras_path, paths, args)
    figures["latency_ratio"] = (
        figures["served"]["single_p50_ms"] / figures["bare"]["single_p50_ms"]
    )
    figures["throughput_ratio"] = (
        figures["bare"]["batch32_images_per_s"]
        / figures["served"]["batch32_images_per_s"]
    )
    figures["setup"] = {
        "image_size": IMAGE_SIZE,
        "requests": args.requests,
        "batches": args.batches,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
    }
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
