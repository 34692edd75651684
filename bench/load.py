"""HTTP load generator: closed loop (C clients), open loop (Poisson arrivals), and its own ceiling.

Open loop launches each request at its scheduled time as its own task, whatever earlier ones are
doing, and measures latency from that scheduled time: a slow server cannot hide its queue by slowing
the generator down (no coordinated omission). Latencies come from time.perf_counter: uvloop's loop clock,
which times the deadlines and the schedule, has whole milliseconds, read once per loop iteration.
Run as `python bench/load.py`; run.py imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import uvloop
from tqdm import tqdm

from photos import SIZES, make_photos

# Every loop of the generator runs on uvloop: less CPU taken from the server that shares the machine.
run = uvloop.run

TIMEOUT = "timeout"  # no answer within the client deadline
ERROR = "error"  # the connection failed: refused, reset, closed mid-answer
BOUNDARY = "load-generator-boundary-7f3a9c"
IDLE_REUSE_S = 2.0  # reuse a keep-alive connection only this long after its last answer


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | str  # HTTP status, TIMEOUT or ERROR
    latency_s: float  # from the scheduled send time to the end of the answer
    lag_s: float | None = None  # how late the generator launched it (open loop only)


class _Connections:
    """Keep-alive HTTP/1.1 connections to one server, reused from a free list; one request on each at a time.

    A minimal client on asyncio streams, not httpx: the generator shares the machine with the server under
    test, and httpx spent 1.4 ms of CPU per upload here against 0.1 ms for this (aiohttp: 0.45 ms).
    It speaks only what the servers under test answer: a status line, headers, and a body framed by
    Content-Length or chunked encoding.
    """

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # ..., idle since
        self._all: set[asyncio.StreamWriter] = set()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        now = asyncio.get_running_loop().time()
        while self._idle:
            reader, writer, since = self._idle.pop()
            # Servers close idle connections (uvicorn after 5 s): reusing one as it closes loses the request.
            if not reader.at_eof() and now - since < IDLE_REUSE_S:
                return reader, writer
            self._close(writer)
        return await asyncio.open_connection(self._host, self._port)

    async def request(self, raw: bytes) -> int:
        """Send one encoded request on an idle connection (or a new one); return the status."""
        reader, writer = await self._connect()
        self._all.add(writer)
        try:
            writer.write(raw)
            status, keep_alive = await _read_response(reader)
        except BaseException:  # timeout, reset, garbage: this connection is in an unknown state
            self._close(writer)
            raise
        if keep_alive:
            self._idle.append((reader, writer, asyncio.get_running_loop().time()))
        else:
            self._close(writer)
        return status

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self._all.discard(writer)
        writer.close()

    async def __aenter__(self) -> _Connections:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for writer in list(self._all):
            self._close(writer)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the connection may carry another request."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    headers = {name.strip().lower(): value.strip().lower()
               for name, _, value in (line.partition(b":") for line in lines)}
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # the empty trailer
    else:
        await reader.read()  # framed by closing the connection
        return status, False
    return status, headers.get(b"connection") != b"close"


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: only http://host:port/path URLs are supported")
        return cls(parts.hostname, parts.port or 80, parts.path or "/")

    def encode(self, body: bytes | None) -> bytes:
        """The whole request: a GET without a body, else the body as a multipart upload in field `file`."""
        head = f"{'GET' if body is None else 'POST'} {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is None:
            return f"{head}\r\n".encode()
        form = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + body + f"\r\n--{BOUNDARY}--\r\n".encode()
        return (f"{head}Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(form)}\r\n\r\n").encode() + form


async def _send(connections: _Connections, raw: bytes, deadline_at: float) -> int | str:
    """Send one encoded request; its status, TIMEOUT or ERROR."""
    try:
        async with asyncio.timeout_at(deadline_at):
            return await connections.request(raw)
    except TimeoutError:
        return TIMEOUT
    except (OSError, EOFError, ValueError, IndexError, asyncio.LimitOverrunError):
        return ERROR  # refused, reset, closed mid-answer (IncompleteReadError is an EOFError), or garbage


def _requests(target: _Target, photos: list[bytes] | None) -> Iterator[bytes]:
    """Encoded requests, one per photo (encoded once), in a cycle; GETs when there are no photos."""
    return itertools.cycle([target.encode(p) for p in photos] if photos else [target.encode(None)])


def _percentiles_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": 1000 * p50, "p90": 1000 * p90, "p99": 1000 * p99, "max": 1000 * max(values)}


def summarize(outcomes: list[Outcome], elapsed_s: float, deadline_s: float,
              window_s: float | None = None) -> dict[str, Any]:
    """Rates (per second of `window_s`, else of `elapsed_s`), latency percentiles (ms) and status counts."""
    per_s = 1 / (window_s or elapsed_s)
    answered = [o for o in outcomes if isinstance(o.status, int)]
    ok = [o.latency_s for o in answered if o.status == 200]
    not_ok = [o.latency_s for o in answered if o.status != 200]
    return {
        "sent": len(outcomes),
        "elapsed_s": elapsed_s,
        "completed_per_s": len(answered) * per_s,
        "ok_per_s": len(ok) * per_s,
        "goodput_per_s": sum(latency <= deadline_s for latency in ok) * per_s,
        "latency_ok_ms": _percentiles_ms(ok),
        "latency_all_ms": _percentiles_ms([o.latency_s for o in answered]),
        "max_latency_non_200_ms": 1000 * max(not_ok) if not_ok else None,
        "status_counts": dict(Counter(str(o.status) for o in outcomes)),
        "launch_lag_ms": _percentiles_ms([o.lag_s for o in outcomes if o.lag_s is not None]),
        "deadline_s": deadline_s,
    }


async def closed_loop(url: str, photos: list[bytes] | None, concurrency: int, duration_s: float,
                      deadline_s: float = 10.0, max_requests: int = 1_000_000,
                      progress: bool = True) -> dict[str, Any]:
    """Run `concurrency` clients that each send the next request when the last one is answered."""
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome] = []
    target = _Target.parse(url)
    requests = _requests(target, photos)
    start = loop.time()
    end = start + duration_s
    async with _Connections(target.host, target.port) as connections:
        with tqdm(desc=f"C={concurrency}", unit="req", disable=not progress, leave=False) as bar:

            async def one_client() -> None:
                while loop.time() < end and len(outcomes) < max_requests:
                    sent = time.perf_counter()
                    status = await _send(connections, next(requests), loop.time() + deadline_s)
                    outcomes.append(Outcome(status, time.perf_counter() - sent))
                    bar.update()

            await asyncio.gather(*(one_client() for _ in range(concurrency)))
    result = summarize(outcomes, loop.time() - start, deadline_s)
    result.update(mode="closed", concurrency=concurrency)
    return result


def poisson_offsets(rate: float, duration_s: float, seed: int = 0, max_requests: int = 1_000_000) -> list[float]:
    """Arrival times in [0, duration_s) of a Poisson process of `rate` per second."""
    rng = random.Random(seed)
    offsets: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and len(offsets) < max_requests:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def open_loop(url: str, photos: list[bytes], rate: float, duration_s: float, deadline_s: float,
                    seed: int = 0, progress: bool = True, grace_s: float = 0.1) -> dict[str, Any]:
    """Send requests at Poisson arrival times, each as its own task.

    Goodput counts 200s within `deadline_s`; the client waits `grace_s` longer, so that a server's
    own 504 at its deadline (which starts at arrival, a little after sending) is seen, not cut off.
    """
    loop = asyncio.get_running_loop()
    offsets = poisson_offsets(rate, duration_s, seed)
    target = _Target.parse(url)
    requests = _requests(target, photos)
    outcomes: list[Outcome] = []
    async with _Connections(target.host, target.port) as connections:
        with tqdm(total=len(offsets), desc=f"{rate:.0f}/s", unit="req", disable=not progress, leave=False) as bar:

            async def one_request(offset: float, raw: bytes) -> None:
                launched = time.perf_counter()
                status = await _send(connections, raw, start + offset + deadline_s + grace_s)
                scheduled = clock_start + offset
                outcomes.append(Outcome(status, time.perf_counter() - scheduled, launched - scheduled))
                bar.update()

            start, clock_start = loop.time(), time.perf_counter()
            tasks = []
            for offset in offsets:
                await asyncio.sleep(start + offset - loop.time())  # returns at once when already late
                tasks.append(asyncio.create_task(one_request(offset, next(requests))))
            await asyncio.gather(*tasks)
    # Rates per second of the arrival window, the one the offered rate refers to.
    result = summarize(outcomes, loop.time() - start, deadline_s, window_s=duration_s)
    result.update(mode="open", rate=rate)
    return result


async def ceiling(base_url: str, concurrency: int = 32, duration_s: float = 3.0,
                  progress: bool = True) -> dict[str, Any]:
    """The generator's own max rate: a closed loop against GET /healthz, which does no work."""
    return await closed_loop(f"{base_url}/healthz", None, concurrency, duration_s, progress=progress)


