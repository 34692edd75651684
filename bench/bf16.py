"""Should BF16 be on by default? Top-1 agreement of bf16 autocast with fp32, and the speed of each.

The sample: every photo that ships inside scikit-image (no download), each as a whole and as five
crops and their mirror images, preprocessed as the service does. The model alone is then timed at
batch 8 in both precisions, interleaved. Run as `python bench/bf16.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the service's modules live in the repo root

from cpu_runtime import keep_freed_memory, limit_openmp_spinning  # noqa: E402
from settings import Settings  # noqa: E402

limit_openmp_spinning(Settings().gomp_spincount)  # as the service does, before torch loads

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import classification  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "logo", "camera", "coins", "moon", "page", "clock", "horse", "grass", "gravel", "brick")


def variants(image: Image.Image) -> list[Image.Image]:
    """The image, its centre and four corner crops at 60 %, and the mirror image of each."""
    w, h = image.size
    cw, ch = int(w * 0.6), int(h * 0.6)
    boxes = [(0, 0, w, h), ((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2),
             (0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    crops = [image.crop(box) for box in boxes]
    return crops + [crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for crop in crops]


def sample(model: Any) -> list[np.ndarray]:
    """Preprocessed items for every photo scikit-image has on disk (each encoded as a PNG upload)."""
    items = []
    for name in PHOTOS:
        try:
            pixels = getattr(skimage.data, name)()
        except Exception:  # some photos are fetched on first use: skip, never download
            continue
        image = Image.fromarray(pixels.astype(np.uint8) if pixels.dtype == bool else pixels)
        for variant in variants(image.convert("RGB")):
            buffer = io.BytesIO()
            variant.save(buffer, "PNG")
            items.append(classification.preprocess(model, buffer.getvalue()))
    return items


def top1(model: Any, items: list[np.ndarray]) -> list[int]:
    """Top-1 class index of each item, in batches of 8."""
    return [row[0]["index"] for start in range(0, len(items), 8)
            for row in classification.batch_classification(model, items[start:start + 8])]


def images_per_s(model: Any, items: list[np.ndarray], seconds: float) -> float:
    """Model-only images/s at batch 8 (the items are already preprocessed)."""
    batch = items[:8]
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        classification.batch_classification(model, batch)
        done += len(batch)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed run per precision and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    keep_freed_memory()
    fp32 = classification.get_model(Settings())
    bf16 = classification.get_model(Settings(bf16=True))
    for model in (fp32, bf16):
        classification.warm_up(model, 8)
    items = sample(fp32)
    a, b = top1(fp32, items), top1(bf16, items)
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    speeds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        speeds["fp32"].append(images_per_s(fp32, items, args.seconds))
        speeds["bf16"].append(images_per_s(bf16, items, args.seconds))
    median = {k: float(np.median(v)) for k, v in speeds.items()}
    result = {"items": len(items), "top1_agree": agree, "agreement": agree / len(items),
              "images_per_s_batch8": median, "speedup": median["bf16"] / median["fp32"],
              "cpu_flags": sorted({f for f in ("avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()}),
              "torch": torch.__version__}
    print(f"top-1 agreement: {agree} of {len(items)} ({100 * agree / len(items):.1f} %); model alone at batch 8: "
          f"fp32 {median['fp32']:.1f}, bf16 {median['bf16']:.1f} img/s ({result['speedup']:.2f}x); "
          f"CPU flags {result['cpu_flags']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
