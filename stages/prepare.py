"""Stage prepare: decode every image, report rejects and duplicates, list the rest."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm import tqdm

from stages import tracking
from stages.config import (
    DATA_DIR,
    METRICS_DIR,
    OUTPUTS_DIR,
    SPLITS,
    PipelineError,
    load_params,
    save_figure,
    write_csv,
    write_json,
)
from stages.images import ImageRejected, Limits, decode

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "split",
    "label",
    "sha256",
    "width",
    "height",
    "format",
    "conversions",
]
REJECTED_COLUMNS = ["path", "split", "label", "reason", "detail"]
DUPLICATE_COLUMNS = ["sha256", "path", "split", "kind"]
REJECT_REASONS = (
    "empty",
    "truncated",
    "not_an_image",
    "unsupported_format",
    "too_small",
    "too_large",
    "unreadable",
    "decoder_error",
)
CONVERSIONS = ("grayscale", "cmyk", "palette", "alpha", "16bit", "exif_rotated")
DUPLICATE_KINDS = {
    "leak": "leak: the same content in several splits",
    "within_split": "duplicate within one split",
}
DEBRIS_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
ON_REJECT = ("skip", "fail")
ON_LEAKAGE = ("warn", "fail")
MANIFEST = "manifest.csv"
CLASSES = "classes.json"
REJECTED = "rejected.csv"
DUPLICATES = "duplicates.csv"
CHART = "class_distribution.png"
CLASS_COUNTS = "class_counts.json"  # per split and class: too wide for dvc exp show


@dataclass(frozen=True)
class Settings:
    """The params the stage reads, checked."""

    classes: tuple[str, ...]
    seed: int
    sample_per_class: int
    on_reject: str
    on_leakage: str
    limits: Limits

    @classmethod
    def from_params(cls, base: dict, params: dict) -> Settings:
        """Build from the `base` and `prepare` sections; PipelineError if invalid."""
        classes = tuple(base.get("classes") or ())
        if not classes or len(set(classes)) != len(classes):
            raise PipelineError("base.classes must name each class once")
        on_reject = params.get("on_reject", "skip")
        on_leakage = params.get("on_leakage", "warn")
        _check_choice("prepare.on_reject", on_reject, ON_REJECT)
        _check_choice("prepare.on_leakage", on_leakage, ON_LEAKAGE)
        sample = int(params.get("sample_per_class", 0))
        if sample < 0:
            raise PipelineError(f"prepare.sample_per_class is {sample}; use 0 or more")
        if base.get("seed") is None:
            raise PipelineError("base.seed is missing")
        limits = Limits.from_params(params)
        return cls(classes, int(base["seed"]), sample, on_reject, on_leakage, limits)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PipelineError(f"{name} is {value!r}; use one of {', '.join(choices)}")


@dataclass(frozen=True)
class Candidate:
    """An image file found at <split>/<label>/<name>."""

    path: Path
    split: str
    label: str


@dataclass
class Checked:
    """One image file after decoding; `reason` is empty when it is kept."""

    path: str
    split: str
    label: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    conversions: str = ""
    reason: str = ""
    detail: str = ""


@dataclass
class PrepareResult:
    """What the stage wrote: the tables, the metrics and the debris it ignored."""

    manifest: pd.DataFrame
    rejected: pd.DataFrame
    duplicates: pd.DataFrame
    metrics: dict[str, Any]
    debris: list[str]


def is_debris(name: str) -> bool:
    """True for operating-system litter: hidden names, Thumbs.db, desktop.ini."""
    return name.startswith(".") or name.lower() in DEBRIS_NAMES


def find_images(
    data_dir: Path, classes: Sequence[str]
) -> tuple[list[Candidate], list[Path]]:
    """List the files at data_dir/<split>/<class>/ and the debris beside them.

    Raises PipelineError naming every layout problem at once: a missing split,
    a missing or unexpected class folder, a file or folder out of place.
    """
    candidates: list[Candidate] = []
    debris: list[Path] = []
    problems: list[str] = []
    for split in SPLITS:
        split_dir = data_dir / split
        if split_dir.is_dir():
            candidates += _scan_split(split_dir, classes, debris, problems)
        else:
            problems.append(f"split {split!r}: folder {split_dir} is missing")
    if problems:
        raise PipelineError("dataset layout:\n  " + "\n  ".join(problems))
    return candidates, debris


def _scan_split(
    split_dir: Path, classes: Sequence[str], debris: list[Path], problems: list[str]
) -> list[Candidate]:
    split = split_dir.name
    found: list[Candidate] = []
    present: set[str] = set()
    for entry in sorted(split_dir.iterdir()):
        if is_debris(entry.name):
            debris += _debris_files(entry)
        elif not entry.is_dir():
            problems.append(f"split {split!r}: {entry} is outside any class folder")
        elif entry.name not in classes:
            problems.append(
                f"split {split!r}: unexpected class folder {entry.name!r} "
                f"(not in base.classes) at {entry}"
            )
        else:
            present.add(entry.name)
            found += _scan_class(entry, debris, problems)
    problems += [
        f"split {split!r}: class folder {label!r} is missing ({split_dir / label})"
        for label in classes
        if label not in present
    ]
    return found


def _scan_class(
    class_dir: Path, debris: list[Path], problems: list[str]
) -> list[Candidate]:
    found: list[Candidate] = []
    split, label = class_dir.parent.name, class_dir.name
    for entry in sorted(class_dir.iterdir()):
        if is_debris(entry.name):
            debris += _debris_files(entry)
        elif entry.is_dir():
            problems.append(
                f"split {split!r}, class {label!r}: subfolder {entry} is not "
                "supported; put the images directly in the class folder"
            )
        else:
            found.append(Candidate(entry, split, label))
    return found


def _debris_files(entry: Path) -> list[Path]:
    if not entry.is_dir():
        return [entry]
    inside = [Path(top) / name for top, _, names in os.walk(entry) for name in names]
    return sorted(inside)


def check_image(candidate: Candidate, anchor: Path, limits: Limits) -> Checked:
    """Read, hash and fully decode one file; the path is recorded from `anchor`."""
    row = Checked(
        candidate.path.relative_to(anchor).as_posix(), candidate.split, candidate.label
    )
    try:
        data = candidate.path.read_bytes()
    except OSError as err:
        row.reason, row.detail = "unreadable", str(err.strerror or err)
        return row
    row.sha256 = hashlib.sha256(data).hexdigest()
    try:
        image = decode(data, limits)
    except ImageRejected as err:
        row.reason, row.detail = err.reason, err.detail
        return row
    except Exception as err:  # one odd file must not hide the report on the rest
        row.reason, row.detail = "decoder_error", f"{type(err).__name__}: {err}"
        return row
    row.height, row.width = (int(n) for n in image.pixels.shape[:2])
    row.format = image.source_format
    row.conversions = ";".join(image.conversions)
    return row


def check_images(
    candidates: Sequence[Candidate], anchor: Path, limits: Limits
) -> list[Checked]:
    """Check every candidate, with a progress bar."""
    progress = tqdm(candidates, desc="decode", unit="img", disable=None)
    return [check_image(candidate, anchor, limits) for candidate in progress]


def find_duplicates(kept: Sequence[Checked]) -> pd.DataFrame:
    """One row per file whose content (sha256) occurs more than once.

    `kind` is `leak` when the content is in two or more splits, otherwise
    `within_split`.
    """
    groups: dict[str, list[Checked]] = {}
    for row in kept:
        groups.setdefault(row.sha256, []).append(row)
    rows = []
    for sha, members in sorted(groups.items()):
        if len(members) > 1:
            kind = "leak" if len({m.split for m in members}) > 1 else "within_split"
            rows += [(sha, m.path, m.split, kind) for m in members]
    return pd.DataFrame(rows, columns=DUPLICATE_COLUMNS)


def sample_per_class(
    kept: Sequence[Checked], per_class: int, seed: int
) -> list[Checked]:
    """Keep `per_class` files of each split and class (all when 0), by seed.

    Each (split, class) draws from its own generator, so the choice in one
    class does not depend on how many files another class has.
    """
    if per_class <= 0:
        return list(kept)
    groups: dict[tuple[str, str], list[Checked]] = {}
    for row in kept:
        groups.setdefault((row.split, row.label), []).append(row)
    chosen: set[str] = set()
    for (split, label), rows in groups.items():
        rng = random.Random(f"{seed}/{split}/{label}")
        picked = rows if len(rows) <= per_class else rng.sample(rows, per_class)
        chosen |= {row.path for row in picked}
    return [row for row in kept if row.path in chosen]


def _sort_key(classes: Sequence[str]) -> Any:
    order = {label: i for i, label in enumerate(classes)}
    return lambda row: (SPLITS.index(row.split), order[row.label], row.path)


def _frame(rows: Sequence[Checked], columns: list[str]) -> pd.DataFrame:
    records = [{name: getattr(row, name) for name in columns} for row in rows]
    return pd.DataFrame(records, columns=columns)


def _per_split(rows: Sequence[Checked]) -> dict[str, int]:
    counts = Counter(row.split for row in rows)
    return {"total": len(rows), **{split: counts[split] for split in SPLITS}}


def count_metrics(
    checked: Sequence[Checked],
    manifest: Sequence[Checked],
    duplicates: pd.DataFrame,
    debris: int,
    classes: Sequence[str],
) -> dict[str, Any]:
    """The counts that go to metrics/prepare.json and to MLflow."""
    kept = [row for row in checked if not row.reason]
    per_class = Counter((row.split, row.label) for row in kept)
    return {
        "files_seen": len(checked) + debris,
        "debris_ignored": debris,
        "images_checked": len(checked),
        "kept": _per_split(kept),
        "kept_per_class": {
            split: {label: per_class[split, label] for label in classes}
            for split in SPLITS
        },
        "manifest": _per_split(manifest),
        "converted": _conversion_counts(kept),
        "rejected": _reason_counts([row for row in checked if row.reason]),
        "duplicates": _duplicate_counts(duplicates),
    }


def _conversion_counts(kept: Sequence[Checked]) -> dict[str, int]:
    codes = Counter(c for row in kept for c in row.conversions.split(";") if c)
    extra = sorted(set(codes) - set(CONVERSIONS))
    converted = sum(1 for row in kept if row.conversions)
    return {"total": converted, **{c: codes[c] for c in (*CONVERSIONS, *extra)}}


def _reason_counts(rejected: Sequence[Checked]) -> dict[str, int]:
    reasons = Counter(row.reason for row in rejected)
    extra = sorted(set(reasons) - set(REJECT_REASONS))
    return {
        "total": len(rejected),
        **{r: reasons[r] for r in (*REJECT_REASONS, *extra)},
    }


def _duplicate_counts(duplicates: pd.DataFrame) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, name in (("leak", "leaked"), ("within_split", "within_split")):
        rows = duplicates[duplicates["kind"] == kind]
        counts[f"{name}_groups"] = int(rows["sha256"].nunique())
        counts[f"{name}_files"] = len(rows)
    return counts


def report_problems(
    rejected: Sequence[Checked], duplicates: pd.DataFrame, seen: int
) -> None:
    """Log one warning per rejected file and per duplicate group, and a summary."""
    for row in rejected:
        log.warning("rejected %s: %s (%s)", row.path, row.reason, row.detail)
    if rejected:
        reasons = Counter(row.reason for row in rejected)
        summary = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        log.warning("rejected %d of %d images: %s", len(rejected), seen, summary)
    for sha, group in duplicates.groupby("sha256", sort=True):
        what = DUPLICATE_KINDS[group["kind"].iloc[0]]
        log.warning("%s (sha256 %s): %s", what, sha[:12], ", ".join(group["path"]))


def enforce_policies(
    settings: Settings, checked: Sequence[Checked], duplicates: pd.DataFrame
) -> None:
    """Raise PipelineError for empty classes and for what the policies forbid."""
    problems = []
    kept = Counter((row.split, row.label) for row in checked if not row.reason)
    for split in SPLITS:
        for label in settings.classes:
            if not kept[split, label]:
                problems.append(
                    f"split {split!r}, class {label!r}: no usable image is left"
                )
    rejected = [row for row in checked if row.reason]
    if rejected and settings.on_reject == "fail":
        problems.append(f"{len(rejected)} rejected images (prepare.on_reject: fail):")
        problems += [f"  {row.path}: {row.reason} ({row.detail})" for row in rejected]
    leaks = duplicates[duplicates["kind"] == "leak"]
    if len(leaks) and settings.on_leakage == "fail":
        problems.append("the same image in several splits (prepare.on_leakage: fail):")
        problems += [
            f"  {', '.join(group['path'])}" for _, group in leaks.groupby("sha256")
        ]
    if problems:
        raise PipelineError("prepare failed:\n" + "\n".join(problems))


def plot_distribution(
    manifest: pd.DataFrame, classes: Sequence[str], path: Path, title: str
) -> None:
    """Save a bar chart of images per class, one bar per split."""
    counts = Counter(zip(manifest["label"], manifest["split"], strict=True))
    fig = Figure(figsize=(10, 4.5))
    ax = fig.subplots()
    width = 0.8 / len(SPLITS)
    positions = np.arange(len(classes))
    for i, split in enumerate(SPLITS):
        heights = [counts[label, split] for label in classes]
        ax.bar(positions + (i - 1) * width, heights, width, label=split)
    ax.set_xticks(positions, classes, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def _log_run(result: PrepareResult, out_dir: Path) -> None:
    mlflow.log_metrics(tracking.flatten(result.metrics))
    for name in (MANIFEST, CLASSES, REJECTED, DUPLICATES, CHART):
        mlflow.log_artifact(str(out_dir / name))
    tracking.log_dataset(result.manifest, context="prepare")


def _log_debris(debris: Sequence[Path]) -> None:
    for path in debris:
        log.debug("ignored operating-system debris: %s", path)
    if debris:
        log.info("ignored %d operating-system debris files", len(debris))


def prepare(
    data_dir: Path, out_dir: Path, metrics_path: Path, base: dict, params: dict
) -> PrepareResult:
    """Check every image under data_dir/<split>/<class>/ and write the manifest.

    Manifest paths are posix and relative to data_dir's parent (the project
    root in the pipeline). The rejected and duplicates reports are written
    before any policy failure; inside an active MLflow run the metrics, chart,
    tables and dataset are logged to it. Raises PipelineError on a layout
    problem, an empty class, or what prepare.on_reject / on_leakage forbid.
    """
    settings = Settings.from_params(base, params)
    data_dir = Path(os.path.abspath(data_dir))
    candidates, debris = find_images(data_dir, settings.classes)
    _log_debris(debris)
    checked = check_images(candidates, data_dir.parent, settings.limits)
    checked.sort(key=_sort_key(settings.classes))
    kept = [row for row in checked if not row.reason]
    rejected = [row for row in checked if row.reason]
    duplicates = find_duplicates(kept)
    write_csv(out_dir / REJECTED, _frame(rejected, REJECTED_COLUMNS))
    write_csv(out_dir / DUPLICATES, duplicates)
    report_problems(rejected, duplicates, len(checked))
    enforce_policies(settings, checked, duplicates)
    chosen = sample_per_class(kept, settings.sample_per_class, settings.seed)
    metrics = count_metrics(checked, chosen, duplicates, len(debris), settings.classes)
    result = PrepareResult(
        _frame(chosen, MANIFEST_COLUMNS),
        _frame(rejected, REJECTED_COLUMNS),
        duplicates,
        metrics,
        [str(path) for path in debris],
    )
    _write_outputs(result, settings, out_dir, metrics_path)
    if mlflow.active_run() is not None:
        _log_run(result, out_dir)
    return result


def _write_outputs(
    result: PrepareResult, settings: Settings, out_dir: Path, metrics_path: Path
) -> None:
    write_csv(out_dir / MANIFEST, result.manifest)
    write_json(out_dir / CLASSES, list(settings.classes))
    metrics = dict(result.metrics)
    write_json(out_dir / CLASS_COUNTS, metrics.pop("kept_per_class"))
    write_json(metrics_path, metrics)
    sampled = settings.sample_per_class
    title = "images per class and split" + (
        f" (sample of {sampled} per class)" if sampled else ""
    )
    plot_distribution(result.manifest, settings.classes, out_dir / CHART, title)
    kept = result.metrics["manifest"]
    log.info(
        "manifest: %d train, %d validation, %d test images",
        kept["train"],
        kept["validation"],
        kept["test"],
    )


def main() -> None:
    """Run the stage on the project's data with params.yaml."""
    params = load_params()
    base, section = params["base"], params.get("prepare") or {}
    with tracking.stage_run("prepare", {"base": base, "prepare": section}):
        prepare(
            DATA_DIR,
            OUTPUTS_DIR / "prepare",
            METRICS_DIR / "prepare.json",
            base,
            section,
        )


if __name__ == "__main__":
    tracking.run_stage(main)
