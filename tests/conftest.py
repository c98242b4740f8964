from __future__ import annotations

from pathlib import Path

import pytest

import pipeline  # noqa: F401  (first: sets OpenMP's passive wait before torch loads it)
import torch  # noqa: E402

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
    params = PreprocessParams(
        survival_size_xyz=(32, 32, 32), ctfm_size_xyz=(32, 32, 16), petfm_size_xyz=(32, 32, 32)
    )
    cache = base / "cache"
    preprocess_cohort(manifest, cache, params, workers=2, progress=False)
    return {"root": root, "manifest": manifest, "cache": cache}


#: Fixtures that build a cohort and cache, train, or run a study or subprocesses: a test using one
#: (directly or through another fixture) is end-to-end and gets the ``slow`` marker, so
#: ``make test-fast`` (``-m "not slow"``) leaves it to the full suite.
SLOW_FIXTURES = frozenset({
    "tiny_study",       # conftest: 24 cases generated and preprocessed
    "finished_study",   # test_report: real tiny cells trained
    "inputs",           # test_study: cohort, cache and embeddings of a tiny study
    "beyond",           # test_study_beyond: a study run over several splits
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
