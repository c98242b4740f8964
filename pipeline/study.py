"""The projection-ablation study: 13 configurations x K folds, each cell its own job.

Grid (REFERENCE section 1): the DeepMTS+DAFT baseline plus, for each embedding set
(CT, PET, CT+PET), the FM projection size d in {64, 128, 256, orig}: 13 configurations.
Every configuration is trained on the same K folds (one shared folds file), so the 5 x 13
= 65 cells are paired. Embeddings come from the stage-one cache (one file of the set that
reads every encoder, ``ctpet``; the CT-only configurations read its ``ct`` rows, etc.): no
foundation model runs during the grid.

Each (configuration, fold) cell is independent and resumable: :func:`run_cell` calls
:func:`pipeline.train.train_fold`, which writes ``<study>/runs/<config>/fold_<k>/`` and its
completion marker ``done.json`` last. A killed worker or a pre-empted cluster job loses
only its own cell; rerunning the study skips every cell that has a marker.

Beyond the paper's single 5-fold run, a study can hold further *splits* of the same
cohort, each with its own shared folds file and its own resumable cells:

* ``cv0`` .. ``cv<R-1>``: repeated stratified K-fold CV (``repeats = R``); repeat ``r``
  uses split seed ``folds_seed + r`` (as :func:`pipeline.splits.repeated_folds`), so
  ``cv0`` is the paper-style run and every configuration sees identical folds per repeat;
* ``loco``: leave-one-centre-out (:func:`pipeline.splits.leave_one_centre_out`), one fold
  per centre.

The CNN grid trains on every split, or only on ``cv0`` (``cnn_extra_splits = False``, used
by the CPU demo). The classical peers (:mod:`pipeline.peers`: clinical Cox,
radiomics-lite Cox and one penalised-Cox embedding head per FM configuration, with the same
embedding set and projection size) take seconds and always run on every split, on the same
folds files as the CNN.

Training noise is measured by *seeds* (``seeds = S``): on ``cv0``, seed index ``s`` trains
each configuration of ``seed_configs`` (default all) with training seed ``train.seed + s``
on the same outer folds and the same inner split (``TrainConfig.split_seed`` stays), so the
spread over seeds is the training noise alone. Seed 0 is the study's ordinary cell, in its
ordinary folder; seeds ``s >= 1`` are resumable cells of their own (:meth:`StudySpec.seed_root`).

Layout of a study folder::

    <study>/study.json                 spec, cohort summary, provenance (see prepare_study)
    <study>/folds.json                 the shared folds of split cv0 (pipeline.splits format)
    <study>/runs/<config>/             a run folder (pipeline.layout.RunLayout): run.json, and
                                       fold_<k>/ with train_fold's outputs, done.json, cell.json
    <study>/peers/<peer>/              a peer run folder (pipeline.layout.PeerRunLayout)
    <study>/splits/<split>/            the same (folds.json, runs/, peers/) for cv1.. and loco
    <study>/seeds/<s>/runs/<config>/   training seed index s >= 1 of cv0 (StudySpec.seed_root)
    <study>/submitit/                  logs of cluster jobs (when that executor is used)
    <study>/.claims/<cell key>.lock    the claim a cell's trainer holds (claim_cell), and .log

Executors: a local process pool (:func:`run_pool` on :class:`pipeline.pool.JobPool`, shared
by cells and peers: ``workers`` processes, each pinned round-robin to one GPU through
``CUDA_VISIBLE_DEVICES`` when GPUs are present, failures named per job, progress per result)
and submitit (Slurm, or submitit's
local executor), which submits the pending cells as one array job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import submitit

from pipeline.artefacts import (
    ProvenanceError,
    code_version,
    params_hash,
    read_json,
    sha256_file,
    utc_now,
    write_json_atomic,
)
from pipeline.cache import PreprocessedCache
from pipeline.embedding_sets import embedding_set, head_group, set_names
from pipeline.embeddings import RANDOM_INIT, RandomInitWarning, read_embeddings
from pipeline.layout import PeerRunLayout, RunLayout, folds_hash
from pipeline.manifest import read_manifest, survival_cases
from pipeline.peers import HeadConfig, fit_peer_run
from pipeline.pool import Job, JobPool
from pipeline.runtime import DEFAULT_THREADS
from pipeline.splits import case_set_sha256, leave_one_centre_out, load_folds, make_folds, save_folds

# pipeline.train and pipeline.dataset import torch: this module imports them where a cell
# trains, so that status listings and reports load without torch, and a pool worker sets
# CUDA_VISIBLE_DEVICES before torch is loaded (_worker_init).

#: Projection sizes of the ablation; ``None`` = native size ("orig": 512 CT, 768 PET).
PROJ_SIZES: tuple[int | None, ...] = (64, 128, 256, None)
BASELINE = "baseline"
STUDY_FILE = "study.json"
#: The first CV split: the paper-style 5-fold run, stored at the study root.
FIRST_SPLIT = "cv0"
LOCO = "loco"
#: Peer families a study can run (``StudySpec.peers``).
PEER_FAMILIES = ("clinical", "radiomics", "heads")


def split_names(repeats: int, loco: bool) -> list[str]:
    """``["cv0", .., "cv<R-1>"]`` (+ ``"loco"``)."""
    return [f"cv{r}" for r in range(int(repeats))] + ([LOCO] if loco else [])


def split_repeat(split: str) -> int | None:
    """``"cv3"`` -> 3, ``"loco"`` -> None; raises ``ValueError`` naming a bad split."""
    if split == LOCO:
        return None
    if split.startswith("cv") and split[2:].isdigit():
        return int(split[2:])
    raise ValueError(f"not a split name: {split!r} (expected 'cv<r>' or 'loco')")


def proj_label(proj: int | None) -> str:
    """``64`` -> ``"64"``, ``None`` -> ``"orig"``."""
    return "orig" if proj is None else str(int(proj))


def parse_proj_label(label: str) -> int | None:
    """Inverse of :func:`proj_label`; raises ``ValueError`` naming a bad label."""
    if label == "orig":
        return None
    try:
        value = int(label)
    except ValueError:
        raise ValueError(f"projection size must be a positive integer or 'orig', got {label!r}") from None
    if value < 1:
        raise ValueError(f"projection size must be a positive integer or 'orig', got {label!r}")
    return value


@dataclass(frozen=True)
class Configuration:
    """One row of the ablation: the baseline, or an embedding set with a projection size.

    Attributes:
        embedding_set: ``None`` for the baseline, else a set of :mod:`pipeline.embedding_sets`.
        proj: projection size, ``None`` = native ("orig"); ignored for the baseline.
    """

    embedding_set: str | None = None
    proj: int | None = None

    def __post_init__(self) -> None:
        if self.embedding_set is not None:
            embedding_set(self.embedding_set)  # names the registered sets when unknown
        if self.embedding_set is None and self.proj is not None:
            raise ValueError(f"the baseline has no FM projection, got proj={self.proj}")

    @property
    def name(self) -> str:
        """Folder name: ``baseline``, ``ct-d64`` ... ``ctpet-dorig``."""
        return BASELINE if self.embedding_set is None else f"{self.embedding_set}-d{proj_label(self.proj)}"

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoders whose embeddings the configuration reads (none for the baseline)."""
        return () if self.embedding_set is None else embedding_set(self.embedding_set).encoders

    @property
    def group(self) -> str:
        """Its report group: ``baseline`` or its embedding set."""
        return self.embedding_set or BASELINE

    @property
    def d_label(self) -> str:
        return "-" if self.embedding_set is None else proj_label(self.proj)

    @classmethod
    def from_name(cls, name: str) -> Configuration:
        """Inverse of :attr:`name`; raises ``ValueError`` naming a bad name."""
        if name == BASELINE:
            return cls()
        set_name, sep, d = name.partition("-d")
        hint = f"not a study configuration name: {name!r} (e.g. 'baseline', 'ct-d64', 'ctpet-dorig')"
        if not sep or set_name not in set_names():
            raise ValueError(hint)
        try:
            return cls(set_name, parse_proj_label(d))
        except ValueError as exc:
            raise ValueError(f"{hint}: {exc}") from None


