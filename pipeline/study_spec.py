"""The projection-ablation study described: its grid, cells, peers, splits and folder layout.

This module names what a study holds; :mod:`pipeline.study` runs it (claims, cells, peers,
pools, submitit). Reading a study folder's state (:func:`load_study`, :func:`cell_status`,
:func:`peer_status`) needs nothing more, so a report or a dry run loads neither torch nor
submitit nor the execution.

Grid (REFERENCE section 1): the DeepMTS+DAFT baseline plus, for each embedding set
(CT, PET, CT+PET), the FM projection size d in {64, 128, 256, orig}: 13 configurations.
Every configuration is trained on the same K folds (one shared folds file), so the 5 x 13
= 65 cells are paired. Embeddings come from the stage-one cache (one file of the set that
reads every encoder, ``ctpet``; the CT-only configurations read its ``ct`` rows, etc.): no
foundation model runs during the grid.

Each (configuration, fold) cell is independent and resumable: its run folder
``<study>/runs/<config>/fold_<k>/`` is done when its completion marker ``done.json``
exists (:func:`cell_done`).

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

    <study>/study.json                 spec, cohort summary, provenance (pipeline.study.prepare_study)
    <study>/folds.json                 the shared folds of split cv0 (pipeline.splits format)
    <study>/runs/<config>/             a run folder (pipeline.layout.RunLayout): run.json, and
                                       fold_<k>/ with train_fold's outputs, done.json, cell.json
    <study>/peers/<peer>/              a peer run folder (pipeline.layout.PeerRunLayout)
    <study>/splits/<split>/            the same (folds.json, runs/, peers/) for cv1.. and loco
    <study>/seeds/<s>/runs/<config>/   training seed index s >= 1 of cv0 (StudySpec.seed_root)
    <study>/submitit/                  logs of cluster jobs (when that executor is used)
    <study>/.claims/<cell key>.lock    the claim a cell's trainer holds (pipeline.study.claim_cell), and .log
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.artefacts import params_hash, read_json
from pipeline.embedding_sets import embedding_set, head_group, set_names
from pipeline.layout import PeerRunLayout, RunLayout
from pipeline.manifest import read_manifest, survival_cases

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
    """A classical model fitted on the study's folds (:mod:`pipeline.peers`; its settings are
    :func:`pipeline.study.peer_head_config`).

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
            (``proj`` is set per configuration: :func:`pipeline.study.train_config`).
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
        for key in (
            "study_dir",
            "configs",
            "repeats",
            "loco",
            "cnn_extra_splits",
            "peers",
            "head",
            "seeds",
            "seed_configs",
        ):
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
    cells = [
        Cell(c, k, split)
        for split in spec.cnn_splits()
        for c in spec.configurations()
        for k in range(split_n_folds(spec, split))
    ]
    return cells + [
        Cell(c, k, split, s)
        for s in range(1, int(spec.seeds))
        for split in spec.cnn_splits()
        for c in spec.configurations()
        if s in spec.seed_indices(c, split)
        for k in range(split_n_folds(spec, split))
    ]


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
        rows.append(
            {
                "cell": cell.key,
                "split": cell.split,
                "seed": cell.seed,
                "config": cell.config.name,
                "group": cell.config.group,
                "d": cell.config.d_label,
                "fold": cell.fold,
                "done": cell_done(spec, cell),
                "seconds": seconds,
                "path": str(cell_dir(spec, cell)),
            }
        )
    return pd.DataFrame(rows)


def peer_status(spec: StudySpec) -> pd.DataFrame:
    """One row per peer run: ``run`` (``peers/<split>/<peer>``), ``split``, ``peer``, ``done``."""
    return pd.DataFrame(
        [
            {"run": f"peers/{split}/{p.name}", "split": split, "peer": p.name, "done": peer_done(spec, p, split)}
            for split in spec.splits()
            for p in spec.peer_list()
        ],
        columns=["run", "split", "peer", "done"],
    )


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


def peer_done(spec: StudySpec, peer: Peer, split: str) -> bool:
    """A peer run is done when its marker ``peer.json`` exists (see :func:`pipeline.study.run_peer`)."""
    return PeerRunLayout(spec.peer_dir(peer, split)).marker.is_file()


def load_study(study_dir: str | os.PathLike) -> tuple[StudySpec, dict[str, Any]]:
    """Read ``study.json``: the spec and the full record."""
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a study folder (run `run-study` first)")
    record = read_json(path)
    return StudySpec.from_dict(record["spec"]), record
