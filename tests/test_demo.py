"""The demo preset: its settings apply to any manifest, and the committed manifest is a demo cohort."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache import PreprocessedCache
from pipeline.demo import (
    DEMO_SURVIVAL_SIZE_XYZ,
    DEMO_TRAIN,
    demo_study_options,
    demo_train_options,
    describes_demo_cohort,
    prepare_demo_cohort,
    prepare_inputs,
)
from pipeline.manifest import read_manifest
from pipeline.study_spec import StudySpec
from pipeline.train import TrainConfig

pytestmark = pytest.mark.slow  # trains networks or runs the console scripts end to end

ROOT = Path(__file__).resolve().parents[1]


def test_committed_manifest_describes_the_demo_cohort():
    assert describes_demo_cohort(ROOT / "data_manifest.csv")


def test_demo_settings_apply_to_a_manifest_that_is_not_a_demo_cohort(tiny_study, tmp_path):
    # The same manifest without the generator's record (as for HECKTOR data): real data, no oracle.
    manifest = tmp_path / "hecktor.csv"
    manifest.write_text(Path(tiny_study["manifest"]).read_text())
    record = json.loads(Path(tiny_study["manifest"]).with_suffix(".json").read_text())
    assert describes_demo_cohort(tiny_study["manifest"]) and record.pop("demo_cohort")
    manifest.with_suffix(".json").write_text(json.dumps(record))
    assert not describes_demo_cohort(manifest)
    info = prepare_demo_cohort(manifest)
    assert info["synthetic"] is False and "oracle_c_index" not in info
    assert str(manifest.resolve()) in info["data_source"]
    synthetic = prepare_demo_cohort(tiny_study["manifest"])
    assert synthetic["synthetic"] is True and 0.5 < synthetic["oracle_c_index"] <= 1.0


def test_demo_train_options_are_a_valid_config_and_a_copy():
    opts = demo_train_options()
    cfg = TrainConfig(**opts)
    assert cfg.select_from_epoch < cfg.epochs and cfg.model == {"preset": "demo"}
    opts["model"]["preset"] = "paper"
    assert DEMO_TRAIN["model"] == {"preset": "demo"}
    json.dumps(DEMO_TRAIN)  # recorded in run.json


def test_the_demo_chain_runs_from_python_and_reuses_what_it_made(tiny_study, tmp_path):
    spec = StudySpec.create(
        tiny_study["manifest"],
        tmp_path / "cache",
        None,
        tmp_path / "study",
        configs=("baseline",),
        **demo_study_options(),
    )
    assert spec.splits() == ["cv0", "cv1", "cv2", "loco"] and spec.cnn_splits() == ["cv0"]
    said = []
    info = prepare_inputs(spec, demo=True, workers=1, progress=False, say=lambda *m: said.append(m))
    assert info["synthetic"] is True and 0.5 < info["oracle_c_index"] <= 1.0
    assert info["settings"].startswith("reduced demo settings: ")
    cache = PreprocessedCache(spec.cache_root)  # complete, at the demo's sizes
    assert tuple(cache.params["survival_size_xyz"]) == DEMO_SURVIVAL_SIZE_XYZ
    assert len(cache.case_ids) == len(read_manifest(tiny_study["manifest"]))
    # Two steps (data, preprocessing; no embeddings for a baseline-only grid), each timed.
    assert [k for k, _ in said] == ["step", "line", "step", "line"]
    assert "preprocess into" in said[2][1] and said[3][1].endswith(" s)")
    written = {p: p.stat().st_mtime_ns for p in Path(spec.cache_root).rglob("*.h5")}
    again = prepare_inputs(spec, demo=True, workers=1, progress=False)
    assert again == info and {p: p.stat().st_mtime_ns for p in written} == written


@pytest.mark.parametrize("demo", [True, False])
def test_run_study_names_make_clean_demo_when_the_demos_own_outputs_are_refused(tmp_path, monkeypatch, demo):
    """An input made by another version (here an embedding file refused for its provenance)
    stops `run-study` with the refusal; for the demo the message adds how to start afresh."""
    from click.testing import CliRunner

    from pipeline.artefacts import ProvenanceError
    from pipeline.cli import study as cli

    def refuse(*args, **kwargs):
        raise ProvenanceError("embeddings/ctpet.h5: exists with other provenance; refusing to mix")

    monkeypatch.setattr(cli, "prepare_inputs", refuse)
    args = ["--demo"] if demo else []
    res = CliRunner().invoke(cli.run_study, [*args, "--out", str(tmp_path / "study")])
    assert res.exit_code == 1
    assert "error: embeddings/ctpet.h5: exists with other provenance" in res.output
    assert ("make clean-demo" in res.output) == demo
