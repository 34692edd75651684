"""INFERENCE_PROCESS: the model processes compute batches, share the cores, and never outlive their parent."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from unittest.mock import patch

import pytest
import skimage.data
from PIL import Image

from cpu_runtime import torch_threads
from inference_process import ModelProcess
from settings import Settings
from tests import fake_task

ROOT = Path(__file__).resolve().parent.parent

# A parent that starts two model processes with the fake task, computes a batch in each, prints the
# children's pids and their answers, then waits to be killed.
PARENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from inference_process import ModelProcess
from settings import Settings
process = ModelProcess(Settings(task_module="tests.fake_task"))
process.warm_up(4)
answers = [process.handle_batch([b"one", b"two"]), process.handle_batch([b"%PDF", b"three"])]
pids = [pid for pool in process._pools for pid in pool._processes]
labels = [r[0]["label"] if isinstance(r, list) else type(r.error).__name__ for a in answers for r in a]
print(",".join(map(str, pids)), labels, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited


def test_children_compute_and_exit_when_their_parent_is_killed() -> None:
    with subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT)], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True) as parent:
        try:
            assert parent.stdout is not None
            pids, labels = parent.stdout.readline().split(" ", 1)
            # Each child decodes its batch (PREPROCESS_IN_BATCH, the default): a bad upload fails alone.
            assert labels.strip() == "['one', 'two', 'UnsupportedInputError', 'three']"
            children = [int(pid) for pid in pids.split(",")]
            assert len(set(children)) == 2 and all(map(_alive, children))
            parent.send_signal(signal.SIGKILL)  # no shutdown, no cleanup: only the children's watch can notice
            parent.wait(timeout=10)
            deadline = time.monotonic() + 10
            while any(map(_alive, children)):
                assert time.monotonic() < deadline, "a model process outlived its parent"
                time.sleep(0.05)
        finally:
            parent.kill()


def test_a_model_process_that_dies_is_replaced_by_one_warmed_up_before_its_next_batch() -> None:
    process = ModelProcess(Settings(task_module="tests.fake_task", model_workers=1))
    try:
        process.warm_up(4)
        with pytest.raises(BrokenProcessPool):
            process.handle_batch([b"exit-process"])  # the child dies mid-batch
        [answer] = process.handle_batch([b"after"])  # waits for the new child, then computes there
        assert answer[0]["label"] == "after"
        assert process._pools[0].submit(fake_task.warmed_up_to).result() == 4
    finally:
        process.close()


def test_a_batch_alone_gets_every_core_and_a_share_otherwise() -> None:
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buffer, format="JPEG")  # type: ignore[no-untyped-call]
    with patch("settings.available_cpus", lambda: 2):  # a two-CPU machine: one CPU per child
        process = ModelProcess(Settings(max_batch_size=2))  # the real model, with torch, in each child
    try:
        process.load()
        process.warm_up(2)
        threads = [pool.submit(torch_threads).result() for pool in process._pools]
        assert threads == [1, 1]
        [alone] = process.handle_batch([buffer.getvalue()])  # no other batch computing
        assert alone[0]["label"] in {"tiger cat", "tabby", "Egyptian cat"}
        first = [pool.submit(torch_threads).result() for pool in process._pools]
        assert sorted(first) == [1, 2]
        busy = process._free.get_nowait()  # as if the other child were computing a batch
        try:
            process.handle_batch([buffer.getvalue()])
        finally:
            process._free.put(busy)
        assert [pool.submit(torch_threads).result() for pool in process._pools] == [1, 1]
    finally:
        process.close()
