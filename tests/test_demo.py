"""The demo preset: its settings apply to any manifest, and the committed manifest is a demo cohort."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.demo import DEMO_TRAIN, demo_train_options, describes_demo_cohort, prepare_demo_cohort
from pipeline.train import TrainConfig

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
