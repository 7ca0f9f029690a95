"""How many threads torch computes with on the CPU: no more than the CPUs this process may run on, nor than
its cgroup's CPU quota (a container's CPU limit), which torch does not read.

torch starts one OpenMP thread per core it sees, and a pod limited to 2 CPUs on a 64-core node sees 64. The
threads beyond the quota are throttled while the others spin-wait for them at every op: on a busy 2-core
host, two threads against a share of about one made a warm-up 10x slower than one thread.
OMP_NUM_THREADS, when set, is the operator's choice and is left alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time per period the cgroup may use (cgroup v2 or v1); None without a limit."""
    v2 = root / "cpu.max"
    if v2.is_file():
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    for controller in ("cpu", "cpu,cpuacct"):
        quota_file = root / controller / "cpu.cfs_quota_us"
        period_file = root / controller / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text())
            return None if quota_us < 0 else quota_us / int(period_file.read_text())
    return None


def fit_torch_threads() -> int:
    """Lower torch's thread count to what the process may use (never raise it); returns the count."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    usable = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota()
    if quota is not None:
        usable = min(usable, max(1, int(quota)))  # a fraction of a CPU more would only be throttled
    if torch.get_num_threads() > usable:
        logger.info("computing with %d torch threads: the CPUs this process may use", usable)
        torch.set_num_threads(usable)
    return torch.get_num_threads()
