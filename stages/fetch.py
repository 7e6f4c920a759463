"""Fetch clothing-dataset-small into data/, verified against the hash in data.dvc."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING

from stages.config import ROOT, SPLITS, PipelineError, setup_logging

if TYPE_CHECKING:
    from dvc.output import Output
    from dvc.repo import Repo
    from dvc_data.hashfile.tree import Tree

SOURCE_COMMIT = "11961516512414bf9f6c150a832cfd21b54a6b54"
DEFAULT_URL = (
    "https://github.com/alexeygrigorev/clothing-dataset-small/archive/"
    f"{SOURCE_COMMIT}.tar.gz"
)
DVC_FILE = "data.dvc"
CHUNK_BYTES = 1 << 20
LOG_EVERY_BYTES = 20 << 20
DOWNLOAD_TIMEOUT_S = 60
MAX_LISTED = 5
MB = 1e6

log = logging.getLogger("stages.fetch")  # not __main__ under `python -m`


def fetch(
    root: Path = ROOT,
    *,
    source_dir: Path | None = None,
    url: str = DEFAULT_URL,
    force: bool = False,
) -> Path:
    """Put the pinned dataset at `root`/data from `source_dir`, else from `url`.

    The new tree is staged beside data/ and only renamed into place once its
    DVC hash equals the one in data.dvc; then it is stored in the DVC cache.
    Returns the data folder. Raises PipelineError on any failure, with an
    existing data/ left as it was (or, with `force`, moved aside).
    """
    from dvc.exceptions import DvcException

    if source_dir is not None and not Path(source_dir).is_dir():
        raise PipelineError(f"--from {source_dir}: no such folder")
    try:
        with _open_repo(root) as repo:
            out = pinned_output(repo)
            data_dir = Path(out.fs_path)
            if not _existing_matches(out, data_dir, force):
                _fetch_new(out, data_dir, source_dir, url)
            _store_in_cache(repo, out)
    except DvcException as err:
        raise PipelineError(f"DVC failed in {root}: {err}") from err
    return data_dir


def _open_repo(root: Path) -> Repo:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(os.fspath(root))
    except NotDvcRepoError:
        raise PipelineError(f"{root} is not a DVC project (no .dvc/)") from None


def pinned_output(repo: Repo) -> Output:
    """Return the output that data.dvc tracks, with the pinned hash."""
    from dvc.stage.exceptions import StageFileDoesNotExistError

    # An absolute path: DVC resolves a relative one against the cwd, not the repo.
    path = os.path.join(repo.root_dir, DVC_FILE)
    try:
        stage = repo.stage.load_one(path)
    except StageFileDoesNotExistError:
        raise PipelineError(f"{path} is missing") from None
    if len(stage.outs) != 1 or not stage.outs[0].hash_info.isdir:
        raise PipelineError(f"{DVC_FILE} must track exactly one folder")
    return stage.outs[0]


def tree_hash(out: Output, path: Path) -> Tree:
    """Hash the folder `path` exactly as `dvc add` hashes `out`'s folder."""
    from dvc_data.hashfile.build import build

    try:
        _, _, tree = build(
            out.cache,
            os.fspath(path),
            out.fs,
            out.hash_name,
            ignore=out.dvcignore,
            dry_run=True,
        )
    except OSError as err:
        raise PipelineError(f"cannot read {path}: {err}") from None
    return tree


def _existing_matches(out: Output, data_dir: Path, force: bool) -> bool:
    if not (data_dir.exists() or data_dir.is_symlink()):
        return False
    tree = tree_hash(out, data_dir)
    if tree.hash_info.value == out.hash_info.value:
        log.info("%s already matches %s; nothing to fetch", data_dir, DVC_FILE)
        return True
    differences = describe_differences(out, tree)
    if not force:
        raise PipelineError(
            f"{data_dir} exists and differs from the pin in {DVC_FILE}: "
            f"{differences}. Nothing was changed. Run again with --force to "
            f"move it aside to {data_dir.name}.replaced-<timestamp>/ and fetch "
            "a fresh copy."
        )
    log.warning(
        "%s differs from %s (%s); --force given", data_dir, DVC_FILE, differences
    )
    return False


