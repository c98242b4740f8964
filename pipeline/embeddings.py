"""The embeddings store: the HDF5 schema of an embeddings file, its one writer and its readers.

Stage one (:mod:`pipeline.extraction`) writes ``embeddings/<set>.h5`` with the frozen
encoders' embeddings of every case of a preprocessed cache; :mod:`pipeline.feature_tables`
writes an imported feature table in the same schema. Stage two (training, the peers, the
study, the report, prediction) reads a file only through :func:`load_embeddings` /
:func:`read_embeddings`, which refuse embeddings made from another preprocessing. Nothing
here imports torch.

HDF5 schema (``SCHEMA_VERSION`` 1; readable with plain h5py, no custom types)::

    /case_ids        (N,) variable-length UTF-8 str   row order of every other dataset
    /fingerprints    (N,) variable-length UTF-8 str   per-case cache fingerprint, same rows
    /ct              (N, 512) float32                 CT-FM embeddings   (sets ct, ctpet)
    /pet             (N, 768) float32                 PET-FM embeddings  (sets pet, ctpet)

One dataset per encoder, named after it (:data:`pipeline.embedding_sets.ENCODERS`), or one
named after an imported table. File attributes: ``schema_version``, ``modality`` (the
embedding set extracted: ``ct`` | ``pet`` | ``ctpet``, or an imported table's name; the
schema's name for it), ``modalities`` (JSON list of the file's datasets),
``params_hash`` and ``crop_size_vox_xyz`` of the preprocessed cache, ``cache_path``,
``cache_bound`` (bool; False only for a feature table imported without a cache: empty
fingerprints, and the cache checks of :func:`read_embeddings` do not apply),
``code_version``, ``created`` (UTC ISO 8601), ``random_init`` (bool), ``environment`` (JSON:
where extracted rows were computed). Files from
:func:`pipeline.feature_tables.import_feature_table` add ``source = "feature_table"``. Every
file is written by :func:`write_embedding_file`, the one writer of this schema.

Attributes of each embedding dataset (``/ct``, ``/pet``): ``modality`` (the encoder's name,
the schema's word for it), ``encoder`` (the architecture: ``ct_fm_segresencoder`` /
``seganypet_vit_b_ori``), ``weights_sha256`` (hex, or ``"random-init"``),
``random_init_seed`` (-1 unless random-init), ``weights_path`` (informational),
``encoder_config`` (JSON of the constructor overrides, ``{}`` for the published
architecture), ``embedding_dim``, ``pooling`` (``gap_last_feature_map`` for CT-FM: global
average pool of the last of five SegResEncoder maps; ``mean_tokens_pre_neck`` for PET-FM:
mean of the 8^3 ViT tokens before the neck), ``input_key`` (``ctfm/ct`` / ``petfm/pet`` in
the cache), ``input_shape`` (``[D, H, W]`` of the cached input; the encoder sees
``[B, 1, D, H, W]``, D = slice axis), ``dtype`` (``float32``, the stored type), ``precision``
(``fp32`` on CPU, ``bf16-autocast`` on CUDA), ``compute`` (JSON: device, numerics, threads),
``provenance`` (canonical JSON of all of these) and ``provenance_hash``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from pipeline.artefacts import (
    ProvenanceError,
    atomic_path,
    canonical_json,
    code_version,
    missing_path_message,
    params_hash,
    plain_value,
    sha256_file,
    utc_now,
)
from pipeline.cache import PreprocessedCache
from pipeline.embedding_sets import encoder_names

SCHEMA_VERSION = 1
RANDOM_INIT = "random-init"
#: ``source`` file attribute of feature tables imported by
#: :func:`pipeline.feature_tables.import_feature_table`.
FEATURE_TABLE_SOURCE = "feature_table"


class RandomInitWarning(UserWarning):
    """Embeddings were computed with randomly initialised encoders (demo only)."""


class MissingCasesError(ValueError):
    """The embedding file lacks cases a consumer needs; ``missing`` lists them."""

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


def training_fill(train: np.ndarray) -> np.ndarray:
    """Per-feature fill value of missing entries: the mean of the training rows.

    The one missing-value policy for embeddings and imported features, called by the CNN's
    :func:`pipeline.train.fit_fm_stats` and the Cox heads' :mod:`pipeline.peers` alike: a
    training-fold mean is what z-scoring with training statistics maps to 0, so a missing
    value carries no signal. A column missing in every training row is filled with 0.

    Args:
        train: ``[N, F]`` training rows (NaN = missing).

    Returns:
        float64 ``[F]``.
    """
    train = np.asarray(train, dtype=np.float64)
    if not np.isnan(train).any():
        return train.mean(axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for all-NaN columns
        return np.nan_to_num(np.nanmean(train, axis=0))


#: A feature whose training SD is at most this is constant: it is scaled by 1, not its SD.
SD_FLOOR = 1e-8


def training_scale(filled: np.ndarray) -> np.ndarray:
    """Per-feature SD of filled training rows ``[N, F]``, 1 where at most :data:`SD_FLOOR`."""
    sd = np.asarray(filled).std(axis=0)
    return np.where(sd > SD_FLOOR, sd, 1.0)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _other_preprocessing_message(path: Path, attrs: dict[str, Any], cache: PreprocessedCache) -> str:
    """Why an embedding file does not fit ``cache``: the cache it was made from (its
    ``cache_path`` attribute) and, where that cache's ``cohort.json`` is still there, the
    preprocessing parameters that differ; else the crop sizes both record."""
    made_from = str(attrs.get("cache_path") or "") or "(not recorded)"
    head = (
        f"{path}: made from the preprocessed cache {made_from} (params_hash "
        f"{attrs['params_hash']!r}), but the cache {cache.root} has {cache.params_hash!r}"
    )
    fix = f"re-run `extract-embeddings --cache {cache.root}`, or pass the cache the file was made from"
    if attrs.get("cache_path") and Path(made_from) == cache.root.resolve():
        return f"{head}: the cache was preprocessed again since the file was made; {fix}"
    try:
        theirs = PreprocessedCache(made_from).params if attrs.get("cache_path") else None
    except (FileNotFoundError, ProvenanceError, ValueError, KeyError):
        theirs = None
    if theirs is not None and theirs != cache.params:
        keys = sorted(set(theirs) | set(cache.params), key=str)
        diff = [
            f"{k}: {theirs.get(k)!r} there, {cache.params.get(k)!r} here"
            for k in keys
            if theirs.get(k) != cache.params.get(k)
        ]
        return f"{head}; differing preprocessing parameters: {'; '.join(diff)}; {fix}"
    crop = plain_value(attrs.get("crop_size_vox_xyz"))
    if crop is not None and list(crop) != list(cache.crop_size_vox_xyz):
        head += f"; crop size G {list(crop)} there, {list(cache.crop_size_vox_xyz)} here (x, y, z voxels)"
    gone = (
        ""
        if theirs is not None or not attrs.get("cache_path")
        else f" ({made_from} is gone or unreadable: parameters not compared)"
    )
    return f"{head}{gone}; {fix}"


def write_embedding_file(
    out: str | os.PathLike,
    *,
    name: str,
    case_ids: Sequence[str],
    datasets: dict[str, tuple[np.ndarray, dict[str, Any], dict[str, Any]]],
    cache: PreprocessedCache | None,
    fingerprints: Sequence[str] | None = None,
    random_init: bool = False,
    file_attrs: dict[str, Any] | None = None,
) -> None:
    """Write an embedding file (schema :data:`SCHEMA_VERSION`) atomically: the one writer.

    Args:
        out: destination ``.h5``.
        name: the file's ``modality`` attribute: the embedding set extracted (``ct``/``pet``/
            ``ctpet``) or an imported table's name.
        case_ids: row order, N cases.
        datasets: dataset name (an encoder's, or a table's) -> (float ``[N, dim]`` matrix,
            dataset attributes as HDF5-ready values, provenance dict). The writer adds ``embedding_dim``, ``dtype``,
            ``provenance`` (canonical JSON) and ``provenance_hash``.
        cache: the preprocessed cache the rows belong to: its ``params_hash``, crop size and
            path are recorded; ``None`` writes an unbound file (``cache_bound`` False, empty
            fingerprints).
        fingerprints: per-case cache fingerprints in row order; default: read from
            ``cache`` (``""`` for a case it lacks).
        random_init: any dataset comes from randomly initialised encoders.
        file_attrs: further file attributes (e.g. ``source``).
    """
    case_ids = list(case_ids)
    if fingerprints is None:
        have = set(cache.case_ids) if cache is not None else set()
        fingerprints = [cache.case_fingerprint(c) if c in have else "" for c in case_ids]
    if len(fingerprints) != len(case_ids):
        raise ValueError(f"{out}: {len(fingerprints)} fingerprints for {len(case_ids)} cases")
    str_dt = h5py.string_dtype(encoding="utf-8")
    with atomic_path(out, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["schema_version"] = SCHEMA_VERSION
            h5.attrs["modality"] = name
            h5.attrs["modalities"] = json.dumps(list(datasets))
            h5.attrs["params_hash"] = cache.params_hash if cache is not None else ""
            h5.attrs["crop_size_vox_xyz"] = np.asarray(
                cache.crop_size_vox_xyz if cache is not None else (), dtype=np.int64
            )
            h5.attrs["cache_path"] = str(cache.root.resolve()) if cache is not None else ""
            h5.attrs["cache_bound"] = cache is not None
            h5.attrs["code_version"] = code_version()
            h5.attrs["created"] = utc_now()
            h5.attrs["random_init"] = bool(random_init)
            for k, v in (file_attrs or {}).items():
                h5.attrs[k] = v
            h5.create_dataset("case_ids", data=np.asarray(case_ids, dtype=object), dtype=str_dt)
            h5.create_dataset("fingerprints", data=np.asarray(list(fingerprints), dtype=object), dtype=str_dt)
            for dataset, (mat, attrs, prov) in datasets.items():
                mat = np.asarray(mat).astype(np.float32, copy=False)
                if mat.ndim != 2 or mat.shape[0] != len(case_ids):
                    raise ValueError(
                        f"{out}: dataset {dataset!r} has shape {list(mat.shape)}, expected [{len(case_ids)}, dim]"
                    )
                ds = h5.create_dataset(dataset, data=mat)
                for k, v in attrs.items():
                    ds.attrs[k] = v
                ds.attrs["embedding_dim"] = int(mat.shape[1])
                ds.attrs["dtype"] = "float32"
                ds.attrs["provenance"] = canonical_json(prov)
                ds.attrs["provenance_hash"] = params_hash(prov)


def _listed_datasets(attrs: Any) -> list[str]:
    """The datasets a file's ``modalities`` attribute lists; every encoder's for a file
    without it (those hold ``/ct`` and ``/pet`` only)."""
    listed = plain_value(attrs.get("modalities"))
    return (json.loads(listed) if isinstance(listed, str) and listed else []) or list(encoder_names())


def embedding_dims(path: str | os.PathLike) -> dict[str, int]:
    """Columns of each embedding dataset of a file, e.g. ``{"ct": 512, "pet": 768}``."""
    with h5py.File(path, "r") as h5:
        return {d: int(h5[d].shape[1]) for d in _listed_datasets(h5.attrs) if d in h5}


def random_init_datasets(path: str | os.PathLike) -> list[str]:
    """Datasets of a file made with randomly initialised encoders (read without warning)."""
    with h5py.File(path, "r") as h5:
        return [d for d in embedding_dims(path) if plain_value(h5[d].attrs.get("weights_sha256", "")) == RANDOM_INIT]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def warn_random_init(message: str) -> None:
    """Warn (:class:`RandomInitWarning`, and on stderr) that embeddings come from randomly
    initialised encoders."""
    # Loud on stderr as well, unless the caller filtered the warning (a study states it once).
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn(message, RandomInitWarning, stacklevel=3)
    for w in shown:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if shown:
        print(f"WARNING: {message}", file=sys.stderr)


@dataclass
class LoadedEmbeddings:
    """What :func:`read_embeddings` read from one embeddings file, rows aligned with ``case_ids``.

    Attributes:
        path: the ``.h5`` read.
        case_ids: row order.
        fingerprints: per-case cache fingerprints, same order.
        matrices: dataset -> float32 ``[N, dim]`` (``"ct"`` -> [N, 512], ``"pet"`` -> [N, 768],
            or an imported table's name -> [N, F]).
        attrs: file attributes (plain Python values).
        dataset_attrs: per dataset, its attributes (encoder, weights, pooling ...).
        sha256: SHA-256 of the file, for downstream provenance records.
    """

    path: Path
    case_ids: list[str]
    fingerprints: list[str]
    matrices: dict[str, np.ndarray]
    attrs: dict[str, Any]
    dataset_attrs: dict[str, dict[str, Any]]
    sha256: str

    @property
    def datasets(self) -> list[str]:
        """The datasets read, in file order."""
        return list(self.matrices)

    def matrix(self, dataset: str) -> np.ndarray:
        """float32 ``[N, dim]`` of one dataset, rows in :attr:`case_ids` order."""
        if dataset not in self.matrices:
            raise KeyError(f"{self.path}: no {dataset!r} embeddings (has {self.datasets})")
        return self.matrices[dataset]

    def frame(self) -> pd.DataFrame:
        """DataFrame indexed by ``case_id`` with columns ``ct_000 ..`` then ``pet_000 ..``;
        ``attrs`` holds the file's attributes, ``path``, ``sha256``, ``dataset_attrs`` and
        ``feature_datasets`` (the datasets, in column order)."""
        blocks = [
            pd.DataFrame(
                mat,
                index=pd.Index(self.case_ids, name="case_id"),
                columns=[f"{d}_{j:03d}" for j in range(mat.shape[1])],
            )
            for d, mat in self.matrices.items()
        ]
        df = pd.concat(blocks, axis=1) if blocks else pd.DataFrame(index=self.case_ids)
        df.attrs = {
            "path": str(self.path),
            "sha256": self.sha256,
            **self.attrs,
            "dataset_attrs": self.dataset_attrs,
            "feature_datasets": self.datasets,
        }
        return df


def read_embeddings(
    path: str | os.PathLike,
    *,
    cache: PreprocessedCache | str | os.PathLike | None = None,
    case_ids: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> LoadedEmbeddings:
    """Read an embedding file, checking it against the preprocessed cache when given.

    Args:
        path: ``.h5`` written by :func:`write_embedding_file` (extraction or an import).
        cache: the preprocessed cache stage two uses (object or root); when given, the file's
            ``params_hash`` and the fingerprints of the returned cases must match it (not
            checked for a feature table imported without a cache: ``cache_bound`` False).
        case_ids: rows to return, in this order (e.g. the stage-two manifest's cases);
            default: every case in file order.
        datasets: subset of the file's datasets (encoders ``"ct"``, ``"pet"``, or an imported
            feature table's name); default: all in the file.

    Returns:
        :class:`LoadedEmbeddings`. Files made with random-init encoders warn
        (:class:`RandomInitWarning` and stderr) on every read.

    Raises:
        FileNotFoundError: no such file.
        ProvenanceError: schema, params_hash or per-case fingerprints disagree with ``cache``
            (both sides named), or the file holds no such dataset.
        MissingCasesError: ``case_ids`` lists cases the file lacks (all of them named).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise FileNotFoundError(f"{path}: not an embedding file (a folder)")
        raise FileNotFoundError(missing_path_message(path, "embedding file", "*.h5"))
    attrs, file_ids, file_fps, names, mats, dattrs = _read_embedding_file(path, datasets)
    wanted, rows = _select_rows(path, attrs, file_ids, case_ids)

    # A table imported without a cache has no fingerprints to check (attribute cache_bound).
    if cache is not None and bool(attrs.get("cache_bound", True)):
        cache = cache if isinstance(cache, PreprocessedCache) else PreprocessedCache(cache)
        if attrs["params_hash"] != cache.params_hash:
            raise ProvenanceError(_other_preprocessing_message(path, attrs, cache))
        in_cache = set(cache.case_ids)
        not_cached = [c for c in wanted if c not in in_cache]
        if not_cached:
            raise ProvenanceError(f"{path}: has embeddings for cases {not_cached} that the cache {cache.root} lacks")
        bad = [
            f"{c} (file {file_fps[r]}, cache {fp})"
            for c, r in zip(wanted, rows)
            if (fp := cache.case_fingerprint(c)) != file_fps[r]
        ]
        if bad:
            raise ProvenanceError(
                f"{path}: per-case fingerprints differ from the cache {cache.root} for "
                f"{len(bad)} case(s): {', '.join(bad)}; re-run `extract-embeddings`"
            )

    random = [d for d in names if dattrs[d].get("weights_sha256") == RANDOM_INIT]
    if random:
        seeds = {d: dattrs[d].get("random_init_seed") for d in random}
        warn_random_init(
            f"{path}: {random} embeddings come from randomly initialised encoders "
            f"(seeds {seeds}); fine for a demo, meaningless for results"
        )
    return LoadedEmbeddings(
        path=path,
        case_ids=wanted,
        fingerprints=[file_fps[r] for r in rows],
        matrices={d: np.ascontiguousarray(mats[d][rows]) for d in names},
        attrs=attrs,
        dataset_attrs=dattrs,
        sha256=sha256_file(path),
    )


def _read_embedding_file(
    path: Path, datasets: Sequence[str] | None
) -> tuple[dict[str, Any], list[str], list[str], list[str], dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """File attributes, case ids, fingerprints, datasets read, their matrices and attributes."""
    with h5py.File(path, "r") as h5:
        found = int(h5.attrs.get("schema_version", -1))
        if found != SCHEMA_VERSION:
            raise ProvenanceError(
                f"{path}: embedding schema_version {found}, this code reads {SCHEMA_VERSION}; "
                "re-run `extract-embeddings`"
            )
        attrs = {k: plain_value(v) for k, v in h5.attrs.items()}
        file_ids = list(h5["case_ids"].asstr()[()])
        file_fps = list(h5["fingerprints"].asstr()[()])
        # Extracted files hold one dataset per encoder; imported feature tables their own named one.
        present = [d for d in _listed_datasets(attrs) if d in h5]
        names = list(datasets) if datasets is not None else present
        absent = [d for d in names if d not in present]
        if absent:
            raise ProvenanceError(f"{path}: holds {present} embeddings, {absent} requested")
        mats = {d: h5[d][()] for d in names}
        dattrs = {d: {k: plain_value(v) for k, v in h5[d].attrs.items()} for d in names}
    return attrs, file_ids, file_fps, names, mats, dattrs


def _select_rows(
    path: Path, attrs: dict[str, Any], file_ids: list[str], case_ids: Sequence[str] | None
) -> tuple[list[str], list[int]]:
    """The cases to return (``case_ids``, default every case in file order) and their rows."""
    if case_ids is None:
        return file_ids, list(range(len(file_ids)))
    wanted = list(case_ids)
    pos = {c: i for i, c in enumerate(file_ids)}
    missing = [c for c in wanted if c not in pos]
    if missing:
        if attrs.get("source") == FEATURE_TABLE_SOURCE:
            fix = (
                "import a table with rows for them: `import-features TABLE.csv --out "
                f"{path}` (NaN where a feature is unknown)"
            )
        else:
            fix = "re-run `extract-embeddings` on a cache holding them"
        raise MissingCasesError(f"{path}: lacks rows for {len(missing)} needed case(s): {missing}; {fix}", missing)
    return wanted, [pos[c] for c in wanted]


def load_embeddings(
    path: str | os.PathLike,
    *,
    cache: PreprocessedCache | str | os.PathLike | None = None,
    case_ids: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`read_embeddings` as a DataFrame indexed by case id (``ct_000..``, ``pet_000..``).

    Provenance (file attributes, per-dataset attributes, path, sha256) is in ``df.attrs``
    (:meth:`LoadedEmbeddings.frame`).
    """
    return read_embeddings(path, cache=cache, case_ids=case_ids, datasets=datasets).frame()
