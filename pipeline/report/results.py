"""The typed results object of a study report: every number the report shows, by name.

:func:`pipeline.report.analysis.analyse` builds a :class:`Results`; :meth:`Results.to_json`
writes ``results.json`` (NaN -> null, frames -> lists of records) and :meth:`Results.from_json`
reads one back, so the renderer (:mod:`pipeline.report.render`) reads the same fields whether it
draws a fresh analysis or a saved file. Sections whose rows are tables (summary, Table 1, paired
comparisons, LOCO ...) keep their rows as lists of plain records: their columns are documented
by the analysis that makes them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pandas as pd

from pipeline.report.labels import clean

#: Version of the results layout. ``environment``, ``seeds`` and ``selection`` are optional:
#: results written before them lack them. Schema 4: a summary row's CV repeats are
#: ``n_repeats`` (``n_splits`` before).
RESULTS_SCHEMA = 4


@dataclass
class CellCount:
    """CNN cells of the study grid: how many there are and how many finished."""

    total: int
    done: int


# --- the shapes of the sections: records as results.json holds them ----------------------------
# TypedDicts are plain dicts at run time: they name the keys each analysis writes (documented
# by the function that makes them) without changing the JSON. ``total=False`` where a key is
# present only in some states (pending rows, older results, a study without LOCO).


class StudyRecord(TypedDict, total=False):
    """``study.json`` (:func:`pipeline.study.prepare_study`): the parts the report reads by
    name; ``spec`` is :meth:`pipeline.study_spec.StudySpec.to_dict`."""

    spec: dict[str, Any]
    spec_hash: str
    code_version: str
    cohort: dict[str, Any]
    folds_hash: str
    cache_params_hash: str
    embeddings: dict[str, Any] | None
    info: dict[str, Any]
    splits: dict[str, Any]
    created: str
    updated: str


class Facts(TypedDict, total=False):
    """What the sentences and the stamp need (:func:`~pipeline.report.analysis.study_facts`,
    :func:`~pipeline.report.analysis.baseline_training`); any may be missing."""

    random_init: bool
    synthetic: bool
    n_cases: int | None
    n_events: int | None
    n_folds: int | None
    baseline_sd: float | None
    baseline_train_c: float | None
    baseline_steps: int | None
    baseline_barely_trained: bool


class AnalysisRun(TypedDict):
    """Which analysis ran on which splits (:func:`~pipeline.report.analysis.analyses_run`)."""

    analysis: str
    cnn: list[str]
    peers: list[str]


class MeanCI(TypedDict):
    """:func:`pipeline.stats.mean_ci`: mean, sample SD, count and t-interval (None where undefined)."""

    mean: float | None
    sd: float | None
    n: int
    low: float | None
    high: float | None
    level: float
    clipped: bool


class SummaryRow(TypedDict, total=False):
    """One protocol x configuration or peer (:func:`~pipeline.report.analysis.summarise_records`):
    ``n_folds`` counts fold slots over every repeat, ``n_repeats`` the CV repeats,
    ``c_n`` / ``auc_n`` the defined folds."""

    protocol: str
    config: str
    kind: str
    group: str
    d: str
    n_done: int
    n_folds: int
    n_repeats: int
    c_mean: float | None
    c_sd: float | None
    c_n: int
    c_low: float | None
    c_high: float | None
    c_clipped: bool
    auc_mean: float | None
    auc_sd: float | None
    auc_n: int
    auc_low: float | None
    auc_high: float | None
    auc_clipped: bool
    sel_mean: float | None


class Table1Row(TypedDict, total=False):
    """One Table 1 row (:func:`~pipeline.report.analysis.table1`): a pending row has only
    ``group, config, d, status``. Made from a frame, so its counts are JSON numbers that may
    read ``6.0`` (and None on a pending row): typed ``float``."""

    group: str
    config: str | None
    d: str | None
    status: str
    c_mean: float | None
    c_sd: float | None
    c_n: float | None
    auc_mean: float | None
    auc_sd: float | None
    auc_n: float | None
    n_folds: float | None
    selected_by: str | None
    delta_c: float | None
    delta_auc: float | None


class PairedRow(TypedDict, total=False):
    """One model vs a reference (:func:`~pipeline.report.analysis.paired_comparisons`,
    :func:`pipeline.report.noise.seed_paired_comparisons`): the :class:`pipeline.stats.
    PairedComparison` fields once ``status`` is ``done``; ``reason`` when ``undefined``."""

    model: str
    label: str
    kind: str
    reference: str
    protocol: str
    splits: list[str]
    status: str
    reason: str
    n_seeds: int
    n_seeds_reference: int
    within_baseline_noise: bool | None
    metric: str
    a: float
    b: float
    delta: float
    ci_low: float
    ci_high: float
    level: float
    p_value: float
    n_boot: int
    n_boot_dropped: int
    n_cases: int
    n_groups: int
    seed: int
    per_fold: list[dict[str, Any]]
    fold_test: dict[str, Any] | None
    n_seeds_a: int
    n_seeds_b: int
    seed_means_a: list[float]
    seed_means_b: list[float]


class HeadlineRow(TypedDict, total=False):
    """One headline row (:func:`~pipeline.report.analysis.headline`): a Table 1 row with its
    paired Δ vs the baseline (its counts as Table 1 has them)."""

    group: str
    label: str
    config: str | None
    d: str | None
    status: str
    c_mean: float | None
    c_sd: float | None
    c_n: float | None
    n_folds: float | None
    auc_mean: float | None
    auc_sd: float | None
    auc_n: float | None
    paired_status: str
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    paired_splits: list[str]
    within_baseline_noise: bool | None


class TrainingNoise(TypedDict):
    """The baseline's training noise under one protocol, and the largest |Δ| within it."""

    n_seeds: int
    mean: float
    sd: float
    threshold: float


