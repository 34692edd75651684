"""Image classification task: the plugin surface the service loads (see task.TaskModule)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvf

from classification.images import decode_rgb, open_image
from classification.model import Classifier, load_classifier

if TYPE_CHECKING:
    from settings import Settings

logger = logging.getLogger(__name__)

Prediction = dict[str, Any]


def get_model(settings: Settings) -> Classifier:
    """Load the configured classifier from local files (torch's threads are the caller's: the service sets
    each model worker's share, cpu_runtime.torch_threads)."""
    return load_classifier(settings.model, settings.model_weights, device=settings.device,
                           top_k=settings.top_k, max_pixels=settings.max_image_pixels, bf16=settings.bf16,
                           compile_for_batch_sizes=settings.max_batch_size if settings.torch_compile else 0)


def warm_up(model: Classifier, max_batch_size: int) -> None:
    """Run every batch size twice: the first call of each shape costs 10-40x a normal one (oneDNN builds
    its kernels per shape; with TORCH_COMPILE, torch.compile compiles a graph per shape, 10-30 s each),
    which would slow the first requests and skew the engine's estimate."""
    item = np.zeros((model.crop, model.crop, 3), dtype=np.uint8)
    for size in range(1, max_batch_size + 1):
        for _ in range(2):
            batch_classification(model, [item] * size)


def preprocess(model: Classifier, data: bytes) -> np.ndarray:
    """Decode one upload to a crop x crop x 3 uint8 array: resize the shorter side, centre-crop.

    Pillow decodes (big JPEGs at a DCT-reduced scale); torch resizes the channels-last view, faster than
    Pillow's resize (bench/preprocess.py times both; the README has the figures).
    """
    rgb = decode_rgb(open_image(data, max_pixels=model.max_pixels), draft_size=model.resize)
    return resize_and_crop(model, torch.from_numpy(np.array(rgb)).permute(2, 0, 1))  # CHW view of HWC memory


def resize_and_crop(model: Classifier, pixels: torch.Tensor) -> np.ndarray:
    """Resize a 3 x H x W uint8 image's shorter side to model.resize, centre-crop model.crop; return HWC."""
    height, width = pixels.shape[1:]
    scale = model.resize / min(width, height)
    size = [max(model.crop, round(height * scale)), max(model.crop, round(width * scale))]
    pixels = tvf.resize(pixels, size, interpolation=tvf.InterpolationMode.BILINEAR, antialias=True)
    top, left = (size[0] - model.crop) // 2, (size[1] - model.crop) // 2
    item: np.ndarray = pixels[:, top:top + model.crop, left:left + model.crop].permute(1, 2, 0).numpy()
    return item


def batch_classification(model: Classifier, items: list[np.ndarray]) -> list[list[Prediction]]:
    """Classify a batch of preprocessed images; return the top-k predictions of each, in order."""
    # Stacking HWC arrays and permuting gives NCHW with channels_last strides, at no copy.
    batch = torch.from_numpy(np.stack(items)).to(model.device).permute(0, 3, 1, 2)
    with torch.inference_mode(), model.autocast():
        logits = model.net((batch.float() - model.mean) / model.std)
    probs = torch.softmax(logits.float(), dim=1)
    scores, indices = probs.topk(model.top_k, dim=1)
    return [
        [{"label": model.labels[i], "index": i, "score": round(s, 4)}
         for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores.tolist(), indices.tolist(), strict=True)
    ]
