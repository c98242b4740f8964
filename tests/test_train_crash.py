"""kill -9 a real train-survival process in the middle of its writes: no truncated file
under a final name at any of those moments, and a rerun completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.train import train_survival
from pipeline.layout import CURVES_COLUMNS, OOF_COLUMNS, TRAIN_RISK_COLUMNS, RunLayout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: One fold of two, one step: each killed process trains for seconds.
SMALLEST = [
    "--n-folds",
    "2",
    "--fold",
    "0",
    "--epochs",
    "1",
    "--steps-per-epoch",
    "1",
    "--batch-size",
    "2",
    "--model-config",
    '{"preset": "tiny"}',
    "--quiet",
]
#: Where each killed process stops: a substring of the file being written (its temporary
#: sibling is named after it), one per writer: torch.save, Path.write_text (the completion
#: marker) and DataFrame.to_csv (the run's last file, after every fold is done).
KILL_AT = ("best_", "done.json", "oof_predictions.csv")
#: Column sets of the run's CSV files, by name.
CSV_COLUMNS = {"curves.csv": CURVES_COLUMNS, "oof.csv": OOF_COLUMNS, "oof_predictions.csv": OOF_COLUMNS}

# Every file the child writes through torch.save, DataFrame.to_csv or Path.write_text is
# written in two halves; while writing the one named by KILL_AT it announces the path and
# sleeps between the halves, so the kill lands with half a file on disk.
CHILD = textwrap.dedent("""
    import io, os, pathlib, sys, time
    import torch
    torch.set_num_threads(2)  # as in-process (conftest): same kernels, same bits
    import pandas as pd

    TARGET = os.environ["KILL_AT"]

    def halves(path, data):
        name = os.fspath(path)
        with open(name, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            if TARGET in os.path.basename(name):
                print("@@ " + name, flush=True)
                time.sleep(120)
            handle.write(data[len(data) // 2:])

    _save, _to_csv = torch.save, pd.DataFrame.to_csv

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return _save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        _save(obj, buf, *args, **kwargs)
        halves(f, buf.getvalue())

    def to_csv(self, path=None, *args, **kwargs):
        if not isinstance(path, (str, os.PathLike)):
            return _to_csv(self, path, *args, **kwargs)
        halves(path, _to_csv(self, None, *args, **kwargs).encode())

    def write_text(self, data, *args, **kwargs):
        halves(self, data.encode())
        return len(data)

    torch.save, pd.DataFrame.to_csv, pathlib.Path.write_text = save, to_csv, write_text
    from pipeline.cli.train import train_survival
    train_survival(sys.argv[1:])
""")


def run_until_killed(args: list[str], target: str, log: Path) -> None:
    """Run train-survival in a child process and SIGKILL it half-way through writing ``target``."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            cwd=REPO,
            env={**os.environ, "KILL_AT": target},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            for line in proc.stdout:
                if line.startswith("@@ "):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            else:
                pytest.fail(f"child exited ({proc.wait()}) before writing {target}: {log.read_text()[-2000:]}")
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"child not killed while writing {target}"


def final_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]


def check_complete(root: Path) -> None:
    """Every file under a final name is whole and readable; finished folds have every output."""
    for path in final_files(root):
        if path.suffix == ".pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
            assert state and all(isinstance(v, torch.Tensor) for v in state.values()), path
        elif path.suffix == ".csv":
            assert path.read_text().endswith("\n"), f"{path}: truncated"
            frame = pd.read_csv(path)
            expected = TRAIN_RISK_COLUMNS if path.name.startswith("train_risk_") else CSV_COLUMNS.get(path.name)
            if expected is not None:
                assert tuple(frame.columns) == expected, path
            assert len(frame), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
    layout = RunLayout(root / "run")
    for k in layout.finished_folds():
        record = json.loads(layout.done(k).read_text())
        selected = [p for p, r in record["protocols"].items() if r["selected_epoch"] is not None]
        outputs = [layout.curves(k), layout.oof(k), layout.fold_state(k)]
        outputs += [f(k, p) for p in selected for f in (layout.best, layout.train_risk)]
        assert selected and all(p.is_file() for p in outputs), f"fold {k}: marker without its outputs"


def test_kill9_at_each_write_leaves_whole_files_and_a_rerun_completes(tiny_study, tmp_path):
    run = RunLayout(tmp_path / "run")
    args = [
        "--manifest",
        str(tiny_study["manifest"]),
        "--cache",
        str(tiny_study["cache"]),
        "--folds",
        str(tmp_path / "folds.json"),
        "--out",
        str(run.root),
        *SMALLEST,
    ]
    for target in KILL_AT:
        run_until_killed(args, target, tmp_path / f"{target}.log")
        check_complete(tmp_path)
        assert any(target in p.name and p.name.endswith(".tmp") for p in tmp_path.rglob("*")), target
        # The marker is written last: a fold killed before it is not done, one killed after it is.
        assert run.finished_folds() == ([0] if target == "oof_predictions.csv" else [])

    resumed = CliRunner().invoke(train_survival, args, catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "fold 0: already done, skipped" in resumed.output
    check_complete(tmp_path)
    oof = pd.read_csv(run.oof_predictions, dtype={"case_id": str})
    assert set(oof["case_id"]) == set(pd.read_csv(run.oof(0), dtype={"case_id": str})["case_id"])
    assert np.isfinite(oof["risk"]).all()
