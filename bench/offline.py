"""The limit without HTTP: JPEG bytes -> preprocess -> batched model, in a tight loop.

One process (the default): a thread pool preprocesses batch n+1 while the model runs on batch n on all
the cores (torch's threads). `--processes N`: the service's default layout without HTTP: N processes,
each with the cores divided among them, each decoding a batch and then computing it, all at once; their
images/s are summed. Run as `python bench/offline.py`; run.py runs it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the service's modules live in the repo root

from cpu_runtime import keep_freed_memory, limit_openmp_spinning, torch_threads  # noqa: E402
from settings import Settings  # noqa: E402

limit_openmp_spinning(Settings().gomp_spincount)  # as the service does, before torch loads

import torch  # noqa: E402

import classification  # noqa: E402
from photos import SIZES, make_photos  # noqa: E402


def _images_per_s(model: Any, jpegs: list[bytes], batch_size: int, seconds: float, pool: ThreadPoolExecutor,
                  warmup_batches: int = 2) -> float:
    photos = itertools.cycle(jpegs)

    def submit_batch() -> list[Future[Any]]:
        return [pool.submit(classification.preprocess, model, next(photos)) for _ in range(batch_size)]

    pending = submit_batch()
    done, start = 0, time.perf_counter()
    for step in itertools.count():
        if step == warmup_batches:
            done, start = 0, time.perf_counter()
        batch = [future.result() for future in pending]
        pending = submit_batch()  # decoded while the model runs on `batch`
        classification.batch_classification(model, batch)
        done += batch_size
        if step >= warmup_batches and time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    for future in pending:
        future.result()  # leave the pool idle for the next batch size
    return done / elapsed


def _single_image_ms(model: Any, jpegs: list[bytes], runs: int) -> dict[str, float]:
    total, pre, infer = [], [], []
    for jpeg in itertools.islice(itertools.cycle(jpegs), runs):
        t0 = time.perf_counter()
        item = classification.preprocess(model, jpeg)
        t1 = time.perf_counter()
        classification.batch_classification(model, [item])
        t2 = time.perf_counter()
        total.append(t2 - t0)
        pre.append(t1 - t0)
        infer.append(t2 - t1)
    return {
        "median_ms": 1000 * statistics.median(total),
        "preprocess_median_ms": 1000 * statistics.median(pre),
        "inference_median_ms": 1000 * statistics.median(infer),
        "runs": runs,
    }


def measure(model: Any, jpegs: list[bytes], batch_sizes: list[int], seconds: float,
            preprocess_workers: int = 1, latency_runs: int = 50) -> dict[str, Any]:
    """Measure images/s per batch size (preprocessing overlapped) and sequential single-image latency."""
    classification.warm_up(model, max(batch_sizes))
    with ThreadPoolExecutor(preprocess_workers, thread_name_prefix="preprocess") as pool:
        rows = [{"batch_size": b, "images_per_s": _images_per_s(model, jpegs, b, seconds, pool)}
                for b in batch_sizes]
    best = max(rows, key=lambda row: row["images_per_s"])
    return {
        "throughput": rows,
        "best": best,
        "single_image": _single_image_ms(model, jpegs, latency_runs),
        "preprocess_workers": preprocess_workers,
        "torch_threads": torch.get_num_threads(),
        "seconds_per_batch_size": seconds,
    }


def print_table(result: dict[str, Any]) -> None:
    """Print the throughput table and the single-image latency."""
    print(f"{'batch':>5}  {'images/s':>9}")
    for row in result["throughput"]:
        mark = "  <- best" if row is result["best"] else ""
        print(f"{row['batch_size']:>5}  {row['images_per_s']:>9.1f}{mark}")
    single = result.get("single_image")
    if single is None:
        print(f"{result['processes']} processes of {result['torch_threads']} torch thread(s) each")
        return
    print(f"single image: {single['median_ms']:.1f} ms median of {single['runs']} "
          f"(preprocess {single['preprocess_median_ms']:.1f} ms + model {single['inference_median_ms']:.1f} ms)")


def _decode_then_compute(model: Any, jpegs: list[bytes], batch_size: int, seconds: float, barrier: Barrier,
                         warmup_batches: int = 2) -> tuple[int, float]:
    """One process's share: decode a batch, then compute it, as a model process of the service does."""
    photos = itertools.cycle(jpegs)

    def one_batch() -> None:
        classification.batch_classification(model, [classification.preprocess(model, next(photos))
                                                    for _ in range(batch_size)])

    for _ in range(warmup_batches):
        one_batch()
    barrier.wait()  # every process starts timing together, so that their rates add up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_batch()
        done += batch_size
    return done, time.perf_counter() - start


def _process_worker(processes: int, size: str, batch_sizes: list[int], seconds: float, barrier: Barrier,
                    results: Any) -> None:
    keep_freed_memory()
    torch_threads(Settings(model_workers=processes).torch_threads())  # the CPUs divided, as in the service
    model = classification.get_model(Settings())
    classification.warm_up(model, max(batch_sizes))
    jpegs = make_photos()[size]
    # One message per process: two puts each could interleave with another process's in the queue.
    results.put(([_decode_then_compute(model, jpegs, b, seconds, barrier) for b in batch_sizes],
                 torch.get_num_threads()))


def measure_processes(processes: int, size: str, batch_sizes: list[int], seconds: float) -> dict[str, Any]:
    """Images/s per batch size of `processes` processes decoding and computing at once, summed."""
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_process_worker, args=(processes, size, batch_sizes, seconds, barrier, queue))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    shares, threads = zip(*(queue.get() for _ in workers), strict=True)
    for worker in workers:
        worker.join()
        if worker.exitcode:
            raise RuntimeError(f"offline process exited with {worker.exitcode}")
    rows = [{"batch_size": b, "images_per_s": sum(done / elapsed for done, elapsed in (share[i] for share in shares))}
            for i, b in enumerate(batch_sizes)]
    return {"throughput": rows, "best": max(rows, key=lambda row: row["images_per_s"]), "processes": processes,
            "torch_threads": threads[0], "seconds_per_batch_size": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed run per batch size (default: %(default)s)")
    parser.add_argument("--preprocess-workers", type=int, default=1, help="preprocessing threads (default: 1)")
    parser.add_argument("--latency-runs", type=int, default=50, help="single-image runs (default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZES), default="640x480", help="photo size (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=1, help="processes computing at once, the cores divided "
                        "among them (default: %(default)s; above 1, no single-image latency)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.processes > 1:
        result = measure_processes(args.processes, args.size, batch_sizes, args.seconds)
    else:
        keep_freed_memory()  # the same allocator set-up as the service
        model = classification.get_model(Settings())
        result = measure(model, make_photos()[args.size], batch_sizes, args.seconds, args.preprocess_workers,
                         args.latency_runs)
    result["size"] = args.size
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()
