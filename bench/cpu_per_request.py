"""Where the CPU goes: per-thread CPU milliseconds per request of one server under a closed loop.

Starts the service (or a variant from servers.py) on a free port, runs C clients for a while, and prints
the CPU time each thread of the server's processes (its whole process group: LitServe's workers too) and
the generator spent per answered request. A process's first thread (tid = pid) is its event loop or main
thread. Run as `python bench/cpu_per_request.py [--server ours] [--concurrency 16]`; `--concurrency 0` measures
the server idle, with no load (what it takes from a server under test beside it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import load
from photos import SIZES, make_photos
from servers import group_pids, serve, server_specs


def thread_cpu_s(group: int) -> dict[tuple[int, int], float]:
    """User + system CPU seconds of each thread of each process in a process group, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for pid in group_pids(group):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                cpu[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) / ticks
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="ours", choices=sorted(server_specs()))
    parser.add_argument("--concurrency", type=int, default=16, help="clients; 0: no load, the server idle")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--size", choices=sorted(SIZES), default="640x480")
    args = parser.parse_args()

    photos = make_photos()[args.size]
    with serve(server_specs()[args.server], Path(tempfile.mkdtemp(prefix="bench-logs-"))) as server:
        url = f"{server.base_url}/cls"
        load.run(load.closed_loop(url, photos, 4, 2.0, progress=False))
        before, generator_before = thread_cpu_s(server.pid), time.process_time()
        if args.concurrency:
            result = load.run(load.closed_loop(url, photos, args.concurrency, args.duration, progress=False))
        else:
            time.sleep(args.duration)
        after, generator_after = thread_cpu_s(server.pid), time.process_time()
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    if not args.concurrency:
        print(f"idle for {args.duration:g} s: {100 * sum(spent.values()) / args.duration:.2f} % of a core")
        return
    answered = sum(n for status, n in result["status_counts"].items() if status.isdigit())
    print(load.describe(result))
    print(f"generator: {1000 * (generator_after - generator_before) / answered:.2f} ms/request")
    for (pid, tid), seconds in sorted(spent.items(), key=lambda item: -item[1]):
        if seconds > 0.01:
            name = f"process {pid} " + ("main thread" if tid == pid else f"thread {tid}")
            print(f"{name}: {1000 * seconds / answered:.2f} ms/request")
    print(f"server total: {sum(spent.values()) / args.duration:.2f} cores busy of {os.cpu_count()}")


if __name__ == "__main__":
    main()
