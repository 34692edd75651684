"""The task-module contract, and the input errors a task raises for the app to map to HTTP."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from batching import BatchSizeMismatchError, ItemError

if TYPE_CHECKING:
    from settings import Settings


class InvalidInputError(ValueError):
    """The upload cannot be used: empty, corrupt, truncated, or not the expected kind (HTTP 400)."""


class UnsupportedInputError(InvalidInputError):
    """The upload is a recognised format that this task does not accept (HTTP 415)."""


class InputTooLargeError(InvalidInputError):
    """The upload decodes to more than the configured limit (HTTP 413)."""


class TaskModule(Protocol):
    """What `TASK_MODULE` must provide; a plain module satisfies it structurally.

    The model object is the task's own: it carries whatever preprocess needs (input size,
    normalisation), which is why preprocess receives it.
    """

    def get_model(self, settings: Settings) -> Any: ...  # once per worker process; may be slow

    def warm_up(self, model: Any, max_batch_size: int) -> None: ...  # before /readyz turns 200

    def preprocess(self, model: Any, data: bytes) -> Any: ...  # one upload; raise ValueError on bad input

    def batch_classification(self, model: Any, items: list[Any]) -> list[Any]: ...  # same length and order


def batch_function(task: TaskModule, model: Any, *, decode: bool, pool: Executor | None = None
                   ) -> Callable[[list[Any]], list[Any]]:
    """What one batch runs: the model on preprocessed items, or (decode) preprocess_and_classify on uploads."""
    if decode:
        return partial(preprocess_and_classify, task, model, pool=pool)
    return partial(task.batch_classification, model)


def preprocess_and_classify(task: TaskModule, model: Any, uploads: list[bytes], pool: Executor | None = None
                            ) -> list[Any]:
    """Preprocess each upload (on `pool`'s threads, if given), then classify the good ones as one batch.

    A bad upload gets an ItemError holding its ValueError in its place; the others are computed.
    """
    def prepare(data: bytes) -> Any:
        try:
            return task.preprocess(model, data)
        except ValueError as exc:
            return ItemError(exc)

    prepared = list(pool.map(prepare, uploads) if pool else map(prepare, uploads))
    items = [item for item in prepared if not isinstance(item, ItemError)]
    results = task.batch_classification(model, items) if items else []
    if len(results) != len(items):
        raise BatchSizeMismatchError(f"batch_classification returned {len(results)} results for {len(items)} items")
    computed = iter(results)
    return [item if isinstance(item, ItemError) else next(computed) for item in prepared]
