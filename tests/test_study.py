"""Study runner: grid, shared folds, dry run, resume, local pool, submitit dispatch, CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import STUDY_N_CASES, TINY_TRAIN, expensive, make_spec, make_study_inputs

from pipeline import study, study_spec
from pipeline.artefacts import ProvenanceError, read_json


@pytest.fixture(scope="module")
@expensive
def inputs(tmp_path_factory):
    return make_study_inputs(tmp_path_factory.mktemp("study_inputs"))


# --- grid -------------------------------------------------------------------------------------


def test_grid_is_13_configurations_and_65_cells():
    confs = study_spec.configurations()
    assert len(confs) == 13
    assert confs[0].name == "baseline" and confs[0].encoders == () and confs[0].group == "baseline"
    names = [c.name for c in confs]
    assert len(set(names)) == 13
    for set_name, encoders in (("ct", ("ct",)), ("pet", ("pet",)), ("ctpet", ("ct", "pet"))):
        rows = [c for c in confs if c.embedding_set == set_name]
        assert [c.proj for c in rows] == [64, 128, 256, None]
        assert all(c.encoders == encoders and c.group == set_name for c in rows)
    spec = study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/s")
    cells = study_spec.grid(spec)
    assert len(cells) == 65 and len({c.key for c in cells}) == 65
    assert {c.fold for c in cells} == set(range(5))
    # Names round-trip, bad ones are refused naming the value.
    assert all(study_spec.Configuration.from_name(n) == c for n, c in zip(names, confs))
    with pytest.raises(ValueError, match="'ct-d7x'"):
        study_spec.Configuration.from_name("ct-d7x")
    with pytest.raises(ValueError, match="need an embeddings file"):
        study_spec.StudySpec("m.csv", "c", None, "/tmp/s")
    with pytest.raises(ValueError, match="proj"):
        study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/s", train={"proj": 64})


def test_spec_round_trips_and_hash_ignores_folder_and_grid_size():
    a = study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/a", train={"epochs": 3})
    assert study_spec.StudySpec.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    b = study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/b", train={"epochs": 3}, configs=("baseline",))
    assert a.hash == b.hash
    assert a.hash != study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/a", train={"epochs": 4}).hash
    cfg = study.train_config(a, study_spec.Configuration("pet", 128), input_size=(24, 40, 40))
    assert cfg.proj == 128 and cfg.epochs == 3 and tuple(cfg.model["input_size"]) == (24, 40, 40)
    assert study.train_config(a, study_spec.Configuration("ct", None)).proj is None


def test_seeds_add_cells_in_their_own_folders_and_leave_the_hash_and_seed_0_alone():
    one = study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/s", configs=("baseline", "ct-d64"))
    three = study_spec.StudySpec(
        "m.csv", "c", "e.h5", "/tmp/s", configs=("baseline", "ct-d64"), seeds=3, seed_configs=("baseline",)
    )
    assert three.hash == one.hash  # growing the seeds keeps finished cells valid, as repeats do
    assert study_spec.StudySpec.from_dict(json.loads(json.dumps(three.to_dict()))) == three
    cells = study_spec.grid(three)
    assert cells[:10] == study_spec.grid(one)  # today's cells first, unchanged
    assert [c.key for c in cells[10:]] == [f"seed{s}/baseline/fold_{k}" for s in (1, 2) for k in range(5)]
    base = study_spec.Configuration()
    assert three.run_dir(base) == one.run_dir(base) == Path("/tmp/s/runs/baseline")
    assert three.run_dir(base, seed=2) == Path("/tmp/s/seeds/2/runs/baseline")
    assert [c.name for c in three.seed_configurations()] == ["baseline"]
    assert len(study_spec.grid(study_spec.StudySpec.from_dict(three.to_dict() | {"seed_configs": None}))) == 30
    # Seed s trains with seed + s on seed 0's inner split; seed 0 is the study's config unchanged.
    assert study.train_config(three, base) == study.train_config(one, base)
    cfg = study.train_config(three, base, seed=2)
    assert (cfg.seed, cfg.split_seed) == (44, 42)
    own = study_spec.StudySpec("m.csv", "c", None, "/tmp/s", configs=("baseline",), train={"seed": 7}, seeds=2)
    assert (study.train_config(own, base, seed=1).seed, study.train_config(own, base, seed=1).split_seed) == (8, 7)
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/s", seeds=0)
    with pytest.raises(ValueError, match="'basline'"):
        study_spec.StudySpec("m.csv", "c", "e.h5", "/tmp/s", seeds=2, seed_configs=("basline",))


# --- preparation, dry run, resume ----------------------------------------------------------------


@pytest.mark.slow
def test_prepare_shares_one_folds_file_and_dry_run_lists_pending(inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s")
    rec = study.prepare_study(spec, info={"settings": "test"})
    assert rec["cohort"]["n_cases"] == STUDY_N_CASES
    assert rec["embeddings"]["random_init"] is True
    runs = [read_json(spec.run_dir(c) / "run.json") for c in spec.configurations()]
    assert len(runs) == 13
    # Identical folds for every configuration; only proj and the modalities differ.
    assert len({r["folds_hash"] for r in runs}) == 1
    assert {tuple(r["modalities"]) for r in runs} == {(), ("ct",), ("pet",), ("ct", "pet")}
    by_name = {c.name: r for c, r in zip(spec.configurations(), runs)}
    assert {by_name[f"pet-d{d}"]["config"]["proj"] for d in ("64", "128", "256", "orig")} == {64, 128, 256, None}
    assert len({r["config_hash"] for r in runs}) == 4  # the baseline shares proj=None with "orig"
    status = study_spec.cell_status(spec)
    assert len(status) == 65 and not status["done"].any()
    text = study_spec.format_status(status)
    assert "65 cells: 0 done, 65 pending" in text and "ctpet-dorig/fold_4" in text
    # A second preparation with other settings is refused, naming the folder.
    other = study_spec.StudySpec.from_dict(spec.to_dict() | {"train": spec.train | {"epochs": 3}})
    with pytest.raises(ProvenanceError, match="other settings"):
        study.prepare_study(other)


@pytest.mark.slow
def test_run_cell_trains_writes_marker_and_resume_skips(inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline", "ctpet-d64"))
    study.prepare_study(spec)
    cell = study_spec.Cell(study_spec.Configuration("ctpet", 64), 1)
    res = study.run_cell(spec, cell)
    assert not res["skipped"]
    folder = study_spec.cell_dir(spec, cell)
    done = read_json(folder / "done.json")
    assert done["fold"] == 1 and set(done["protocols"]) == {"paper", "inner"}
    assert (folder / "oof.csv").is_file() and (folder / "cell.json").is_file()
    assert read_json(folder / "cell.json")["seconds"] > 0
    # The fold's validation cases are exactly fold 1 of the shared folds file.
    from pipeline.splits import load_folds

    folds = load_folds(spec.folds_path)
    oof = pd.read_csv(folder / "oof.csv")
    assert set(oof["case_id"]) == set(folds.loc[folds["fold"] == 1, "case_id"])
    mtime = (folder / "done.json").stat().st_mtime_ns
    again = study.run_cell(spec, cell)
    assert again["skipped"] and again["record"] == done
    assert (folder / "done.json").stat().st_mtime_ns == mtime
    status = study_spec.cell_status(spec).set_index("cell")
    assert status.loc["ctpet-d64/fold_1", "done"] and not status.loc["ctpet-d64/fold_0", "done"]
    assert int(status["done"].sum()) == 1


@pytest.mark.slow
def test_local_pool_runs_only_pending_cells(inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline",), n_folds=2)
    study.prepare_study(spec)
    first = study_spec.Cell(study_spec.Configuration(), 0)
    study.run_cell(spec, first)
    marker = study_spec.cell_dir(spec, first) / "done.json"
    before = marker.stat().st_mtime_ns
    seen = []
    outcome = study.run_study(spec, executor="local", workers=2, on_result=seen.append)
    assert outcome.ok, outcome.failed
    assert outcome.ran == ["baseline/fold_1"] and "baseline/fold_0" in outcome.skipped
    assert [r["cell"] for r in seen] == ["baseline/fold_1"]
    assert marker.stat().st_mtime_ns == before
    assert study_spec.cell_status(spec)["done"].all()
    # The cell computed on the configuration's thread count (TrainConfig.threads, default 1),
    # not on a share of the cores: its record holds the count in force in the training
    # (torch.get_num_threads() there), not the setting read back.
    folder = study_spec.cell_dir(spec, study_spec.Cell(study_spec.Configuration(), 1))
    env = read_json(folder / "done.json")["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["deterministic"] is True


@pytest.mark.slow
def test_local_pool_reports_a_failing_cell_and_continues(inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline",), n_folds=2)
    study.prepare_study(spec)
    # Corrupt one configuration's provenance: that cell must fail loudly, the other run.
    run_json = spec.run_dir(study_spec.Configuration()) / "run.json"
    rec = read_json(run_json)
    rec["config_hash"] = "0" * 16
    run_json.write_text(json.dumps(rec))
    outcome = study.run_local(spec, study_spec.grid(spec), workers=1)
    assert set(outcome.failed) == {"baseline/fold_0", "baseline/fold_1"}
    assert all("config_hash differs" in e for e in outcome.failed.values())


def _read_embeddings_job(path: str) -> dict:
    from pipeline.embeddings import read_embeddings

    return {"n": len(read_embeddings(path).case_ids)}


def _failing_job(x: int) -> dict:
    raise RuntimeError(f"bad input {x}")


def _noisy_job(i: int) -> dict:
    import logging

    warnings.warn("the same caveat in every job", UserWarning, stacklevel=1)
    logging.getLogger("pipeline.splits").warning("the same log line in every job")
    return {"i": i}


@pytest.mark.slow
def test_random_init_is_stated_once_per_run_and_pool_failures_are_named(inputs, tmp_path, capfd, caplog):
    import os

    from pipeline.embeddings import RandomInitWarning

    spec = make_spec(inputs, tmp_path / "s", configs=("ct-d64",))
    reads = [study.Job(f"read/{i}", _read_embeddings_job, (str(inputs["embeddings"]),)) for i in range(3)]
    noisy = [study.Job(f"noisy/{i}", _noisy_job, (i,)) for i in range(2)]
    bad = study.Job("cv0/bad/fold_0", _failing_job, (7,), ident={"cell": "cv0/bad/fold_0"})
    seen, shown = [], set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert study.announce_random_init(spec) is True
        here = study.run_pool(reads + noisy + [bad], in_process=True, on_result=seen.append, shown=shown)
        # One spawned worker: reads and noisy jobs, then a job that kills its process.
        pool = study.run_pool(reads + noisy + [study.Job("dies", os._exit, (3,))], workers=1, shown=shown)
    err = capfd.readouterr().err
    # Six embeddings reads (3 here, 3 in a worker), one statement; four noisy jobs, each notice once.
    kinds = [w.category for w in caught]
    assert kinds.count(RandomInitWarning) == 1 and kinds.count(UserWarning) == 1
    assert err.count("WARNING:") == 1 and "stated once per run" in err
    # Log records come back to this process and are logged here once (pytest's own handler
    # also sees the two in-process jobs' records directly; a console has no such handler).
    again = [
        r for r in caplog.records if r.getMessage() == "the same log line in every job" and r.filename == "pool.py"
    ]
    assert len(again) == 1
    assert here.ran == ["read/0", "read/1", "read/2", "noisy/0", "noisy/1"]
    assert here.failed == {"cv0/bad/fold_0": "RuntimeError: bad input 7"}
    assert [r["progress"]["done"] for r in seen] == [1, 2, 3, 4, 5, 6] and seen[-1]["progress"]["remaining_s"] == 0
    assert seen[-1]["cell"] == "cv0/bad/fold_0" and "_failing_job" in seen[-1]["traceback"]
    assert sorted(pool.ran) == ["noisy/0", "noisy/1", "read/0", "read/1", "read/2"]
    assert list(pool.failed) == ["dies"] and pool.failed["dies"].startswith("worker process died")


def test_gpu_slots_are_round_robin(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert study.visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert study.visible_gpus() == []


@pytest.mark.slow
def test_submitit_local_executor_runs_a_cell_and_leaves_its_marker(inputs, tmp_path):
    spec = make_spec(inputs, tmp_path / "s", configs=("pet-d128",))
    study.prepare_study(spec)
    cell = study_spec.Cell(study_spec.Configuration("pet", 128), 2)
    outcome = study.run_submitit(
        spec, [cell], cluster="local", options=study.SlurmOptions(time_min=10, gpus_per_node=0)
    )
    assert outcome.ok, outcome.failed
    assert outcome.ran == [cell.key] and len(outcome.job_ids) == 1
    assert (study_spec.cell_dir(spec, cell) / "done.json").is_file()
    assert (spec.root / "submitit").is_dir()
    assert study_spec.cell_status(spec).set_index("cell")["done"].sum() == 1


@pytest.mark.slow
def test_submitit_local_cluster_refuses_gpu_cells(inputs, tmp_path, monkeypatch):
    """Its local cluster would start every GPU cell at once on GPU 0: refused before submitting."""
    spec = make_spec(inputs, tmp_path / "s", configs=("pet-d128",))
    study.prepare_study(spec)
    cell = study_spec.Cell(study_spec.Configuration("pet", 128), 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="--executor local --workers 2"):
        study.run_submitit(spec, [cell], cluster="local", options=study.SlurmOptions(time_min=10, gpus_per_node=1))
    assert not (spec.root / "submitit").exists()
    assert not (study_spec.cell_dir(spec, cell) / "done.json").exists()


def test_slurm_options_map_to_submitit_parameters():
    opts = study.SlurmOptions(partition="gpu", time_min=90, gpus_per_node=1, mem_gb=48, cpus_per_task=8)
    p = opts.parameters("slurm")
    assert p == {
        "timeout_min": 90,
        "gpus_per_node": 1,
        "mem_gb": 48,
        "cpus_per_task": 8,
        "slurm_array_parallelism": 65,
        "slurm_partition": "gpu",
    }
    assert study.SlurmOptions().parameters("local") == {"timeout_min": 120, "gpus_per_node": 1}


@pytest.mark.slow
def test_cli_dry_run_and_help(inputs, tmp_path):
    from pipeline.cli.study import run_study

    runner = CliRunner()
    res = runner.invoke(run_study, ["--help"])
    assert res.exit_code == 0
    for opt in (
        "--demo",
        "--workers",
        "--executor",
        "--partition",
        "--time",
        "--gpus-per-node",
        "--mem",
        "--cpus",
        "--dry-run",
        "--ct-weights",
        "--pet-weights",
        "--report-only",
        "--repeats",
        "--loco",
        "--cnn-splits",
        "--peers",
        "--seeds",
        "--seed-configs",
        "--seed",
        "--split-seed",
    ):
        assert opt in res.output
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline", "ct-d64"), n_folds=2)
    study.prepare_study(spec)
    study.run_cell(spec, study_spec.Cell(study_spec.Configuration("ct", 64), 0))
    res = runner.invoke(run_study, ["--out", str(tmp_path / "s"), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = dict(line.split() for line in res.output.splitlines()[1:-1])
    cells = {k: v for k, v in lines.items() if not k.startswith("peers/")}
    assert cells == {
        "baseline/fold_0": "pending",
        "baseline/fold_1": "pending",
        "ct-d64/fold_0": "done",
        "ct-d64/fold_1": "pending",
    }
    # The peers (clinical, radiomics, one head per FM configuration) are listed too.
    assert {k for k in lines if k.startswith("peers/")} == {
        "peers/cv0/clinical-cox",
        "peers/cv0/radiomics-cox",
        "peers/cv0/head-ct-d64",
    }
    assert "4 cells: 1 done, 3 pending; 3 peer runs: 0 done" in res.output


def test_cli_gives_each_encoders_weights_to_the_inputs_and_the_training_options_to_the_spec(tmp_path, monkeypatch):
    """run-study's --<encoder>-weights come from the encoder registry, as extract-embeddings'
    do; they reach the embedding extraction, and the training options reach the spec."""
    import pipeline.cli.study as cli
    from pipeline.embedding_sets import ENCODERS, full_set

    help_text = " ".join(CliRunner().invoke(cli.run_study, ["--help"]).output.split())
    for entry in ENCODERS.values():
        assert entry.weights_option in help_text and f"${entry.weights_env}" in help_text
    assert f"embeddings/{full_set()}.h5" in help_text
    seen = {}

    def stop(spec, **kwargs):
        seen.update(kwargs, spec=spec)
        raise ValueError("inputs stop here")

    monkeypatch.setattr(cli, "prepare_inputs", stop)
    res = CliRunner().invoke(
        cli.run_study,
        [
            "--out",
            str(tmp_path / "s"),
            "--ct-weights",
            "ct.safetensors",
            "--epochs",
            "3",
            "--configs",
            "baseline,ct-d64",
        ],
    )
    assert res.exit_code == 1 and "inputs stop here" in res.output
    assert {k: v for k, v in seen.items() if k.endswith("_weights")} == {
        f"{e}_weights": ("ct.safetensors" if e == "ct" else None) for e in ENCODERS
    }
    assert seen["spec"].train["epochs"] == 3 and seen["spec"].embeddings.endswith(f"embeddings/{full_set()}.h5")


# The owner of a study: the local pool, two workers, every cell of the spec in the file given.
STUDY_OWNER = """
import json, sys
from pipeline import study, study_spec
spec = study_spec.StudySpec.from_dict(json.loads(open(sys.argv[1]).read()))
study.run_study(spec, executor="local", workers=2)
"""


@pytest.mark.slow
def test_a_study_killed_with_sigkill_leaves_no_worker_and_resumes(inputs, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from helpers import alive, pool_workers, wait_until

    # Cells long enough (a few seconds each) that the kill lands while the pool works.
    spec = make_spec(inputs, tmp_path / "s", configs=("baseline",), n_folds=4)
    spec = study_spec.StudySpec.from_dict(spec.to_dict() | {"train": spec.train | {"epochs": 12, "patience": 12}})
    study.prepare_study(spec)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    owner = subprocess.Popen(
        [sys.executable, "-c", STUDY_OWNER, str(tmp_path / "spec.json")],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cells = list(study_spec.grid(spec))
    done = lambda: [c for c in cells if study_spec.cell_layout(spec, c).is_done(c.fold)]  # noqa: E731
    try:
        assert wait_until(lambda: len(done()) >= 1, 240), "no cell finished"
        workers = pool_workers(owner.pid)
        assert workers, "the study's pool workers were not found"
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)
        assert wait_until(lambda: not any(alive(w) for w in workers), 10), "a worker outlived the killed study"
    finally:
        if owner.poll() is None:
            owner.kill()
    finished = done()
    assert len(finished) < len(cells), "every cell finished before the kill: nothing to resume"
    stamps = {c.key: study_spec.cell_layout(spec, c).done(c.fold).stat().st_mtime_ns for c in finished}
    outcome = study.run_study(spec, executor="local", workers=2)
    assert outcome.ok, outcome.failed
    assert sorted(outcome.skipped) == sorted(stamps) and len(outcome.ran) == len(cells) - len(stamps)
    assert {
        k: study_spec.cell_layout(spec, c).done(c.fold).stat().st_mtime_ns for c in cells if (k := c.key) in stamps
    } == stamps


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal of cuda on a CPU host")
@pytest.mark.slow
def test_run_study_device_reaches_the_embedding_extraction(inputs, tmp_path, monkeypatch):
    """`run-study --device` sets the encoders' device (and so their precision), not only training's."""
    import pipeline.demo as demo

    monkeypatch.setattr(demo, "preprocess_cohort", lambda *a, **k: None)  # the cache is complete already
    spec = study_spec.StudySpec.create(
        inputs["manifest"],
        inputs["cache"],
        tmp_path / "ctpet.h5",
        tmp_path / "s",
        train=json.loads(json.dumps(TINY_TRAIN)),
        configs=("pet-d128",),
    )
    with pytest.raises(ValueError, match="device 'cuda' requested but torch sees no CUDA device"):
        demo.prepare_inputs(spec, random_init=True, progress=False, device="cuda")
    assert not (tmp_path / "ctpet.h5").exists()


@pytest.mark.slow
def test_the_inner_split_follows_split_seed_not_the_training_seed(inputs):
    from pipeline.dataset import load_cohort
    from pipeline.splits import make_folds
    from pipeline.train import TrainConfig, prepare_fold

    cohort = load_cohort(inputs["manifest"], inputs["cache"])
    folds = make_folds(cohort.case_ids, cohort.time, cohort.event, n_splits=2, seed=42)
    inner = {
        (seed, split): prepare_fold(cohort, folds, 0, TrainConfig(seed=seed, split_seed=split)).inner.tolist()
        for seed, split in ((42, None), (43, 42), (44, 42), (43, None))
    }
    assert inner[(42, None)] == inner[(43, 42)] == inner[(44, 42)]  # the training seed leaves it alone
    assert inner[(43, None)] != inner[(42, None)]  # split_seed follows seed when not set (older runs)


@pytest.mark.slow
def test_run_study_seeds_trains_extra_seed_cells_resumes_and_keeps_seed_0_bit_identical(inputs, tmp_path):
    from pipeline.cli.study import run_study

    # The CLI builds the seed settings into the spec (dry run: no training).
    res = CliRunner().invoke(
        run_study,
        [
            "--manifest",
            str(inputs["manifest"]),
            "--cache",
            str(inputs["cache"]),
            "--embeddings",
            str(inputs["embeddings"]),
            "--out",
            str(tmp_path / "dry"),
            "--configs",
            "baseline,ct-d64",
            "--n-folds",
            "2",
            "--seeds",
            "3",
            "--seed-configs",
            "baseline",
            "--peers",
            "none",
            "--dry-run",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "seed2/baseline/fold_1" in res.output and "seed1/ct-d64" not in res.output
    assert "8 cells: 0 done, 8 pending" in res.output

    spec = make_spec(inputs, tmp_path / "s", configs=("baseline",), n_folds=2, seeds=2, peers=())
    outcome = study.run_study(spec, executor="local", workers=2)
    keys = ["baseline/fold_0", "baseline/fold_1", "seed1/baseline/fold_0", "seed1/baseline/fold_1"]
    assert outcome.ok, outcome.failed
    assert sorted(outcome.ran) == sorted(keys) and [c.key for c in study_spec.grid(spec)] == keys
    run0, run1 = spec.run_dir(study_spec.Configuration()), spec.root / "seeds" / "1" / "runs" / "baseline"
    prov = read_json(run1 / "run.json")
    assert (prov["config"]["seed"], prov["config"]["split_seed"], prov["seed_index"]) == (43, 42, 1)
    for k in range(2):
        state0, state1 = (read_json(r / f"fold_{k}" / "fold_state.json") for r in (run0, run1))
        # Same outer fold and inner split for every seed; the training (init, batches, augmentation) differs.
        assert state0["inner_case_ids"] == state1["inner_case_ids"] and state0["fit_case_ids"] == state1["fit_case_ids"]
    oofs = [pd.read_csv(r / "fold_0" / "oof.csv") for r in (run0, run1)]
    assert (oofs[0]["case_id"] == oofs[1]["case_id"]).all() and not np.allclose(oofs[0]["risk"], oofs[1]["risk"])
    status = study_spec.cell_status(spec)
    assert status["done"].all() and status.set_index("cell").loc["seed1/baseline/fold_1", "seed"] == 1
    # A rerun skips every cell, the extra seeds included.
    stamp = (run1 / "fold_1" / "done.json").stat().st_mtime_ns
    again = study.run_study(spec, executor="local", workers=2)
    assert again.ran == [] and sorted(again.skipped) == sorted(keys)
    assert (run1 / "fold_1" / "done.json").stat().st_mtime_ns == stamp
    # Seed 0 of a seeded study is the cell of a one-seed study, bit for bit.
    single = make_spec(inputs, tmp_path / "one", configs=("baseline",), n_folds=2, peers=())
    study.prepare_study(single)
    study.run_cell(single, study_spec.Cell(study_spec.Configuration(), 0))
    alone = single.run_dir(study_spec.Configuration()) / "fold_0"
    for name in ("oof.csv", "fold_state.json", "train_risk_inner.csv", "train_risk_paper.csv"):
        assert (alone / name).read_bytes() == (run0 / "fold_0" / name).read_bytes(), name
    curves = [pd.read_csv(f / "curves.csv").drop(columns="seconds") for f in (alone, run0 / "fold_0")]
    pd.testing.assert_frame_equal(*curves)
    assert (
        read_json(single.run_dir(study_spec.Configuration()) / "run.json")["config_hash"]
        == read_json(run0 / "run.json")["config_hash"]
    )
