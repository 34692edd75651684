"""The servers under test: each runs as a subprocess on a free 127.0.0.1 port and is always stopped.

Each server gets its own process group, so stopping it also stops its children (LitServe's
workers), and a Ctrl-C in the terminal reaches run.py only, whose `finally` then stops the group.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 20.0  # the service drains in-flight requests for up to TIMEOUT on SIGTERM


@dataclass(frozen=True, slots=True)
class ServerSpec:
    name: str
    command: list[str]  # "{port}" is replaced by the chosen port
    env: dict[str, str] = field(default_factory=dict)
    has_metrics: bool = False  # serves Prometheus /metrics with batch_size_sum / batch_size_count


@dataclass(frozen=True, slots=True)
class RunningServer:
    name: str
    base_url: str
    pid: int
    log_path: Path
    has_metrics: bool

    def pause(self) -> None:
        """Freeze the server's whole process group (SIGSTOP): an idle server must not take CPU from the one
        under test (`bench/cpu_per_request.py --server litserve --concurrency 0`: LitServe's idle workers poll)."""
        _signal_group(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        _signal_group(self.pid, signal.SIGCONT)


TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def server_specs(timeout_s: float | None = None) -> dict[str, ServerSpec]:
    """The servers: ours (uvicorn main:app) with both dispatch rules, the naive sync one, and LitServe."""
    python = sys.executable
    ours = [python, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", "{port}", "--no-access-log",
            "--log-level", "warning"]
    ours_env = {} if timeout_s is None else {"TIMEOUT": str(timeout_s)}
    # The service under each setting compared: the environment each variant adds to `ours_env`.
    # One model thread in the server process, decoding on arrival: the default until bench/results/workers.
    # The older variants were measured on top of it and keep it, so that their rows in the README reproduce.
    thread = {"INFERENCE_PROCESS": "false", "MODEL_WORKERS": "1", "PREPROCESS_IN_BATCH": "false"}
    variants = {
        "ours": {},  # two model processes of one core each, each decoding its batches; dispatch when one is free
        "ours-delay10ms": {"MAX_BATCH_DELAY_MS": "10"},  # wait up to 10 ms for company, as LitServe's batch_timeout
        "ours-thread": thread,
        # Not in run.py's default list: knobs measured on demand (--servers ours,ours-process1,...).
        "ours-process1": {"MODEL_WORKERS": "1"},  # one model process using both cores
        # Idle OpenMP threads (a batch alone computes on two) spin this many rounds before sleeping. The default
        # was 2000 until bench/results/spin, where ours-gomp20k won; it is 20000 since (ours-gomp20k = ours).
        "ours-gomp2k": {"GOMP_SPINCOUNT": "2000"},
        "ours-gomp20k": {"GOMP_SPINCOUNT": "20000"},
        "ours-gomp300k": {"GOMP_SPINCOUNT": "300000"},  # libgomp's own default
        "ours-process2": {"INFERENCE_PROCESS": "true", "MODEL_WORKERS": "2", "PREPROCESS_IN_BATCH": "true"},
        "ours-workers2": thread | {"MODEL_WORKERS": "2", "PREPROCESS_IN_BATCH": "true"},  # 2 model threads
        "ours-inbatch": thread | {"PREPROCESS_IN_BATCH": "true", "PREPROCESS_WORKERS": "2"},  # decode, then compute
        "ours-process": thread | {"INFERENCE_PROCESS": "true"},  # one model process, decoding in the server
        "ours-preprocess2": thread | {"PREPROCESS_WORKERS": "2"},
        "ours-compile": thread | {"TORCH_COMPILE": "true"},
        "ours-spin300k": thread | {"GOMP_SPINCOUNT": "300000"},  # libgomp's default spinning, against 2000 then
        "ours-omp-passive": thread | {"OMP_WAIT_POLICY": "PASSIVE"},  # OpenMP threads sleep at once
    }
    return {
        **{name: ServerSpec(name, ours, {**ours_env, **env}, has_metrics=True) for name, env in variants.items()},
        # The baselines get the service's allocator tuning too (as glibc's environment tunables), so the
        # comparison is of serving designs, not of malloc settings.
        "naive": ServerSpec("naive", [python, "bench/naive_server.py", "--port", "{port}"], TUNED_MALLOC),
        "litserve": ServerSpec("litserve", [python, "bench/litserve_server.py", "--port", "{port}"], TUNED_MALLOC),
    }


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _signal_group(leader: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(leader, sig)  # start_new_session: the group id is the leader's pid


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        _signal_group(proc.pid, signal.SIGCONT)  # a paused server handles SIGTERM only once it runs again
        _signal_group(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also on a second Ctrl-C: children may outlive the leader, so kill the whole group
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{url}: the server exited with {proc.returncode} before it was ready:\n{tail}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout_s} s; see {log_path}")


@contextmanager
def turn(server: RunningServer) -> Iterator[RunningServer]:
    """Let a paused server run for the duration of the block, then pause it again."""
    server.resume()
    try:
        yield server
    finally:
        server.pause()


@contextmanager
def serve(spec: ServerSpec, log_dir: Path, startup_timeout_s: float = 600.0) -> Iterator[RunningServer]:
    """Start the server, wait until GET /readyz answers 200, and stop it on the way out, whatever happens."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{spec.name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([part.format(port=port) for part in spec.command], cwd=ROOT,
                                env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_ready(proc, f"{base_url}/readyz", log_path, startup_timeout_s)
            yield RunningServer(spec.name, base_url, proc.pid, log_path, spec.has_metrics)
        finally:
            _stop(proc)


def group_pids(group: int) -> list[int]:
    """The processes of a process group (a server and its model processes or workers), from /proc."""
    pids = []
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        with suppress(FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2]) == group:
                pids.append(pid)
    return pids


def memory_kib(group: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB summed over a server's process group, from /proc/PID/status.

    The summed VmHWM adds each process's own peak: an upper bound of the group's peak.
    """
    rss = hwm = 0
    for pid in group_pids(group):
        with suppress(FileNotFoundError, ProcessLookupError):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            fields = dict(line.split(":", 1) for line in status if ":" in line)
            rss += int(fields["VmRSS"].split()[0])
            hwm += int(fields["VmHWM"].split()[0])
    return rss, hwm


async def sample_memory(pid: int, stop: asyncio.Event, interval_s: float = 1.0) -> list[tuple[float, int, int]]:
    """Sample (seconds since start, VmRSS KiB, VmHWM KiB) every interval until `stop` is set."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    samples = []
    while not stop.is_set():
        samples.append((loop.time() - start, *memory_kib(pid)))
        with suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
    return samples


def batch_totals(server: RunningServer) -> tuple[float, float] | None:
    """(batch_size_sum, batch_size_count) from the server's /metrics, or None if it has none."""
    if not server.has_metrics:
        return None
    text = httpx.get(f"{server.base_url}/metrics", timeout=5.0).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("batch_size_sum", "batch_size_count"):
            values[name] = float(value)
    if len(values) < 2:
        return None
    return values["batch_size_sum"], values["batch_size_count"]
