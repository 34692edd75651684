"""Scale-out topologies on loopback: gunicorn replacing a dead worker, nginx balancing two instances."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_e2e import BIN, server

pytestmark = pytest.mark.e2e
FAKE = {"TASK_MODULE": "tests.fake_task", "FAKE_BATCH_S": "0.02", "TIMEOUT": "5"}


def children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


class Load:
    """One client thread posting in a loop until stopped; records every outcome."""

    def __init__(self, url: str, pause_s: float = 0.0, clients: int = 1) -> None:
        self.url, self.pause_s = url, pause_s
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            for i in range(2000):  # bounded, whatever happens
                if self._stop.is_set():
                    return
                try:
                    status = http.post("/cls", files={"file": ("x", f"c{n}-{i}".encode())}).status_code
                    self.outcomes[str(status)] += 1
                except httpx.TransportError as exc:
                    self.outcomes[type(exc).__name__] += 1
                time.sleep(self.pause_s)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_gunicorn_replaces_a_killed_worker() -> None:
    port = free_port()
    env = FAKE | {"BIND": f"127.0.0.1:{port}", "WORKERS": "2"}
    with server([str(BIN / "gunicorn"), "main:app", "-c", "gunicorn_config.py"], port, env) as (url, master):
        deadline = time.monotonic() + 30
        while len(workers := children(master.pid)) < 2:
            assert time.monotonic() < deadline, "two workers never started"
            time.sleep(0.1)
        with Load(url, pause_s=0.05) as load:
            time.sleep(1)
            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            while victim in children(master.pid) or len(children(master.pid)) < 2:
                assert time.monotonic() < deadline + 30, "the dead worker was not replaced"
                time.sleep(0.1)
            time.sleep(1)
        answered = load.outcomes["200"]
        errors = sum(load.outcomes.values()) - answered
        print(f"worker kill: {answered} answered, {errors} errors ({dict(load.outcomes)})")
        assert answered > 20
        assert errors <= 1  # at most the one request the killed worker was holding
        assert httpx.post(f"{url}/cls", files={"file": ("x", b"after")}).status_code == 200
        # /metrics sums every worker, the killed one included (multiprocess mode), whichever answers it.
        assert served(url) == answered + 1


NGINX_CONF = """
worker_processes 1;
error_log {tmp}/error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    upstream classifier {{ server 127.0.0.1:{a}; server 127.0.0.1:{b}; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 20m;
        location / {{
            proxy_pass http://classifier;
            # A failed connection to a stopping instance is retried on the other one. POST included
            # (non_idempotent): classifying an image has no side effect, and a connection that sat in
            # the backlog of a listener that just closed is reset after nginx has sent the request.
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
}}
"""


@contextmanager
def nginx(tmp: Path, port: int, a: int, b: int) -> Iterator[str]:
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, a=a, b=b))
    process = subprocess.Popen([shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(tmp),
                                "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def served(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith('http_requests_total{route="/cls",status="200"}'))


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (apt-get install nginx-light)")
def test_nginx_spreads_load_and_loses_nothing_when_one_instance_stops(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    uvicorn = [str(BIN / "uvicorn"), "main:app", "--host", "127.0.0.1", "--port"]
    with ExitStack() as stack:
        (url_a, proc_a), (url_b, _) = (stack.enter_context(server(uvicorn + [str(p)], p, FAKE)) for p in ports[:2])
        balancer = stack.enter_context(nginx(tmp_path, ports[2], ports[0], ports[1]))
        with httpx.Client(base_url=balancer, timeout=10) as http:
            assert all(http.post("/cls", files={"file": ("x", b"spread")}).status_code == 200 for _ in range(20))
        assert served(url_a) >= 5 and served(url_b) >= 5  # round robin: about 10 each

        with Load(balancer, clients=4) as load:
            time.sleep(1)
            proc_a.send_signal(signal.SIGTERM)
            assert proc_a.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
            time.sleep(1)
        print(f"nginx failover: {dict(load.outcomes)}")
        assert set(load.outcomes) == {"200"}, load.outcomes  # no 502, no reset, nothing lost
        assert load.outcomes["200"] > 50
