"""A study on a real Slurm cluster (the one-node test cluster of scripts/slurm_cluster.sh),
and the cell claims that keep two studies on one folder from training a cell twice at once.

The `slurm` tests need the cluster (conftest.py starts it when HNFM_SLURM_CLUSTER=start, as
CI does; otherwise they skip, except under CI=true). The claim tests run anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import expensive, make_spec, make_study_inputs

from pipeline import study, study_spec

pytestmark = pytest.mark.slow  # runs studies on the Slurm test cluster

REPO = Path(__file__).resolve().parent.parent
#: Cells long enough (a few seconds) that a cancel, a requeue or a second study lands mid-run.
LONG = {"epochs": 12, "patience": 12}
#: One CPU and a little memory per task: the test cluster has the machine's 2 cores.
OPTIONS = study.SlurmOptions(time_min=10, gpus_per_node=0, mem_gb=2, cpus_per_task=1)


@pytest.fixture(scope="module")
@expensive
def inputs(tmp_path_factory):
    return make_study_inputs(tmp_path_factory.mktemp("slurm_inputs"))


#: Cells long enough (~10 s on a quiet core) that a task is still training when the test
#: cancels it: with LONG's ~3-s cells a quiet machine finished the task first. (An epoch of these
#: cells costs ~0.05 s since training scores the fit rows every fifth epoch only.)
SLOW = LONG | {"epochs": 150, "patience": 150}
#: Cells of ~20 s on a quiet core, for a kill that must land mid-training (the requeue's
#: KillWait is 5 s; the whole array's scancel must find both cells training).
SLOWER = LONG | {"epochs": 350, "patience": 350}


def long_spec(inputs, folder: Path, n_folds: int = 2, train: dict | None = None) -> study_spec.StudySpec:
    spec = make_spec(inputs, folder, configs=("baseline",), n_folds=n_folds, peers=())
    return study_spec.StudySpec.from_dict(spec.to_dict() | {"train": spec.train | (LONG if train is None else train)})


@pytest.fixture(scope="module")
@expensive
def reference(inputs, tmp_path_factory):
    """The local pool's out-of-fold risks of the long baseline spec, per cell."""
    spec = long_spec(inputs, tmp_path_factory.mktemp("reference") / "s")
    outcome = study.run_study(spec, executor="local", workers=1)
    assert outcome.ok, outcome.failed
    return oof_of(spec)


def oof_of(spec: study_spec.StudySpec) -> dict[str, pd.DataFrame]:
    return {
        c.key: pd.read_csv(study_spec.cell_dir(spec, c) / "oof.csv")
        for c in study_spec.grid(spec)
        if study_spec.cell_done(spec, c)
    }


