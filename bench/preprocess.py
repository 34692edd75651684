"""Decode + resize + crop of one upload, three ways: time per photo, and whether the model's answer changes.

  service      Pillow decodes (JPEG at a DCT-reduced scale when big), torch resizes: classification.preprocess
  pillow       the service's Pillow decoding, then Pillow resizes too (bilinear, antialiased) and crops
  torchvision  torchvision.io.decode_jpeg at full size, torch resizes (no DCT scaling in libjpeg-turbo's API here)

Run as `python bench/preprocess.py`; prints a table per photo size and writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the service's modules live in the repo root

from cpu_runtime import keep_freed_memory, limit_openmp_spinning  # noqa: E402
from settings import Settings  # noqa: E402

limit_openmp_spinning(Settings().gomp_spincount)  # as the service does, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.io  # noqa: E402
from PIL import Image  # noqa: E402

import classification  # noqa: E402
from classification.images import decode_rgb, open_image  # noqa: E402
from classification.model import Classifier  # noqa: E402
from photos import PHOTOS, make_photos  # noqa: E402


def pillow(model: Classifier, data: bytes) -> np.ndarray:
    image = decode_rgb(open_image(data, max_pixels=model.max_pixels), draft_size=model.resize)  # as the service
    scale = model.resize / min(image.size)
    size = (max(model.crop, round(image.width * scale)), max(model.crop, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - model.crop) // 2, (size[1] - model.crop) // 2
    return np.asarray(image.crop((left, top, left + model.crop, top + model.crop)))


def torchvision_io(model: Classifier, data: bytes) -> np.ndarray:
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    pixels = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB)
    item: np.ndarray = classification.resize_and_crop(model, pixels)
    return item


WAYS: dict[str, Callable[[Classifier, bytes], np.ndarray]] = {
    "service": classification.preprocess, "pillow": pillow, "torchvision": torchvision_io}


def median_ms(way: Callable[[Classifier, bytes], np.ndarray], model: Classifier, data: bytes, runs: int) -> float:
    way(model, data)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        way(model, data)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per photo and way (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    keep_freed_memory()
    model = classification.get_model(Settings())
    result: dict[str, Any] = {"runs": args.runs, "torch_threads": torch.get_num_threads(), "sizes": {}}
    for size, jpegs in make_photos().items():
        rows: dict[str, Any] = {}
        reference = [classification.preprocess(model, data) for data in jpegs]
        top1 = [p[0]["index"] for p in classification.batch_classification(model, reference)]
        for name, way in WAYS.items():
            items = [way(model, data) for data in jpegs]
            answers = [p[0]["index"] for p in classification.batch_classification(model, items)]
            rows[name] = {
                "median_ms": statistics.median(median_ms(way, model, data, args.runs) for data in jpegs),
                "max_pixel_difference": max(int(np.abs(a.astype(int) - b.astype(int)).max())
                                            for a, b in zip(items, reference, strict=True)),
                "same_top1_as_service": sum(a == b for a, b in zip(answers, top1, strict=True)),
                "photos": len(jpegs),
            }
        result["sizes"][size] = rows
        print(f"{size} ({', '.join(PHOTOS)}):")
        for name, row in rows.items():
            print(f"  {name:<12} {row['median_ms']:6.2f} ms  max pixel difference {row['max_pixel_difference']:3d}"
                  f"  same top-1 as service {row['same_top1_as_service']}/{row['photos']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