class Headline(TypedDict, total=False):
    """The first screen (:func:`~pipeline.report.analysis.headline`, with its sentences)."""

    protocols: list[str]
    rows: dict[str, list[HeadlineRow]]
    oracle_c_index: float | None
    training_noise: dict[str, TrainingNoise]
    sentences: list[str]


class IdenticalGroup(TypedDict):
    """Configurations with identical results, and why (:func:`~pipeline.report.analysis.identical_groups`)."""

    group: str
    configs: list[str]
    d: list[str]
    shown: str
    reason: str


class LocoCentre(TypedDict):
    """One LOCO fold (:func:`~pipeline.report.analysis.loco_centre_table`)."""

    fold: int
    centre: str
    n: int
    events: int
    events_before_365: int


class LocoCell(TypedDict):
    """One model's result on one held-out centre (None and the reason where undefined)."""

    fold: int
    centre: str
    done: bool
    c_index: float | None
    c_index_reason: str | None
    auc_1y: float | None
    auc_1y_reason: str | None


class LocoModel(TypedDict):
    """One model under one protocol over the held-out centres."""

    model: str
    label: str
    kind: str
    protocol: str
    per_centre: list[LocoCell]
    n_done: int
    mean_c_index: MeanCI
    mean_auc_1y: MeanCI
    pooled_c_index: float | None


class LocoSection(TypedDict, total=False):
    """Leave-one-centre-out (:func:`~pipeline.report.analysis.loco_results`); empty without LOCO."""

    centres: list[LocoCentre]
    models: list[LocoModel]


class SurvivalModel(TypedDict, total=False):
    """IBS, calibration and risk-group KM of one model (:func:`~pipeline.report.analysis.
    survival_analysis`): ``calibration`` and ``km`` once ``status`` is ``done``."""

    model: str
    label: str
    kind: str
    protocol: str
    horizon: float
    status: str
    ibs: dict[str, Any]
    calibration: dict[str, Any]
    km: dict[str, Any]


class LearningCurves(TypedDict, total=False):
    """Fold-mean learning curves of one split (:func:`~pipeline.report.analysis.learning_curves`):
    each of ``configs`` holds ``config, x, n_folds`` and one list per name in ``columns``;
    empty in results written before them."""

    split: str
    columns: list[str]
    configs: list[dict[str, Any]]