def _fetch_new(out: Output, data_dir: Path, source_dir: Path | None, url: str) -> None:
    with tempfile.TemporaryDirectory(
        dir=data_dir.parent, prefix=f".{data_dir.name}.fetch-"
    ) as work:
        staged = Path(work) / data_dir.name
        if source_dir is not None:
            copy_splits(Path(source_dir), staged)
        else:
            archive = Path(work) / "archive.tar.gz"
            download(url, archive)
            extract_splits(archive, staged, url)
            archive.unlink()
        _check_splits(staged, source_dir or url)
        verify(out, staged, source_dir or url)
        _install(staged, data_dir)


def copy_splits(source_dir: Path, staged: Path) -> None:
    """Copy the train/validation/test folders of `source_dir` into `staged`."""
    for split in SPLITS:
        src = source_dir / split
        if not src.is_dir():
            raise PipelineError(
                f"{src}: no such folder; {source_dir} must hold {', '.join(SPLITS)}"
            )
        try:
            nfiles, nbytes = _copy_contents(src, staged / split)
        except OSError as err:
            raise PipelineError(f"cannot copy {src}: {err}") from None
        log.info("copied %s: %d files, %.1f MB", src, nfiles, nbytes / MB)


def _copy_contents(src: Path, dest: Path) -> tuple[int, int]:
    # File contents only: a read-only source must not give a read-only data/.
    nfiles = nbytes = 0
    for folder, _, files in os.walk(src, followlinks=True):
        target = dest / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(folder) / name, target / name)
            nfiles += 1
            nbytes += (target / name).stat().st_size
    return nfiles, nbytes


def download(url: str, archive: Path) -> None:
    """Stream `url` to the file `archive`, logging the bytes received."""
    log.info("downloading %s", url)
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            open(archive, "wb") as sink,
        ):
            total = int(response.headers.get("Content-Length") or 0)
            received = _stream(response, sink, total)
    except urllib.error.HTTPError as err:
        err.close()
        raise PipelineError(
            f"cannot download {url}: HTTP {err.code} {err.reason}"
        ) from None
    except urllib.error.URLError as err:
        raise PipelineError(f"cannot download {url}: {err.reason}") from None
    except (OSError, ValueError) as err:
        raise PipelineError(f"cannot download {url}: {err}") from None
    log.info("downloaded %.1f MB from %s", received / MB, url)


def _stream(response: IO[bytes], sink: IO[bytes], total: int) -> int:
    received, next_log = 0, LOG_EVERY_BYTES
    while chunk := response.read(CHUNK_BYTES):
        sink.write(chunk)
        received += len(chunk)
        if received >= next_log:
            of_total = f" of {total / MB:.1f} MB" if total else ""
            log.info("downloaded %.1f MB%s", received / MB, of_total)
            next_log = received + LOG_EVERY_BYTES
    if total and received != total:
        raise OSError(f"connection closed after {received} of {total} bytes")
    return received


def extract_splits(archive: Path, staged: Path, source: str) -> None:
    """Extract the splits under the archive's top folder into `staged`.

    Everything else (LICENSE, README.md) is skipped. Absolute names, `..`,
    links and special files anywhere in the archive fail the whole fetch.
    """
    nfiles = nbytes = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                target = _member_target(member, staged)
                if target is not None and _extract_member(tar, member, target):
                    nfiles, nbytes = nfiles + 1, nbytes + member.size
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        reason = str(err).splitlines()[0].rstrip(":")
        raise PipelineError(f"cannot extract {source}: {reason}") from None
    log.info("extracted %d files, %.1f MB", nfiles, nbytes / MB)


def _member_target(member: tarfile.TarInfo, staged: Path) -> Path | None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise PipelineError(f"unsafe path in the archive: {member.name!r}")
    if member.issym() or member.islnk():
        raise PipelineError(f"the archive holds a link, refused: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise PipelineError(f"the archive holds a special file: {member.name!r}")
    inner = name.parts[1:]
    if not inner or inner[0] not in SPLITS:
        return None
    return staged.joinpath(*inner)


def _extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path
) -> bool:
    """Write one folder or file under `target`; return whether it was a file."""
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has a reader
    with source, open(target, "wb") as sink:
        shutil.copyfileobj(source, sink, CHUNK_BYTES)
    return True


