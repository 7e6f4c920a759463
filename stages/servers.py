"""Start MLflow server processes on 127.0.0.1 and stop them, for the tests
and benchmarks: a model server (`mlflow models serve`) or a tracking server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

BIN_DIR = Path(sys.executable).parent  # mlflow and uvicorn live beside Python


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(
    command: list[str],
    health_url: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> Iterator[subprocess.Popen]:
    """Run `command` in a new process group until `health_url` answers 200;
    stop the whole group on exit, whatever happened inside the block."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(  # its log goes to our stderr (fd 2)
        command, env=env, cwd=cwd, stdout=2, start_new_session=True
    )
    try:
        _wait_until_up(health_url, process, timeout)
        yield process
    finally:
        _stop_group(process)


@contextlib.contextmanager
def scoring_server(
    model_uri: str,
    port: int,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """`mlflow models serve` on 127.0.0.1:`port`; yield its base URL."""
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN_DIR / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    with local_server(command, f"{url}/ping", cwd, env):
        yield url


@contextlib.contextmanager
def tracking_server(
    store: Path, port: int, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1:`port` with its store in folder `store`."""
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN_DIR / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
    ]
    with local_server(command, f"{url}/health", store, env):
        yield url


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the server at {url} did not answer in {timeout} s")


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=15)
            return