def configurations(
    sets: Sequence[str] | None = None,
    projections: Sequence[int | None] = PROJ_SIZES,
    *,
    baseline: bool = True,
) -> list[Configuration]:
    """The ablation grid: baseline first, then each embedding set x projection size.

    ``sets`` default to every registered set; with the defaults this is the paper's 13
    configurations.
    """
    out = [Configuration()] if baseline else []
    out += [Configuration(s, p) for s in (set_names() if sets is None else sets) for p in projections]
    return out


@dataclass(frozen=True)
class Cell:
    """One job: a configuration on one outer fold of one split (``cv<r>`` or ``loco``),
    trained with seed index ``seed`` (0 = the study's training seed, s = that seed + s)."""

    config: Configuration
    fold: int
    split: str = FIRST_SPLIT
    seed: int = 0

    @property
    def key(self) -> str:
        """``baseline/fold_0``, ``cv1/baseline/fold_0``, ``seed1/baseline/fold_0``."""
        head = "" if self.split == FIRST_SPLIT else f"{self.split}/"
        head += f"seed{self.seed}/" if self.seed else ""
        return f"{head}{self.config.name}/fold_{self.fold}"


@dataclass(frozen=True)
class Peer:
    """A classical model fitted on the study's folds (:mod:`pipeline.peers`).

    Attributes:
        kind: ``clinical`` (ridge Cox on the clinical covariates), ``radiomics`` (ridge
            Cox on radiomics-lite features) or ``embeddings`` (penalised Cox head on the
            cached FM embeddings + clinical).
        embedding_set: the embedding set of a head (:mod:`pipeline.embedding_sets`).
        proj: PCA size of a head, ``None`` = all standardised features ("orig").
    """

    kind: str
    embedding_set: str | None = None
    proj: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("clinical", "radiomics", "embeddings"):
            raise ValueError(f"unknown peer kind {self.kind!r}")
        if (self.kind == "embeddings") != (self.embedding_set is not None):
            raise ValueError(f"peer {self.kind!r}: an embedding set is needed by (and only by) heads")

    @property
    def name(self) -> str:
        """``clinical-cox``, ``radiomics-cox`` or ``head-<set>-d<proj>``."""
        if self.kind == "embeddings":
            return f"{self.group}-d{proj_label(self.proj)}"
        return f"{self.kind}-cox"

    @property
    def group(self) -> str:
        """Its report group: ``clinical``, ``radiomics`` or ``head-<set>``."""
        return head_group(self.embedding_set) if self.kind == "embeddings" else self.kind

    @property
    def label(self) -> str:
        if self.kind == "clinical":
            return "peer: clinical Cox"
        if self.kind == "radiomics":
            return "peer: radiomics-lite Cox"
        return f"peer: {embedding_set(self.embedding_set).label} embedding head, d = {proj_label(self.proj)}"

    def head_config(self, overrides: dict[str, Any] | None = None):
        """The :class:`pipeline.peers.HeadConfig`: ridge for clinical / radiomics (radiomics
        without clinical covariates), coxnet + clinical with ``proj`` for heads."""
        if self.kind == "clinical":
            return HeadConfig(model="ridge", with_clinical=True)
        if self.kind == "radiomics":
            return HeadConfig(model="ridge", with_clinical=False)
        return HeadConfig(**({"model": "coxnet", "with_clinical": True} | dict(overrides or {}) | {"proj": self.proj}))