def claim_events(spec: study_spec.StudySpec, cell: study_spec.Cell) -> list[dict]:
    log = study.claim_path(spec, cell).with_suffix(".log")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def assert_one_holder_at_a_time(events: list[dict]) -> None:
    """Claims and releases never interleave: each claim is released (or its holder died,
    leaving no release) before the next claim."""
    holder = None
    for ev in events:
        if ev["event"] == "claimed":
            assert holder is None or not _alive(holder), f"claimed by {ev['pid']} while {holder} held it"
            holder = ev["pid"]
        elif ev["event"] == "released":
            assert ev["pid"] == holder, f"{ev['pid']} released a claim held by {holder}"
            holder = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(pred, timeout: float, step: float = 0.5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


# --- claims, without Slurm --------------------------------------------------------------------

STUDY_RUN = """
import json, sys
from pipeline import study, study_spec
spec = study_spec.StudySpec.from_dict(json.loads(open(sys.argv[1]).read()))
out = study.run_study(spec, executor="local", workers=1)
print(json.dumps({"ran": out.ran, "skipped": out.skipped, "failed": out.failed, "waited": out.waited}))
"""


def test_two_studies_on_one_folder_never_train_a_cell_at_once(inputs, reference, tmp_path):
    spec = long_spec(inputs, tmp_path / "s")
    study.prepare_study(spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    cmd = [sys.executable, "-c", STUDY_RUN, str(tmp_path / "spec.json")]
    # Both start at once (one worker each, cells in the same order): they meet on a cell.
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    # Every cell trained once, by one of them; the other skipped it after waiting, and said so.
    ran = results[0]["ran"] + results[1]["ran"]
    assert sorted(ran) == sorted(c.key for c in study_spec.grid(spec))
    waiter = [i for i, r in enumerate(results) if r["waited"]]
    assert waiter, results
    assert "is being trained by" in outs[waiter[0]][1] and "waiting" in outs[waiter[0]][1]
    assert set(results[waiter[0]]["waited"]) <= set(results[waiter[0]]["skipped"])
    for cell in study_spec.grid(spec):
        events = claim_events(spec, cell)
        assert_one_holder_at_a_time(events)
    # And the numbers are the local pool's.
    got = oof_of(spec)
    assert set(got) == set(reference)
    for key, frame in reference.items():
        pd.testing.assert_frame_equal(got[key], frame)


HOLD = """
import json, sys, time
from pipeline import study, study_spec
spec = study_spec.StudySpec.from_dict(json.loads(open(sys.argv[1]).read()))
with study.claim_cell(spec, study_spec.grid(spec)[0]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_dead_owner_does_not_hold_its_cell(inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline",), n_folds=2, peers=())
    study.prepare_study(spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    owner = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "spec.json")], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout.readline().strip() == "held"
        holder = json.loads(study.claim_path(spec, study_spec.grid(spec)[0]).read_text())
        assert holder["pid"] == owner.pid and holder["host"]
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
    t0 = time.monotonic()
    res = study.run_cell(spec, study_spec.grid(spec)[0])
    assert not res["skipped"] and "waited_for" not in res
    assert time.monotonic() - t0 < 120
    events = claim_events(spec, study_spec.grid(spec)[0])
    assert [e["event"] for e in events] == ["claimed", "claimed", "released"]
    assert events[0]["pid"] == owner.pid and events[1]["pid"] == os.getpid()


# --- on the Slurm cluster ---------------------------------------------------------------------


def _squeue(job: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i %T"], capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if line.strip())


@pytest.mark.slurm
def test_an_array_job_gives_the_local_pools_numbers(slurm_cluster, inputs, reference, tmp_path):
    spec = long_spec(inputs, tmp_path / "s")
    seen = []
    outcome = study.run_study(spec, executor="submitit", cluster="slurm", slurm=OPTIONS, on_result=seen.append)
    assert outcome.ok, (outcome.failed, outcome.logs)
    assert len(outcome.job_ids) == 2 and len({j.split("_")[0] for j in outcome.job_ids}) == 1
    assert sorted(outcome.ran) == sorted(reference) and sorted(r["cell"] for r in seen) == sorted(reference)
    got = oof_of(spec)
    for key, frame in reference.items():
        pd.testing.assert_frame_equal(got[key], frame)
    # Each task claimed its cell under its Slurm job id.
    for cell in study_spec.grid(spec):
        claims = [e for e in claim_events(spec, cell) if e["event"] == "claimed"]
        assert len(claims) == 1 and claims[0]["slurm_job"] in outcome.job_ids


# run-study itself, with its input preparation (cohort, cache, embeddings) stubbed: the
# inputs fixture made them already, with sizes run-study's preparation would redo.
RUN_STUDY = """
import sys
import pipeline.cli.study as cli
cli.prepare_inputs = lambda spec, **kw: {}
sys.argv[0] = "run-study"
cli.run_study()
"""


@pytest.mark.slurm
def test_run_study_notices_a_cancelled_task_names_it_and_the_rerun_completes_it(slurm_cluster, inputs, tmp_path):
    local = long_spec(inputs, tmp_path / "local", train=SLOW)
    outcome = study.run_study(local, executor="local", workers=2)
    assert outcome.ok, outcome.failed
    reference = oof_of(local)
    train = tmp_path / "train.json"
    train.write_text(json.dumps(local.train))
    args = [
        "--manifest",
        str(inputs["manifest"]),
        "--cache",
        str(inputs["cache"]),
        "--configs",
        "baseline",
        "--n-folds",
        "2",
        "--peers",
        "none",
        "--train-config",
        str(train),
        "--out",
        str(tmp_path / "s"),
        "--report-dir",
        str(tmp_path / "r"),
        "--executor",
        "submitit",
        "--cluster",
        "slurm",
        "--gpus-per-node",
        "0",
        "--mem",
        "2",
        "--cpus",
        "1",
        "--time",
        "10",
    ]
    env = os.environ | {"HNFM_SLURM_POLL_S": "3"}
    run = subprocess.Popen(
        [sys.executable, "-c", RUN_STUDY, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    spec, _ = None, None
    try:
        assert _wait(lambda: (tmp_path / "s" / "study.json").is_file(), 120)
        spec, _ = study_spec.load_study(tmp_path / "s")
        cell1 = study_spec.grid(spec)[1]
        # Cancel task 1 once it is training; task 0 goes on.
        assert _wait(lambda: any(e["event"] == "claimed" for e in claim_events(spec, cell1)), 180), (
            "task 1 never claimed its cell"
        )
        job = claim_events(spec, cell1)[0]["slurm_job"]
        subprocess.run(["scancel", job], check=True)
        t_cancel = time.monotonic()
        out, err = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, out + err
    # Noticed within a minute of the cancel (sacct fails on this cluster: no accounting).
    assert time.monotonic() - t_cancel < 60 + 30, "run-study took too long to notice"
    assert "cancelled (their Slurm tasks ended without a result): baseline/fold_1" in err, err
    assert f"Slurm task {job} ended without a result" in err
    assert "resume with: run-study " in err and "--executor submitit" in err.split("resume with:")[1]
    assert study_spec.cell_done(spec, study_spec.grid(spec)[0]) and not study_spec.cell_done(spec, cell1)
    # The command it names completes the study, with the local pool's numbers.
    again = subprocess.run(
        [sys.executable, "-c", RUN_STUDY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    got = oof_of(spec)
    for key, frame in reference.items():
        pd.testing.assert_frame_equal(got[key], frame)
    assert_one_holder_at_a_time(claim_events(spec, cell1))


@pytest.mark.slurm
def test_a_failing_task_is_named_with_its_log(slurm_cluster, inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline",), n_folds=2, peers=())
    study.prepare_study(spec)
    run_json = spec.run_dir(study_spec.Configuration()) / "run.json"
    rec = json.loads(run_json.read_text())
    rec["config_hash"] = "0" * 16  # a planted error: both cells refuse this folder
    run_json.write_text(json.dumps(rec))
    os.environ["HNFM_SLURM_POLL_S"] = "2"
    try:
        outcome = study.run_submitit(spec, study_spec.grid(spec), cluster="slurm", options=OPTIONS)
    finally:
        del os.environ["HNFM_SLURM_POLL_S"]
    assert set(outcome.failed) == {"baseline/fold_0", "baseline/fold_1"} and not outcome.cancelled
    assert all("config_hash differs" in e for e in outcome.failed.values()), outcome.failed
    for log in outcome.logs.values():
        assert Path(log).is_file() and "config_hash differs" in Path(log).read_text()


@pytest.mark.slurm
def test_a_requeued_task_never_trains_its_cell_twice_at_once(slurm_cluster, inputs, tmp_path):
    # A cell long enough (~20 s) that the requeue's kill (KillWait = 5 s) lands mid-training.
    spec = long_spec(inputs, tmp_path / "s", train=SLOWER)
    study.prepare_study(spec)
    cell = study_spec.grid(spec)[0]
    os.environ["HNFM_SLURM_POLL_S"] = "2"
    try:
        import submitit

        executor = submitit.AutoExecutor(folder=spec.root / "submitit" / "%j", cluster="slurm")
        executor.update_parameters(name="hnfm-requeue", **OPTIONS.parameters("slurm"))
        job = executor.submit(study.run_cell, spec, cell)
        assert _wait(lambda: any(e["event"] == "claimed" for e in claim_events(spec, cell)), 180)
        first = claim_events(spec, cell)[0]
        subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
        outcome = study.StudyOutcome()
        study.wait_slurm_tasks([cell], [job], outcome)
    finally:
        del os.environ["HNFM_SLURM_POLL_S"]
    events = claim_events(spec, cell)
    claims = [e for e in events if e["event"] == "claimed"]
    assert outcome.ok, (outcome.failed, outcome.logs, events)
    # The first run was killed holding the claim (no release); the requeued run claimed it
    # after, trained it and released it.
    assert len(claims) == 2 and claims[0]["pid"] == first["pid"] and claims[1]["pid"] != first["pid"], events
    assert [e["event"] for e in events if e["event"] != "waiting"] == ["claimed", "claimed", "released"], events
    assert claims[0]["slurm_job"] == claims[1]["slurm_job"] == str(job.job_id)
    assert_one_holder_at_a_time(events)
    assert study_spec.cell_done(spec, cell)


@pytest.mark.slurm
def test_scancel_of_the_whole_array_is_noticed_and_every_cell_named(slurm_cluster, inputs, tmp_path):
    spec = long_spec(inputs, tmp_path / "s", train=SLOWER)  # the cancel lands while both train
    study.prepare_study(spec)
    cells = study_spec.grid(spec)
    cancelled_at = []

    def cancel_when_training():
        if _wait(lambda: any(e["event"] == "claimed" for e in claim_events(spec, cells[0])), 180):
            array = claim_events(spec, cells[0])[0]["slurm_job"].split("_")[0]
            subprocess.run(["scancel", array], check=True)
            cancelled_at.append(time.monotonic())

    import threading

    canceller = threading.Thread(target=cancel_when_training, daemon=True)
    canceller.start()
    os.environ["HNFM_SLURM_POLL_S"] = "2"
    try:
        outcome = study.run_submitit(spec, cells, cluster="slurm", options=OPTIONS)
    finally:
        del os.environ["HNFM_SLURM_POLL_S"]
    canceller.join(timeout=10)
    assert cancelled_at, "no task started training"
    assert time.monotonic() - cancelled_at[0] < 60, "the cancel was not noticed within a minute"
    assert sorted(outcome.cancelled) == sorted(c.key for c in cells) == sorted(outcome.failed), outcome.failed
    assert all("ended without a result" in e for e in outcome.failed.values())
    assert not any(study_spec.cell_done(spec, c) for c in cells)
