"""Run the task's model in a child process, so that the server's GIL (event loop, decoding) never stalls it.

    BatchProcessor -> model thread -> ModelProcess.handle_batch(items) --pipe--> child: batch_classification

Each child loads and warms up its own copy of the model. With PREPROCESS_IN_BATCH (the default) the parent
never touches the model, and does not even import torch; otherwise it keeps a copy for preprocess only.
Items and results cross the pipe pickled (a batch of 8 images of 224x224x3 bytes is 1.2 MB; with
PREPROCESS_IN_BATCH the items are the uploads, decoded in the child).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from cpu_runtime import keep_freed_memory, torch_threads
from settings import Settings
from task import batch_function

logger = logging.getLogger(__name__)

_task: Any = None  # in the child: the task module, its model, and what a batch runs (task.batch_function)
_model: Any = None
_compute: Callable[[list[Any]], Sequence[Any]] | None = None
_start_error: Exception | None = None  # why the model could not load: raised by every call, the parent reports it


def _start_child(settings: Settings) -> None:
    global _start_error
    try:
        _load(settings)
    except Exception as exc:  # an initializer that raises breaks the pool and loses the reason: keep it
        _start_error = exc


def _load(settings: Settings) -> None:
    global _task, _model, _compute
    # The parent ends the child (shutdown, or the pipe closing when it dies); a Ctrl-C or SIGTERM sent to
    # the whole process group must not kill the model while the parent still drains its queue.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A parent killed outright (SIGKILL, OOM) cannot shut the pool down, and the child would wait for work forever.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True, name="parent-watch").start()
    if settings.malloc_tuning:
        keep_freed_memory()
    _task = importlib.import_module(settings.task_module)  # GOMP_SPINCOUNT came with the parent's environment
    torch_threads(settings.torch_threads())  # this child's share of the CPUs, before the model loads
    _model = _task.get_model(settings)
    pool = None
    if settings.preprocess_in_batch and settings.preprocess_workers > 1:
        pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="preprocess")
    _compute = batch_function(_task, _model, decode=settings.preprocess_in_batch, pool=pool)


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(0)


def _loaded() -> None:
    if _start_error is not None:
        raise _start_error


def _warm_up(max_batch_size: int, thread_counts: tuple[int, ...]) -> None:
    _loaded()
    for count in thread_counts:  # the last one is the one batches mostly run with
        torch_threads(count)
        _task.warm_up(_model, max_batch_size)


def _batch(items: list[Any], threads: int) -> Sequence[Any]:
    _loaded()
    torch_threads(threads)
    assert _compute is not None  # set by _load, or _loaded raised
    return _compute(items)


class ModelProcess:
    """The model in MODEL_WORKERS child processes; handle_batch blocks (releasing the GIL) until one answers.

    At most MODEL_WORKERS handle_batch calls may run at once (the engine's max_concurrent_batches): each takes
    a free child for its batch, waiting for one while a restarted child warms up. Each child computes
    with its share of the cores (Settings.torch_threads); a batch that finds every other child idle gets
    all of them, so one request alone is not slowed down by the split (unless THREADS fixes the count).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lone_threads, self._shared_threads = settings.torch_threads(busy_workers=1), settings.torch_threads()
        self._pools = [self._start() for _ in range(settings.model_workers)]
        self._warm_batch_size = 0  # set by warm_up; a child started after a crash warms up to it too
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(self._pools)):
            self._free.put(index)

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: a forked child would inherit torch's thread pools in an undefined state.
        return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_start_child,
                                   initargs=(self._settings,))

    def load(self) -> None:
        """Wait until every child has loaded the model; raise the error of one that could not."""
        for future in [pool.submit(_loaded) for pool in self._pools]:
            future.result()

    def warm_up(self, max_batch_size: int) -> None:
        """Load the model in every child and run every batch size (blocks until done)."""
        self._warm_batch_size = max_batch_size
        for future in [self._submit_warm_up(pool) for pool in self._pools]:
            future.result()

    def _submit_warm_up(self, pool: ProcessPoolExecutor) -> Future[None]:
        counts = tuple(dict.fromkeys((self._lone_threads, self._shared_threads)))  # once if they are the same
        return pool.submit(_warm_up, self._warm_batch_size, counts)

    def handle_batch(self, items: list[Any]) -> Sequence[Any]:
        """Compute one batch in a free child; if the child died, fail this batch and start a new child.

        Blocks while every child is taken: a child started after a crash takes no batch before it has
        loaded the model and warmed up (otherwise its first batches pay for both, past their deadlines).
        """
        index = self._free.get()
        alone = self._free.qsize() == len(self._pools) - 1
        restarted = False
        try:
            return self._pools[index].submit(_batch, items,
                                             self._lone_threads if alone else self._shared_threads).result()
        except BrokenProcessPool:
            logger.error("a model process died; starting a new one, which loads the model and warms up "
                         "before it takes a batch")
            self._restart(index)  # puts the index back once the new child is warm
            restarted = True
            raise
        finally:
            if not restarted:
                self._free.put(index)

    def _restart(self, index: int) -> None:
        pool = self._pools[index] = self._start()
        if not self._warm_batch_size:  # never warmed up: neither is the new child
            self._free.put(index)
            return

        def ready(warming: Future[None]) -> None:
            if error := warming.exception():
                logger.error("the new model process failed to warm up: %r", error)
            self._free.put(index)  # even so: its next batch fails and starts another

        self._submit_warm_up(pool).add_done_callback(ready)

    def close(self) -> None:
        """Let the children finish their batches, then end them."""
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