@dataclass(frozen=True)
class StudySpec:
    """Everything a cell needs, as plain paths and values (picklable, JSON-able).

    Attributes:
        manifest: the case manifest (absolute path).
        cache_root: the preprocessed cache.
        embeddings: the stage-one HDF5 holding every encoder the grid uses (the set
            reading all, ``ctpet``), or ``None`` for a baseline-only study.
        study_dir: output folder of the study.
        n_folds: number of outer CV folds.
        folds_seed: seed of the shared folds (made once, then reused).
        train: :class:`pipeline.train.TrainConfig` fields shared by every configuration
            (``proj`` is set per configuration).
        configs: configuration names of the grid (see :func:`configurations`).
        repeats: CV repeats R (splits ``cv0`` .. ``cv<R-1>``, split seeds
            ``folds_seed + r``).
        loco: add the leave-one-centre-out split.
        cnn_extra_splits: train the CNN grid on every split; False = only on ``cv0``
            (the peers still run on every split).
        peers: peer families to fit (subset of :data:`PEER_FAMILIES`); ``heads`` adds one
            embedding head per FM configuration of the grid.
        head: :class:`pipeline.peers.HeadConfig` overrides of the embedding heads.
        seeds: training seeds S per configuration of ``seed_configs`` on ``cv0``: seed index
            s trains with ``TrainConfig.seed = train seed + s`` and the same inner split
            (``split_seed`` unchanged); 1 = the study's single seed.
        seed_configs: configuration names trained with every seed; ``None`` = all of
            ``configs`` (names outside ``configs`` are not trained).
    """

    manifest: str
    cache_root: str
    embeddings: str | None
    study_dir: str
    n_folds: int = 5
    folds_seed: int = 42
    train: dict[str, Any] = field(default_factory=dict)
    configs: tuple[str, ...] = tuple(c.name for c in configurations())
    repeats: int = 1
    loco: bool = False
    cnn_extra_splits: bool = True
    peers: tuple[str, ...] = PEER_FAMILIES
    head: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1
    seed_configs: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be >= 2, got {self.n_folds}")
        if int(self.repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if int(self.seeds) < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.seed_configs is not None:
            for name in self.seed_configs:
                Configuration.from_name(name)  # names a bad one
            if len(set(self.seed_configs)) != len(self.seed_configs):
                raise ValueError(f"duplicate configurations in seed_configs {self.seed_configs}")
        bad = [p for p in self.peers if p not in PEER_FAMILIES]
        if bad:
            raise ValueError(f"unknown peer families {bad}; choose from {list(PEER_FAMILIES)}")
        if "proj" in self.train:
            raise ValueError("StudySpec.train must not set 'proj': the grid sets it per configuration")
        confs = [Configuration.from_name(n) for n in self.configs]
        if len(set(self.configs)) != len(self.configs):
            raise ValueError(f"duplicate configurations in {self.configs}")
        if self.embeddings is None and any(c.embedding_set for c in confs):
            fm = [c.name for c in confs if c.embedding_set]
            raise ValueError(f"configurations {fm} need an embeddings file, none given")

    @classmethod
    def create(cls, manifest, cache_root, embeddings, study_dir, **kwargs: Any) -> StudySpec:
        """Build a spec with absolute paths, so cells run from any working directory."""
        absolute = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731
        return cls(absolute(manifest), absolute(cache_root), absolute(embeddings), absolute(study_dir), **kwargs)

    @property
    def root(self) -> Path:
        return Path(self.study_dir)

    @property
    def folds_path(self) -> Path:
        return self.folds_path_of(FIRST_SPLIT)

    def splits(self) -> list[str]:
        """Every split of the study: ``cv0`` .. ``cv<R-1>`` (+ ``loco``)."""
        return split_names(self.repeats, self.loco)

    def cnn_splits(self) -> list[str]:
        """The splits the CNN grid trains on."""
        return self.splits() if self.cnn_extra_splits else [FIRST_SPLIT]

    def split_root(self, split: str = FIRST_SPLIT) -> Path:
        """``cv0`` lives at the study root (the paper-style layout); others in ``splits/``."""
        split_repeat(split)  # validates the name
        return self.root if split == FIRST_SPLIT else self.root / "splits" / split

    def folds_path_of(self, split: str) -> Path:
        return self.split_root(split) / "folds.json"

    def configurations(self) -> list[Configuration]:
        return [Configuration.from_name(n) for n in self.configs]

    def seed_indices(self, config: Configuration, split: str = FIRST_SPLIT) -> range:
        """The seed indices a configuration trains on a split: ``0 .. seeds-1`` on ``cv0`` for
        the configurations of ``seed_configs``, else only 0."""
        extra = split == FIRST_SPLIT and (self.seed_configs is None or config.name in self.seed_configs)
        return range(int(self.seeds) if extra else 1)

    def seed_configurations(self) -> list[Configuration]:
        """The configurations of the grid trained with more than one seed."""
        return [c for c in self.configurations() if len(self.seed_indices(c)) > 1]

    def seed_root(self, split: str = FIRST_SPLIT, seed: int = 0) -> Path:
        """Where seed index ``seed`` of a split keeps its runs: the split's own folder for
        seed 0 (the study's ordinary layout), ``<split root>/seeds/<seed>`` otherwise."""
        root = self.split_root(split)
        return root if int(seed) == 0 else root / "seeds" / str(int(seed))

    def run_dir(self, config: Configuration, split: str = FIRST_SPLIT, seed: int = 0) -> Path:
        return self.seed_root(split, seed) / "runs" / config.name

    def peer_list(self) -> list[Peer]:
        """Clinical and radiomics peers, then one head per FM configuration of the grid."""
        out = [Peer(k) for k in ("clinical", "radiomics") if k in self.peers]
        if "heads" in self.peers and self.embeddings is not None:
            out += [Peer("embeddings", c.embedding_set, c.proj) for c in self.configurations() if c.embedding_set]
        return out

    def peer_dir(self, peer: Peer, split: str = FIRST_SPLIT) -> Path:
        return self.split_root(split) / "peers" / peer.name

    def train_config(self, config: Configuration, input_size: Sequence[int] | None = None, seed: int = 0):
        """The :class:`pipeline.train.TrainConfig` of one configuration.

        Args:
            config: the grid row; sets ``proj``.
            input_size: ``(D, H, W)`` of the cached survival volumes; written into the
                model overrides when they do not set it, so reduced-size caches work.
            seed: seed index; s >= 1 trains with ``seed + s`` and keeps the inner split of
                seed 0 (``split_seed`` = the study's), s = 0 is the study's config unchanged.
        """
        from pipeline.train import TrainConfig  # local: torch (see the note on imports)

        options = json.loads(json.dumps(self.train))  # deep copy of plain values
        if input_size is not None:
            options.setdefault("model", {}).setdefault("input_size", [int(s) for s in input_size])
        options["proj"] = config.proj
        if seed:
            base = int(options.get("seed", TrainConfig.seed))
            if options.get("split_seed") is None:
                options["split_seed"] = base
            options["seed"] = base + int(seed)
        return TrainConfig.from_dict(options)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["configs"] = list(self.configs)
        d["peers"] = list(self.peers)
        d["seed_configs"] = None if self.seed_configs is None else list(self.seed_configs)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudySpec:
        d = dict(d)
        d["configs"] = tuple(d.get("configs", ()))
        if "peers" in d:
            d["peers"] = tuple(d["peers"])
        if d.get("seed_configs") is not None:
            d["seed_configs"] = tuple(d["seed_configs"])
        return cls(**d)

    @property
    def hash(self) -> str:
        """Hash of what determines the CNN cells' results (not the output folder).

        Growing the study later (more configurations, repeats, LOCO, peers, seeds) keeps
        finished cells valid; peer settings are checked per peer run (``peer.json``), a seed's
        training seed per run (``run.json``). The seed settings are recorded with the spec in
        ``study.json``; like the repeats they are left out of the hash, which is then the hash
        of a study made before seeds existed.
        """
        d = self.to_dict()
        for key in ("study_dir", "configs", "repeats", "loco", "cnn_extra_splits", "peers", "head", "seeds",
                    "seed_configs"):
            d.pop(key)
        return params_hash(d)


def loco_centres(spec: StudySpec) -> list[str]:
    """Held-out centre of each LOCO fold (fold k = k-th centre in sorted order).

    Read from the LOCO folds file when it exists, else from the manifest's endpoint cases.
    """
    path = spec.folds_path_of(LOCO)
    if path.is_file():
        return [str(c) for c in read_json(path)["params"]["centres"]]
    return sorted(set(survival_cases(read_manifest(spec.manifest))["center"].astype(str)))


def split_n_folds(spec: StudySpec, split: str) -> int:
    """Folds of a split: ``n_folds`` for CV, the number of centres for LOCO."""
    return len(loco_centres(spec)) if split == LOCO else spec.n_folds


def grid(spec: StudySpec) -> list[Cell]:
    """Every CNN cell of the study: split-major, then configuration-major (baseline first),
    then the extra training seeds (seed-major: every cell of seed 1, then of seed 2, ...).

    With one repeat, no LOCO and one seed this is the paper's grid (configurations x folds).
    """
    cells = [Cell(c, k, split) for split in spec.cnn_splits() for c in spec.configurations()
             for k in range(split_n_folds(spec, split))]
    return cells + [Cell(c, k, split, s) for s in range(1, int(spec.seeds)) for split in spec.cnn_splits()
                    for c in spec.configurations() if s in spec.seed_indices(c, split)
                    for k in range(split_n_folds(spec, split))]


def cell_layout(spec: StudySpec, cell: Cell) -> RunLayout:
    """The run folder of the cell's configuration on its split and seed."""
    return RunLayout(spec.run_dir(cell.config, cell.split, cell.seed))


def cell_dir(spec: StudySpec, cell: Cell) -> Path:
    return cell_layout(spec, cell).fold_dir(cell.fold)


def cell_done(spec: StudySpec, cell: Cell) -> bool:
    return cell_layout(spec, cell).is_done(cell.fold)


def cell_status(spec: StudySpec) -> pd.DataFrame:
    """One row per cell: ``cell, split, seed, config, group, d, fold, done, seconds, path``."""
    rows = []
    for cell in grid(spec):
        info_path = cell_layout(spec, cell).cell(cell.fold)
        seconds = read_json(info_path).get("seconds") if info_path.is_file() else None
        rows.append({
            "cell": cell.key, "split": cell.split, "seed": cell.seed, "config": cell.config.name,
            "group": cell.config.group, "d": cell.config.d_label, "fold": cell.fold,
            "done": cell_done(spec, cell), "seconds": seconds, "path": str(cell_dir(spec, cell)),
        })
    return pd.DataFrame(rows)


def peer_status(spec: StudySpec) -> pd.DataFrame:
    """One row per peer run: ``run`` (``peers/<split>/<peer>``), ``split``, ``peer``, ``done``."""
    return pd.DataFrame([{"run": f"peers/{split}/{p.name}", "split": split, "peer": p.name,
                          "done": peer_done(spec, p, split)}
                         for split in spec.splits() for p in spec.peer_list()],
                        columns=["run", "split", "peer", "done"])


def format_status(status: pd.DataFrame, peers: pd.DataFrame | None = None) -> str:
    """Dry-run listing: one line per cell (and peer run), then the done/pending counts."""
    lines = [f"{'cell':<24} status"]
    for row in status.itertuples():
        lines.append(f"{row.cell:<24} {'done' if row.done else 'pending'}")
    if peers is not None:
        for row in peers.itertuples():
            lines.append(f"{row.run:<24} {'done' if row.done else 'pending'}")
    n_done = int(status["done"].sum())
    tail = f"{len(status)} cells: {n_done} done, {len(status) - n_done} pending"
    if peers is not None and len(peers):
        tail += f"; {len(peers)} peer runs: {int(peers['done'].sum())} done"
    lines.append(tail)
    return "\n".join(lines)


# --- cohort loading, cached per process -------------------------------------------------

_BASE_COHORTS: dict[tuple[str, str], Any] = {}
_EMBEDDINGS: dict[tuple[str, str, str, tuple[str, ...]], tuple[dict, dict]] = {}


def load_study_cohort(spec: StudySpec, encoders: Sequence[str] = ()):
    """The :class:`pipeline.dataset.SurvivalCohort` of a configuration, cached per process.

    One copy of the volumes per process is shared by every configuration; the embedding
    rows of each combination of encoders are read once per process through
    :func:`pipeline.dataset.load_cohort` (which checks them against the cache).
    """
    from pipeline.dataset import load_cohort  # local: torch (see the note on imports)

    key = (spec.manifest, spec.cache_root)
    if key not in _BASE_COHORTS:
        _BASE_COHORTS[key] = load_cohort(spec.manifest, spec.cache_root)
    base = _BASE_COHORTS[key]
    if not encoders:
        return base
    if spec.embeddings is None:
        raise ValueError(f"encoders {tuple(encoders)} requested but the study has no embeddings file")
    ekey = (spec.embeddings, spec.cache_root, spec.manifest, tuple(encoders))
    if ekey not in _EMBEDDINGS:
        full = load_cohort(spec.manifest, spec.cache_root, spec.embeddings, tuple(encoders))
        if full.case_ids != base.case_ids:
            raise ValueError(f"{spec.manifest}: case order changed while loading {tuple(encoders)} embeddings")
        _EMBEDDINGS[ekey] = (full.embeddings, full.embedding_attrs)
    emb, attrs = _EMBEDDINGS[ekey]
    # Share the base volumes: one copy of the images per process, whatever the grid row.
    return dataclasses.replace(base, embeddings=emb, embedding_attrs=attrs)


def clear_cohort_cache() -> None:
    """Forget the cohorts cached by :func:`load_study_cohort` (tests, long-lived workers)."""
    _BASE_COHORTS.clear()
    _EMBEDDINGS.clear()


def _cache_params_hash(spec: StudySpec) -> str:
    return PreprocessedCache(spec.cache_root).params_hash


def _config_provenance(spec: StudySpec, cohort, config: Configuration, folds: pd.DataFrame,
                       seed: int = 0) -> tuple[Any, dict]:
    from pipeline.train import run_provenance  # local: torch (see the note on imports)

    cfg = spec.train_config(config, tuple(cohort.images.shape[2:]), seed)
    prov = run_provenance(cohort, cfg, folds_hash(folds), _cache_params_hash(spec))
    return cfg, prov | {"study": spec.hash, "configuration": config.name} | ({"seed_index": seed} if seed else {})


# --- claims: one trainer per cell --------------------------------------------------------

#: Folder of the cells' claim files, under the study folder (outside the run folders).
CLAIMS_DIR = ".claims"


def claim_path(spec: StudySpec, cell: Cell) -> Path:
    """``<study>/.claims/<cell key>.lock``; its ``.log`` sibling keeps the claim history."""
    return spec.root / CLAIMS_DIR / f"{cell.key}.lock"


def _claimant() -> dict[str, Any]:
    """Who claims: host, pid and, in a Slurm task, the job and array task ids."""
    who: dict[str, Any] = {"host": platform.node(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        who["slurm_job"] = f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]
    return who


def describe_claimant(who: dict[str, Any] | None) -> str:
    """``"host:pid (Slurm job 12_3)"`` of a claim record; ``"another process"`` without one."""
    if not who:
        return "another process"
    text = f"{who.get('host', '?')}:{who.get('pid', '?')}"
    return text + (f" (Slurm job {who['slurm_job']})" if who.get("slurm_job") else "")


def _log_claim(path: Path, event: str, who: dict[str, Any], **extra: Any) -> None:
    with open(path.with_suffix(".log"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": event, "time": utc_now(), **who, **extra}) + "\n")


@contextlib.contextmanager
def claim_cell(spec: StudySpec, cell: Cell) -> Iterator[dict[str, Any]]:
    """Hold the cell's claim for the block: an exclusive ``flock`` on its claim file.

    The kernel drops the lock when its holder's process ends, however it ends (SIGKILL, a
    cancelled or requeued Slurm task, a dead node's NFS lease), so a dead owner never holds
    a cell for good and no stale lock needs breaking by hand. While the claim is held by
    another process, this one prints who holds it (host, pid, Slurm job, as the holder wrote
    in the file) and waits. Each claim, wait and release is appended to ``<key>.log``.

    Yields:
        ``{"waited_for": holder description or None, "waited_s": seconds waited}``.
    """
    import fcntl  # local: POSIX only, like the clusters this serves

    path = claim_path(spec, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    who = _claimant()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited_for, t0 = None, time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            except (ValueError, UnicodeDecodeError):
                holder = None
            waited_for = describe_claimant(holder)
            print(f"cell {cell.key} is being trained by {waited_for}; waiting for it to finish or end",
                  file=sys.stderr, flush=True)
            _log_claim(path, "waiting", who, holder=holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(who | {"since": utc_now()}).encode(), 0)
        _log_claim(path, "claimed", who)
        try:
            yield {"waited_for": waited_for, "waited_s": time.monotonic() - t0}
        finally:
            _log_claim(path, "released", who)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


# --- the unit of work ---------------------------------------------------------------------


def run_cell(spec: StudySpec, cell: Cell, progress: bool = False) -> dict[str, Any]:
    """Train one configuration on one fold; self-contained and picklable (a job function).

    Loads the cohort from the spec's paths (cached per process), checks the configuration
    folder's provenance (``run.json``) and calls :func:`pipeline.train.train_fold`, whose
    ``done.json`` is the completion marker. Also writes ``cell.json`` (wall time, host,
    device) beside it. A finished cell returns its record without training.

    Args:
        spec: the study.
        cell: the configuration and fold.
        progress: show the epoch progress bar.

    Returns:
        ``{"cell": key, "skipped": bool, "seconds": float, "record": done.json content}``.

    Raises:
        ProvenanceError: the configuration folder was made with other settings or folds.
        FileNotFoundError: :func:`prepare_study` has not written the folds file yet.

    A cell is claimed before it trains (:func:`claim_cell`): when another process, of this
    study or of another on the same folder, holds it, this one says so on stderr, waits,
    and then skips the cell that the other finished (the result names whom it waited for).
    """
    layout = cell_layout(spec, cell)
    if layout.is_done(cell.fold):
        return {"cell": cell.key, "skipped": True, "seconds": 0.0, "record": read_json(layout.done(cell.fold))}
    with claim_cell(spec, cell) as claim:
        if layout.is_done(cell.fold):  # the owner we waited for finished it
            return {"cell": cell.key, "skipped": True, "seconds": 0.0, "record": read_json(layout.done(cell.fold)),
                    "waited_for": claim["waited_for"], "waited_s": claim["waited_s"]}
        res = _train_cell(spec, cell, layout, progress)
    return res | ({"waited_for": claim["waited_for"], "waited_s": claim["waited_s"]} if claim["waited_for"] else {})


def _train_cell(spec: StudySpec, cell: Cell, layout: RunLayout, progress: bool) -> dict[str, Any]:
    """:func:`run_cell`'s training, under the cell's claim."""
    from pipeline.train import start_run, train_fold  # local: torch (see the note on imports)

    t0 = time.perf_counter()
    cohort = load_study_cohort(spec, cell.config.encoders)
    folds = load_folds(spec.folds_path_of(cell.split), expected_case_ids=cohort.case_ids)
    cfg, prov = _config_provenance(spec, cohort, cell.config, folds, cell.seed)
    start_run(layout.root, prov)
    t_train = time.perf_counter()
    record = train_fold(cohort, folds, cell.fold, cfg, layout.root, progress=progress)
    t_end = time.perf_counter()
    import torch  # local: torch (see the note on imports); loaded by the training above

    info = {
        "cell": cell.key, "seconds": t_end - t0, "train_seconds": t_end - t_train,
        "load_seconds": t_train - t0, "epochs_run": record.get("epochs_run"),
        "host": platform.node(), "pid": os.getpid(), "torch_threads": cfg.threads,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu",
        "finished": utc_now(), "code_version": code_version(),
    }
    write_json_atomic(layout.cell(cell.fold), info)
    return {"cell": cell.key, "skipped": False, "seconds": info["seconds"], "record": record}


# --- set-up, shared by every executor --------------------------------------------------


def split_folds(spec: StudySpec, split: str, cohort) -> pd.DataFrame:
    """Load the shared folds file of a split, or create it once.

    ``cv<r>``: stratified K-fold with seed ``folds_seed + r`` (repeat ``r`` of
    :func:`pipeline.splits.repeated_folds`); ``loco``: one fold per centre.

    Raises:
        pipeline.artefacts.ProvenanceError: the file was made for another case set.
        ValueError: the file holds another number of folds / other centres.
    """
    from pipeline.train import get_folds  # local: torch (see the note on imports)

    path = spec.folds_path_of(split)
    repeat = split_repeat(split)
    if repeat is not None:
        if repeat == 0:
            return get_folds(path, cohort, n_folds=spec.n_folds, seed=spec.folds_seed)
        if path.is_file():
            folds = load_folds(path, expected_case_ids=cohort.case_ids)
            if folds.attrs["params"].get("seed") != spec.folds_seed + repeat or folds["fold"].nunique() != spec.n_folds:
                raise ValueError(f"{path}: made with {folds.attrs['params']}, expected {spec.n_folds} folds "
                                 f"with seed {spec.folds_seed + repeat}")
            return folds
        folds = make_folds(cohort.case_ids, cohort.time, cohort.event, n_splits=spec.n_folds,
                           seed=spec.folds_seed + repeat)
        folds.attrs["params"] = folds.attrs["params"] | {"repeat": repeat}
    else:
        fresh = leave_one_centre_out(cohort.case_ids, cohort.centre)
        if path.is_file():
            folds = load_folds(path, expected_case_ids=cohort.case_ids)
            if folds_hash(folds) != folds_hash(fresh):
                raise ValueError(f"{path}: the centres of the cohort changed since the LOCO folds were made")
            return folds
        folds = fresh
    save_folds(folds, path)
    return folds


def prepare_study(spec: StudySpec, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create (or check) the study folder before any cell runs.

    Loads the cohort with every encoder the grid uses (so a missing or mismatched
    embedding row fails here, once, not in 52 jobs), creates or reuses the shared folds of
    every split (:func:`split_folds`), writes ``run.json`` of every configuration on every
    CNN split and seed, and writes ``study.json``: the spec, the
    cohort summary (cases, events, case-set hash), the cache's params hash, the embedding
    file's sha256 and attributes (random-init or real weights), the code version and
    ``info`` (free-form: data source, settings label, oracle C-index, ...).

    Raises:
        ProvenanceError: the folder holds a study made with other settings.

    Returns:
        The ``study.json`` record.
    """
    from pipeline.train import start_run  # local: torch (see the note on imports)

    root = spec.root
    path = root / STUDY_FILE
    if path.is_file():
        old = read_json(path)
        if old.get("spec_hash") != spec.hash:
            raise ProvenanceError(
                f"{path}: the study folder was made with other settings (spec hash {old.get('spec_hash')!r}, "
                f"this invocation {spec.hash!r}); use another study folder"
            )
    all_encoders = tuple(sorted({e for c in spec.configurations() for e in c.encoders}))
    cohort = load_study_cohort(spec, all_encoders) if all_encoders else load_study_cohort(spec)
    all_folds = {split: split_folds(spec, split, cohort) for split in spec.splits()}
    folds = all_folds[FIRST_SPLIT]
    for split in spec.cnn_splits():
        for config in spec.configurations():
            sub = load_study_cohort(spec, config.encoders)
            for seed in spec.seed_indices(config, split):
                _, prov = _config_provenance(spec, sub, config, all_folds[split], seed)
                start_run(spec.run_dir(config, split, seed), prov)

    emb_record = None
    if spec.embeddings is not None:
        emb_record = embeddings_provenance(spec.embeddings)
    record = {
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "created": read_json(path)["created"] if path.is_file() else utc_now(),
        "updated": utc_now(),
        "code_version": code_version(),
        "cohort": {
            "n_cases": len(cohort), "n_events": int(cohort.event.sum()),
            "case_set_sha256": case_set_sha256(cohort.case_ids),
            "n_centres": int(pd.Series(cohort.centre).nunique()),
            "survival_input_size_dhw": [int(s) for s in cohort.images.shape[2:]],
        },
        "folds_hash": folds_hash(folds),
        "splits": {
            split: {"folds_hash": folds_hash(f), "n_folds": int(f["fold"].nunique()),
                    "folds_file": str(spec.folds_path_of(split).relative_to(root)),
                    "params": f.attrs.get("params", {}), "cnn": split in spec.cnn_splits()}
            for split, f in all_folds.items()
        },
        "cache_params_hash": _cache_params_hash(spec),
        "embeddings": emb_record,
        "info": info or {},
    }
    write_json_atomic(path, record)
    return record


def peer_done(spec: StudySpec, peer: Peer, split: str) -> bool:
    """A peer run is done when its marker ``peer.json`` exists (see :func:`run_peer`)."""
    return PeerRunLayout(spec.peer_dir(peer, split)).marker.is_file()


def _peer_key(spec: StudySpec, peer: Peer, split: str, embeddings_sha256: str | None) -> str:
    return params_hash({
        "peer": peer.name, "config": peer.head_config(spec.head).to_dict(),
        "folds_sha256": sha256_file(spec.folds_path_of(split)), "manifest_sha256": sha256_file(spec.manifest),
        "cache_params_hash": _cache_params_hash(spec) if peer.kind != "clinical" else None,
        "embeddings_sha256": embeddings_sha256 if peer.kind == "embeddings" else None,
    })


def run_peer(spec: StudySpec, peer: Peer, split: str, *, embeddings_sha256: str | None = None) -> dict[str, Any]:
    """Fit one peer on one split's shared folds (:func:`pipeline.peers.fit_peer_run`).

    Writes ``<split root>/peers/<peer>/``: ``oof_predictions.csv`` (the CNN's OOF columns,
    ``protocol = "fit"``), ``train_risk.csv`` (each fold's training linear predictor),
    ``summary.json`` and, last, the marker ``peer.json`` holding the key of its inputs
    (peer settings, folds / manifest sha256, cache params hash, embeddings sha256). A
    marker with the same key is skipped; a different key (e.g. changed head settings)
    refits, since peers take seconds and are deterministic.

    Returns:
        ``{"peer", "split", "skipped", "seconds", "summary"}``.
    """
    if peer.kind == "embeddings" and embeddings_sha256 is None:
        embeddings_sha256 = sha256_file(spec.embeddings)
    layout = PeerRunLayout(spec.peer_dir(peer, split))
    key = _peer_key(spec, peer, split, embeddings_sha256)
    marker = layout.marker
    if marker.is_file() and read_json(marker).get("key") == key:
        return {"peer": peer.name, "split": split, "skipped": True, "seconds": 0.0,
                "summary": read_json(layout.summary)}
    t0 = time.perf_counter()
    summary = fit_peer_run(
        peer.kind, manifest_path=spec.manifest, folds_path=spec.folds_path_of(split), out_dir=layout.root,
        cache_root=spec.cache_root, features_path=spec.embeddings if peer.kind == "embeddings" else None,
        datasets=list(embedding_set(peer.embedding_set).encoders) if peer.embedding_set else None,
        config=peer.head_config(spec.head),
    )
    seconds = time.perf_counter() - t0
    write_json_atomic(marker, {"peer": peer.name, "label": peer.label, "split": split, "key": key,
                               "seconds": seconds, "finished": utc_now(), "code_version": code_version()})
    return {"peer": peer.name, "split": split, "skipped": False, "seconds": seconds, "summary": summary}


def run_peers(
    spec: StudySpec, *, workers: int = 1, on_result: Callable[[dict[str, Any]], None] | None = None,
    shown: set[tuple] | None = None,
) -> StudyOutcome:
    """Fit every peer on every split; failures are reported, the others continue.

    With ``workers > 1`` the peer runs go to :func:`run_pool` (fresh spawned processes, one
    torch/BLAS thread each); otherwise they run in this process. Keys of the outcome are
    ``<split>/<peer>``; ``on_result`` also sees the runs skipped as up to date (without
    ``progress``); ``shown`` as in :func:`run_pool`.
    """
    t0 = time.perf_counter()
    peers = spec.peer_list()
    emb_sha = sha256_file(spec.embeddings) if any(p.kind == "embeddings" for p in peers) else None
    todo, skipped = [], []
    for split in spec.splits():
        for peer in peers:
            marker = PeerRunLayout(spec.peer_dir(peer, split)).marker
            fresh = marker.is_file() and read_json(marker).get("key") == _peer_key(spec, peer, split, emb_sha)
            (skipped if fresh else todo).append((peer, split))
    for peer, split in skipped:
        if on_result is not None:
            on_result({"key": f"{split}/{peer.name}", "peer": peer.name, "split": split, "skipped": True,
                       "seconds": 0.0})
    jobs = [Job(f"{s}/{p.name}", run_peer, (spec, p, s), {"embeddings_sha256": emb_sha},
                {"peer": p.name, "split": s}) for p, s in todo]
    outcome = run_pool(jobs, workers, in_process=workers == 1 or len(jobs) < 2, on_result=on_result, shown=shown)
    outcome.skipped = [f"{s}/{p.name}" for p, s in skipped] + outcome.skipped
    outcome.seconds = time.perf_counter() - t0
    return outcome


def embeddings_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Path, sha256, file attributes and per-dataset encoder records of an embedding file.

    ``random_init`` is True when any dataset was made with a randomly initialised encoder.
    (The keys ``modalities`` and ``random_init_modalities`` name the datasets: study.json
    files hold them under these names.)
    """
    with quiet_random_init():  # the caller states random-init loudly itself
        loaded = read_embeddings(path)
    random = sorted(d for d, a in loaded.dataset_attrs.items() if a.get("weights_sha256") == RANDOM_INIT)
    return {
        "path": str(path), "sha256": loaded.sha256, "attrs": loaded.attrs,
        "modalities": {d: dict(a) for d, a in loaded.dataset_attrs.items()},
        "random_init": bool(random), "random_init_modalities": random,
    }


def load_study(study_dir: str | os.PathLike) -> tuple[StudySpec, dict[str, Any]]:
    """Read ``study.json``: the spec and the full record."""
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a study folder (run `run-study` first)")
    record = read_json(path)
    return StudySpec.from_dict(record["spec"]), record


# --- executors ----------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch  # local: torch (see the note on imports)

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA runtime means no GPU
        return []


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Silence copies of :class:`pipeline.embeddings.RandomInitWarning` in this block.

    Every embeddings read of a random-init file warns; a study states it once, loudly
    (:func:`announce_random_init`), and reads the file once per process and configuration.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RandomInitWarning)
        yield


def announce_random_init(spec: StudySpec) -> bool:
    """Warn once (warning + stderr line) when the study's embeddings are random-init.

    Returns:
        Whether the study uses embeddings and they are random-init.
    """
    uses = any(c.embedding_set for c in spec.configurations())
    if not uses or spec.embeddings is None or not Path(spec.embeddings).is_file():
        return False
    prov = embeddings_provenance(spec.embeddings)
    if prov["random_init"]:
        msg = (f"{spec.embeddings}: {', '.join(prov['random_init_modalities'])} embeddings come from RANDOMLY "
               "INITIALISED encoders; every FM row of this study tests the pipeline, not the foundation models "
               "(stated once per run)")
        warnings.warn(msg, RandomInitWarning, stacklevel=2)
        print(f"WARNING: {msg}", file=sys.stderr)
    return bool(prov["random_init"])


#: Cells one GPU trains side by side unless ``--cells-per-gpu`` says otherwise: at the paper's
#: batch of 8 a cell keeps an H200 busy about half of each step, and four folds sharing it gave
#: 1.6x the throughput of one (``benchmarks/gpu.md``).
DEFAULT_CELLS_PER_GPU = 4
#: GPU memory a paper-size cell is taken to need when choosing how many share a GPU: an upper
#: estimate until ``benchmarks/gpu_check.sh`` measures a cell's peak (it prints it).
CELL_GPU_MEMORY_GIB = 8.0


def gpu_free_memory_gib(gpus: Sequence[str]) -> list[float] | None:
    """Free memory of each GPU in GiB, from ``nvidia-smi`` (this process starts no CUDA
    context: the workers do); None when it cannot be read."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    free = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        if mib.strip().isdigit():
            free[index.strip()] = int(mib) / 1024
    return [free[g] for g in gpus] if all(g in free for g in gpus) else None


def cells_per_gpu(gpus: Sequence[str], requested: int | None = None,
                  free_gib: Sequence[float] | None = None) -> int:
    """How many cells each GPU trains side by side.

    Args:
        gpus: the GPU ids cells are pinned to.
        requested: ``--cells-per-gpu``; None = :data:`DEFAULT_CELLS_PER_GPU`, fewer when the
            GPU with the least free memory holds fewer :data:`CELL_GPU_MEMORY_GIB` cells (at
            least 1).
        free_gib: free memory per GPU; default :func:`gpu_free_memory_gib` (unknown = no cap).

    Raises:
        ValueError: ``requested`` below 1.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"cells per GPU must be >= 1, got {requested}")
        return int(requested)
    if not gpus:
        return 1
    free = gpu_free_memory_gib(gpus) if free_gib is None else list(free_gib)
    if not free:
        return DEFAULT_CELLS_PER_GPU
    return max(1, min(DEFAULT_CELLS_PER_GPU, int(0.9 * min(free) // CELL_GPU_MEMORY_GIB)))


def device_slots(gpus: Sequence[str], workers: int) -> list[str | None]:
    """The GPU each of ``workers`` pool workers is pinned to: round-robin over ``gpus``, so the
    first workers spread over the GPUs and each GPU gets ``workers / len(gpus)`` of them (one
    group of side-by-side cells per GPU); all None without GPUs."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(workers)]


def _worker_init(slots, threads: int) -> None:
    """Pin this pool worker to a GPU (before CUDA initialises), bound CPU threads, and
    silence the random-init warning (the parent states it once)."""
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    warnings.filterwarnings("ignore", category=RandomInitWarning)
    import torch  # after CUDA_VISIBLE_DEVICES: torch reads it when CUDA starts

    torch.set_num_threads(threads)


@dataclass
class StudyOutcome:
    """What an executor did. ``failed`` maps cell key -> error message."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    job_ids: list[str] = field(default_factory=list)
    #: Cells whose cluster task ended without a result (cancelled, requeued away, killed).
    cancelled: list[str] = field(default_factory=list)
    #: Cell key -> log file of its cluster task, for the failed and cancelled ones.
    logs: dict[str, str] = field(default_factory=dict)
    #: Cell key -> the process whose claim on the cell this run waited for (:func:`claim_cell`).
    waited: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, key: str, res: dict[str, Any]) -> None:
        """File one job result under ran, skipped or failed."""
        if res.get("waited_for"):
            self.waited[key] = res["waited_for"]
        if "error" in res:
            self.failed[key] = res["error"]
        elif res.get("skipped"):
            self.skipped.append(key)
        else:
            self.ran.append(key)


def run_pool(
    jobs: Sequence[Job],
    workers: int = 1,
    *,
    gpus: Sequence[str] = (),
    threads: int = 1,
    in_process: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    shown: set[tuple] | None = None,
) -> StudyOutcome:
    """Run study jobs (cells, peers) on :class:`pipeline.pool.JobPool`, collected in a :class:`StudyOutcome`.

    Worker i is pinned to GPU ``gpus[i % len(gpus)]`` through ``CUDA_VISIBLE_DEVICES``
    (set before CUDA starts: hence spawn), uses ``threads`` torch threads and ignores
    copies of the random-init warning. A job's other warnings and warning-level log
    records are shown here, each distinct one once (not once per job and worker). A job
    that raises is reported under its key and the others continue; a worker that dies
    (killed, out of memory) fails the jobs it took, each named.

    Args:
        jobs: the work.
        workers: pool size.
        gpus: GPU ids to pin workers to; empty = no pinning.
        threads: torch intra-op threads per worker.
        in_process: run the jobs one by one in this process instead (no pool).
        on_result: called in this process with each result as it finishes; the result has
            ``key`` and ``progress`` (:func:`pipeline.pool.progress_of` over these jobs); a
            failed job's has ``error`` and ``traceback`` (:meth:`pipeline.pool.Job.failure`).
        shown: warnings and log records already shown in this run (see
            :func:`pipeline.pool.show_notices`); pass one set to several calls to show each
            once in all.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    outcome = StudyOutcome()
    t0 = time.perf_counter()
    if not jobs:
        return outcome
    slots = None
    if not in_process:
        slots = mp.get_context("spawn").Queue()  # one GPU id per worker, taken as it starts
        for slot in device_slots(gpus, workers):
            slots.put(slot)
    pool = JobPool(workers, in_process=in_process, initializer=_worker_init, initargs=(slots, threads))
    with pool, quiet_random_init() if in_process else contextlib.nullcontext():
        for done in pool.run(jobs, shown=shown):
            job = done.job
            res = (done.value | {"key": job.key} if done.ok
                   else job.failure(done.failed.error, done.failed.trace))
            outcome.add(job.key, res)
            res["progress"] = done.progress
            if on_result is not None:
                on_result(res)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_local(
    spec: StudySpec,
    cells: Sequence[Cell],
    workers: int | None = None,
    *,
    gpus: Sequence[str] | None = None,
    per_gpu: int | None = None,
    threads_per_worker: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    shown: set[tuple] | None = None,
) -> StudyOutcome:
    """Run cells in a pool of fresh (spawned) worker processes (:func:`run_pool`).

    With GPUs (and a study not set to train on the CPU), each GPU trains ``per_gpu`` cells side
    by side (:func:`cells_per_gpu`), one group per GPU: ``workers`` defaults to
    ``len(gpus) x per_gpu`` and worker i is pinned to GPU ``gpus[i % len(gpus)]`` through
    ``CUDA_VISIBLE_DEVICES`` (:func:`device_slots`). A cell's numbers do not depend on which
    worker or neighbour it has (``tests/test_study.py``). Torch CPU threads per worker default
    to 1 outside training; a cell trains on its configuration's ``threads``
    (:mod:`pipeline.runtime`). A failing cell is reported in the outcome and the others continue.

    Args:
        spec: the study (already prepared by :func:`prepare_study`).
        cells: the cells to run; finished ones are skipped inside :func:`run_cell`.
        workers: pool size; default ``len(gpus) x per_gpu`` with GPUs, else 1.
        gpus: GPU ids; default :func:`visible_gpus` (none when the study trains on the CPU).
        per_gpu: cells side by side on each GPU (``--cells-per-gpu``); default
            :func:`cells_per_gpu`'s choice.
        threads_per_worker: torch intra-op threads per worker.
        on_result: called in the parent with each cell's result as it finishes (with
            ``progress``, see :func:`run_pool`).
        shown: warnings already shown in this run (:func:`run_pool`).
    """
    if gpus is None:
        gpus = [] if spec.train.get("device") == "cpu" else visible_gpus()
    gpus = list(gpus)
    if workers is None:
        workers = len(gpus) * cells_per_gpu(gpus, per_gpu) if gpus else 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = threads_per_worker or DEFAULT_THREADS
    jobs = [Job(cell.key, run_cell, (spec, cell), ident={"cell": cell.key}) for cell in cells]
    return run_pool(jobs, workers, gpus=gpus, threads=threads, on_result=on_result, shown=shown)


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each array task (submitit parameter names in brackets).

    Attributes:
        partition: Slurm partition [slurm_partition]; ``None`` = cluster default.
        time_min: wall-time limit per cell in minutes [timeout_min].
        gpus_per_node: GPUs per task [gpus_per_node].
        mem_gb: memory per task [mem_gb].
        cpus_per_task: CPU cores per task [cpus_per_task].
        array_parallelism: most tasks running at once [slurm_array_parallelism].
        extra: further submitit parameters (e.g. ``{"slurm_account": "..."}``).
    """

    partition: str | None = None
    time_min: int = 120
    gpus_per_node: int = 1
    mem_gb: int = 32
    cpus_per_task: int = 4
    array_parallelism: int = 65
    extra: dict[str, Any] = field(default_factory=dict)

    def parameters(self, cluster: str | None) -> dict[str, Any]:
        """``update_parameters`` arguments for ``AutoExecutor(cluster=cluster)``."""
        params: dict[str, Any] = {"timeout_min": int(self.time_min), "gpus_per_node": int(self.gpus_per_node)}
        if cluster != "local":
            params.update(mem_gb=int(self.mem_gb), cpus_per_task=int(self.cpus_per_task),
                          slurm_array_parallelism=int(self.array_parallelism))
            if self.partition:
                params["slurm_partition"] = self.partition
        params.update(self.extra)
        return params


def _refuse_local_gpu_cells(options: SlurmOptions) -> None:
    """Refuse GPU cells on submitit's local cluster: it starts every task at once (no
    array-parallelism cap) and pins GPUs through ``CUDA_AVAILABLE_DEVICES``, which CUDA does
    not read, so every cell would land on GPU 0 together. The local pool pins one cell per GPU
    through ``CUDA_VISIBLE_DEVICES``."""
    gpus = visible_gpus()
    if int(options.gpus_per_node) > 0 and gpus:
        raise ValueError(
            f"submitit's local cluster cannot place GPU cells (gpus_per_node={options.gpus_per_node}, "
            f"GPUs {gpus}): it runs every cell at once on GPU 0. Use the local pool "
            f"(`run-study --executor local --workers {len(gpus)}`: one cell per GPU), or "
            "--gpus-per-node 0 to run the local cluster's cells on the CPU")


def run_submitit(
    spec: StudySpec,
    cells: Sequence[Cell],
    *,
    cluster: str | None = None,
    options: SlurmOptions = SlurmOptions(),
    wait: bool = True,
    log_dir: str | os.PathLike | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> StudyOutcome:
    """Submit the cells as one submitit array job (``executor.map_array``).

    On Slurm the wait follows the tasks with ``squeue`` and ``scontrol``, not ``sacct``
    (:func:`wait_slurm_tasks`): a cluster without accounting is common, and a cancelled task
    is then noticed within a minute instead of being polled for good.

    Args:
        spec: the study (prepared).
        cells: cells to submit (pass only pending ones; finished cells would no-op).
        cluster: ``None`` (auto: Slurm when ``sbatch`` exists), ``"slurm"``, ``"local"``
            (submitit's local executor, one subprocess per cell) or ``"debug"`` (in-process).
        options: resources per task.
        wait: block until every task finishes and collect results; otherwise return the
            job ids right after submission (rerun the study later to build the report).
        log_dir: submitit folder; default ``<study>/submitit``.
        on_result: Slurm only: called with each task's result as it is collected (a failed or
            cancelled one has ``error`` and ``log``).
    """
    if cluster == "local":
        _refuse_local_gpu_cells(options)
    folder = Path(log_dir) if log_dir else spec.root / "submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    if executor.cluster == "local":
        _refuse_local_gpu_cells(options)
    executor.update_parameters(name="hnfm-study", **options.parameters(executor.cluster))
    outcome = StudyOutcome()
    if not cells:
        return outcome
    t0 = time.perf_counter()
    jobs = executor.map_array(run_cell, [spec] * len(cells), list(cells))
    outcome.job_ids = [j.job_id for j in jobs]
    if wait and executor.cluster == "slurm":
        wait_slurm_tasks(cells, jobs, outcome, on_result=on_result)
    elif wait:
        for cell, job in zip(cells, jobs):
            try:
                outcome.add(cell.key, job.result())
            except Exception as exc:  # noqa: BLE001 - one failed task must not hide the others
                outcome.failed[cell.key] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    outcome.seconds = time.perf_counter() - t0
    return outcome


#: Seconds between two looks at the Slurm queue (HNFM_SLURM_POLL_S overrides).
SLURM_POLL_S = 10.0
#: Slurm states of a task that is still queued or running (it may yet write its result).
_SLURM_LIVE = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                         "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "STOPPED",
                         "RESV_DEL_HOLD", "SPECIAL_EXIT"})


def _slurm_queue(array_ids: set[str]) -> dict[str, str] | None:
    """``{"<array>_<task>": state}`` of the queued tasks of these array jobs (``squeue -r``);
    None when squeue fails (the controller is unreachable: nothing can be concluded)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(sorted(array_ids)), "-o", "%i %T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses ids it no longer knows ("Invalid job id specified"): all have left.
        return {} if "Invalid job id" in out.stderr else None
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())


def _slurm_task_state(task_id: str) -> str | None:
    """``scontrol show job``'s JobState of one task (kept for MinJobAge after it ends); None
    when the controller no longer knows it."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", task_id], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def wait_slurm_tasks(cells: Sequence[Cell], jobs: Sequence[Any], outcome: StudyOutcome, *,
                     poll_s: float | None = None,
                     on_result: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Collect the array's results as they come, without ``sacct``.

    A task's result is its submitit result file. A task that is no longer queued or running
    (``squeue``; ``scontrol`` for the state of one that left) and has written no result, on
    two looks in a row, ended without one: it is filed under ``failed`` and ``cancelled``
    with its state and its log, and the others are still awaited. A task that failed (an
    error in the cell) is filed under ``failed`` with its error's last line and its log.
    """
    poll = float(os.environ.get("HNFM_SLURM_POLL_S", poll_s or SLURM_POLL_S))
    pending = {i: (cell, job) for i, (cell, job) in enumerate(zip(cells, jobs))}
    gone: dict[int, int] = {}
    total, t0 = len(pending), time.perf_counter()

    def file(i: int, res: dict[str, Any]) -> None:
        cell, job = pending.pop(i)
        outcome.add(cell.key, res)
        if "error" in res:
            outcome.logs[cell.key] = res["log"]
        if on_result is not None:
            on_result(res | {"progress": {"done": total - len(pending), "total": total,
                                          "elapsed_s": time.perf_counter() - t0, "remaining_s": None}})

    while pending:
        for i, (cell, job) in list(pending.items()):
            if job.paths.result_pickle.exists():
                res = _slurm_result(cell, job)
                # A task cancelled while it trains may write a result of its own (the signal's
                # error) before it ends: still a cancelled cell, named as such.
                if "error" in res and (_slurm_task_state(str(job.job_id)) or "").startswith("CANCELLED"):
                    outcome.cancelled.append(cell.key)
                file(i, res)
        if not pending:
            break
        queue = _slurm_queue({str(job.job_id).split("_")[0] for _, job in pending.values()})
        for i, (cell, job) in list(pending.items()):
            if queue is None or str(job.job_id) in queue:
                gone.pop(i, None)
                continue
            state = _slurm_task_state(str(job.job_id))
            if state in _SLURM_LIVE:
                gone.pop(i, None)
                continue
            gone[i] = gone.get(i, 0) + 1
            if gone[i] >= 2 and not job.paths.result_pickle.exists():
                outcome.cancelled.append(cell.key)
                file(i, {"cell": cell.key, "key": cell.key, "log": str(job.paths.stderr),
                         "error": f"Slurm task {job.job_id} ended without a result "
                                  f"({state or 'no longer known to Slurm'}; cancelled or killed?)"})
        if pending:
            time.sleep(poll)


def _slurm_result(cell: Cell, job: Any) -> dict[str, Any]:
    """The result of a task that wrote its result file; a failure names its log."""
    try:
        return dict(job.result()) | {"key": cell.key}
    except Exception as exc:  # noqa: BLE001 - one failed task must not hide the others
        # submitit's FailedJobError: "... with trace:\n----\n<traceback>\n----\n<log paths>";
        # the traceback's last line is the cell's own error.
        text = str(exc)
        parts = [p for p in text.split("-" * 22) if p.strip()]
        trace = parts[1] if len(parts) >= 3 else text
        lines = [ln.strip("-").strip() for ln in trace.strip().splitlines() if ln.strip("-").strip()]
        return {"cell": cell.key, "key": cell.key, "log": str(job.paths.stderr), "traceback": trace.strip(),
                "error": lines[-1] if lines else type(exc).__name__}


def run_study(
    spec: StudySpec,
    *,
    executor: str = "local",
    workers: int | None = None,
    cells_per_gpu: int | None = None,
    slurm: SlurmOptions = SlurmOptions(),
    cluster: str | None = None,
    wait: bool = True,
    info: dict[str, Any] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_peer: Callable[[dict[str, Any]], None] | None = None,
    peer_workers: int | None = None,
    announce: bool = True,
) -> StudyOutcome:
    """Prepare the study folder, fit the peers on every split, then run every pending cell.

    Peers run first: they take seconds, and the report can then put them beside whatever
    CNN cells are finished. Failed peers appear in ``outcome.failed`` under
    ``peers:<split>/<peer>``. Random-init embeddings are stated once at the start
    (:func:`announce_random_init`); every later read, here and in the workers, is silent,
    and every other warning of the peers and cells is shown once in the run.

    Args:
        spec: the study.
        executor: ``"local"`` (process pool) or ``"submitit"`` (array job).
        workers: local pool size; default :func:`run_local`'s (``len(gpus) x cells_per_gpu``
            with GPUs, else 1).
        cells_per_gpu: local executor with GPUs: cells each GPU trains side by side; default
            :func:`cells_per_gpu`'s choice.
        slurm: resources per array task (submitit).
        cluster: submitit cluster (``None`` auto, ``"slurm"``, ``"local"``, ``"debug"``).
        wait: submitit only: wait for the array to finish.
        info: free-form record stored in ``study.json`` (data source, settings, ...).
        on_result: callback per finished cell (with ``progress``): local pool and Slurm.
        on_peer: callback per fitted (or skipped) peer.
        peer_workers: processes fitting peers; default ``workers`` (local executor) or 1.
        announce: state random-init embeddings here; False when the caller already did.
    """
    if executor not in ("local", "submitit"):
        raise ValueError(f"executor must be 'local' or 'submitit', got {executor!r}")
    if announce:
        announce_random_init(spec)
    shown: set[tuple] = set()  # each warning once in the whole run, peers and cells together
    with quiet_random_init():
        prepare_study(spec, info)
        peers = run_peers(spec, workers=peer_workers or (workers or 1 if executor == "local" else 1),
                          on_result=on_peer, shown=shown)
        pending = [c for c in grid(spec) if not cell_done(spec, c)]
        done = [c.key for c in grid(spec) if cell_done(spec, c)]
        if executor == "local":
            outcome = (run_local(spec, pending, workers, per_gpu=cells_per_gpu, on_result=on_result, shown=shown)
                       if pending else StudyOutcome())
        else:
            outcome = run_submitit(spec, pending, cluster=cluster, options=slurm, wait=wait, on_result=on_result)
    outcome.skipped = done + outcome.skipped
    outcome.failed.update({f"peers:{k}": v for k, v in peers.failed.items()})
    return outcome
