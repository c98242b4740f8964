"""Step 1 of the report: read a study folder once into frames (:class:`StudyData`).

Only this step touches files; the analyses (:mod:`pipeline.report.analysis`) work on its frames.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artefacts import read_json
from pipeline.embedding_sets import embedding_set
from pipeline.layout import EVAL_COLUMNS, PROTOCOLS, PeerRunLayout, RunLayout
from pipeline.manifest import read_manifest, survival_cases
from pipeline.metrics import NO_VALID_EPOCH, c_index_value
from pipeline.report.labels import PRED_COLUMNS, PROTOCOL_LABELS, as_float
from pipeline.splits import load_folds
from pipeline.study_spec import (
    FIRST_SPLIT,
    LOCO,
    Cell,
    Configuration,
    StudySpec,
    cell_layout,
    grid,
    load_study,
    loco_centres,
    peer_done,
    proj_label,
    split_n_folds,
)


@dataclass(frozen=True)
class ModelRef:
    """A model of the study: a CNN configuration or a peer (:class:`pipeline.study_spec.Peer`).

    ``oof_protocol(protocol)`` is the protocol of its OOF rows: the CNN's own, or
    ``"fit"`` for a peer (no checkpoint selection).
    """

    name: str
    kind: str  # "cnn" | "peer"
    label: str

    def oof_protocol(self, protocol: str) -> str:
        return protocol if self.kind == "cnn" else "fit"


def study_models(spec: StudySpec) -> list[ModelRef]:
    """The CNN configurations, then the peers, as :class:`ModelRef`."""
    out = []
    for c in spec.configurations():
        label = (
            "DeepMTS+DAFT baseline"
            if c.embedding_set is None
            else f"DeepMTS+DAFT + {embedding_set(c.embedding_set).label}, d = {c.d_label}"
        )
        out.append(ModelRef(c.name, "cnn", label))
    out += [ModelRef(p.name, "peer", p.label) for p in spec.peer_list()]
    return out


@dataclass
class StudyData:
    """Everything the analyses need, read once from a study folder (frames, no paths).

    Attributes:
        spec, study: the spec and the ``study.json`` record.
        records: per-fold metrics of CNN cells and peers (:func:`collect_records`,
            :func:`collect_peer_records`), pending rows included.
        predictions: :data:`PRED_COLUMNS`; ``role`` is ``oof`` (held-out fold) or ``train``
            (the fold's training rows, for Breslow baselines and risk cut-offs).
        folds: ``split, fold, case_id`` of every split whose folds file exists.
        survival: ``time, event`` indexed by ``case_id``.
        curves: ``split, seed, config, fold, epoch`` + the ``curves.csv`` columns present, of
            every cell (every training seed).
        cells: one row per CNN cell (every training seed): ``split, seed, config, fold, done,
            epochs_run, seconds``, ``start_<score>`` (before the first step),
            ``val_dice_<protocol>`` and ``selected_epoch_<protocol>``.
        peer_fits: one row per peer fold: ``split, peer, fold, n_train`` and
            ``<block>_pca_components`` where a PCA was fitted.
        models: the study's models.
        centres: held-out centre name per LOCO fold (empty without LOCO).
        environments: the distinct ``run.json["environment"]`` records of the CNN runs
            (:func:`collect_environments`).
        seed_records: :func:`collect_seed_records`: the ``cv0`` records of every seed of the
            configurations trained with several seeds (``seed`` column); empty without.
        seed_predictions: :func:`collect_seed_predictions`: their held-out risks.

    ``records`` and ``predictions`` hold the study's own training seed (seed index 0) only,
    so every table but the training-noise one reads one run per configuration and fold.
    """

    spec: StudySpec
    study: dict[str, Any]
    records: pd.DataFrame
    predictions: pd.DataFrame
    folds: pd.DataFrame
    survival: pd.DataFrame
    curves: pd.DataFrame
    cells: pd.DataFrame
    peer_fits: pd.DataFrame
    models: list[ModelRef]
    centres: list[str]
    environments: list[dict[str, Any]] = field(default_factory=list)
    seed_records: pd.DataFrame = field(default_factory=pd.DataFrame)
    seed_predictions: pd.DataFrame = field(default_factory=pd.DataFrame)


def collect_study(study_dir: str | os.PathLike) -> StudyData:
    """Read a study folder (prepared by :func:`pipeline.study.prepare_study`) into frames."""
    spec, study = load_study(study_dir)
    survival = read_survival(spec)
    folds = read_folds(spec)
    cnn = collect_records(spec, survival=survival, folds=folds)
    protocols = [p for p in PROTOCOL_LABELS if p in set(cnn["protocol"])] if len(cnn) else list(PROTOCOL_LABELS)
    peers = collect_peer_records(spec, protocols)
    records = pd.DataFrame(cnn.to_dict("records") + peers.to_dict("records"))
    models = study_models(spec)
    curves, cells = collect_training(spec)
    return StudyData(
        spec=spec,
        study=study,
        records=records,
        predictions=collect_predictions(spec, models),
        folds=folds,
        survival=survival,
        curves=curves,
        cells=cells,
        peer_fits=collect_peer_fits(spec),
        models=models,
        centres=loco_centres(spec) if (folds["split"] == LOCO).any() else [],
        environments=collect_environments(spec),
        seed_records=collect_seed_records(spec, survival=survival, folds=folds),
        seed_predictions=collect_seed_predictions(spec, models),
    )


def primary_cells(spec: StudySpec) -> list[Cell]:
    """The cells of the study's own training seed (seed index 0): one run per configuration
    and fold, what every table but the training-noise one reads."""
    return [c for c in grid(spec) if c.seed == 0]


def seed_cells(spec: StudySpec) -> list[Cell]:
    """Every seed's cells (seed 0 included) of the configurations trained with several seeds."""
    names = {c.name for c in spec.seed_configurations()}
    return [c for c in grid(spec) if c.split == FIRST_SPLIT and c.config.name in names]


def collect_environments(spec: StudySpec) -> list[dict[str, Any]]:
    """The distinct environments the CNN cells recorded, each with the runs that share it.

    Read from each finished fold's ``done.json["environment"]`` (:func:`pipeline.runtime.
    environment_record`: torch version, threads, determinism, device, CUDA / cuDNN, TF32,
    precision; per fold, since a resumed run may finish on another machine); folds without
    the key (older runs) are left out. Returns ``[{"environment": {...}, "runs":
    ["split/config", ...]}, ...]`` in the order first met.
    """
    groups: dict[str, dict[str, Any]] = {}
    for cell in grid(spec):
        layout = cell_layout(spec, cell)
        if not layout.is_done(cell.fold):
            continue
        env = read_json(layout.done(cell.fold)).get("environment")
        if isinstance(env, dict) and env:
            key = json.dumps(env, sort_keys=True, default=str)
            runs = groups.setdefault(key, {"environment": env, "runs": []})["runs"]
            name = f"{cell.split}/{cell.config.name}" + (f" (seed {cell.seed})" if cell.seed else "")
            if name not in runs:
                runs.append(name)
    return list(groups.values())


def read_survival(spec: StudySpec) -> pd.DataFrame:
    """``time, event`` indexed by ``case_id``: the manifest's cases with an endpoint."""
    m = survival_cases(read_manifest(spec.manifest))
    return pd.DataFrame(
        {"time": m["rfs_days"].astype(float).to_numpy(), "event": m["relapse"].astype(int).to_numpy()},
        index=pd.Index(m["case_id"].astype(str), name="case_id"),
    )


def read_folds(spec: StudySpec) -> pd.DataFrame:
    """``split, fold, case_id`` of every split whose shared folds file exists."""
    frames = []
    for split in spec.splits():
        path = spec.folds_path_of(split)
        if path.is_file():
            f = load_folds(path)
            frames.append(
                pd.DataFrame(
                    {
                        "split": split,
                        "fold": f["fold"].astype(int).to_numpy(),
                        "case_id": f["case_id"].astype(str).to_numpy(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["split", "fold", "case_id"])


def held_out(folds: pd.DataFrame, survival: pd.DataFrame, split: str, fold: int) -> pd.DataFrame:
    """``case_id, time, event`` of one held-out fold."""
    ids = folds.loc[(folds["split"] == split) & (folds["fold"] == fold), "case_id"]
    return survival.loc[ids].reset_index()


def c_undefined_reason(held: pd.DataFrame) -> str:
    """Why a held-out fold has no C-index, for runs written before the training record kept
    the reason: no event, no comparable pair, else no valid epoch.

    Args:
        held: the fold's ``time``, ``event`` (:func:`held_out`).
    """
    if held.empty:
        return "unknown"
    t, e = held["time"].to_numpy(float), held["event"].to_numpy(int)
    return c_index_value(t, e, np.zeros(len(t))).reason or NO_VALID_EPOCH


def _cell_records(spec: StudySpec, cell: Cell) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    """``(done, done.json record, cell.json record)`` of one CNN cell; ``{}`` for a missing file."""
    layout = cell_layout(spec, cell)
    done = layout.is_done(cell.fold)
    rec = read_json(layout.done(cell.fold)) if done else {}
    info = read_json(layout.cell(cell.fold)) if layout.cell(cell.fold).is_file() else {}
    return done, rec, info


def collect_records(
    spec: StudySpec, *, survival: pd.DataFrame | None = None, folds: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per CNN cell x protocol from the finished cells; pending cells give NaN rows.

    Covers every split the CNN trains on, with the study's own training seed (seed index 0;
    :func:`collect_seed_records` reads the others). Columns: ``split, kind, config, group,
    d, fold, protocol, done, c_index, c_index_reason, auc_1y, auc_1y_reason,
    selection_c_index, selected_epoch, val_dice, epochs_run, seconds``. ``kind`` is
    ``"cnn"``, ``group`` (the report group) is ``"baseline"`` for the baseline, else the
    configuration's embedding set; ``d`` is ``"-"`` there. An
    undefined C-index (e.g. a LOCO centre without an event) is NaN with its reason code.

    Args:
        spec: the study.
        survival, folds: :func:`read_survival` / :func:`read_folds` (read when omitted).
    """
    survival = read_survival(spec) if survival is None else survival
    folds = read_folds(spec) if folds is None else folds
    return pd.DataFrame([row for cell in primary_cells(spec) for row in _record_rows(spec, cell, survival, folds)])


def collect_seed_records(
    spec: StudySpec, *, survival: pd.DataFrame | None = None, folds: pd.DataFrame | None = None
) -> pd.DataFrame:
    """:func:`collect_records` rows of every training seed of the configurations trained with
    several seeds (``cv0`` only, seed 0 included), with a ``seed`` column; empty without."""
    cells = seed_cells(spec)
    if not cells:
        return pd.DataFrame()
    survival = read_survival(spec) if survival is None else survival
    folds = read_folds(spec) if folds is None else folds
    return pd.DataFrame(
        [row | {"seed": cell.seed} for cell in cells for row in _record_rows(spec, cell, survival, folds)]
    )


def _record_rows(spec: StudySpec, cell: Cell, survival: pd.DataFrame, folds: pd.DataFrame) -> list[dict[str, Any]]:
    """The rows of one CNN cell, one per protocol (see :func:`collect_records`)."""
    base = {
        "split": cell.split,
        "kind": "cnn",
        "config": cell.config.name,
        "group": cell.config.group,
        "d": cell.config.d_label,
        "fold": cell.fold,
    }
    done, rec, info = _cell_records(spec, cell)
    rows = []
    for proto in PROTOCOLS:
        res = rec.get("protocols", {}).get(proto) if done else None
        if done and res is None:
            continue  # e.g. inner_val_fraction = 0: only the paper protocol exists
        res = res or {}
        c = as_float(res.get("c_index"))
        reason = None
        if done and math.isnan(c):
            reason = res.get("c_index_undefined_reason") or c_undefined_reason(
                held_out(folds, survival, cell.split, cell.fold)
            )
        rows.append(
            base
            | {
                "protocol": proto,
                "done": done,
                "c_index": c,
                "c_index_reason": reason,
                "auc_1y": as_float(res.get("auc_1y")),
                "auc_1y_reason": res.get("auc_1y_undefined_reason"),
                "selection_c_index": as_float(res.get("selection_c_index")),
                "selected_epoch": res.get("selected_epoch"),
                "val_dice": as_float(res.get("val_dice")),
                "epochs_run": rec.get("epochs_run"),
                "seconds": info.get("seconds"),
            }
        )
    return rows


def collect_peer_records(spec: StudySpec, protocols: Sequence[str] = ("paper", "inner")) -> pd.DataFrame:
    """The peers' per-fold metrics on every split, in the layout of :func:`collect_records`.

    A peer has no checkpoint selection (``protocol = "fit"`` in its OOF file); its rows
    are repeated under each CNN protocol so every table can put it beside the CNN.
    ``selection_c_index`` is the mean inner-CV C-index of the penalty choice (embedding
    heads), used to pick a head's projection size without the outer folds. ``kind`` is
    ``"peer"``; ``group`` is ``clinical``, ``radiomics`` or ``head-<set>``.
    """
    rows = []
    for split in spec.splits():
        n_folds = split_n_folds(spec, split)
        for peer in spec.peer_list():
            done = peer_done(spec, peer, split)
            layout = PeerRunLayout(spec.peer_dir(peer, split))
            summ = read_json(layout.summary) if done else {}
            per_fold = {int(r["fold"]): r for r in summ.get("per_fold", [])}
            fits = {int(r["fold"]): r for r in summ.get("fit", [])}
            seconds = read_json(layout.marker).get("seconds") if done else None
            base = {
                "split": split,
                "kind": "peer",
                "config": peer.name,
                "group": peer.group,
                "d": proj_label(peer.proj) if peer.kind == "embeddings" else "-",
            }
            for k in range(n_folds):
                r, f = per_fold.get(k, {}), fits.get(k, {})
                for proto in protocols:
                    rows.append(
                        base
                        | {
                            "fold": k,
                            "protocol": proto,
                            "done": done and bool(r),
                            "c_index": as_float(r.get("c_index")),
                            "c_index_reason": r.get("c_index_reason"),
                            "auc_1y": as_float(r.get("auroc")),
                            "auc_1y_reason": r.get("auroc_reason"),
                            "selection_c_index": as_float(f.get("inner_c_index")),
                            "selected_epoch": None,
                            "val_dice": float("nan"),
                            "epochs_run": None,
                            "seconds": seconds / n_folds if seconds else None,
                        }
                    )
    return pd.DataFrame(rows)


def collect_predictions(spec: StudySpec, models: Sequence[ModelRef]) -> pd.DataFrame:
    """Saved held-out and training-fold risks of every finished fold (:data:`PRED_COLUMNS`).

    CNN: ``fold_<k>/oof.csv`` and ``fold_<k>/train_risk_<protocol>.csv`` (the selected
    checkpoint's risks on its training rows). Peer: ``oof_predictions.csv`` and
    ``train_risk.csv`` of each split's run (protocol ``fit``).
    """
    frames = []
    for m in models:
        for split in spec.cnn_splits() if m.kind == "cnn" else spec.splits():
            frames += _cnn_predictions(spec, m, split) if m.kind == "cnn" else _peer_predictions(spec, m, split)
    if not frames:
        return pd.DataFrame(columns=PRED_COLUMNS)
    return pd.concat(frames, ignore_index=True)[PRED_COLUMNS]


def _pred_frame(df: pd.DataFrame, model: ModelRef, split: str, role: str, **fixed: Any) -> pd.DataFrame:
    out = df.assign(model=model.name, kind=model.kind, split=split, role=role, **fixed)
    return out.assign(case_id=out["case_id"].astype(str))[PRED_COLUMNS]


def collect_seed_predictions(spec: StudySpec, models: Sequence[ModelRef]) -> pd.DataFrame:
    """Held-out risks (``role = oof``) of every training seed of the configurations trained
    with several seeds, on ``cv0``: :data:`PRED_COLUMNS` + ``seed``; empty without."""
    names = {c.name for c in spec.seed_configurations()}
    frames = [
        f.assign(seed=s)
        for m in models
        if m.name in names
        for s in spec.seed_indices(Configuration.from_name(m.name))
        for f in _cnn_predictions(spec, m, FIRST_SPLIT, s)
        if (f["role"] == "oof").all()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*PRED_COLUMNS, "seed"])


def _cnn_predictions(spec: StudySpec, model: ModelRef, split: str, seed: int = 0) -> list[pd.DataFrame]:
    layout = RunLayout(spec.run_dir(Configuration.from_name(model.name), split, seed))
    frames = []
    for k in range(split_n_folds(spec, split)):
        if not layout.is_done(k) or not layout.oof(k).is_file():
            continue
        oof = pd.read_csv(layout.oof(k), dtype={"case_id": str})
        frames.append(_pred_frame(oof, model, split, "oof"))
        for proto in oof["protocol"].unique():
            path = layout.train_risk(k, proto)
            if path.is_file():
                tr = pd.read_csv(path, dtype={"case_id": str})
                frames.append(_pred_frame(tr, model, split, "train", protocol=proto, fold=k))
    return frames


def _peer_predictions(spec: StudySpec, model: ModelRef, split: str) -> list[pd.DataFrame]:
    peer = {p.name: p for p in spec.peer_list()}[model.name]
    if not peer_done(spec, peer, split):
        return []
    layout = PeerRunLayout(spec.peer_dir(peer, split))
    frames = [
        _pred_frame(pd.read_csv(layout.oof_predictions, dtype={"case_id": str}), model, split, "oof", protocol="fit")
    ]
    if layout.train_risk.is_file():
        frames.append(
            _pred_frame(pd.read_csv(layout.train_risk, dtype={"case_id": str}), model, split, "train", protocol="fit")
        )
    return frames


def collect_training(spec: StudySpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Learning curves (``curves.csv``) and per-cell training facts (``done.json``).

    Columns missing in older runs are simply absent (curves) or NaN (cells).

    Every cell of the grid, each training seed included (``seed`` column).

    Returns:
        ``(curves, cells)``: curves ``split, seed, config, fold, epoch`` + the ``curves.csv``
        columns; cells ``split, seed, config, fold, done, epochs_run, seconds, start_<score>``
        (:data:`EVAL_COLUMNS` before the first step), ``val_dice_<protocol>`` (outer Dice at
        the selected epoch) and ``selected_epoch_<protocol>``.
    """
    curves, cells = [], []
    for cell in grid(spec):
        key = {"split": cell.split, "seed": cell.seed, "config": cell.config.name, "fold": cell.fold}
        done, rec, info = _cell_records(spec, cell)
        start = rec.get("start") or {}
        row = key | {"done": done, "epochs_run": rec.get("epochs_run"), "seconds": info.get("seconds")}
        row |= {f"start_{c}": as_float(start.get(c)) for c in EVAL_COLUMNS}
        protos = {p: rec.get("protocols", {}).get(p) or {} for p in PROTOCOLS}
        row |= {f"val_dice_{p}": as_float(r.get("val_dice")) for p, r in protos.items()}
        row |= {f"selected_epoch_{p}": r.get("selected_epoch") for p, r in protos.items()}
        cells.append(row)
        curves_path = cell_layout(spec, cell).curves(cell.fold)
        if done and curves_path.is_file():
            curves.append(pd.read_csv(curves_path).assign(**key))
    curve_frame = (
        pd.concat(curves, ignore_index=True)
        if curves
        else pd.DataFrame(columns=["split", "seed", "config", "fold", "epoch"])
    )
    return curve_frame, pd.DataFrame(cells)


def collect_peer_fits(spec: StudySpec) -> pd.DataFrame:
    """Per peer fold: ``split, peer, fold, n_train`` and every ``<block>_pca_components``."""
    rows = []
    for split in spec.splits():
        for peer in spec.peer_list():
            if not peer_done(spec, peer, split):
                continue
            for f in read_json(PeerRunLayout(spec.peer_dir(peer, split)).summary).get("fit", []):
                rows.append(
                    {"split": split, "peer": peer.name, "fold": int(f["fold"]), "n_train": f.get("n_train")}
                    | {k: v for k, v in f.items() if k.endswith("_pca_components")}
                )
    return pd.DataFrame(rows, columns=None if rows else ["split", "peer", "fold", "n_train"])
