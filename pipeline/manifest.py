"""The case manifest: one row per case, the input of every later stage.

A manifest is a CSV written by ``build-manifest`` (from a HECKTOR 2022 training root, or the
synthetic demo cohort, which has the same layout). Image paths are stored relative to the
manifest's folder so that a manifest and its data can move together.

Columns (in this order):

=====================  =========================================================
case_id                HECKTOR PatientID, e.g. ``CHUM-001``
center_id              HECKTOR CenterID: any integer (1..7 in HECKTOR 2022)
center                 centre code (CHUM, CHUP, CHUS, CHUV, MDA, HGJ, HMR; ``C<id>``
                       for another centre, e.g. ``C9``)
ct_path                CT (HU), relative to the manifest folder
pet_path               PET (SUV), relative to the manifest folder
label_path             mask on the CT grid (0 bg, 1 GTVp, 2 GTVn), relative
ct_sha256              SHA-256 of the CT file ("" when checksums were skipped)
pet_sha256             SHA-256 of the PET file
label_sha256           SHA-256 of the label file
task1, task2           HECKTOR task membership flags (0/1)
has_endpoint           1 if the case has a row in the endpoint CSV
relapse                1 = event, 0 = censored (empty without endpoint)
rfs_days               recurrence-free survival in days (empty without endpoint)
gender                 ``M`` / ``F``
age                    years
weight                 kg (may be missing)
tobacco                0/1 (may be missing)
alcohol                0/1 (may be missing)
performance_status     0..4 (may be missing)
hpv_status             0/1 (may be missing)
surgery                0/1 (may be missing)
chemotherapy           0/1
has_gtvp               1 if the label contains label 1
has_gtvn               1 if the label contains label 2
=====================  =========================================================
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.artefacts import atomic_path, missing_path_message

MANIFEST_COLUMNS: tuple[str, ...] = (
    "case_id",
    "center_id",
    "center",
    "ct_path",
    "pet_path",
    "label_path",
    "ct_sha256",
    "pet_sha256",
    "label_sha256",
    "task1",
    "task2",
    "has_endpoint",
    "relapse",
    "rfs_days",
    "gender",
    "age",
    "weight",
    "tobacco",
    "alcohol",
    "performance_status",
    "hpv_status",
    "surgery",
    "chemotherapy",
    "has_gtvp",
    "has_gtvn",
)

#: The nine clinical covariates of the paper, as manifest columns.
CLINICAL_COLUMNS: tuple[str, ...] = (
    "age",
    "gender",
    "weight",
    "tobacco",
    "alcohol",
    "performance_status",
    "hpv_status",
    "chemotherapy",
    "surgery",
)

PATH_COLUMNS: tuple[str, ...] = ("ct_path", "pet_path", "label_path")

#: HECKTOR 2022's centres: CenterID -> code.
CENTERS: dict[int, str] = {1: "CHUM", 2: "CHUP", 3: "CHUS", 4: "CHUV", 5: "MDA", 6: "HGJ", 7: "HMR"}


def center_name(center_id: int) -> str:
    """Centre code of a CenterID: HECKTOR 2022's code, else ``C<id>`` (e.g. ``C9``)."""
    return CENTERS.get(int(center_id), f"C{int(center_id)}")


def _check_columns_and_ids(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what}: not a manifest, missing columns {missing}. The columns are "
            'pipeline.manifest.MANIFEST_COLUMNS (docs/data.md, section "Data: HECKTOR 2022 reader and the '
            'demo cohort"); write a manifest with `build-manifest HECKTOR_ROOT --out data_manifest.csv` or '
            "`make-demo-cohort`"
        )
    dup = df["case_id"][df["case_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{what}: duplicate case ids {dup}")


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` (columns :data:`MANIFEST_COLUMNS`) atomically as CSV.

    Raises:
        ValueError: when a manifest column is missing or a case id repeats.
    """
    _check_columns_and_ids(df, "manifest")
    with atomic_path(path, suffix=".csv") as tmp:
        df.loc[:, list(MANIFEST_COLUMNS)].to_csv(tmp, index=False, lineterminator="\n")


def read_manifest(path: str | os.PathLike, *, resolve_paths: bool = True) -> pd.DataFrame:
    """Read a manifest, indexed by ``case_id``, with image paths made absolute.

    Args:
        path: the manifest CSV.
        resolve_paths: turn the relative path columns into absolute ``str`` paths.

    Raises:
        FileNotFoundError: when the manifest does not exist.
        ValueError: when a manifest column is missing or a case id repeats.
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise FileNotFoundError(f"{path}: not a manifest CSV (a folder)")
        raise FileNotFoundError(missing_path_message(path, "manifest", "*.csv"))
    df = pd.read_csv(
        path,
        dtype={"case_id": str, "gender": str, "center": str, "ct_sha256": str, "pet_sha256": str, "label_sha256": str},
        keep_default_na=True,
    )
    _check_columns_and_ids(df, f"{path}")
    for col in ("ct_sha256", "pet_sha256", "label_sha256"):
        df[col] = df[col].fillna("")
    if resolve_paths:
        root = path.resolve().parent
        for col in PATH_COLUMNS:
            df[col] = [str((root / p).resolve()) for p in df[col]]
    return df.set_index("case_id", drop=False)


def survival_cases(manifest: pd.DataFrame) -> pd.DataFrame:
    """Rows that have an endpoint (HECKTOR Task 2 cases with RFS and Relapse).

    Raises:
        ValueError: no row has one (a manifest built from a root without an endpoint file
            serves ``predict-survival`` only; training and evaluation need endpoints).
    """
    rows = manifest[manifest["has_endpoint"].astype(int) == 1]
    if rows.empty and len(manifest):
        raise ValueError(
            f"the manifest's {len(manifest)} case(s) have no endpoint (has_endpoint is 0 for all: "
            "built from a root without hecktor2022_endpoint_training.csv); it serves "
            "predict-survival only, training needs a root with endpoints (import-dicom --endpoint)"
        )
    return rows
