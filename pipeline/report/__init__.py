"""The study report, in three steps: collect -> analyse -> render.

:func:`write_report` can run at any time, during or after a study: finished cells
(``done.json``) and peer runs are read, missing ones are shown as pending.

1. :mod:`pipeline.report.collect` reads the study folder once into frames
   (:class:`~pipeline.report.collect.StudyData`): per-fold records, out-of-fold and
   training-fold predictions, folds, endpoints, learning curves, per-cell training facts and
   the runs' recorded environments. Only this step touches files.
2. :mod:`pipeline.report.analysis` turns those frames into one typed results object
   (:class:`~pipeline.report.results.Results`): the headline, the tables, paired comparisons,
   LOCO, IBS / calibration / KM, learning curves and rows that are identical for a stated
   reason; :mod:`pipeline.report.noise` adds the training noise of studies run with several
   training seeds and the count of checkpoints a selection tie decided. Each analysis is a
   function of arrays or frames, so it is tested on hand-made predictions.
3. :mod:`pipeline.report.render` draws ``report.md``, ``report.html`` and, through
   :mod:`pipeline.report.figures`, the figures from that object alone (it can re-render a
   saved ``results.json``).

Shared names, labels and value helpers live in :mod:`pipeline.report.labels`, text formatting
in :mod:`pipeline.report.format`; the modules import in that one direction (labels <- format
<- figures <- render; labels <- collect <- noise <- analysis), so there is no import circle.

Files: ``results.json`` (the results object), ``results.csv`` (one row per cell or peer
fold x protocol, pending rows included), ``report.md`` / ``report.html`` and the figures.

Model-selection protocols (see :mod:`pipeline.train`): "paper protocol (optimistic)" selects
the checkpoint on the outer fold it reports; "unbiased inner selection" selects on an inner
split of the training fold. Table 1 picks the best d per embedding set the same way: by the
mean outer C-index under the paper protocol (as the paper did), and by the mean **inner**
validation C-index under the unbiased protocol, so no outer-fold number leaks into that
choice either. The headline repeats Table 1's rows, unbiased protocol first, with each
row's paired difference from the baseline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.artefacts import atomic_path, write_json_atomic
from pipeline.report.analysis import analyse
from pipeline.report.collect import collect_study
from pipeline.report.labels import N_BOOT
from pipeline.report.render import render_report

__all__ = ["write_report"]


def write_report(
    study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, n_boot: int = N_BOOT
) -> Path:
    """collect -> analyse -> render: ``results.json`` / ``results.csv``, then the report from them.

    Args:
        study_dir: a folder prepared by :func:`pipeline.study.prepare_study`.
        out_dir: destination; default ``<study_dir>/report``.
        n_boot: bootstrap draws of the paired comparisons.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir) if out_dir else Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = analyse(collect_study(study_dir), n_boot=n_boot).clean()
    write_json_atomic(out / "results.json", results.to_json())
    with atomic_path(out / "results.csv", suffix=".csv") as tmp:
        pd.DataFrame(results.records).to_csv(tmp, index=False)
    return render_report(results, out)
