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
from typing import Any

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


@dataclass
class SurvivalSection:
    """IBS / calibration / risk groups (:func:`pipeline.report.analysis.survival_analysis`)
    of the models Table 1 selects, under ``protocol`` (the CNN's), at ``horizon_days``."""

    protocol: str
    horizon_days: float
    models: list[dict[str, Any]]


@dataclass
class TrainingSection:
    """Learning curves (:func:`~pipeline.report.analysis.learning_curves`), per-cell training
    facts (:func:`~pipeline.report.analysis.cell_training`) and their summary."""

    curves: dict[str, Any]
    cells: list[dict[str, Any]]
    summary: dict[str, Any]


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
    report_code_version: Any
    study: dict[str, Any]
    cells: CellCount
    protocols: list[str]
    protocol_labels: dict[str, str]
    n_boot: int
    facts: dict[str, Any]
    stamp: str | None
    settings: list[list[Any]]
    provenance: list[list[Any]]
    analyses: list[dict[str, Any]]
    headline: dict[str, Any]
    summary: Any
    table1: dict[str, Any]
    identical: list[dict[str, Any]]
    paired_vs_baseline: dict[str, list[dict[str, Any]]]
    paired_vs_clinical_cox: list[dict[str, Any]]
    loco: dict[str, Any]
    survival: SurvivalSection
    training: TrainingSection
    compute: dict[str, Any]
    undefined: list[dict[str, Any]]
    records: Any
    environment: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)

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
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"not a report results object: missing {missing}")
        kw = {k: v for k, v in data.items() if k in names}
        kw["cells"] = CellCount(**data["cells"])
        kw["survival"] = SurvivalSection(**data["survival"])
        training = data.get("training") or {}
        kw["training"] = TrainingSection(training.get("curves") or {}, training.get("cells") or [],
                                         training.get("summary") or {})
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
