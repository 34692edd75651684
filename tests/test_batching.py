"""Unit tests of BatchProcessor with a recording handle_batch; no HTTP, no model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from batching import (
    BatchProcessor,
    BatchSizeMismatchError,
    DeadlineExceededError,
    ItemError,
    OverloadedError,
    QueueFullError,
    ShuttingDownError,
)

pytestmark = pytest.mark.anyio


class Recorder:
    """handle_batch that records each batch, can be held at a gate, and can fail on demand."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.error: Exception | None = None
        self.short = False
        self.compute_s = 0.0  # how long each batch "computes" once through the gate
        self.rejected: set[Any] = set()  # items answered with an ItemError
        self.inside = 0  # calls computing now, and the most at once
        self.most_inside = 0
        self.lock = threading.Lock()

    def __call__(self, items: list[Any]) -> list[Any]:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.entered.set()
        try:
            assert self.gate.wait(10), "test gate never opened"
            time.sleep(self.compute_s)
        finally:
            with self.lock:
                self.inside -= 1
        self.batches.append(list(items))
        if self.error is not None:
            raise self.error
        results = [ItemError(ValueError(f"bad {item}")) if item in self.rejected else f"r{item}" for item in items]
        return results[:-1] if self.short else results


class Observer:
    def __init__(self) -> None:
        self.drops: Counter[str] = Counter()
        self.sizes: list[int] = []

    def batch_done(self, size: int, queue_waits_s: Sequence[float], run_s: float, ok: bool, queue_depth: int) -> None:
        self.sizes.append(size)

    def dropped_before_compute(self, reason: str, count: int) -> None:
        self.drops[reason] += count


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def observer() -> Observer:
    return Observer()


@pytest.fixture
async def make(recorder: Recorder, observer: Observer) -> AsyncIterator[Any]:
    started: list[tuple[BatchProcessor, asyncio.Task[None]]] = []

    def _make(**kwargs: Any) -> BatchProcessor:
        opts = {"max_batch_size": 4, "max_batch_delay_s": 0.0, "max_queue_size": 16} | kwargs
        processor = BatchProcessor(recorder, observer=observer, **opts)
        started.append((processor, asyncio.create_task(processor.run())))
        return processor

    yield _make
    recorder.gate.set()
    for processor, runner in started:
        await processor.close(runner, drain_timeout_s=5)


