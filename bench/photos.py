"""Real test photos as in-memory JPEGs: scikit-image's sample photos resized to two camera sizes."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

# Natural photos that ship inside scikit-image (no download), with ImageNet-like subjects.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080)}


def encode_jpeg(pixels: np.ndarray, size: tuple[int, int], quality: int = 90) -> bytes:
    """Resize an RGB array to `size` (width, height) and encode it as a JPEG."""
    image = Image.fromarray(pixels).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def make_photos(quality: int = 90) -> dict[str, list[bytes]]:
    """Return {"640x480": [jpeg, ...], "1920x1080": [jpeg, ...]}, one JPEG per sample photo."""
    pixels = [getattr(data, name)() for name in PHOTOS]
    return {label: [encode_jpeg(p, size, quality) for p in pixels] for label, size in SIZES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save", type=Path, help="also write the JPEGs into this folder")
    args = parser.parse_args()
    for label, jpegs in make_photos().items():
        print(f"{label}: {', '.join(f'{name} {len(j) / 1024:.0f} KiB' for name, j in zip(PHOTOS, jpegs, strict=True))}")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for name, jpeg in zip(PHOTOS, jpegs, strict=True):
                (args.save / f"{name}-{label}.jpg").write_bytes(jpeg)


if __name__ == "__main__":
    main()
