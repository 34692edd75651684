"""Benchmark everything in one go, with the same photos and the same load generator for every server.

all servers started side by side, then paused -> generator ceiling -> per repeat: the offline limit (no HTTP,
in processes of its own), then closed loops at C=1,4,16 against ours (MAX_BATCH_DELAY_MS=0), ours-delay10ms
(=10), ours-thread (the model on one thread of the server process, the default before bench/results/workers),
the naive server and LitServe, each running only for its turn -> ours and ours-thread with TIMEOUT=1.0:
open-loop overload at 2x saturation (+ one request right after), ours: 70% soak -> bench/results/latest.json,
PNG plots, README section.
Full run: `.venv/bin/python bench/run.py` (about 25 minutes); smoke run: add `--quick`. The service's other
settings are measured on demand: `--servers ours,ours-process,...` (the variants in servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Coroutine
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import load
import report
from photos import SIZES, make_photos
from servers import ROOT, RunningServer, ServerSpec, batch_totals, memory_kib, sample_memory, serve, server_specs, turn

sys.path.insert(0, str(ROOT))  # settings.py, for the run's meta and the service's model layout

from settings import Settings  # noqa: E402

FULL = {"repeats": 3, "seconds": 10.0, "offline_seconds": 10.0, "overload_seconds": 30.0, "soak_seconds": 300.0,
        "warmup_seconds": 3.0, "ceiling_seconds": 5.0, "latency_runs": 50}
QUICK = {"repeats": 1, "seconds": 3.0, "offline_seconds": 3.0, "overload_seconds": 3.0, "soak_seconds": 5.0,
         "warmup_seconds": 1.0, "ceiling_seconds": 2.0, "latency_runs": 20}
LAG_WARNING_MS = 20.0  # open loop: launching this late means the generator itself is saturated
CLOSED_DEADLINE_S = 10.0  # closed loops: generous, so the servers' own 503/504 answers are what we see


def headline(summary: dict[str, Any]) -> dict[str, float | None]:
    """The numbers worth a median: rates, latency percentiles (ms), mean batch size."""
    ok, every = summary["latency_ok_ms"] or {}, summary["latency_all_ms"] or {}
    return {
        "completed_per_s": summary["completed_per_s"],
        "ok_per_s": summary["ok_per_s"],
        "goodput_per_s": summary["goodput_per_s"],
        **{f"ok_{p}_ms": ok.get(p) for p in ("p50", "p90", "p99")},
        **{f"all_{p}_ms": every.get(p) for p in ("p50", "p90", "p99")},
        "max_latency_non_200_ms": summary["max_latency_non_200_ms"],
        "mean_batch_size": summary.get("mean_batch_size"),
    }


def median_headline(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per-number median over repeats, skipping runs where a number is missing."""
    heads = [headline(run) for run in runs]
    medians: dict[str, float | None] = {}
    for key in heads[0]:
        values = [value for h in heads if (value := h[key]) is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def run_phase(server: RunningServer, work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run one load phase; add the server's mean batch size over it when it has /metrics."""
    before = batch_totals(server)
    result = load.run(work)
    after = batch_totals(server)
    batches = after[1] - before[1] if before and after else 0
    result["mean_batch_size"] = (after[0] - before[0]) / batches if before and after and batches else None
    return result


def _median_throughput(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median images/s per batch size over repeats, and the best batch size by that median."""
    rows = [{"batch_size": row["batch_size"],
             "images_per_s": statistics.median(run["throughput"][i]["images_per_s"] for run in runs)}
            for i, row in enumerate(runs[0]["throughput"])]
    best = max(rows, key=lambda row: row["images_per_s"])
    return {"throughput": rows, "best_batch_size": best["batch_size"], "best_images_per_s": best["images_per_s"]}


class Offline:
    """bench/offline.py, one run per repeat, each in its own process, so that the generator stays free of torch:
    one process on every core (the limit as the issue defines it) and, where the service runs its model in
    `processes` processes, that layout too (the limit of the service's own configuration). Its repeats are
    interleaved with the servers' (run_curves), so that a drift of the machine does not pass for a ratio."""

    def __init__(self, size: str, cfg: dict[str, Any], preprocess_workers: int, processes: int) -> None:
        self._size, self._cfg, self._preprocess_workers, self._processes = size, cfg, preprocess_workers, processes
        self._runs: dict[str, list[dict[str, Any]]] = {"one": [], "processes": []} if processes > 1 else {"one": []}

    def run(self, i: int) -> None:
        for layout, runs in self._runs.items():
            what = "one process" if layout == "one" else f"{self._processes} processes"
            print(f"offline run {i + 1}/{self._cfg['repeats']} ({what}):", flush=True)
            extra = (["--processes", str(self._processes)] if layout == "processes" else
                     ["--preprocess-workers", str(self._preprocess_workers), "--latency-runs",
                      str(self._cfg["latency_runs"])])
            with tempfile.TemporaryDirectory(prefix="bench-offline-") as tmp:
                out = Path(tmp) / "offline.json"
                subprocess.run([sys.executable, str(Path(__file__).with_name("offline.py")), "--size", self._size,
                                "--batch-sizes", "1,2,4,8,16", "--seconds", str(self._cfg["offline_seconds"]), *extra,
                                "--out", str(out)], check=True)
                runs.append(json.loads(out.read_text()))

    def result(self) -> dict[str, Any]:
        one = self._runs["one"]
        result = {"runs": one, "median": {**_median_throughput(one), "single_image_ms": statistics.median(
            run["single_image"]["median_ms"] for run in one)}}
        if processes := self._runs.get("processes"):
            result["processes"] = {"runs": processes, "median": _median_throughput(processes),
                                   "processes": self._processes, "torch_threads": processes[0]["torch_threads"]}
        return result


def run_curves(servers: list[RunningServer], photos: list[bytes], levels: list[int], cfg: dict[str, Any],
               offline: Offline | None = None) -> dict[str, dict[str, Any]]:
    """Closed loops at each concurrency against every server, `repeats` times, after a short warm-up of each.

    Repeats are interleaved (repeat 1 of every server, then repeat 2, ...): the machine is shared and its
    speed drifts over minutes, and a drift must not pass for a difference between servers. The servers
    come paused; each runs only for its turn, which starts with a short warm-up. Each repeat starts with
    the offline limit's (while every server is paused).
    """
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {c: [] for c in levels} for s in servers}
    for i in range(cfg["repeats"]):
        if offline is not None:
            offline.run(i)
        for server in servers:
            with turn(server):
                load.run(load.closed_loop(f"{server.base_url}/cls", photos, 4, cfg["warmup_seconds"], progress=False))
                for c in levels:
                    result = run_phase(server, load.closed_loop(f"{server.base_url}/cls", photos, c,
                                                                cfg["seconds"], CLOSED_DEADLINE_S))
                    runs[server.name][c].append(result)
                    print(f"{server.name} C={c} run {i + 1}/{cfg['repeats']}: {load.describe(result)}")
    return {name: {str(c): {"runs": rs, "median": median_headline(rs)} for c, rs in by_level.items()}
            for name, by_level in runs.items()}


def memory_summary(samples: list[tuple[float, int, int]], seconds: float) -> dict[str, Any]:
    """Mean RSS over the first and the last window (a minute, or half a short soak) and the peak."""
    window = min(60.0, seconds / 2)
    end = samples[-1][0]
    first = [rss for t, rss, _ in samples if t <= window]
    last = [rss for t, rss, _ in samples if t >= end - window]
    minutes: dict[int, list[int]] = {}
    for t, rss, _ in samples:
        minutes.setdefault(int(t // 60), []).append(rss)
    return {"window_s": window, "first_rss_mib": statistics.mean(first) / 1024,
            "last_rss_mib": statistics.mean(last) / 1024, "max_rss_mib": max(s[1] for s in samples) / 1024,
            "peak_hwm_mib": max(s[2] for s in samples) / 1024, "samples": len(samples),
            "rss_per_minute_mib": [round(statistics.mean(values) / 1024, 1) for _, values in sorted(minutes.items())]}


async def soak(server: RunningServer, photos: list[bytes], rate: float, seconds: float,
               deadline_s: float) -> dict[str, Any]:
    """An open loop at `rate` while sampling the server's memory every second."""
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_memory(server.pid, stop))
    try:
        result = await load.open_loop(f"{server.base_url}/cls", photos, rate, seconds, deadline_s, seed=1000)
    finally:
        stop.set()
        samples = await sampler
    result["memory"] = memory_summary(samples, seconds)
    return result


def overload(server: RunningServer, photos: list[bytes], rate: float, deadline_s: float,
             cfg: dict[str, Any]) -> dict[str, Any]:
    """Open-loop runs at `rate`, each followed by one single request to see that the server answers again."""
    url = f"{server.base_url}/cls"
    runs, after = [], []
    for i in range(cfg["repeats"]):
        runs.append(run_phase(server, load.open_loop(url, photos, rate, cfg["overload_seconds"], deadline_s, seed=i)))
        outcome = load.run(load.single(url, photos[0]))
        after.append({"status": outcome.status, "latency_ms": 1000 * outcome.latency_s})
        slowest = runs[-1]["max_latency_non_200_ms"]
        print(f"{server.name} overload {rate:.0f}/s run {i + 1}/{cfg['repeats']}: {load.describe(runs[-1])}; slowest "
              f"non-200 {slowest or 0:.0f} ms; next request: {outcome.status} in {1000 * outcome.latency_s:.0f} ms")
        if (lag := runs[-1]["launch_lag_ms"]) and lag["p99"] > LAG_WARNING_MS:
            print(f"WARNING: the generator launched requests late (p99 {lag['p99']:.0f} ms): "
                  "it, not the server, may be the bottleneck")
    return {"rate": rate, "seconds": cfg["overload_seconds"], "deadline_s": deadline_s, "runs": runs,
            "median": median_headline(runs), "next_request": after,
            "recovered": all(a["status"] == 200 for a in after)}


def run_overload_and_soak(spec: ServerSpec, log_dir: Path, photos: list[bytes], saturation: float,
                          deadline_s: float, cfg: dict[str, Any], soak_too: bool) -> dict[str, Any]:
    """A fresh server with TIMEOUT=deadline_s: overload at 2x `saturation`, then (soak_too) the 70% soak."""
    results: dict[str, Any] = {}
    with serve(spec, log_dir) as server:
        load.run(load.closed_loop(f"{server.base_url}/cls", photos, 4, cfg["warmup_seconds"], progress=False))
        if cfg["overload_seconds"] > 0:
            results["overload"] = overload(server, photos, 2 * saturation, deadline_s, cfg)
        if soak_too and cfg["soak_seconds"] > 0:
            rate = 0.7 * saturation
            result = run_phase(server, soak(server, photos, rate, cfg["soak_seconds"], deadline_s))
            mem = result["memory"]
            print(f"soak {rate:.0f}/s: {load.describe(result)}; RSS first {mem['first_rss_mib']:.0f} MiB, "
                  f"last {mem['last_rss_mib']:.0f} MiB, peak {mem['peak_hwm_mib']:.0f} MiB")
            results["soak"] = {"rate": rate, "seconds": cfg["soak_seconds"], "runs": [result],
                               "median": median_headline([result]), "memory": result["memory"]}
            results["rss_after_soak_mib"] = memory_kib(server.pid)[0] / 1024
    return results


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    low, sat = (str(c) for c in results["latency_levels"])

    def at(name: str, level: str, key: str) -> float | None:
        value: float | None = results["servers"].get(name, {}).get(level, {}).get("median", {}).get(key)
        return value

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ours = at("ours", sat, "ok_per_s")
    offline = results.get("offline", {})
    c1, single = at("ours", low, "ok_p50_ms"), offline.get("median", {}).get("single_image_ms")

    def at_max_batch(median: dict[str, Any]) -> float | None:  # the limit at the service's own largest batch
        return next((row["images_per_s"] for row in median.get("throughput", [])
                     if row["batch_size"] == results["meta"]["max_batch_size"]), None)

    found = {"ours_over_offline": div(ours, offline.get("median", {}).get("best_images_per_s")),
             "ours_over_offline_at_max_batch_size": div(ours, at_max_batch(offline.get("median", {})))}
    if processes := offline.get("processes"):
        found |= {"ours_over_offline_processes": div(ours, processes["median"]["best_images_per_s"]),
                  "ours_over_offline_processes_at_max_batch_size": div(ours, at_max_batch(processes["median"]))}
    return found | {"ours_over_naive": div(ours, at("naive", sat, "ok_per_s")),
                    "ours_over_litserve": div(ours, at("litserve", sat, "ok_per_s")),
                    "c1_p50_overhead_ms": c1 - single if c1 is not None and single is not None else None}


def meta(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """What ran where; torch's thread count is filled in from the offline runs, so torch never loads here."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    python = os.path.relpath(sys.executable)
    python = sys.executable if python.startswith("..") else python
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": importlib.metadata.version("torch"), "torch_threads": None,
            "size": args.size, "command": shlex.join([python, *sys.argv]), **cfg,
            "max_batch_size": Settings().max_batch_size,
            # The service's settings given in the environment (the servers inherit it), by Settings' own names.
            "env": {k: v for k, v in os.environ.items()
                    if k.upper() in {name.upper() for name in Settings.model_fields} | {"OMP_WAIT_POLICY"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 3 s phases, 5 s soak, no README")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), help=f"(default {value}, quick "
                            f"{QUICK[name]})")
    parser.add_argument("--servers", default="ours,ours-delay10ms,ours-thread,naive,litserve",
                        help="comma-separated (default: %(default)s)")
    parser.add_argument("--overload-servers", default="ours,ours-thread", help="servers that also get the "
                        "overload at 2x their saturation (ours also the soak; default: %(default)s)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop clients; the lowest gives latency, "
                        "the highest saturation (default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="640x480", help="photo size (default: %(default)s)")
    parser.add_argument("--overload-deadline", type=float, default=1.0, help="client deadline and server TIMEOUT "
                        "for overload and soak, s (default: %(default)s)")
    parser.add_argument("--preprocess-workers", type=int, default=1, help="offline preprocessing threads (default 1)")
    parser.add_argument("--skip-offline", action="store_true", help="no offline limit (no ratios against it)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, quick: bench/results/quick)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README to rewrite between the "
                        "bench markers (default: %(default)s; never with --quick)")
    args = parser.parse_args()
    cfg = {name: getattr(args, name) if getattr(args, name) is not None else (QUICK if args.quick else FULL)[name]
           for name in FULL}
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    names = [name for name in args.servers.split(",") if name]
    if unknown := set(names) - set(server_specs()):
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {sorted(server_specs())}")
    overload_names = [name for name in args.overload_servers.split(",") if name]
    if stray := set(overload_names) - set(names):
        parser.error(f"--overload-servers: {sorted(stray)} not in --servers")
    out = args.out or ROOT / "bench" / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` too unwinds through serve(): servers stop

    photos = make_photos()[args.size]
    results: dict[str, Any] = {"meta": meta(args, cfg), "latency_levels": [levels[0], levels[-1]], "servers": {}}
    offline = None
    if not args.skip_offline:
        service = Settings()
        offline = Offline(args.size, cfg, args.preprocess_workers,
                          service.model_workers if service.inference_process else 1)
    with ExitStack() as stack:  # every server started side by side, then paused but for its turn
        servers = [stack.enter_context(serve(server_specs()[name], log_dir)) for name in names]
        for server in servers:
            server.pause()
        if "ours" in names:
            with turn(servers[names.index("ours")]) as ours:
                results["ceiling"] = load.run(load.ceiling(ours.base_url, 32, cfg["ceiling_seconds"]))
            print(f"generator ceiling (GET /healthz, C=32): {load.describe(results['ceiling'])}")
        results["servers"] = run_curves(servers, photos, levels, cfg, offline)
    if offline is not None:
        results["offline"] = offline.result()
        results["meta"]["torch_threads"] = results["offline"]["runs"][0]["torch_threads"]
    for name in overload_names:
        saturation = results["servers"][name][str(levels[-1])]["median"]["ok_per_s"]
        if not saturation:
            print(f"{name} answered no 200 at saturation: no overload or soak")
            continue
        spec = server_specs(timeout_s=args.overload_deadline)[name]
        found = run_overload_and_soak(spec, log_dir, photos, saturation, args.overload_deadline, cfg, name == "ours")
        if name == "ours":
            results.update(found)
        elif "overload" in found:
            results.setdefault("overload_variants", {})[name] = found["overload"]
    results["ratios"] = ratios(results)

    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = [out / "throughput.png", out / "latency.png"] if results["servers"] else []
    if plots:
        report.plot_throughput(results, plots[0])
        report.plot_latency(results, plots[1])
    readme = None if args.quick else args.readme
    written = report.section_target(readme, out / "README-section.md")
    section = report.markdown(results, plots, written.parent)  # image links relative to where the section goes
    report.write_section(section, written)
    print(f"\n{section}\n\nresults: {out / 'latest.json'}; section written to {written}; server logs in {log_dir}")


if __name__ == "__main__":
    main()