def _check_splits(staged: Path, source: Path | str) -> None:
    missing = [split for split in SPLITS if not (staged / split).is_dir()]
    if missing:
        raise PipelineError(f"{source} has no {', '.join(missing)} folder")


def verify(out: Output, staged: Path, source: Path | str) -> None:
    """Raise PipelineError unless `staged` hashes to the pin in data.dvc."""
    tree = tree_hash(out, staged)
    if tree.hash_info.value == out.hash_info.value:
        log.info("%s matches %s (%s)", source, DVC_FILE, tree.hash_info.value)
        return
    raise PipelineError(
        f"the data from {source} does not match the pin in {DVC_FILE}: "
        f"expected md5 {out.hash_info.value}, got {tree.hash_info.value}; "
        f"{describe_differences(out, tree)}. "
        f"Nothing was moved into {out.fs_path}."
    )


def describe_differences(out: Output, tree: Tree) -> str:
    """Name the files that are missing, extra or different against the pin."""
    pinned = _pinned_listing(out)
    if pinned is None:
        return (
            f"the file listing of {out.hash_info.value} is not in the DVC cache "
            f"({out.cache.path}), so the differing files cannot be named; "
            "`dvc pull` from a team remote would bring it"
        )
    actual = {"/".join(key): hash_info.value for key, _, hash_info in tree}
    groups = {
        "missing": sorted(pinned.keys() - actual.keys()),
        "extra": sorted(actual.keys() - pinned.keys()),
        "different": sorted(
            k for k in pinned.keys() & actual.keys() if pinned[k] != actual[k]
        ),
    }
    found = [f"{label} {_sample(paths)}" for label, paths in groups.items() if paths]
    return "; ".join(found) or "same files, different hash"


def _pinned_listing(out: Output) -> dict[str, str] | None:
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.errors import ObjectFormatError

    try:
        pinned = Tree.load(out.cache, out.hash_info)
    except (FileNotFoundError, ObjectFormatError):
        return None
    return {"/".join(key): hash_info.value for key, _, hash_info in pinned}


def _sample(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_LISTED])
    more = len(paths) - MAX_LISTED
    return f"({len(paths)}): {shown}" + (f" and {more} more" if more > 0 else "")


def _install(staged: Path, data_dir: Path) -> None:
    aside = None
    if data_dir.exists() or data_dir.is_symlink():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = data_dir.with_name(f"{data_dir.name}.replaced-{stamp}")
        _rename(data_dir, aside)
        log.warning("moved the old %s aside to %s", data_dir, aside)
    try:
        _rename(staged, data_dir)
    except PipelineError:
        if aside is not None:
            os.rename(aside, data_dir)
        raise
    log.info("%s is in place", data_dir)


def _rename(src: Path, dst: Path) -> None:
    if dst.exists():
        raise PipelineError(f"cannot move {src} to {dst}: {dst} already exists")
    try:
        os.rename(src, dst)
    except OSError as err:
        raise PipelineError(f"cannot move {src} to {dst}: {err}") from None


def _store_in_cache(repo: Repo, out: Output) -> None:
    # Output.commit copies the files into the cache without rewriting
    # data.dvc, so the pin stays byte for byte what git has.
    with repo.lock:
        out.commit(relink=False)
    log.info("stored %s in the DVC cache %s", out.fs_path, out.cache.path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.fetch", description=__doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--from",
        dest="source_dir",
        type=Path,
        metavar="DIR",
        help="copy from a local copy of the dataset (offline)",
    )
    source.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="download this tarball (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="move a differing data/ aside to data.replaced-<timestamp>/",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m stages.fetch [--from DIR | --url URL] [--force]`."""
    setup_logging()
    args = _parser().parse_args(argv)
    try:
        fetch(ROOT, source_dir=args.source_dir, url=args.url, force=args.force)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