class CellTraining(TypedDict, total=False):
    """One finished CNN cell's training (:func:`~pipeline.report.analysis.cell_training`);
    ``epochs_run`` comes from a frame (``4.0``)."""

    split: str
    config: str
    fold: int
    epochs_run: float | None
    dice_start: float | None
    dice_end: float | None
    train_c_start: float | None
    train_c_end: float | None
    train_c_epochs: int
    selected_epoch_inner: int | None
    selected_epoch_paper: int | None


class TrainingSummary(TypedDict, total=False):
    """Means over cells and counts of cells that selected their last epoch
    (:func:`~pipeline.report.analysis.training_summary`); ``[fewest, most]`` for the ranges."""

    n_cells: int
    dice_start: float | None
    dice_end: float | None
    train_c_start: float | None
    train_c_end: float | None
    train_c_epochs: list[int]
    epochs_run: list[int]
    selected_last_inner: int
    n_selected_inner: int
    selected_last_paper: int
    n_selected_paper: int


class ComputeSummary(TypedDict, total=False):
    """CNN cell and peer time (:func:`~pipeline.report.analysis.compute_summary`)."""

    n_cnn_cells: int
    cnn_minutes: float | None
    median_cell_seconds: float | None
    peer_minutes: float


class UndefinedMetric(TypedDict):
    """How many finished CV fold results of a metric are undefined, by reason code."""

    metric: str
    n_results: int
    n_undefined: int
    reasons: dict[str, int]


class RecordRow(TypedDict, total=False):
    """One per-fold record (``results.csv``; :func:`pipeline.report.collect.collect_records`
    and :func:`~pipeline.report.collect.collect_peer_records`): rows of a frame, so the epochs
    read ``5.0`` (NaN, then None, on pending rows)."""

    split: str
    kind: str
    config: str
    group: str
    d: str
    fold: int
    protocol: str
    done: bool
    c_index: float | None
    c_index_reason: str | None
    auc_1y: float | None
    auc_1y_reason: str | None
    selection_c_index: float | None
    selected_epoch: float | None
    val_dice: float | None
    epochs_run: float | None
    seconds: float | None


class EnvironmentGroup(TypedDict):
    """One environment the runs recorded (:func:`pipeline.runtime.environment_record`) and the
    runs that share it (:func:`pipeline.report.collect.collect_environments`)."""

    environment: dict[str, Any]
    runs: list[str]


class SeedNoise(TypedDict):
    """One configuration's training noise under one protocol (:func:`pipeline.report.noise.seed_noise`)."""

    config: str
    group: str
    d: str
    protocol: str
    n_seeds: int
    seeds: list[int]
    seed_means: list[float]
    mean: float | None
    sd: float | None


class SeedsSection(TypedDict, total=False):
    """Training noise (:func:`~pipeline.report.analysis.seeds_section`); empty in results
    written before it."""

    n_seeds: int
    seed_configs: list[str]
    noise_rule: str
    noise_sd_multiple: float
    noise: list[SeedNoise]
    paired_vs_baseline: dict[str, list[PairedRow]]


class TieCount(TypedDict):
    """Finished cells with a selected epoch, and those a tie decided (named)."""

    n_cells: int
    n_ties: int
    cells: list[str]


class SelectionSection(TypedDict, total=False):
    """The checkpoint-selection rule and its ties per protocol
    (:func:`~pipeline.report.analysis.selection_section`); empty in results written before it."""

    rule: str
    select_from_epoch: int
    ties: dict[str, TieCount]


# --- the results object --------------------------------------------------------------------------


@dataclass
class SurvivalSection:
    """IBS / calibration / risk groups (:func:`pipeline.report.analysis.survival_analysis`)
    of the models Table 1 selects, under ``protocol`` (the CNN's), at ``horizon_days``."""

    protocol: str
    horizon_days: float
    models: list[SurvivalModel]


@dataclass
class TrainingSection:
    """Learning curves (:func:`~pipeline.report.analysis.learning_curves`), per-cell training
    facts (:func:`~pipeline.report.analysis.cell_training`) and their summary."""

    curves: LearningCurves
    cells: list[CellTraining]
    summary: TrainingSummary


