"""Benchmark: the cached-feature mode against the reference mode, on real data.

Prints, for each mode, wall time, peak memory and best validation accuracy at
150 px with the same seed, epochs, weights and augmentation; the full recipe
(both sizes, all epochs) timed in full in cached mode and extrapolated from
measured epochs in reference mode; and the extraction rate against the bare
forward-pass rate of the same base. Each training trial runs in its own
process so its peak memory is its own.

    python benchmarks/cache_vs_reference.py --weights none --compare-epochs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import datasets  # noqa: E402
from stages.config import load_params  # noqa: E402


def trial(stage: str, mode: str, epochs: int, weights: str, home: Path) -> dict:
    """One training stage in a child process; its metrics, wall time and peak RSS.

    `home` holds the trial's feature cache (empty at first) and MLflow store.
    """
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--trial", stage, mode, str(epochs), weights]
    env = {
        **os.environ,
        "DVC_ROOT": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
    }
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{stage} {mode} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "wall_seconds": wall}


def run_trial(stage: str, mode: str, epochs: int, weights: str) -> None:
    """The child's side of `trial`: train one stage and print its figures."""
    import mlflow

    from stages import train

    params = load_params()
    params["train"]["mode"] = mode
    params[stage.replace("-", "_")]["epochs"] = epochs
    params["base"]["weights"] = weights
    settings = train.Settings.from_params(stage, params)
    out = Path(os.environ["DVC_ROOT"]) / f"{stage}-{mode}"
    with mlflow.start_run():
        result = train.train(settings, datasets.read_manifest(), out, out / "m.json")
    print("RESULT " + json.dumps(result))


def bare_rate(size: int, weights: str, precision: str, batches: int = 6) -> float:
    """Images/s of the base alone on decoded, resized real images in memory."""
    from stages.features import extraction_model
    from stages.model import build_backbone

    manifest = datasets.read_manifest()
    images = datasets.calibration_images(manifest, size)
    backbone = build_backbone(size, weights, 0, images)
    call = extraction_model(backbone, precision)
    call(images)  # trace and warm up
    start = time.perf_counter()
    for _ in range(batches):
        call(images).numpy()
    return batches * len(images) / (time.perf_counter() - start)


def extraction_check(size: int, weights: str, count: int) -> dict:
    """Extraction of `count` training views against the bare base, back to back."""
    from stages.augment import Augmentation
    from stages.features import FeatureCache, extract, extraction_model, items_for
    from stages.model import build_backbone

    params = load_params()
    manifest = datasets.read_manifest()
    aug = Augmentation.from_params(params["train"]["augment"], params["base"]["seed"])
    images = datasets.calibration_images(manifest, size)
    backbone = build_backbone(size, weights, 0, images)
    call = extraction_model(backbone, "float32")
    call(images)  # trace once, outside both timings
    items = items_for(manifest, "train", aug)[:count]
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp), backbone, size, "float32").open()
        extracted = extract(cache, call, items, aug, f"{size}px check")
    start = time.perf_counter()
    for _ in range(count // len(images)):
        call(images).numpy()
    bare = (count // len(images)) * len(images) / (time.perf_counter() - start)
    return {
        "size": size,
        "extract_images_per_s": extracted,
        "bare_images_per_s": bare,
        "ratio": extracted / bare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="none")
    parser.add_argument("--compare-epochs", type=int, default=5)
    parser.add_argument("--reference-299-epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--trial", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument(
        "--extraction-only",
        type=int,
        metavar="N",
        help="only time extraction of N training views against the bare base",
    )
    args = parser.parse_args()
    if args.extraction_only:
        for size in (150, 299):
            print(extraction_check(size, args.weights, args.extraction_only))
        return None
    if args.trial:
        stage, mode, epochs, weights = args.trial
        return run_trial(stage, mode, int(epochs), weights)
    params = load_params()
    figures: dict = {"weights": args.weights, "params": params["train"]}
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))

    print(f"== accuracy at 150 px, {args.compare_epochs} epochs, both modes")
    for mode in ("reference", "cached"):
        figures[f"compare_{mode}"] = trial(
            "train-150", mode, args.compare_epochs, args.weights, work / mode
        )
        report(mode, figures[f"compare_{mode}"])

    print("== reference mode at 299 px, measured epochs")
    ref299 = trial(
        "train-299",
        "reference",
        args.reference_299_epochs,
        args.weights,
        work / "ref299",
    )
    report("reference 299", ref299)
    figures["reference_299"] = ref299

    print("== full recipe in cached mode, from an empty cache")
    full = {
        stage: trial(
            stage,
            "cached",
            params[stage.replace("-", "_")]["epochs"],
            args.weights,
            work / "full",
        )
        for stage in ("train-150", "train-299")
    }
    for stage, result in full.items():
        report(f"cached {stage}", result)
    figures["cached_full"] = full

    summarise(figures, params, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2, default=float))


def report(name: str, r: dict) -> None:
    print(
        f"  {name:>16}: wall {r['wall_seconds']:8.1f} s, peak RSS "
        f"{r['peak_rss_mb']:7.0f} MB, best val acc {r['best_val_accuracy']:.4f} "
        f"(epoch {r['best_epoch']})"
    )


def summarise(figures: dict, params: dict, args) -> None:
    ref, cached = figures["compare_reference"], figures["compare_cached"]
    epochs150 = params["train_150"]["epochs"]
    epochs299 = params["train_299"]["epochs"]
    per_epoch_150 = ref["fit_seconds"] / args.compare_epochs
    per_epoch_299 = figures["reference_299"]["fit_seconds"] / args.reference_299_epochs
    reference_full = per_epoch_150 * epochs150 + per_epoch_299 * epochs299
    cached_full = sum(r["wall_seconds"] for r in figures["cached_full"].values())
    gap = 100 * (cached["best_val_accuracy"] - ref["best_val_accuracy"])
    figures["summary"] = {
        "compare_speedup": ref["wall_seconds"] / cached["wall_seconds"],
        "val_accuracy_gap_points": gap,
        "reference_full_seconds_extrapolated": reference_full,
        "cached_full_seconds_measured": cached_full,
        "full_recipe_speedup": reference_full / cached_full,
    }
    for size in (150, 299):
        precision = params["train"]["extract_precision"]
        bare = bare_rate(size, args.weights, precision)
        stage = f"train-{size}"
        extracted = figures["cached_full"][stage]["extract_images_per_s_train"]
        figures["summary"][f"extract_vs_bare_{size}"] = extracted / bare
        figures["summary"][f"bare_images_per_s_{size}"] = bare
        figures["summary"][f"extract_images_per_s_{size}"] = extracted
    fp32, bf16 = (
        bare_rate(299, args.weights, "float32"),
        bare_rate(299, args.weights, "bfloat16"),
    )
    figures["summary"]["bare_299_bfloat16_speedup"] = bf16 / fp32
    print("== summary")
    for key, value in figures["summary"].items():
        print(f"  {key}: {value:.3f}")
    print(
        "  (reference full recipe: extrapolated from "
        f"{args.compare_epochs} epochs at 150 and {args.reference_299_epochs} "
        "at 299; cached full recipe: run and timed in full)"
    )


if __name__ == "__main__":
    main()
