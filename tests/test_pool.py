"""The one process-pool executor (pipeline.pool) and how preprocessing names its failures."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

from pipeline.pool import WORKER_DIED, Job, JobFailed, JobPool, format_progress, progress_of
from pipeline.preprocess import CaseError, _case_error


def _square(x: int) -> dict:
    return {"x": x * x}


def _bad(x: int) -> dict:
    raise ValueError(f"bad input {x}")


def _noisy(i: int) -> dict:
    warnings.warn("the same caveat in every job", UserWarning, stacklevel=1)
    logging.getLogger("pipeline.pool").warning("the same log line in every job")
    return {"i": i}


def test_progress_states_done_elapsed_and_remaining():
    p = progress_of(3, 13, 90.0)
    assert p["remaining_s"] == pytest.approx(300.0)
    assert format_progress(p) == "3/13, 1m30s elapsed, ~5m00s left"
    assert format_progress(progress_of(13, 13, 4000.0)) == "13/13, 1h06m elapsed"


def test_a_failing_job_is_named_keeps_its_error_and_the_others_run():
    jobs = [Job("a", _square, (2,)), Job("case X", _bad, (7,)), Job("c", _square, (3,))]
    with JobPool(in_process=True) as pool:
        done = list(pool.run(jobs))
    assert [d.job.key for d in done] == ["a", "case X", "c"]
    assert [d.value for d in done if d.ok] == [{"x": 4}, {"x": 9}]
    failed = done[1].failed
    assert (failed.key, failed.error) == ("case X", "ValueError: bad input 7")
    assert isinstance(failed.original, ValueError) and "_bad" in failed.trace and not failed.worker_died
    assert [d.progress["done"] for d in done] == [1, 2, 3] and done[-1].progress["remaining_s"] == 0
    with pytest.raises(JobFailed, match="^case X: ValueError: bad input 7$") as info:
        done[1].result()
    assert isinstance(info.value.__cause__, ValueError)


def test_a_dead_worker_fails_each_job_it_took_by_name_and_warnings_show_once(caplog):
    jobs = [Job(f"noisy/{i}", _noisy, (i,)) for i in range(3)] + [Job("dies", os._exit, (3,))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with JobPool(1) as pool:  # one spawned worker: the noisy jobs, then one that kills it
            done = {d.job.key: d for d in pool.run(jobs)}
    assert all(done[f"noisy/{i}"].value == {"i": i} for i in range(3))
    assert done["dies"].failed.worker_died and done["dies"].failed.error.startswith(WORKER_DIED)
    assert str(done["dies"].failed).startswith(f"dies: {WORKER_DIED}")
    assert [w.category for w in caught].count(UserWarning) == 1
    assert sum(r.getMessage() == "the same log line in every job" for r in caplog.records) == 1


def test_run_outside_its_with_block_is_refused():
    with pytest.raises(RuntimeError, match="with"):
        next(JobPool(2).run([Job("a", _square, (1,))]))
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        JobPool(0)


def test_preprocessing_raises_the_case_error_or_names_the_case_whose_worker_died():
    own = CaseError("case 'A': file not found: a.nii.gz")
    assert _case_error(JobFailed("A", "CaseError: ...", None, own)) is own
    died = _case_error(JobFailed("B", f"{WORKER_DIED}: BrokenProcessPool: terminated"))
    assert isinstance(died, CaseError)
    assert str(died).startswith(f"case 'B': {WORKER_DIED}") and "rerun to resume" in str(died)
