"""How many trainings run at once, and on what: pipeline.runtime's choices."""

from __future__ import annotations

import os

import pytest

from pipeline import runtime


@pytest.mark.parametrize("cpus,jobs,threads,expected", [
    (4, 5, 1, 4), (4, 3, 1, 3), (4, 5, 2, 2), (4, 5, 8, 1), (1, 5, 1, 1), (2, 0, 1, 1)])
def test_default_workers_fill_the_usable_cpus_and_never_exceed_the_jobs(monkeypatch, cpus, jobs, threads, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert runtime.usable_cpus() == cpus
    assert runtime.default_workers(jobs, threads, on_gpu=False) == expected
    assert runtime.default_workers(jobs, threads, on_gpu=True) == 1


def test_usable_cpus_is_the_affinity_mask_not_the_machine():
    assert runtime.usable_cpus() == len(os.sched_getaffinity(0)) <= (os.cpu_count() or 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2x"])
def test_thread_counts_are_checked_naming_the_value(bad):
    with pytest.raises((ValueError, TypeError), match=repr(bad) if not isinstance(bad, str) else None):
        runtime.check_threads(bad)
