"""The model alone: images/s per batch size on preprocessed input, and batch-1 latency. No decoding, no HTTP.

For before/after comparisons of a change to the network, run it from two checkouts in turn, e.g.
`for i in 1 2 3; do (cd ../old && python bench/model.py); python bench/model.py; done`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the service's modules live in the repo root

from cpu_runtime import keep_freed_memory, limit_openmp_spinning  # noqa: E402
from settings import Settings  # noqa: E402

limit_openmp_spinning(Settings().gomp_spincount)  # as the service does, before torch loads

import numpy as np  # noqa: E402

import classification  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed run per batch size (default: %(default)s)")
    args = parser.parse_args()

    keep_freed_memory()  # the same allocator set-up as the service
    model = classification.get_model(Settings())
    rng = np.random.default_rng(0)
    item = rng.integers(0, 256, (model.crop, model.crop, 3), dtype=np.uint8)
    result: dict[str, float] = {}
    for size in (int(b) for b in args.batch_sizes.split(",")):
        items = [item] * size
        times = []
        for _ in range(3):
            classification.batch_classification(model, items)  # first calls of a shape build its kernels
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            t = time.perf_counter()
            classification.batch_classification(model, items)
            times.append(time.perf_counter() - t)
        result[f"batch{size}_images_per_s"] = size * len(times) / sum(times)
        result[f"batch{size}_median_ms"] = 1000 * statistics.median(times)
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))


if __name__ == "__main__":
    main()
