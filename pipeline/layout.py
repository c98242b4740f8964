"""The layout of a run folder: every path, file name and CSV column set a run writes, in one place.

Training (:mod:`pipeline.train`), prediction (:mod:`pipeline.predict`), the study
(:mod:`pipeline.study`) and the report (:mod:`pipeline.report`) read and write run folders
through :class:`RunLayout`; peer runs (:mod:`pipeline.peers`) through :class:`PeerRunLayout`.
This module imports neither torch nor the network, so status listings and reports stay light.

A run folder (``train-survival --out``, or ``<study>/runs/<config>`` of a study)::

    run.json                     provenance; a resumed run must match it
    folds.csv                    the shared folds the run was trained on
    summary.json                 per-protocol mean +- SD over the finished folds
    oof_predictions.csv          every finished fold's oof.csv, concatenated (OOF_COLUMNS)
    fold_<k>/
        best_<protocol>.pt       EMA state dict at the protocol's selected epoch
        curves.csv               one row per epoch (CURVES_COLUMNS)
        oof.csv                  held-out risks of each protocol (OOF_COLUMNS)
        train_risk_<protocol>.csv  the selected model's risks on its training rows (TRAIN_RISK_COLUMNS)
        fold_state.json          clinical transform, FM standardisation, fit / inner case ids
        done.json                the fold's results, written last: the completion marker
        cell.json                wall time, host and device (study cells only)

A peer run folder holds ``oof_predictions.csv`` and ``train_risk.csv`` (both
:data:`OOF_COLUMNS`), ``summary.json`` and, in a study, the marker ``peer.json``.

Every file is written through :func:`pipeline.artefacts.atomic_path`, so a file under one of
these names is always complete.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.artefacts import params_hash

#: Model-selection protocols of a training run (see :mod:`pipeline.train`).
PROTOCOLS = ("paper", "inner")
#: The ``curves.csv`` score each selection protocol maximises (:func:`pipeline.train.select`;
#: of equal scores the later epoch is kept).
SELECTION_SCORE = {"paper": "val_c_index_outer", "inner": "val_c_index_inner"}

RUN_FILE = "run.json"
FOLDS_FILE = "folds.csv"
SUMMARY_FILE = "summary.json"
OOF_PREDICTIONS_FILE = "oof_predictions.csv"
DONE_FILE = "done.json"
CURVES_FILE = "curves.csv"
OOF_FILE = "oof.csv"
FOLD_STATE_FILE = "fold_state.json"
CELL_FILE = "cell.json"
PEER_FILE = "peer.json"
PEER_TRAIN_RISK_FILE = "train_risk.csv"

#: Evaluation scores of one epoch: columns of ``curves.csv``, keys of ``done.json`` "start".
EVAL_COLUMNS = ("train_c_index", "val_c_index_inner", "val_c_index_outer", "val_dice_outer")
#: ``curves.csv``: epoch, learning-rate factor, mean loss parts of :func:`models.losses.deepmts_loss`
#: (``total``, also recorded as ``loss``, is the value minimised), the scores and the epoch's wall time.
CURVES_COLUMNS = ("epoch", "lr_factor", "dice", "cox", "total", "loss", *EVAL_COLUMNS, "seconds")
#: ``oof.csv`` and ``oof_predictions.csv`` (CNN and peer runs), and a peer's ``train_risk.csv``.
OOF_COLUMNS = ("case_id", "fold", "protocol", "risk", "time", "event")
#: ``train_risk_<protocol>.csv`` of a CNN fold.
TRAIN_RISK_COLUMNS = ("case_id", "risk", "time", "event")

_FOLD_DIR_RE = re.compile(r"^fold_(0|[1-9][0-9]*)$")


def folds_hash(folds: pd.DataFrame) -> str:
    """The folds hash a run records in ``run.json`` (and a study in ``study.json``).

    Args:
        folds: the folds frame (``case_id``, ``fold`` [, ``centre``]); row order is ignored.
    """
    return params_hash({"folds": folds.sort_values("case_id").astype(str).values.tolist()})


def _file(name: str) -> property:
    """A folder's file ``name``, as a read-only attribute."""
    return property(lambda self: self.root / name, doc=f"``<root>/{name}``")


def _fold_file(name: str) -> Callable[[RunLayout, int], Path]:
    """A fold's file ``name``, as a method of the fold index."""

    def path(self: RunLayout, fold: int) -> Path:
        return self.fold_dir(fold) / name

    path.__doc__ = f"``<root>/fold_<fold>/{name}``"
    return path


@dataclass(frozen=True)
class _Folder:
    """A run folder (CNN or peer) and the files both kinds hold."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    summary = _file(SUMMARY_FILE)
    oof_predictions = _file(OOF_PREDICTIONS_FILE)


class RunLayout(_Folder):
    """Paths of one training run folder (see the module docstring for what each holds).

    Args:
        root: the run folder (str or path).
    """

    run_json = _file(RUN_FILE)
    folds_csv = _file(FOLDS_FILE)
    done = _fold_file(DONE_FILE)
    curves = _fold_file(CURVES_FILE)
    oof = _fold_file(OOF_FILE)
    fold_state = _fold_file(FOLD_STATE_FILE)
    cell = _fold_file(CELL_FILE)

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{int(fold)}"

    def train_risk(self, fold: int, protocol: str) -> Path:
        return self.fold_dir(fold) / f"train_risk_{protocol}.csv"

    def best(self, fold: int, protocol: str) -> Path:
        return self.fold_dir(fold) / f"best_{protocol}.pt"

    def is_done(self, fold: int) -> bool:
        """Whether the fold's completion marker exists."""
        return self.done(fold).is_file()

    def finished_folds(self) -> list[int]:
        """Folds with a completion marker, in ascending order."""
        if not self.root.is_dir():
            return []
        folds = (_FOLD_DIR_RE.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in folds if m and self.is_done(int(m.group(1))))


class PeerRunLayout(_Folder):
    """Paths of one peer run folder (:func:`pipeline.peers.fit_peer_run`).

    Args:
        root: the peer run folder (str or path).
    """

    train_risk = _file(PEER_TRAIN_RISK_FILE)
    #: ``peer.json``, written last by a study (:func:`pipeline.study.run_peer`).
    marker = _file(PEER_FILE)