def later(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def wait_entered(recorder: Recorder) -> None:
    await asyncio.to_thread(recorder.entered.wait, 5)
    assert recorder.entered.is_set()


async def test_concurrent_submits_share_one_batch(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_delay_s=1.0)
    results = await asyncio.gather(*(processor.submit(i, later()) for i in range(4)))
    assert results == ["r0", "r1", "r2", "r3"]
    assert recorder.batches == [[0, 1, 2, 3]]


async def test_items_queued_while_busy_form_the_next_batch(make: Any, recorder: Recorder) -> None:
    processor = make()
    recorder.gate.clear()
    first = asyncio.create_task(processor.submit("a", later()))
    await wait_entered(recorder)
    rest = [asyncio.create_task(processor.submit(x, later())) for x in "bcdef"]
    await asyncio.sleep(0)  # let every submit reach the queue
    recorder.gate.set()
    assert await first == "ra"
    assert [await t for t in rest] == ["rb", "rc", "rd", "re", "rf"]
    assert recorder.batches == [["a"], ["b", "c", "d", "e"], ["f"]]


async def test_idle_model_dispatches_at_once_without_delay(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_delay_s=0.0)
    async with asyncio.timeout(1.0):  # with a delay rule this would still be waiting for company
        assert await processor.submit(7, later()) == "r7"
    assert recorder.batches == [[7]]


async def test_batch_delay_counts_from_first_arrival(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_delay_s=0.2)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(processor.submit(1, later()))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(processor.submit(2, later()))
    start = loop.time()
    assert [await first, await second] == ["r1", "r2"]
    # The second item arrived 0.1 s in: the batch leaves 0.2 s after the first, not 0.2 s after the second.
    assert loop.time() - start < 0.19
    assert recorder.batches == [[1, 2]]


async def test_batch_error_reaches_every_caller_and_loop_survives(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_delay_s=0.5)
    recorder.error = RuntimeError("model exploded")
    outcomes = await asyncio.gather(*(processor.submit(i, later()) for i in range(3)), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and str(o) == "model exploded" for o in outcomes)
    recorder.error = None
    assert await processor.submit(9, later()) == "r9"


async def test_length_mismatch_fails_batch(make: Any, recorder: Recorder, observer: Observer) -> None:
    processor = make(max_batch_delay_s=0.5)
    recorder.short = True
    outcomes = await asyncio.gather(*(processor.submit(i, later()) for i in range(2)), return_exceptions=True)
    assert all(isinstance(o, BatchSizeMismatchError) for o in outcomes)
    recorder.short = False
    assert await processor.submit(3, later()) == "r3"


async def test_cancelled_caller_is_skipped_and_loop_survives(make: Any, recorder: Recorder,
                                                             observer: Observer) -> None:
    processor = make()
    recorder.gate.clear()
    first = asyncio.create_task(processor.submit("a", later()))
    await wait_entered(recorder)
    gone = asyncio.create_task(processor.submit("gone", later()))
    kept = asyncio.create_task(processor.submit("kept", later()))
    await asyncio.sleep(0)
    gone.cancel()  # what a disconnecting client's handler does
    recorder.gate.set()
    assert await first == "ra"
    assert await kept == "rkept"
    assert ["gone"] not in recorder.batches and all("gone" not in b for b in recorder.batches)
    assert observer.drops["cancelled"] == 1


async def test_expired_job_is_dropped_before_compute(make: Any, recorder: Recorder, observer: Observer) -> None:
    processor = make()
    recorder.gate.clear()
    first = asyncio.create_task(processor.submit("a", later()))
    await wait_entered(recorder)
    doomed = asyncio.create_task(processor.submit("late", later(0.05)))
    await asyncio.sleep(0.1)  # its deadline passes while the first batch holds the model
    recorder.gate.set()
    assert await first == "ra"
    with pytest.raises(DeadlineExceededError):
        await doomed
    assert all("late" not in b for b in recorder.batches)
    assert observer.drops["expired"] == 1


async def test_job_predicted_to_miss_in_its_batch_is_dropped(make: Any, recorder: Recorder,
                                                            observer: Observer) -> None:
    processor = make(max_batch_size=2)
    for compute_s in (0.01, 0.01, 0.3):  # two fast batches and a slow one: median 0.01 s, slowest 0.3 s
        recorder.compute_s = compute_s
        await processor.submit(compute_s, later())
    recorder.compute_s = 0.0
    recorder.gate.clear()
    running = asyncio.create_task(processor.submit("running", later()))
    await wait_entered(recorder)
    loop = asyncio.get_running_loop()
    # Its batch of two could take 0.6 s on a slow turn: dropped, though the median (0.02 s) says it fits.
    tight = asyncio.create_task(processor.submit("tight", loop.time() + 0.2))
    loose = asyncio.create_task(processor.submit("loose", later()))
    await asyncio.sleep(0)
    recorder.gate.set()
    assert [await running, await loose] == ["rrunning", "rloose"]
    with pytest.raises(DeadlineExceededError):
        await tight
    assert all("tight" not in b for b in recorder.batches)
    assert observer.drops["expired"] == 1


async def test_full_queue_raises_at_once(make: Any, recorder: Recorder, observer: Observer) -> None:
    processor = make(max_queue_size=2, max_batch_size=1)
    recorder.gate.clear()
    running = asyncio.create_task(processor.submit("running", later()))
    await wait_entered(recorder)
    queued = [asyncio.create_task(processor.submit(i, later())) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):
        await processor.submit("one too many", later())
    assert observer.drops["queue_full"] == 1
    recorder.gate.set()
    assert await running == "rrunning"
    assert [await q for q in queued] == ["r0", "r1"]


async def test_predicted_miss_is_refused_at_arrival(make: Any, recorder: Recorder, observer: Observer) -> None:
    processor = make(max_batch_size=1)
    await processor.submit("measure", later())  # gives the engine a compute-time estimate
    assert processor.seconds_per_item > 0
    loop = asyncio.get_running_loop()
    processor.admit(loop.time())  # nothing queued: admitted whatever the estimate says
    recorder.gate.clear()
    running = asyncio.create_task(processor.submit("running", later()))
    await wait_entered(recorder)
    queued = asyncio.create_task(processor.submit("queued", later()))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        processor.admit(loop.time() + processor.seconds_per_item)  # two items ahead cannot finish by then
    processor.admit(later())  # a reachable deadline is admitted
    assert observer.drops["overloaded"] == 1
    recorder.gate.set()
    assert [await running, await queued] == ["rrunning", "rqueued"]


async def test_close_finishes_running_and_fails_pending(recorder: Recorder, observer: Observer) -> None:
    processor = BatchProcessor(recorder, max_batch_size=1, max_batch_delay_s=0.0, max_queue_size=8,
                               observer=observer)
    runner = asyncio.create_task(processor.run())
    recorder.gate.clear()
    running = asyncio.create_task(processor.submit("running", later()))
    await wait_entered(recorder)
    pending = asyncio.create_task(processor.submit("pending", later()))
    await asyncio.sleep(0)
    closing = asyncio.create_task(processor.close(runner, drain_timeout_s=0.05))
    await asyncio.sleep(0.1)  # the drain window passes while the model is still busy
    recorder.gate.set()
    await closing
    assert await running == "rrunning"  # the batch on the model finishes
    with pytest.raises(ShuttingDownError):
        await pending
    with pytest.raises(ShuttingDownError):
        await processor.submit("after close", later())


async def test_close_drains_queue_within_grace(recorder: Recorder, observer: Observer) -> None:
    processor = BatchProcessor(recorder, max_batch_size=2, max_batch_delay_s=0.0, max_queue_size=8,
                               observer=observer)
    runner = asyncio.create_task(processor.run())
    recorder.gate.clear()
    jobs = [asyncio.create_task(processor.submit(i, later())) for i in range(5)]
    await wait_entered(recorder)
    closing = asyncio.create_task(processor.close(runner, drain_timeout_s=5))
    await asyncio.sleep(0)
    recorder.gate.set()
    await closing
    assert [await j for j in jobs] == ["r0", "r1", "r2", "r3", "r4"]


async def test_only_large_batches_set_the_compute_estimate(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_size=4, max_batch_delay_s=0.5)
    await processor.submit("alone", later())  # a batch of 1: per-item cost is not what a queue drains at
    assert processor.seconds_per_item == 0
    await asyncio.gather(*(processor.submit(i, later()) for i in range(2)))  # half full
    assert processor.seconds_per_item > 0


async def test_admission_keeps_slack_for_slow_batches(make: Any, recorder: Recorder, observer: Observer) -> None:
    processor = make(max_batch_size=1, admit_fraction=0.5)
    recorder.compute_s = 0.02  # an estimate far above the microseconds this test takes between steps
    await processor.submit("measure", later())
    recorder.compute_s = 0.0
    per_item = processor.seconds_per_item
    recorder.gate.clear()
    running = asyncio.create_task(processor.submit("running", later()))
    await wait_entered(recorder)
    queued = asyncio.create_task(processor.submit("queued", later()))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    # Three items' work (two ahead, its own) fits in four items' time, but not in half of it.
    with pytest.raises(OverloadedError):
        processor.admit(loop.time() + 4 * per_item)
    processor.admit(loop.time() + 8 * per_item)
    assert observer.drops["overloaded"] == 1
    recorder.gate.set()
    assert [await running, await queued] == ["rrunning", "rqueued"]


async def test_item_error_fails_only_its_item(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_delay_s=0.5)
    recorder.rejected = {"bad"}
    outcomes = await asyncio.gather(*(processor.submit(x, later()) for x in ("a", "bad", "c")), return_exceptions=True)
    assert outcomes[0] == "ra" and outcomes[2] == "rc"
    assert isinstance(outcomes[1], ItemError) and str(outcomes[1].error) == "bad bad"
    assert recorder.batches == [["a", "bad", "c"]]  # one batch: the bad item did not fail its neighbours


async def wait_inside(recorder: Recorder, count: int) -> None:
    for _ in range(500):
        if recorder.inside == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{recorder.inside} batches computing, expected {count}")


async def test_two_slots_compute_two_batches_at_once(make: Any, recorder: Recorder) -> None:
    processor = make(max_batch_size=2, max_concurrent_batches=2)
    recorder.gate.clear()
    first = [asyncio.create_task(processor.submit(x, later())) for x in "ab"]
    await wait_inside(recorder, 1)
    second = [asyncio.create_task(processor.submit(x, later())) for x in "cd"]
    await wait_inside(recorder, 2)  # the second batch starts while the first still computes
    third = asyncio.create_task(processor.submit("e", later()))
    await asyncio.sleep(0.05)
    assert recorder.inside == 2 and processor.queue_depth == 1  # no third slot: it waits
    recorder.gate.set()
    assert [await t for t in (*first, *second, third)] == ["ra", "rb", "rc", "rd", "re"]
    assert recorder.most_inside == 2
    assert sorted(map(sorted, recorder.batches)) == [["a", "b"], ["c", "d"], ["e"]]


async def test_admission_counts_every_slot(make: Any, recorder: Recorder, observer: Observer) -> None:
    processor = make(max_batch_size=1, max_concurrent_batches=2)
    recorder.compute_s = 0.02
    await processor.submit("measure", later())
    recorder.compute_s = 0.0
    per_item = processor.seconds_per_item
    recorder.gate.clear()
    running = [asyncio.create_task(processor.submit(x, later())) for x in "ab"]
    await wait_inside(recorder, 2)
    queued = [asyncio.create_task(processor.submit(x, later())) for x in "cd"]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    # Four ahead on two slots, then its own: 3 items' time; one slot would need 5.
    processor.admit(loop.time() + 4 * per_item)
    with pytest.raises(OverloadedError):
        processor.admit(loop.time() + 2 * per_item)
    recorder.gate.set()
    assert [await t for t in (*running, *queued)] == ["ra", "rb", "rc", "rd"]


async def test_close_finishes_every_running_batch(recorder: Recorder, observer: Observer) -> None:
    processor = BatchProcessor(recorder, max_batch_size=1, max_batch_delay_s=0.0, max_queue_size=8,
                               observer=observer, max_concurrent_batches=2)
    runner = asyncio.create_task(processor.run())
    recorder.gate.clear()
    running = [asyncio.create_task(processor.submit(x, later())) for x in "ab"]
    await wait_inside(recorder, 2)
    pending = asyncio.create_task(processor.submit("pending", later()))
    await asyncio.sleep(0)
    closing = asyncio.create_task(processor.close(runner, drain_timeout_s=0.05))
    await asyncio.sleep(0.1)
    recorder.gate.set()
    await closing
    assert [await t for t in running] == ["ra", "rb"]
    with pytest.raises(ShuttingDownError):
        await pending
