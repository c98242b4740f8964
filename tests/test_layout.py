"""The run folder layout: file names on disk, finished folds, and the folds hash runs record."""

from __future__ import annotations

import pandas as pd

from pipeline.layout import PeerRunLayout, RunLayout, folds_hash


def test_run_layout_names_are_the_files_on_disk(tmp_path):
    run = RunLayout(str(tmp_path))
    assert run.root == tmp_path
    assert [
        p.relative_to(tmp_path).as_posix()
        for p in (
            run.run_json,
            run.folds_csv,
            run.summary,
            run.oof_predictions,
            run.done(3),
            run.curves(3),
            run.oof(3),
            run.train_risk(3, "inner"),
            run.best(3, "paper"),
            run.fold_state(3),
            run.cell(3),
        )
    ] == [
        "run.json",
        "folds.csv",
        "summary.json",
        "oof_predictions.csv",
        "fold_3/done.json",
        "fold_3/curves.csv",
        "fold_3/oof.csv",
        "fold_3/train_risk_inner.csv",
        "fold_3/best_paper.pt",
        "fold_3/fold_state.json",
        "fold_3/cell.json",
    ]
    peer = PeerRunLayout(tmp_path)
    assert [p.name for p in (peer.oof_predictions, peer.train_risk, peer.summary, peer.marker)] == [
        "oof_predictions.csv",
        "train_risk.csv",
        "summary.json",
        "peer.json",
    ]


def test_finished_folds_are_those_with_a_marker_in_numeric_order(tmp_path):
    run = RunLayout(tmp_path / "run")
    assert run.finished_folds() == []  # no folder yet
    for k in (10, 2, 0, 5):
        run.fold_dir(k).mkdir(parents=True)
    for k in (10, 2, 0):
        run.done(k).write_text("{}")
    (tmp_path / "run" / "fold_x").mkdir()
    (tmp_path / "run" / "fold_01").mkdir()
    (tmp_path / "run" / "fold_01" / "done.json").write_text("{}")  # not a name the run writes
    assert run.finished_folds() == [0, 2, 10]
    assert run.is_done(2) and not run.is_done(5)


def test_folds_hash_keeps_its_value_and_ignores_row_order():
    folds = pd.DataFrame({"case_id": ["B-2", "A-1", "C-3", "D-4"], "fold": [1, 0, 0, 1]})
    # Values recorded in existing run.json / study.json files: a change would refuse every resume.
    assert folds_hash(folds) == "f00ed6a510064efa"
    assert folds_hash(folds.iloc[::-1]) == "f00ed6a510064efa"
    assert folds_hash(folds.assign(centre=["X", "Y", "Y", "X"])) == "fe8bef75cfbb3707"
    assert folds_hash(folds.assign(fold=[0, 0, 1, 1])) != "f00ed6a510064efa"
