"""INFERENCE_PROCESS: the model's child process computes batches and never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A parent that starts the model process with the fake task, computes one batch, prints the child's pid
# and its answer, then waits to be killed.
PARENT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from inference_process import ModelProcess
from settings import Settings
process = ModelProcess(Settings(task_module="tests.fake_task"))
process.warm_up(4)
answer = process.handle_batch([b"one", b"two"])
print(next(iter(process._pools[0]._processes)), [r[0]["label"] for r in answer], flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited


def test_child_computes_and_exits_when_its_parent_is_killed() -> None:
    with subprocess.Popen([sys.executable, "-c", PARENT, str(ROOT)], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True) as parent:
        try:
            assert parent.stdout is not None
            child_pid, labels = parent.stdout.readline().split(" ", 1)
            assert labels.strip() == "['one', 'two']"
            assert _alive(int(child_pid))
            parent.send_signal(signal.SIGKILL)  # no shutdown, no cleanup: only the child's watch can notice
            parent.wait(timeout=10)
            deadline = time.monotonic() + 10
            while _alive(int(child_pid)):
                assert time.monotonic() < deadline, "the model process outlived its parent"
                time.sleep(0.05)
        finally:
            parent.kill()
