from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# The Hub's client reads these when imported: the suite never reaches the network for weights
# nor reads the user's Hub cache (the `hub` tests run the client in subprocesses against a
# local server). Subprocesses inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
_HF_HOME = os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hnfm-tests-hf-")
os.environ.pop("HF_HUB_CACHE", None)

import pipeline  # noqa: E402, F401  (first: sets OpenMP's passive wait before torch loads it)

# isort: split
import torch  # noqa: E402
from helpers import expensive, is_expensive  # noqa: E402

# Two cores here and in CI: keep intra-op threads bounded so parallel helpers don't thrash.
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
STS_ROOT = REPO.parent / "shared" / "data" / "sts_petct"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, controller side: tell each worker the distribution mode (a worker's own
    options say "no"), so tests that must share a process can check it."""
    node.workerinput["dist"] = node.config.getoption("dist")


@pytest.fixture
def sts_root() -> Path:
    """The real PET/CT case in HECKTOR layout, or skip when this checkout lacks it."""
    if not (STS_ROOT / "imagesTr" / "STS-001__CT.nii.gz").is_file():
        pytest.skip(f"real PET/CT case not found at {STS_ROOT} (a checkout on its own has no ../shared)")
    return STS_ROOT


@pytest.fixture(scope="session")
@expensive
def tiny_study(tmp_path_factory):
    """A small synthetic cohort taken through the real reader and preprocessing, once.

    24 cases in HECKTOR layout, manifest, and a preprocessed cache with 32^3 survival inputs
    and small FM inputs, so stage-two tests run the real code paths in seconds.

    Returns:
        dict with ``root`` (cohort), ``manifest`` and ``cache`` paths.
    """
    from pipeline.demo_cohort import generate_demo_cohort
    from pipeline.hecktor import build_manifest
    from pipeline.preprocess import PreprocessParams, preprocess_cohort

    base = tmp_path_factory.mktemp("tiny_study")
    root = generate_demo_cohort(base / "cohort", n_cases=24, seed=1, workers=2)
    manifest = base / "manifest.csv"
    build_manifest(root, manifest, progress=False)
    params = PreprocessParams(survival_size_xyz=(32, 32, 32), ctfm_size_xyz=(32, 32, 16), petfm_size_xyz=(32, 32, 32))
    cache = base / "cache"
    preprocess_cohort(manifest, cache, params, workers=2, progress=False)
    return {"root": root, "manifest": manifest, "cache": cache}


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """A test that uses an :func:`~helpers.expensive` fixture (directly or through another
    fixture) must say ``slow`` itself (``@pytest.mark.slow``, or its module's or class's
    ``pytestmark``), so ``make test-fast`` (``-m "not slow"``) never runs it: its module fails
    to collect, naming the test and the fixture, in every run (with or without ``-m``, under
    pytest-xdist too)."""
    made = yield
    for item in made if isinstance(made, list) else [made]:
        info = getattr(item, "_fixtureinfo", None)  # test functions only
        if info is None or item.get_closest_marker("slow") is not None:
            continue
        names = sorted(
            name for name, chain in info.name2fixturedefs.items() if any(is_expensive(d.func) for d in chain)
        )
        if names:
            raise collector.CollectError(
                f"{item.nodeid} uses the expensive fixture {', '.join(names)} without the `slow` "
                f"marker: add @pytest.mark.slow (or the module's pytestmark = pytest.mark.slow)"
            )
    return made


# --- real parts: a Slurm cluster, a browser, the Hub's client --------------------------------

SLURM_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
#: Markers of the tests that need a real part; under CI=true they may not skip (see below).
REAL_PART_MARKERS = ("slurm", "browser", "hub")


def pytest_configure(config):
    """Start the one-node Slurm test cluster once for the whole run, in the controller (before
    any xdist worker starts: they inherit SLURM_CONF), when asked: HNFM_SLURM_CLUSTER=start
    (CI sets it). ``make test`` alone never starts daemons; the `slurm` tests then skip."""
    if hasattr(config, "workerinput") or os.environ.get("HNFM_SLURM_CLUSTER") != "start":
        return
    folder = tempfile.mkdtemp(prefix="hnfm-slurm-")
    run = subprocess.run(["bash", str(SLURM_SCRIPT), "start", folder], capture_output=True, text=True)
    if run.returncode == 0:
        config._hnfm_slurm = folder
        os.environ["SLURM_CONF"] = f"{folder}/slurm.conf"
        os.environ["HNFM_SLURM_TEST_CLUSTER"] = folder
    else:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ["HNFM_SLURM_START_ERROR"] = (run.stderr or run.stdout).strip()[-2000:]


def pytest_unconfigure(config):
    """Stop the daemons this run started (their pid files), and only those; remove this
    process's Hub cache."""
    shutil.rmtree(_HF_HOME, ignore_errors=True)
    folder = getattr(config, "_hnfm_slurm", None)
    if folder:
        subprocess.run(["bash", str(SLURM_SCRIPT), "stop", folder], capture_output=True, text=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """The test cluster's folder (SLURM_CONF points into it), or skip saying why there is none."""
    folder = os.environ.get("HNFM_SLURM_TEST_CLUSTER")
    if folder and Path(folder, "slurm.conf").is_file():
        return Path(folder)
    error = os.environ.get("HNFM_SLURM_START_ERROR")
    if error:
        pytest.skip(f"the Slurm test cluster did not start: {error}")
    pytest.skip(
        "no Slurm test cluster up: `sudo scripts/slurm_cluster.sh install`, then run the tests "
        "as root with HNFM_SLURM_CLUSTER=start (CI does)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped `slurm`, `browser` or `hub` test fails: CI must not stay green
    by skipping the tests of the real parts it installs."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("CI") != "true" or hasattr(report, "wasxfail"):
        return
    marks = [m for m in REAL_PART_MARKERS if item.get_closest_marker(m)]
    if marks:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a `{marks[0]}` test may not skip here ({reason})"
