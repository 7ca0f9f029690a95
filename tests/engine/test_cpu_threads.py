"""torch's thread count fitted to the CPUs a container may use (cgroup quotas in both cgroup versions)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.engine import cpu_threads


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "max 100000"}, None),
        ({"cpu.max": "250000 100000"}, 2.5),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
        ({}, None),
    ],
    ids=["v2-unlimited", "v2-limit", "v1-unlimited", "v1-limit", "no-cgroup-files"],
)
def test_cgroup_cpu_quota(tmp_path, files, quota):
    assert cpu_threads.cgroup_cpu_quota(write(tmp_path, files)) == quota


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_come_down_to_the_quota_never_up(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads.os, "sched_getaffinity", lambda pid: set(range(64)))
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 1.5)  # a 1500m limit: one thread
    assert cpu_threads.fit_torch_threads() == 1
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: None)  # 64 usable CPUs: 2 stays 2
    assert cpu_threads.fit_torch_threads() == 2


def test_omp_num_threads_is_the_users_choice(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 1.0)
    torch.set_num_threads(2)
    assert cpu_threads.fit_torch_threads() == 2
