"""End-to-end tests of stages.fetch on temporary copies of the project."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stages import fetch
from stages.config import SPLITS, PipelineError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOP = f"clothing-dataset-small-{fetch.SOURCE_COMMIT}"
ARCHIVE_PATH = f"/archive/{fetch.SOURCE_COMMIT}.tar.gz"
PROJECT_FILES = ("data.dvc", ".dvcignore", ".gitignore", "params.yaml")
GIT_ID = ["-c", "user.name=fetch tests", "-c", "user.email=tests@example.invalid"]


def _run(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(root, sys.executable, "-m", "dvc", *args)


def _fetch_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return _run(root, sys.executable, "-m", "stages.fetch", *args, check=False)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy with git, DVC config and data.dvc; no data, no DVC cache."""
    root = tmp_path_factory.mktemp("template") / "project"
    (root / ".dvc").mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, root / name)
    for name in ("config", ".gitignore"):
        shutil.copy2(ROOT / ".dvc" / name, root / ".dvc" / name)
    shutil.copytree(
        ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__")
    )
    _run(root, "git", "init", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", *GIT_ID, "commit", "-q", "-m", "project copy")
    return root


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template for one test."""
    return Path(shutil.copytree(template, tmp_path / "project", symlinks=True))


@pytest.fixture(autouse=True)
def _cwd_outside_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test elsewhere, so code that wrongly uses the cwd fails safely."""
    monkeypatch.chdir(tmp_path)


def _some_images(dataset_dir: Path) -> tuple[str, str]:
    images = sorted(p.relative_to(dataset_dir) for p in dataset_dir.glob("*/*/*.jpg"))
    return images[0].as_posix(), images[-1].as_posix()


def _write_tarball(path: Path, dataset_dir: Path, changes: dict) -> None:
    """Write a GitHub-style tarball; `changes` maps a relpath to bytes or None."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        tar.add(dataset_dir, TOP, recursive=False)
        for name in ("LICENSE", "README.md", *SPLITS):
            tar.add(dataset_dir / name, f"{TOP}/{name}", filter=_drop(changes))
        for relpath, content in changes.items():
            if content is not None:
                info = tarfile.TarInfo(f"{TOP}/{relpath}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def _drop(changes: dict):
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        relpath = info.name.partition("/")[2]
        return None if relpath in changes else info

    return keep


def _write_unsafe_tarball(path: Path, kind: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        if kind == "dotdot":
            info = tarfile.TarInfo(f"{TOP}/train/../../escaped.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        else:
            info = tarfile.TarInfo(f"{TOP}/train/dress/link.jpg")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> dict:
    """Tarballs in GitHub's layout: good, bad (one altered, one removed), unsafe."""
    folder = tmp_path_factory.mktemp("served")
    first, last = _some_images(dataset_dir)
    bad_bytes = (dataset_dir / first).read_bytes() + b"\0"
    (folder / "archive").mkdir()
    _write_tarball(folder / ARCHIVE_PATH.lstrip("/"), dataset_dir, {})
    _write_tarball(folder / "bad.tar.gz", dataset_dir, {first: bad_bytes, last: None})
    for kind in ("dotdot", "symlink"):
        _write_unsafe_tarball(folder / f"{kind}.tar.gz", kind)
    (folder / "page.tar.gz").write_text("<html>a login page, not a tarball</html>")
    return {"folder": folder, "altered": first, "removed": last}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server(served: dict) -> Iterator[str]:
    """Base URL of an HTTP server on 127.0.0.1 serving the tarballs."""
    handler = functools.partial(_QuietHandler, directory=str(served["folder"]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _assert_matches_pin(root: Path) -> None:
    pinned = yaml.safe_load((root / "data.dvc").read_text())["outs"][0]["md5"]
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        out = fetch.pinned_output(repo)
        assert fetch.tree_hash(out, root / "data").hash_info.value == pinned
    assert sorted(p.name for p in (root / "data").iterdir()) == sorted(SPLITS)
    status = _dvc(root, "status", "--json", "data.dvc")
    assert json.loads(status.stdout) == {}
    assert _run(root, "git", "status", "--porcelain", "data.dvc").stdout == ""


def test_fetch_from_local_copy(project: Path, dataset_dir: Path) -> None:
    result = _fetch_cli(project, "--from", str(dataset_dir))
    assert result.returncode == 0, result.stderr
    assert "copied" in result.stderr
    _assert_matches_pin(project)
    assert not (project / "data" / "LICENSE").exists()
    assert not (project / "data" / "README.md").exists()
    inode = (project / "data").stat().st_ino
    again = _fetch_cli(project, "--from", str(dataset_dir))
    assert again.returncode == 0, again.stderr
    assert "already matches" in again.stderr
    assert (project / "data").stat().st_ino == inode


def test_fetch_over_http(project: Path, server: str) -> None:
    result = _fetch_cli(project, "--url", server + ARCHIVE_PATH)
    assert result.returncode == 0, result.stderr
    assert "downloaded" in result.stderr
    _assert_matches_pin(project)
    assert not list(project.glob(".data.fetch-*"))


def test_altered_tarball_is_refused(project: Path, server: str, served: dict) -> None:
    bad_url = f"{server}/bad.tar.gz"
    with pytest.raises(PipelineError) as no_cache:
        fetch.fetch(project, url=bad_url)
    pinned = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert pinned in str(no_cache.value) and "not in the DVC cache" in str(
        no_cache.value
    )
    assert not (project / "data").exists()
    fetch.fetch(project, url=server + ARCHIVE_PATH)
    shutil.rmtree(project / "data")
    result = _fetch_cli(project, "--url", bad_url)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: the data from ")
    assert f"different (1): {served['altered']}" in message
    assert f"missing (1): {served['removed']}" in message
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists()
    assert not list(project.glob(".data.fetch-*"))


def test_http_404_names_the_url(project: Path, server: str) -> None:
    url = f"{server}/archive/no-such-commit.tar.gz"
    result = _fetch_cli(project, "--url", url)
    assert result.returncode == 1
    assert f"error: cannot download {url}: HTTP 404" in result.stderr
    assert not (project / "data").exists()


def test_not_a_tarball(project: Path, server: str) -> None:
    url = f"{server}/page.tar.gz"
    with pytest.raises(PipelineError, match=f"cannot extract {url}"):
        fetch.fetch(project, url=url)
    assert not (project / "data").exists()


@pytest.mark.parametrize("kind", ["dotdot", "symlink"])
def test_unsafe_tarball_is_refused(project: Path, server: str, kind: str) -> None:
    with pytest.raises(PipelineError, match="unsafe path|link, refused"):
        fetch.fetch(project, url=f"{server}/{kind}.tar.gz")
    assert not (project / "data").exists()
    assert not list(project.rglob("escaped.txt"))
    assert not list(project.parent.rglob("escaped.txt"))


def test_missing_split_in_local_copy(project: Path, tmp_path: Path) -> None:
    (tmp_path / "only-train" / "train" / "dress").mkdir(parents=True)
    with pytest.raises(PipelineError, match="validation: no such folder"):
        fetch.fetch(project, source_dir=tmp_path / "only-train")


def test_different_data_needs_force(project: Path, dataset_dir: Path) -> None:
    assert _fetch_cli(project, "--from", str(dataset_dir)).returncode == 0
    extra = project / "data" / "train" / "dress" / "mine.jpg"
    extra.write_bytes(b"not in the pin")
    refused = _fetch_cli(project, "--from", str(dataset_dir))
    assert refused.returncode == 1
    assert "extra (1): train/dress/mine.jpg" in refused.stderr
    assert "--force" in refused.stderr
    assert extra.exists()
    forced = _fetch_cli(project, "--from", str(dataset_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    (aside,) = project.glob("data.replaced-*")
    assert str(aside) in forced.stderr
    assert (aside / "train" / "dress" / "mine.jpg").read_bytes() == b"not in the pin"
    _assert_matches_pin(project)


def test_team_remote_push_and_pull(
    project: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    assert _fetch_cli(project, "--from", str(dataset_dir)).returncode == 0
    _dvc(project, "remote", "add", "-d", "teamremote", str(tmp_path / "remote"))
    _dvc(project, "push")
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    _dvc(project, "pull")
    _assert_matches_pin(project)


def test_a_missing_source_folder_is_an_error_even_when_data_matches(
    project: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    assert _fetch_cli(project, "--from", str(dataset_dir)).returncode == 0
    with pytest.raises(PipelineError, match="nowhere: no such folder"):
        fetch.fetch(project, source_dir=tmp_path / "nowhere")
