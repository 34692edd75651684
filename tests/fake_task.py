"""A deterministic task module obeying the contract: the engine's and the app's stand-in for a model.

Items are the uploaded bytes; each result names its item, so tests can check order. Tests steer
the current model through its events and flags, and reach it with `latest()`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from task import InputTooLargeError, InvalidInputError, UnsupportedInputError

# Set by default; a test clears it to hold warm-up (and so readiness) back.
WARM_GATE = threading.Event()
WARM_GATE.set()
_models: list[FakeModel] = []


@dataclass
class FakeModel:
    batches: list[list[bytes]] = field(default_factory=list)  # every batch computed, in order
    preprocessed: list[bytes] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)  # batches wait here; set = open
    entered: threading.Event = field(default_factory=threading.Event)  # set once a batch has started
    fail_with: Exception | None = None
    drop_one_result: bool = False
    batch_s: float = 0.0  # how long each batch "computes"; FAKE_BATCH_S sets it for server processes
    warmed_up_to: int = 0  # the max_batch_size of the last warm-up
    inside: int = 0  # batches computing now (MODEL_WORKERS > 1 runs several at once)
    most_inside: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.gate.set()


def latest() -> FakeModel:
    """The model of the most recently started app."""
    return _models[-1]


def get_model(settings: Any) -> FakeModel:
    if settings.model == "broken":  # what a bad MODEL does to the real task: fail the start, saying why
        raise ValueError("MODEL=broken is not a model")
    model = FakeModel(batch_s=float(os.environ.get("FAKE_BATCH_S", "0")))
    _models.append(model)
    return model


def warm_up(model: FakeModel, max_batch_size: int) -> None:
    if not WARM_GATE.wait(timeout=30):
        raise RuntimeError("warm gate never opened")
    model.warmed_up_to = max_batch_size


def warmed_up_to() -> int:
    """In a model process: how far its model was warmed up (ModelProcess tests submit this to a child)."""
    return latest().warmed_up_to


def preprocess(model: FakeModel, data: bytes) -> bytes:
    if not data:
        raise InvalidInputError("empty upload")
    if data.startswith(b"bad"):
        raise InvalidInputError("not an image")
    if data.startswith(b"%PDF"):
        raise UnsupportedInputError("unsupported image format PDF")
    if data.startswith(b"huge"):
        raise InputTooLargeError("image is over the pixel limit")
    model.preprocessed.append(data)
    return data


def batch_classification(model: FakeModel, items: list[bytes]) -> list[list[dict[str, Any]]]:
    if b"exit-process" in items:  # INFERENCE_PROCESS tests: the model's process dies mid-batch
        os._exit(3)
    with model.lock:
        model.inside += 1
        model.most_inside = max(model.most_inside, model.inside)
    model.entered.set()
    try:
        if not model.gate.wait(timeout=30):
            raise RuntimeError("gate never opened")
    finally:
        with model.lock:
            model.inside -= 1
    model.batches.append(list(items))
    if model.batch_s:
        time.sleep(model.batch_s)
    if model.fail_with is not None:
        raise model.fail_with
    results = [[{"label": item.decode(errors="replace"), "index": len(item), "score": 1.0}] for item in items]
    return results[:-1] if model.drop_one_result else results
