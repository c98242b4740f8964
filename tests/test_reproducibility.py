"""Same settings, same numbers: a cell's outputs do not depend on the route that trained it
(train-survival or run-study), the worker count (run-study's pool, train-survival --workers),
a resume, or the shell's OMP_NUM_THREADS. Each route runs the real code in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import TINY_TRAIN, expensive, make_spec, make_study_inputs

from pipeline import study, study_spec
from pipeline.artefacts import read_json
from pipeline.layout import RunLayout
from pipeline.numerics import NUMERICS_ENV, PORTABLE_PINS
from pipeline.runtime import ENVIRONMENT_KEYS

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FOLDS = (0, 1)


def _train_survival(
    inputs: dict,
    cfg_json: Path,
    folds: Path,
    out: Path,
    fold_args: list[str],
    omp_threads: str,
    shell: dict[str, str] | None = None,
) -> str:
    """``train-survival`` as a user types it, in a shell whose OMP_NUM_THREADS is ``omp_threads``
    and, when ``shell`` is given, whose kernel variables are only those ``shell`` sets (this test
    process has the portable pins in its environment); returns its standard error (where
    torch's warnings go)."""
    cmd = [
        str(BIN / "train-survival"),
        "--manifest",
        str(inputs["manifest"]),
        "--cache",
        str(inputs["cache"]),
        "--config",
        str(cfg_json),
        "--folds",
        str(folds),
        "--n-folds",
        str(len(FOLDS)),
        "--out",
        str(out),
        "--quiet",
        *fold_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": omp_threads, "MKL_NUM_THREADS": omp_threads}
    if shell is not None:
        env = {k: v for k, v in env.items() if k not in (NUMERICS_ENV, *PORTABLE_PINS)} | shell
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stderr


def _outputs(run_dir: Path) -> dict[str, object]:
    """Everything a fold computed: curves (less wall times), OOF risks, record, fold state."""
    layout = RunLayout(run_dir)
    out: dict[str, object] = {}
    for k in FOLDS:
        curves = pd.read_csv(layout.curves(k)).drop(columns=["seconds"])
        out[f"curves{k}"] = curves.to_csv(index=False)
        out[f"oof{k}"] = layout.oof(k).read_bytes()
        out[f"done{k}"] = read_json(layout.done(k))
        out[f"state{k}"] = read_json(layout.fold_state(k))
    return out


@pytest.fixture(scope="module")
@expensive
def routes(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    inputs = make_study_inputs(root / "inputs")
    spec = make_spec(inputs, root / "study", configs=("baseline",), n_folds=len(FOLDS))
    study.prepare_study(spec)
    # Route 1: run-study's local pool, two workers (one cell each).
    outcome = study.run_study(spec, executor="local", workers=2)
    assert outcome.ok, outcome.failed
    cfg_json = root / "train.json"
    cell_run = study_spec.cell_layout(spec, study_spec.Cell(study_spec.Configuration(), 0)).root
    cfg_json.write_text(json.dumps(read_json(RunLayout(cell_run).run_json)["config"]))  # the same settings
    # Route 2: train-survival, both folds at once in two processes, OMP_NUM_THREADS=2.
    _train_survival(
        inputs, cfg_json, spec.folds_path, root / "cli2", ["--fold", "0", "--fold", "1", "--workers", "2"], "2"
    )
    # Route 3: train-survival with OMP_NUM_THREADS=1, one fold, then the other as a resume.
    _train_survival(inputs, cfg_json, spec.folds_path, root / "cli1", ["--fold", "0"], "1")
    _train_survival(inputs, cfg_json, spec.folds_path, root / "cli1", ["--fold", "1"], "1")
    return {"study": cell_run, "cli2": root / "cli2", "cli1": root / "cli1"}


@pytest.mark.slow
def test_a_cell_is_the_same_whatever_route_workers_threads_or_resume(routes):
    ref = _outputs(routes["study"])
    for name in ("cli2", "cli1"):
        got = _outputs(routes[name])
        differs = [key for key in ref if got[key] != ref[key]]
        assert not differs, f"{name} differs from the run-study cell in {differs}"
    # The record says on what the numbers were computed, identically for every route.
    env = ref["done0"]["environment"]
    assert env["threads"] == 1 and env["deterministic"] is True and env["device"] == "cpu"
    assert set(ENVIRONMENT_KEYS) <= set(env)


#: Shells that ask the CPU libraries for other kernels than the portable pins: the machine's
#: own choice, oneDNN at AVX2 only, ATen's scalar kernels. On an AVX-512 machine each of them
#: alone moved a demo fold's C-index (0.667, 0.712, 0.727) before the pins.
KERNEL_SHELLS = {
    "none": {},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
}


@pytest.fixture(scope="module")
@expensive
def kernel_shells(tmp_path_factory):
    """One fold of the demo's network trained once per shell of :data:`KERNEL_SHELLS`, each in
    its own process (a library reads these variables once, when it loads)."""
    root = tmp_path_factory.mktemp("kernels")
    inputs = make_study_inputs(root / "inputs")
    cfg_json = root / "train.json"
    cfg_json.write_text(json.dumps({k: v for k, v in TINY_TRAIN.items() if k != "device"}))
    folds = root / "folds.json"
    for name, shell in KERNEL_SHELLS.items():
        _train_survival(inputs, cfg_json, folds, root / name, ["--fold", "0", "--fold", "1"], "1", shell)
    return root


@pytest.mark.slow
def test_a_fold_is_the_same_whatever_kernels_the_shell_asks_for(kernel_shells):
    runs = {name: _outputs(kernel_shells / name) for name in KERNEL_SHELLS}
    envs = {name: [runs[name].pop(f"done{k}").pop("environment") for k in FOLDS] for name in runs}
    for name in ("onednn-avx2", "aten-default"):
        differs = [key for key in runs["none"] if runs[name][key] != runs["none"][key]]
        assert not differs, f"the shell {KERNEL_SHELLS[name]} changed {differs}"
    # What decided the bits is recorded, and is the portable path in every process.
    for name, (env, _) in envs.items():
        assert env["numerics"] == "portable" and env["numerics_in_force"] is True, (name, env)
        assert env["cpu_capability"] == "AVX2" and env["pins"]["ONEDNN_MAX_CPU_ISA"] == "AVX2", (name, env)
        assert env["onednn_isa"] in (None, "Intel AVX2"), (name, env["onednn_isa"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_a_cuda_cell_is_the_same_twice_and_uses_only_deterministic_kernels(tmp_path):
    """On CUDA, deterministic algorithms (and the pooling path built for them) make a cell repeat
    exactly; torch warns for any op without a deterministic kernel, and none may warn."""
    inputs = make_study_inputs(tmp_path / "inputs")
    cfg_json = tmp_path / "train.json"
    cfg_json.write_text(json.dumps({k: v for k, v in TINY_TRAIN.items() if k != "device"}))
    folds = tmp_path / "folds.json"
    runs = {}
    for name in ("a", "b"):
        err = _train_survival(inputs, cfg_json, folds, tmp_path / name, ["--device", "cuda"], "1")
        assert "deterministic implementation" not in err, err
        runs[name] = _outputs(tmp_path / name)
    differs = [key for key in runs["a"] if runs["a"][key] != runs["b"][key]]
    assert not differs, f"two CUDA runs differ in {differs}"
    env = runs["a"]["done0"]["environment"]
    assert env["device"].startswith("cuda") and env["gpu"] and env["deterministic"] is True
