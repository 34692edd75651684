"""End to end: real uvicorn and gunicorn processes on 127.0.0.1 with a free port."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import skimage.data
from PIL import Image

from tests.conftest import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


@contextmanager
def server(command: list[str], port: int, env: dict[str, str] | None = None,
           ready_within_s: float = 90) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server process, wait for /readyz, yield its URL; always stop it."""
    log = tempfile.TemporaryFile()  # not a pipe: a chatty server must never block on a full pipe
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}),
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within_s
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited: {log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def jpeg(name: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def post(url: str, data: bytes, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/cls", files={"file": ("photo.jpg", data, "image/jpeg")}, timeout=timeout)


def arrived(url: str) -> float:
    """Uploads that reached the server: being handled now, or already answered."""
    text = httpx.get(f"{url}/metrics").text
    prefixes = ('http_requests_in_progress{route="/cls"}', 'http_requests_total{route="/cls",')
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefixes))


def test_uvicorn_serves_the_real_model() -> None:
    port = free_port()
    command = [str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port", str(port)]
    with server(command, port, {"TIMEOUT": "10"}) as (url, process):  # a slow CI machine must not turn this into 504s
        # By default the model processes decode and compute; the server process does not even load torch.
        assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()
        response = post(url, jpeg("chelsea"))
        assert response.status_code == 200
        assert response.json()["prediction"][0]["label"] in CATS
        assert post(url, jpeg("coffee")).json()["prediction"][0]["label"] in {"espresso", "cup"}
        assert post(url, b"definitely not an image").status_code == 400
        photo = jpeg("chelsea")
        limits = httpx.Limits(max_connections=16)
        with httpx.Client(base_url=url, limits=limits, timeout=30) as http, ThreadPoolExecutor(16) as pool:
            files = {"file": ("photo.jpg", photo, "image/jpeg")}
            statuses = list(pool.map(lambda _: http.post("/cls", files=files).status_code, range(64)))  # a burst
        assert statuses == [200] * 64
        metrics = httpx.get(f"{url}/metrics").text
        count = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("batch_size_count")))
        total = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("batch_size_sum")))
        assert total >= 66 and total / count > 1.5  # the burst was batched


def test_python_main_py_serves_with_env_settings() -> None:
    port = free_port()
    env = {"HOST": "127.0.0.1", "PORT": str(port), "TOP_K": "3"}
    with server([sys.executable, "main.py"], port, env) as (url, _):
        response = post(url, jpeg("chelsea"))
        assert response.status_code == 200
        assert len(response.json()["prediction"]) == 3


def test_gunicorn_serves_the_real_model() -> None:
    port = free_port()
    env = {"BIND": f"127.0.0.1:{port}", "WORKERS": "1"}
    with server([str(BIN / "gunicorn"), "main:app", "-c", "gunicorn_config.py"], port, env) as (url, _):
        assert post(url, jpeg("chelsea")).json()["prediction"][0]["label"] in CATS
        assert "http_requests_total" in httpx.get(f"{url}/metrics").text


def test_lowercase_timeout_env_gives_504() -> None:
    port = free_port()  # docker-compose sets `timeout=1.0`, lower case, as the seed did
    env = {"timeout": "0.3", "TASK_MODULE": "tests.fake_task", "FAKE_BATCH_S": "1.0"}
    with server([str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port", str(port)], port, env) as (url, _):
        started = time.monotonic()
        response = post(url, b"slow")
        assert response.status_code == 504
        assert response.json()["detail"].startswith("deadline exceeded")
        assert time.monotonic() - started < 0.3 + 0.2


def test_gunicorn_sigterm_drains_in_flight_requests() -> None:
    port = free_port()
    env = {"BIND": f"127.0.0.1:{port}", "WORKERS": "1", "TASK_MODULE": "tests.fake_task", "FAKE_BATCH_S": "0.3",
           "MAX_BATCH_SIZE": "4", "TIMEOUT": "10"}
    with server([str(BIN / "gunicorn"), "main:app", "-c", "gunicorn_config.py"], port, env) as (url, process):
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, url, f"item{i}".encode()) for i in range(12)]
            deadline = time.monotonic() + 10
            while arrived(url) < 12:  # every request has reached the worker
                assert time.monotonic() < deadline, "requests never arrived"
                time.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]  # a reset connection would raise here
        assert [r.status_code for r in responses] == [200] * 12
        assert [r.json()["prediction"][0]["label"] for r in responses] == [f"item{i}" for i in range(12)]
        assert process.wait(timeout=30) == 0
