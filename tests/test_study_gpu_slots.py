"""Cells side by side on GPUs: how many per GPU, which worker gets which GPU, and that a cell's
numbers do not depend on its neighbours. On a CPU machine the GPUs are fake device slots (ids in
``CUDA_VISIBLE_DEVICES`` that no CUDA runtime reads); the scheduling is the real pool's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import expensive, make_spec, make_study_inputs

from pipeline import study, study_spec
from pipeline.artefacts import read_json
from pipeline.pool import Job


def test_cells_per_gpu_is_the_request_else_four_capped_by_the_fullest_gpu():
    assert study.cells_per_gpu(["0"], requested=3) == 3
    assert study.cells_per_gpu(["0", "1"], free_gib=[80.0, 70.0]) == study.DEFAULT_CELLS_PER_GPU == 4
    # The GPU with the least free memory decides: 0.9 x 20 GiB holds two 8 GiB cells.
    assert study.cells_per_gpu(["0", "1"], free_gib=[80.0, 20.0]) == 2
    assert study.cells_per_gpu(["0"], free_gib=[3.0]) == 1  # at least one
    assert study.cells_per_gpu([]) == 1
    with pytest.raises(ValueError, match="cells per GPU must be >= 1, got 0"):
        study.cells_per_gpu(["0"], requested=0)


def test_device_slots_spread_workers_over_gpus_first():
    assert study.device_slots(["0", "1"], 5) == ["0", "1", "0", "1", "0"]
    assert study.device_slots([], 2) == [None, None]


def _record_slot(folder: str, i: int, workers: int) -> dict:
    """A job that says which GPU its worker was pinned to, then waits until every worker holds
    a job (so all workers take part), up to a minute."""
    here = Path(folder)
    (here / f"{i}.{os.getpid()}.{os.environ.get('CUDA_VISIBLE_DEVICES')}").write_text(str(time.time()))
    deadline = time.time() + 60
    while len({p.name.split(".")[1] for p in here.iterdir()}) < workers and time.time() < deadline:
        time.sleep(0.05)
    return {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}


def test_each_fake_gpu_gets_its_group_of_workers_and_no_more(tmp_path):
    gpus, per_gpu = ["fake0", "fake1"], 2
    jobs = [Job(f"j{i}", _record_slot, (str(tmp_path), i, len(gpus) * per_gpu)) for i in range(8)]
    outcome = study.run_pool(jobs, len(gpus) * per_gpu, gpus=gpus, on_result=None)
    assert outcome.ok, outcome.failed
    pinned: dict[str, set[str]] = {}
    for path in tmp_path.iterdir():
        _, pid, gpu = path.name.split(".")
        pinned.setdefault(gpu, set()).add(pid)
    # Every worker took part; each GPU's group is per_gpu processes, so at most per_gpu cells at once.
    assert {gpu: len(pids) for gpu, pids in pinned.items()} == {"fake0": per_gpu, "fake1": per_gpu}


@pytest.fixture(scope="module")
@expensive
def inputs(tmp_path_factory):
    return make_study_inputs(tmp_path_factory.mktemp("slot_inputs"))


@pytest.mark.slow
def test_cells_side_by_side_on_one_fake_gpu_give_the_numbers_of_one_at_a_time(inputs, tmp_path):
    cells = [study_spec.Cell(study_spec.Configuration(), k) for k in range(2)]
    alone = make_spec(inputs, tmp_path / "alone", configs=("baseline",), n_folds=2)
    study.prepare_study(alone)
    for cell in cells:
        study.run_cell(alone, cell)
    shared = make_spec(inputs, tmp_path / "shared", configs=("baseline",), n_folds=2)
    study.prepare_study(shared)
    outcome = study.run_local(shared, cells, gpus=["fake0"], per_gpu=2)
    assert outcome.ok, outcome.failed
    assert sorted(outcome.ran) == sorted(c.key for c in cells)
    for cell in cells:
        a, b = study_spec.cell_dir(alone, cell), study_spec.cell_dir(shared, cell)
        assert (a / "oof.csv").read_bytes() == (b / "oof.csv").read_bytes(), cell.key
        assert read_json(a / "done.json")["protocols"] == read_json(b / "done.json")["protocols"]
    shared_cells = [read_json(study_spec.cell_dir(shared, c) / "cell.json") for c in cells]
    assert [c["cuda_visible_devices"] for c in shared_cells] == ["fake0", "fake0"]