async def single(url: str, photo: bytes, deadline_s: float = 5.0) -> Outcome:
    """Send one upload on a fresh connection."""
    loop = asyncio.get_running_loop()
    target = _Target.parse(url)
    async with _Connections(target.host, target.port) as connections:
        sent = time.perf_counter()
        status = await _send(connections, target.encode(photo), loop.time() + deadline_s)
        return Outcome(status, time.perf_counter() - sent)


def describe(result: dict[str, Any]) -> str:
    """One line: rates, latency of the 200s, statuses."""
    ok = result["latency_ok_ms"] or {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    return (f"sent {result['sent']}, {result['completed_per_s']:.1f} answers/s, "
            f"goodput {result['goodput_per_s']:.1f}/s, 200s p50/p90/p99 "
            f"{ok['p50']:.0f}/{ok['p90']:.0f}/{ok['p99']:.0f} ms, {result['status_counts']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:5001", help="server base URL (default: %(default)s)")
    parser.add_argument("--path", default="/cls", help="upload route (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=16, help="closed loop with C clients (default: 16)")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    mode.add_argument("--ceiling", action="store_true", help="the generator's max rate against GET /healthz")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default: %(default)s)")
    parser.add_argument("--deadline", type=float, default=2.0, help="client deadline, s (default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="640x480", help="photo size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="open-loop arrival seed (default: 0)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    url = args.url.rstrip("/") + args.path
    photos = make_photos()[args.size]
    if args.ceiling:
        result = run(ceiling(args.url.rstrip("/"), duration_s=args.duration))
    elif args.rate:
        result = run(open_loop(url, photos, args.rate, args.duration, args.deadline, args.seed))
    else:
        result = run(closed_loop(url, photos, args.concurrency, args.duration, args.deadline))
    print(describe(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
