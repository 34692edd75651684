"""CPU runtime tuning for inference (glibc's allocator, OpenMP's idle threads, torch's threads)."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed blocks instead of unmapping them (True if it took effect).

    By default every forward pass mmaps its large activation buffers afresh and munmaps them after,
    paying page faults each batch; keeping them roughly doubles eager CPU throughput here (see README).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def limit_openmp_spinning(spin_count: int) -> bool:
    """Let torch's idle OpenMP threads busy-wait `spin_count` rounds, then sleep (GNU OpenMP's GOMP_SPINCOUNT).

    libgomp's default, 300000 rounds (a few ms: libgomp estimates 100000 rounds per ms), keeps a thread that
    waits for the next layer, or for a teammate the scheduler took off its core, burning a core that the event
    loop, decoding or that teammate needs. 20000 rounds (a fraction of a millisecond) still cover the gap between
    two layers; with fewer, a thread falls asleep between layers and waking it costs more than it saved (the
    README's Performance section). libgomp reads the variable once, when torch loads: False if torch is loaded
    already with another value. An OMP_WAIT_POLICY in the environment is the operator's choice and is left alone.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return True
    if "torch" in sys.modules:
        return os.environ.get("GOMP_SPINCOUNT") == str(spin_count)
    os.environ["GOMP_SPINCOUNT"] = str(spin_count)
    return True


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's CPU limit).

    Torch sizes its thread pool by the cores it sees; in a container limited to 2 CPUs on a 32-core node
    that is 32 threads sharing 2 CPUs' worth of time.
    """
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(root: str) -> float | None:
    """CPUs' worth of time per period from cgroup v2 (cpu.max) or v1 (cfs quota/period); None if unlimited."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()  # cgroup v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:
            quota = Path(root, "cpu", "cpu.cfs_quota_us").read_text().strip()  # cgroup v1: -1 when unlimited
            period = Path(root, "cpu", "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def torch_threads(count: int = 0) -> int:
    """Torch's intra-op threads on this thread, after setting them to `count` if given; 0 without torch.

    The service sets them where the model runs (the model thread, or a model process), before the task's
    get_model; a task that does not use torch is left alone.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    if count and torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return int(torch.get_num_threads())
