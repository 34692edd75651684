"""A generic, deadline-aware micro-batching engine.

    submit(item, deadline) --admit?--> pending deque --run(): _next_batch--> drop expired/cancelled
        --> handle_batch(items) on an inference thread (one per batch slot)
        --> each future: its result or ItemError, or the batch's error

It knows nothing of HTTP, images or models: it batches opaque items for one blocking callable.
Every job carries an absolute deadline (event-loop time); work that cannot finish by it is never computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class RejectedError(Exception):
    """The job was refused before queueing; the caller may retry later (HTTP 503)."""


class QueueFullError(RejectedError):
    """The queue holds max_queue_size jobs; shed load."""


class OverloadedError(RejectedError):
    """The queue ahead is predicted to outlast the job's deadline."""


class ShuttingDownError(RejectedError):
    """The processor is closing and takes no more work."""


class DeadlineExceededError(TimeoutError):
    """The job's deadline passed (or would pass) before it could be computed."""


class BatchSizeMismatchError(RuntimeError):
    """handle_batch returned a different number of results than it was given items."""


class ItemError(Exception):
    """Returned by handle_batch in place of one item's result: that item fails with `error`, the rest go on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class BatchObserver(Protocol):
    """Receives what the engine saw; metrics live here, not in the loop."""

    def batch_done(
        self, size: int, queue_waits_s: Sequence[float], run_s: float, ok: bool, queue_depth: int
    ) -> None: ...

    def dropped_before_compute(self, reason: str, count: int) -> None: ...


@dataclass(slots=True, eq=False)
class _Job:
    item: Any
    future: asyncio.Future[Any]
    deadline: float
    enqueued: float
    info: dict[str, float] | None


class BatchProcessor:
    """Collect submitted items into batches for `handle_batch`, one batch at a time."""

    def __init__(
        self,
        handle_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue_size: int,
        admit_fraction: float = 1.0,
        observer: BatchObserver | None = None,
        executor: ThreadPoolExecutor | None = None,
        max_concurrent_batches: int = 1,
    ) -> None:
        self._handle_batch = handle_batch
        self._max_batch_size = max_batch_size
        self._max_batch_delay_s = max_batch_delay_s
        self._max_queue_size = max_queue_size
        self._admit_fraction = admit_fraction
        self._observer = observer
        self._pending: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # One thread owns the model: batches never overlap and the event loop never computes. Pass the
        # executor that loaded the model: torch's CPU kernels run about 2x slower when a second thread
        # has also run them (each thread gets its own OpenMP team, and the idle team competes).
        # With max_concurrent_batches > 1, handle_batch must be safe to call from that many threads at once
        # (each call with its own model, or a model that allows it), and the executor must have that many.
        self._slots = max_concurrent_batches
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_concurrent_batches, thread_name_prefix="inference")
        self._closed = False
        self._in_flight = 0  # items in the batches computing now
        self._running: set[asyncio.Task[None]] = set()
        self._item_times: deque[float] = deque(maxlen=8)  # compute seconds per item, last large batches

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a batch (not counting the batch being computed)."""
        return len(self._pending)

    @property
    def seconds_per_item(self) -> float:
        """Compute time per item: median of the last 8 batches at least half full; 0 before any."""
        return statistics.median(self._item_times) if self._item_times else 0.0

    @property
    def slow_seconds_per_item(self) -> float:
        """Compute time per item of the slowest of those 8 batches: what a batch may take on a bad turn."""
        return max(self._item_times, default=0.0)

    def admit(self, deadline: float) -> None:
        """Raise RejectedError if a job with this deadline would be refused now."""
        if self._closed:
            raise ShuttingDownError("shutting down")
        if len(self._pending) >= self._max_queue_size:
            self._drop("queue_full", 1)
            raise QueueFullError(f"queue full ({self._max_queue_size} waiting)")
        # Only a real queue is a reason to refuse: with none, a wrong estimate cannot lock us out.
        # The job waits for everything ahead and then computes in a batch of up to max_batch_size. It must
        # fit in admit_fraction of the time it has left: batch times vary, and a job admitted to finish just
        # before its deadline is likely to be computed and then answered too late.
        if self._pending:
            ahead = len(self._pending) + self._in_flight
            predicted_s = (ahead / self._slots + self._max_batch_size) * self.seconds_per_item
            remaining_s = deadline - asyncio.get_running_loop().time()
            if predicted_s > self._admit_fraction * remaining_s:
                self._drop("overloaded", 1)
                raise OverloadedError(f"{ahead} requests ahead: about {predicted_s * 1000:.0f} ms of work, "
                                      f"{max(remaining_s, 0) * 1000:.0f} ms left before the deadline")

    async def submit(self, item: Any, deadline: float, info: dict[str, float] | None = None) -> Any:
        """Queue one item and wait for its result; raise RejectedError at once if refused.

        If given, `info` receives the item's `batch_size` and `queue_wait_s` when its batch starts.
        """
        self.admit(deadline)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Job(item, future, deadline, loop.time(), info))
        self._wakeup.set()
        # A caller that times out or disconnects cancels this await, and so the future: run() skips it.
        return await future

    async def run(self) -> None:
        """Form and compute batches until cancelled; started and stopped by the owner's lifespan.

        A batch is formed whenever a slot is free (one of max_concurrent_batches) and jobs wait.
        """
        try:
            while True:
                try:
                    while len(self._running) >= self._slots:
                        await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                    batch = await self._next_batch()
                    if batch:
                        task = asyncio.create_task(self._run_batch(batch))
                        self._running.add(task)
                        task.add_done_callback(self._running.discard)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not stop the service: later jobs would hang
                    logger.exception("batching loop error; continuing")
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def close(self, runner: asyncio.Task[None], drain_timeout_s: float) -> None:
        """Refuse new work; let queued work finish within drain_timeout_s, then fail what is still queued.

        A batch already computing always finishes: its thread cannot be interrupted anyway.
        """
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout_s):
                await self._wait_idle()
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(ShuttingDownError("shut down before this request was computed"))
        await self._wait_idle()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        if self._owns_executor:
            await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _wait_idle(self) -> None:
        while self._pending or self._in_flight:
            self._idle.clear()
            await self._idle.wait()

    async def _next_batch(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._idle.set()
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._max_batch_delay_s > 0 and len(self._pending) < self._max_batch_size:
            # Wait for company, counted from the oldest job's arrival, not from when we started looking.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._pending[0].enqueued + self._max_batch_delay_s):
                    while len(self._pending) < self._max_batch_size:
                        self._wakeup.clear()
                        await self._wakeup.wait()
        now = loop.time()
        # A job predicted to miss its deadline is dropped rather than computed in vain, but only in
        # favour of others: computing it when nothing else waits costs nothing and refreshes the estimate.
        # The prediction is pessimistic (the slowest recent batch, not the median): on a shared machine
        # batch times vary by 2x, and under overload a job computed and then answered 504 costs a job
        # behind it that would have made its deadline.
        expected_s = self.slow_seconds_per_item * min(len(self._pending), self._max_batch_size)
        batch: list[_Job] = []
        doomed: list[_Job] = []
        expired = cancelled = 0
        while self._pending and len(batch) + len(doomed) < self._max_batch_size:
            job = self._pending.popleft()
            if job.future.done():  # its caller gave up (timeout or disconnect) and cancelled it
                if job.deadline <= now:
                    expired += 1
                else:
                    cancelled += 1
            elif job.deadline <= now:
                job.future.set_exception(DeadlineExceededError("deadline passed while queued"))
                expired += 1
            elif job.deadline <= now + expected_s:
                doomed.append(job)
            else:
                batch.append(job)
        if batch:
            for job in doomed:
                job.future.set_exception(DeadlineExceededError("deadline would pass before the batch finished"))
            expired += len(doomed)
        else:
            batch = doomed
        if expired:
            self._drop("expired", expired)
        if cancelled:
            self._drop("cancelled", cancelled)
        return batch

    async def _run_batch(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self._in_flight += len(batch)
        for job in batch:
            if job.info is not None:
                job.info["batch_size"] = len(batch)
                job.info["queue_wait_s"] = started - job.enqueued
        ok = False
        run_s = 0.0
        try:
            results, run_s = await loop.run_in_executor(self._executor, self._timed_batch, [j.item for j in batch])
            if len(results) != len(batch):
                raise BatchSizeMismatchError(f"handle_batch returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            self._fail(batch, ShuttingDownError("shut down while this request was computed"))
            raise
        except Exception as exc:
            logger.exception("batch of %d failed", len(batch))
            self._fail(batch, exc)
        else:
            ok = True
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # skip done futures: a timed-out caller cancelled its own
                    continue
                if isinstance(result, ItemError):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self._in_flight -= len(batch)
            if not self._in_flight and not self._pending:
                self._idle.set()
        # Estimate from batches at least half full: a queue drains in full batches, and small batches
        # (cost per item up to 3x higher, and slowest while the loop is busy refusing work) would make a
        # burst of refusals keep itself going.
        if ok and 2 * len(batch) >= self._max_batch_size:
            self._item_times.append(run_s / len(batch))
        if self._observer is not None:
            waits = [started - j.enqueued for j in batch]
            self._observer.batch_done(len(batch), waits, run_s, ok, len(self._pending))

    def _timed_batch(self, items: list[Any]) -> tuple[Sequence[Any], float]:
        # Timed on the worker thread: a busy event loop must not inflate the compute estimate, or it
        # would refuse more work, and the refusals would keep the loop busy.
        started = time.perf_counter()
        results = self._handle_batch(items)
        return results, time.perf_counter() - started

    def _fail(self, batch: list[_Job], exc: BaseException) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)

    def _drop(self, reason: str, count: int) -> None:
        if self._observer is not None:
            self._observer.dropped_before_compute(reason, count)

