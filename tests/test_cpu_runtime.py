"""CPU runtime tuning: the OpenMP spin limit reaches torch's threads only when set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: limits spinning, loads torch, runs parallel work, then prints the CPU time
# the process burns while its main thread sleeps (OpenMP's idle worker spinning, or asleep).
SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from cpu_runtime import limit_openmp_spinning
assert limit_openmp_spinning(int(sys.argv[1]))
import torch
torch.set_num_threads(2)
x, w = torch.randn(8, 32, 64, 64), torch.randn(32, 32, 3, 3)
for _ in range(20):
    torch.nn.functional.conv2d(x, w, padding=1).add_(1)
start = time.process_time()
time.sleep(0.5)
print(time.process_time() - start)
print(limit_openmp_spinning(int(sys.argv[1]) + 1))
"""


@pytest.mark.parametrize(("spin_count", "spins"), [(20_000, False), (30_000_000_000, True)])
def test_spin_limit_set_before_torch_loads_decides_whether_idle_threads_spin(spin_count: int, spins: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(spin_count), str(ROOT)], capture_output=True, text=True,
                         check=True, timeout=60, env=env).stdout.split()
    idle_cpu_s, changed_later = float(out[0]), out[1]
    assert (idle_cpu_s > 0.2) if spins else (idle_cpu_s < 0.1), idle_cpu_s
    assert changed_later == "False"  # once torch is loaded, another value is refused, not silently ignored


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 2),  # cgroup v2: a limit of 1.5 CPUs rounds up to 2
    ({"cpu.max": "max 100000\n"}, 8),  # v2, unlimited: the affinity mask
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),  # v1, unlimited
    ({"cpu.max": "3200000 100000\n"}, 8),  # a quota above the cores this process may run on
    ({}, 8),  # no cgroup files at all
])
def test_available_cpus_honours_a_container_cpu_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       files: dict[str, str], expected: int) -> None:
    from cpu_runtime import available_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_cpus(str(tmp_path)) == expected