@dataclass
class Results:
    """Everything the report shows. Frames are allowed while analysing; :meth:`to_json` turns
    them into records (and :meth:`from_json` keeps records), so a renderer may assume records.

    Attributes:
        schema, generated, report_code_version: layout version, time and code of the analysis.
        study: the ``study.json`` record (its ``spec`` included).
        cells: :class:`CellCount`.
        protocols: model-selection protocols with results, the one to trust first.
        protocol_labels: their display names.
        n_boot: bootstrap draws of the paired comparisons.
        facts: study facts (random init, synthetic, folds, baseline SD) the sentences use.
        stamp: the warning drawn into every figure, or None.
        settings, provenance: ``[item, value]`` rows of the two key-value tables.
        analyses: which analysis ran on which splits, for the CNN and the peers.
        headline: rows per protocol, oracle C-index and sentences.
        summary: mean +- SD / CI per protocol x configuration or peer.
        table1: Table 1 rows per protocol.
        identical: groups of rows identical for a stated reason.
        paired_vs_baseline: paired comparisons vs the baseline, per protocol.
        paired_vs_clinical_cox: paired comparisons of the peers vs the clinical Cox.
        loco: leave-one-centre-out tables (empty without LOCO).
        survival: :class:`SurvivalSection`.
        training: :class:`TrainingSection`.
        compute: CNN / peer time.
        undefined: undefined metrics and their reasons.
        records: per-fold records (``results.csv``).
        environment: the distinct software / hardware environments the runs recorded
            (``run.json["environment"]``), each with the runs that share it; empty when no run
            recorded one.
        seeds: training noise (:func:`pipeline.report.analysis.seeds_section`): ``n_seeds``,
            ``seed_configs``, ``noise_rule``, ``noise_sd_multiple``, ``noise`` (per configuration
            with several seeds and protocol: ``n_seeds``, ``seed_means``, ``mean``, ``sd``) and
            ``paired_vs_baseline`` (per protocol: Δ with a CI holding patients and seeds).
        selection: the checkpoint-selection tie rule and how often a tie decided the checkpoint
            (:func:`pipeline.report.analysis.selection_section`: ``rule``, ``select_from_epoch``,
            ``ties`` per protocol ``{n_cells, n_ties, cells}``).
    """

    schema: int
    generated: str
    report_code_version: str
    study: StudyRecord
    cells: CellCount
    protocols: list[str]
    protocol_labels: dict[str, str]
    n_boot: int
    facts: Facts
    stamp: str | None
    settings: list[list[str]]
    provenance: list[list[str | None]]
    analyses: list[AnalysisRun]
    headline: Headline
    summary: list[SummaryRow] | pd.DataFrame
    table1: dict[str, list[Table1Row] | pd.DataFrame]
    identical: list[IdenticalGroup]
    paired_vs_baseline: dict[str, list[PairedRow]]
    paired_vs_clinical_cox: list[PairedRow]
    loco: LocoSection
    survival: SurvivalSection
    training: TrainingSection
    compute: ComputeSummary
    undefined: list[UndefinedMetric]
    records: list[RecordRow] | pd.DataFrame
    environment: list[EnvironmentGroup] = field(default_factory=list)
    seeds: SeedsSection = field(default_factory=dict)
    selection: SelectionSection = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (the ``results.json`` content): NaN -> None, frames -> records."""
        return clean(_as_dict(self))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Results:
        """A :class:`Results` from :meth:`to_json` output or a loaded ``results.json``.

        Raises:
            ValueError: a required section is missing (the file is not a results object).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"not a report results object: missing {missing}")
        kw = {k: v for k, v in data.items() if k in names}
        kw["cells"] = CellCount(**data["cells"])
        kw["survival"] = SurvivalSection(**data["survival"])
        training = data.get("training") or {}
        kw["training"] = TrainingSection(
            training.get("curves") or {}, training.get("cells") or [], training.get("summary") or {}
        )
        return cls(**kw)

    def clean(self) -> Results:
        """The JSON-safe copy, typed (what the renderer and ``results.json`` see)."""
        return Results.from_json(self.to_json())


def _as_dict(x: Any) -> Any:
    """Dataclasses -> dicts, one level at a time (frames are left for :func:`clean`)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _as_dict(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _as_dict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not isinstance(x, pd.DataFrame):
        return [_as_dict(v) for v in x]
    return x
