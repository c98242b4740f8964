"""The preprocessed cache: what stage one (embeddings) and stage two (training) read.

Layout::

    <root>/cohort.json        cohort-level record (see below), written last by a complete run
    <root>/cases/<ID>.h5      one HDF5 file per case, written atomically

``cohort.json`` keys: ``schema_version``, ``params`` (every preprocessing parameter),
``params_hash`` (:func:`pipeline.artefacts.params_hash` of ``params``),
``crop_size_vox_xyz`` (the global crop G in voxels at the resampling spacing, x, y, z, each
even), ``spacing_mm_xyz``, ``crop_size_source`` (``"cohort"`` when G was measured on this
cohort, or the path of the reference cache it was copied from), ``manifest`` and
``manifest_sha256``, ``code_version``, ``created``, ``case_ids``.

Per-case file, arrays in torch order ``[D, H, W]`` (D = z = slice axis, H = y, W = x):

=================  ===================  =====================================================
dataset            shape (default)      content
=================  ===================  =====================================================
``survival/pet``   [48, 80, 80] f32     PET in SUV, crop resized to 80 x 80 x 48 (x, y, z)
``survival/ct``    [48, 80, 80] f32     CT in HU
``survival/mask``  [48, 80, 80] u8      tumour mask (1 inside), nearest neighbour
``ctfm/ct``        [48, 128, 128] f32   CT-FM input: clip [-1000, 2000] HU, min-max to [0, 1]
``petfm/pet``      [128, 128, 128] f32  PET-FM input: clip to own p0.5/p99.5, min-max [0, 1]
=================  ===================  =====================================================

Each group (``survival``, ``ctfm``, ``petfm``) carries the physical geometry of its grid as
attributes ``origin_xyz``, ``spacing_xyz``, ``direction`` (9 values, row-major, SimpleITK
order) and ``size_xyz``, so any voxel maps back to scanner millimetres. File attributes:
``case_id``, ``params_hash``, ``source_sha256`` (JSON: ct, pet, label), ``center_mm_xyz``
(tumour centre used for the crop; :data:`CENTER_MM_XYZ`), ``native_center_mm_xyz`` and
``center_source`` (the centre measured on the native label grid, and how), ``tumour_volume_ml``
(on the native CT grid), ``fingerprint`` (:meth:`PreprocessedCache.case_fingerprint`),
``code_version``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.artefacts import (
    ProvenanceError,
    atomic_path,
    missing_path_message,
    plain_value,
    read_json,
    write_json_atomic,
)
from pipeline.embedding_sets import ENCODERS

CACHE_SCHEMA_VERSION = 1
GROUPS = ("survival", "ctfm", "petfm")
COHORT_FILE = "cohort.json"
CASES_DIR = "cases"

#: The datasets of one case file (table above), the one spelling of their names.
SURVIVAL_PET = "survival/pet"
SURVIVAL_CT = "survival/ct"
SURVIVAL_MASK = "survival/mask"
#: The encoders' inputs: their names live in the encoders' registry entries.
CTFM_CT = ENCODERS["ct"].input_key
PETFM_PET = ENCODERS["pet"].input_key
#: Every dataset of a case file, in write order.
CASE_DATASETS: tuple[str, ...] = (SURVIVAL_PET, SURVIVAL_CT, SURVIVAL_MASK, CTFM_CT, PETFM_PET)

#: Case-file attributes of the tumour's centre, the one spelling of their names for the writer
#: (:mod:`pipeline.preprocess.case`) and the readers (:mod:`pipeline.qc`). They are on-disk
#: schema that existing caches hold, so they keep the spelling they were written with: "center",
#: as in HECKTOR's ``CenterID`` and the manifest's ``center_id``. The code's word for the idea is
#: "centre": :class:`pipeline.preprocess.locate.TumourLocation`'s ``centre_mm_xyz``,
#: ``native_centre_mm_xyz`` and ``centre_source`` are stored under these three names.
CENTER_MM_XYZ = "center_mm_xyz"
NATIVE_CENTER_MM_XYZ = "native_center_mm_xyz"
CENTER_SOURCE = "center_source"


@dataclass(frozen=True)
class GridGeometry:
    """Physical geometry of a grid, in SimpleITK (x, y, z) order."""

    origin_xyz: tuple[float, float, float]
    spacing_xyz: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major
    size_xyz: tuple[int, int, int]

    def as_attrs(self) -> dict[str, Any]:
        return {
            "origin_xyz": np.asarray(self.origin_xyz, dtype=np.float64),
            "spacing_xyz": np.asarray(self.spacing_xyz, dtype=np.float64),
            "direction": np.asarray(self.direction, dtype=np.float64),
            "size_xyz": np.asarray(self.size_xyz, dtype=np.int64),
        }

    @classmethod
    def from_attrs(cls, attrs: Any) -> GridGeometry:
        return cls(
            origin_xyz=tuple(float(v) for v in attrs["origin_xyz"]),
            spacing_xyz=tuple(float(v) for v in attrs["spacing_xyz"]),
            direction=tuple(float(v) for v in attrs["direction"]),
            size_xyz=tuple(int(v) for v in attrs["size_xyz"]),
        )


def case_fingerprint(params_hash: str, source_sha256: dict[str, str]) -> str:
    """Identity of one preprocessed case: preprocessing parameters plus source file hashes."""
    text = params_hash + "|" + json.dumps(source_sha256, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def case_file(root: str | os.PathLike, case_id: str) -> Path:
    return Path(root) / CASES_DIR / f"{case_id}.h5"


def write_case(
    root: str | os.PathLike,
    case_id: str,
    arrays: dict[str, np.ndarray],
    geometry: dict[str, GridGeometry],
    attrs: dict[str, Any],
) -> Path:
    """Write one case atomically.

    Args:
        root: cache root.
        case_id: the case id; the file is ``<root>/cases/<case_id>.h5``.
        arrays: dataset name (e.g. ``"survival/pet"``) -> array in ``[D, H, W]`` order.
        geometry: group name -> :class:`GridGeometry` of that group's grid.
        attrs: file attributes; must include ``params_hash`` and ``source_sha256`` (dict).

    Returns:
        The final path.
    """
    for key in ("params_hash", "source_sha256"):
        if key not in attrs:
            raise ValueError(f"write_case({case_id!r}): attrs lacks {key!r}")
    final = case_file(root, case_id)
    attrs = dict(attrs)
    attrs["case_id"] = case_id
    attrs["fingerprint"] = case_fingerprint(attrs["params_hash"], attrs["source_sha256"])
    attrs["source_sha256"] = json.dumps(attrs["source_sha256"], sort_keys=True)
    with atomic_path(final, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            for name, value in attrs.items():
                h5.attrs[name] = value
            for name, arr in arrays.items():
                h5.create_dataset(name, data=arr)
            for group, geom in geometry.items():
                g = h5.require_group(group)
                for name, value in geom.as_attrs().items():
                    g.attrs[name] = value
    return final


class PreprocessedCache:
    """Read access to a complete preprocessed cache.

    Args:
        root: the cache folder (holding ``cohort.json`` and ``cases/``).

    Raises:
        FileNotFoundError: when ``cohort.json`` is absent (no complete preprocessing run).
        ProvenanceError: when the schema version is not the one this code reads.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        cohort_path = self.root / COHORT_FILE
        if not self.root.exists():
            raise FileNotFoundError(missing_path_message(self.root, "preprocessed cache", f"*/{COHORT_FILE}"))
        if not cohort_path.is_file():
            raise FileNotFoundError(
                f"{self.root}: no {COHORT_FILE}; this is not a complete preprocessed cache "
                "(run `preprocess` first, or let it finish)"
            )
        self.cohort: dict[str, Any] = read_json(cohort_path)
        found = self.cohort.get("schema_version")
        if found != CACHE_SCHEMA_VERSION:
            raise ProvenanceError(
                f"{cohort_path}: cache schema_version {found!r}, this code reads "
                f"{CACHE_SCHEMA_VERSION}; re-run `preprocess`"
            )

    @property
    def params(self) -> dict[str, Any]:
        return self.cohort["params"]

    @property
    def params_hash(self) -> str:
        return self.cohort["params_hash"]

    @property
    def crop_size_vox_xyz(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.cohort["crop_size_vox_xyz"])

    @property
    def case_ids(self) -> list[str]:
        return list(self.cohort["case_ids"])

    def path(self, case_id: str) -> Path:
        return case_file(self.root, case_id)

    def require(self, case_ids: list[str] | tuple[str, ...]) -> None:
        """Raise ``KeyError`` naming every requested case that the cache lacks."""
        have = set(self.case_ids)
        missing = [c for c in case_ids if c not in have]
        if missing:
            raise KeyError(f"{self.root}: preprocessed cache lacks cases {missing}")

    def read(self, case_id: str, names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
        """Read datasets (e.g. ``("survival/pet", "survival/ct")``) of one case."""
        path = self.path(case_id)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: case {case_id!r} is not in the preprocessed cache")
        with h5py.File(path, "r") as h5:
            missing = [n for n in names if n not in h5]
            if missing:
                raise KeyError(f"{path}: case {case_id!r} lacks datasets {missing}")
            return {n: h5[n][()] for n in names}

    def attrs(self, case_id: str) -> dict[str, Any]:
        with h5py.File(self.path(case_id), "r") as h5:
            out = {k: plain_value(v) for k, v in h5.attrs.items()}
        out["source_sha256"] = json.loads(out["source_sha256"])
        return out

    def geometry(self, case_id: str, group: str) -> GridGeometry:
        with h5py.File(self.path(case_id), "r") as h5:
            return GridGeometry.from_attrs(h5[group].attrs)

    def case_fingerprint(self, case_id: str) -> str:
        with h5py.File(self.path(case_id), "r") as h5:
            return str(h5.attrs["fingerprint"])


def write_cohort_record(root: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write ``cohort.json`` atomically; call it last, after every case file exists."""
    record = dict(record)
    record.setdefault("schema_version", CACHE_SCHEMA_VERSION)
    write_json_atomic(Path(root) / COHORT_FILE, record)
