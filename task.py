"""The task-module contract, and the input errors a task raises for the app to map to HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

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
