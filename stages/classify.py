"""Classify image files or folders with a served model, without a server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from stages.config import setup_logging
from stages.serving import IMAGE_SUFFIXES, FileResult, predict_files
from stages.tracking import tracking_uri

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models:/clothing-classifier@champion"


def image_files(targets: Sequence[Path]) -> list[Path]:
    """Named files as given, plus image files found under named folders."""
    found: list[Path] = []
    for target in targets:
        if target.is_dir():
            found += sorted(
                p
                for p in target.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
        else:
            found.append(target)  # a missing file is reported by predict_files
    return found


def format_table(results: Sequence[FileResult]) -> str:
    """A plain text table: path, label, probability; or path and the reason."""
    width = max([len("path")] + [len(str(r.path)) for r in results])
    lines = [f"{'path':<{width}}  {'label':<10}  probability"]
    for r in results:
        if r.error is None:
            lines.append(f"{str(r.path):<{width}}  {r.label:<10}  {r.probability:.4f}")
        else:
            lines.append(f"{str(r.path):<{width}}  {'REJECTED':<10}  {r.error}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line: -m MODEL_URI and one or more files or folders."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.classify", description=__doc__
    )
    parser.add_argument(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        help=f"model URI or local model folder (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per file; exit 1 if any file failed, 2 if nothing could run."""
    setup_logging()
    # the model's notes on rejected rows number rows, not files; the table names files
    logging.getLogger("stages.serving").setLevel(logging.WARNING)
    args = parse_args(argv)
    files = image_files(args.paths)
    if not files:
        print("no image files found", file=sys.stderr)
        return 2
    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except (MlflowException, OSError) as err:
        print(f"cannot load model {args.model}: {err}", file=sys.stderr)
        print(
            "run the pipeline first (./run.sh full or dvc repro), or name a "
            "model with -m runs:/<run id>/model",
            file=sys.stderr,
        )
        return 2
    results = predict_files(model, files)
    print(format_table(results))
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
