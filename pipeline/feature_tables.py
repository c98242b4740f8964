"""External feature tables (e.g. a radiomics CSV keyed by PatientID) in the embeddings schema.

:func:`import_feature_table` writes a per-case CSV through
:func:`pipeline.embeddings.write_embedding_file`, with or without a preprocessed cache, so the
peers' embedding heads (:mod:`pipeline.peers`) and the CNN read it as they read extracted
embeddings (:func:`pipeline.embeddings.load_embeddings`), missing values included (filled
with the training-fold mean, :func:`pipeline.embeddings.training_fill`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artefacts import sha256_file
from pipeline.cache import PreprocessedCache
from pipeline.embedding_sets import ENCODERS
from pipeline.embeddings import FEATURE_TABLE_SOURCE, MissingCasesError, write_embedding_file

#: The ``encoder`` attribute of an imported table's dataset.
FEATURE_TABLE_ENCODER = FEATURE_TABLE_SOURCE
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_RESERVED = {"case_ids", "fingerprints"}


def import_feature_table(
    csv_path: str | os.PathLike,
    out_h5: str | os.PathLike,
    *,
    id_column: str = "PatientID",
    name: str = "radiomics",
    cache: PreprocessedCache | str | os.PathLike | None = None,
    columns: Sequence[str] | None = None,
    expected_case_ids: Sequence[str] | None = None,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Write a per-case feature CSV as an embeddings file (:mod:`pipeline.embeddings` schema).

    Written by :func:`pipeline.embeddings.write_embedding_file`, so the file has the layout
    and file attributes of extracted embeddings: ``/case_ids``, ``/fingerprints`` (the
    cache's per-case fingerprints, ``""`` for a case the cache lacks or without a cache),
    ``/<name>`` float32 [N, F] (NaN = missing); file attributes ``modality`` = name and
    ``modalities`` = [name],
    ``source`` = ``"feature_table"``, and ``cache_bound`` False when imported without a
    cache (the loader's cache checks then do not apply). Dataset attributes: ``encoder`` =
    ``"feature_table"``, ``weights_sha256`` = the CSV's sha256, ``source_csv``,
    ``source_csv_sha256``, ``id_column``, ``columns`` (JSON list of the F feature names in
    column order), ``dropped_columns`` (JSON: non-numeric columns left out),
    ``embedding_dim``, ``pooling`` = ``"none"``, ``input_key`` = ``""``, ``dtype``,
    ``provenance`` and ``provenance_hash``.

    Args:
        csv_path: the table; one row per case.
        out_h5: destination, e.g. ``embeddings/radiomics.h5``.
        id_column: column holding the case ids.
        name: the table's dataset name (letters and digits, starting with a letter; not an
            encoder's name).
        cache: the preprocessed cache the features belong to (records its params_hash
            and per-case fingerprints so cache-checked reads work); ``None`` imports
            without one.
        columns: feature columns to take (all must be numeric); default: every numeric
            column except the id column.
        expected_case_ids: the cases the table should cover (the manifest's); the
            coverage is reported, and missing cases are refused unless ``allow_missing``.
        allow_missing: import a table that lacks some ``expected_case_ids``.

    Returns:
        ``{"path", "n_cases", "n_features", "columns", "dropped_columns", "not_in_cache",
        "cache_bound", "coverage", "sha256"}``; ``coverage`` is ``None`` without
        ``expected_case_ids``, else ``{"expected", "covered", "missing", "not_expected"}``
        (counts, and the lists of missing and extra case ids).

    Raises:
        ValueError: on a bad name, missing id column, duplicate or empty ids, a
            non-numeric requested column, infinite values or no feature column (naming
            the file, column and cases).
        pipeline.embeddings.MissingCasesError: the table lacks expected cases (all
            listed) and ``allow_missing`` is False.
    """
    csv_path, out_h5 = Path(csv_path), Path(out_h5)
    _check_table_name(name)
    ids, x, use, dropped = _read_feature_table(csv_path, id_column, columns)
    coverage = _checked_coverage(csv_path, ids, expected_case_ids, allow_missing)
    if cache is not None and not isinstance(cache, PreprocessedCache):
        cache = PreprocessedCache(cache)
    in_cache = set(cache.case_ids) if cache is not None else set()
    not_in_cache = [c for c in ids if c not in in_cache] if cache is not None else []
    attrs, prov = _table_dataset_attrs(csv_path, name, id_column, use, dropped)
    write_embedding_file(
        out_h5,
        name=name,
        case_ids=ids,
        datasets={name: (x, attrs, prov)},
        cache=cache,
        file_attrs={"source": FEATURE_TABLE_SOURCE},
    )
    return {
        "path": str(out_h5),
        "n_cases": len(ids),
        "n_features": len(use),
        "columns": use,
        "dropped_columns": dropped,
        "not_in_cache": not_in_cache,
        "cache_bound": cache is not None,
        "coverage": coverage,
        "sha256": sha256_file(out_h5),
    }


def _check_table_name(name: str) -> None:
    """Refuse a dataset name that is not letters/digits, is reserved, or is an encoder's."""
    if not _NAME_RE.match(name) or name in _RESERVED:
        raise ValueError(f"import_feature_table: name {name!r} must be letters/digits starting with a letter")
    if name in ENCODERS:
        raise ValueError(f"import_feature_table: name {name!r} is reserved for the foundation-model embeddings")


def _checked_coverage(
    csv_path: Path, ids: Sequence[str], expected_case_ids: Sequence[str] | None, allow_missing: bool
) -> dict[str, Any] | None:
    """The table's :func:`table_coverage` of ``expected_case_ids`` (``None`` without them).

    Raises:
        pipeline.embeddings.MissingCasesError: cases are missing and ``allow_missing`` is False.
    """
    if expected_case_ids is None:
        return None
    coverage = table_coverage(ids, expected_case_ids)
    if coverage["missing"] and not allow_missing:
        raise MissingCasesError(
            f"{csv_path}: covers {coverage['covered']} of the {coverage['expected']} cases of the "
            f"manifest; {len(coverage['missing'])} missing: {coverage['missing']}. Import a table "
            "with a row for every case (NaN where a feature is unknown: the heads and the CNN fill "
            "it with the training-fold mean), or pass --allow-missing to import it as it is "
            "(fit-heads and train-survival then refuse the missing cases)",
            coverage["missing"],
        )
    return coverage


def _table_dataset_attrs(
    csv_path: Path, name: str, id_column: str, use: list[str], dropped: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The imported dataset's attributes and its provenance (both keyed to the CSV's sha256)."""
    csv_sha = sha256_file(csv_path)
    prov = {
        "encoder": FEATURE_TABLE_ENCODER,
        "modality": name,
        "source_csv_sha256": csv_sha,
        "id_column": id_column,
        "columns": use,
        "pooling": "none",
        "input_key": "",
    }
    attrs = {
        "encoder": FEATURE_TABLE_ENCODER,
        "weights_sha256": csv_sha,
        "random_init_seed": -1,
        "weights_path": str(csv_path.resolve()),
        "encoder_config": "{}",
        "source_csv": str(csv_path.resolve()),
        "source_csv_sha256": csv_sha,
        "id_column": id_column,
        "columns": json.dumps(use),
        "dropped_columns": json.dumps(dropped),
        "pooling": "none",
        "input_key": "",
        "input_shape": np.zeros(0, dtype=np.int64),
        "precision": "fp32",
    }
    return attrs, prov


def table_coverage(table_ids: Sequence[str], expected: Sequence[str]) -> dict[str, Any]:
    """How many ``expected`` cases a table holds: counts, the missing and the extra ids."""
    have, want = set(table_ids), set(expected)
    missing = [c for c in expected if c not in have]
    return {
        "expected": len(want),
        "covered": len(want) - len(set(missing)),
        "missing": missing,
        "not_expected": [c for c in table_ids if c not in want],
    }


def _read_feature_table(
    csv_path: Path, id_column: str, columns: Sequence[str] | None
) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """Case ids, float64 ``[N, F]`` features, the F column names and the non-numeric left out."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"import_feature_table: no such CSV {csv_path}")
    df = pd.read_csv(csv_path, dtype={id_column: str})
    if id_column not in df.columns:
        raise ValueError(
            f"{csv_path}: no id column {id_column!r} (columns: {list(df.columns)[:20]}); name it with --id-column"
        )
    ids = df[id_column].astype(str).str.strip()
    if (ids == "").any() or df[id_column].isna().any():
        empty = np.flatnonzero((ids == "") | df[id_column].isna()).tolist()
        raise ValueError(f"{csv_path}: empty {id_column!r} in rows {empty[:10]}")
    dup = ids[ids.duplicated()].tolist()
    if dup:
        raise ValueError(f"{csv_path}: duplicate {id_column!r} values {dup[:10]}")
    candidates = [c for c in df.columns if c != id_column]
    if columns is not None:
        absent = [c for c in columns if c not in df.columns]
        if absent:
            raise ValueError(f"{csv_path}: requested columns {absent} are not in the table")
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise ValueError(f"{csv_path}: requested columns {bad} are not numeric")
        use, dropped = list(columns), []
    else:
        use = [c for c in candidates if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
        dropped = [c for c in candidates if c not in use]
    if not use:
        raise ValueError(f"{csv_path}: no numeric feature column (non-numeric: {dropped[:20]})")
    x = df[use].to_numpy(dtype=np.float64)
    inf = np.argwhere(np.isinf(x))
    if inf.size:
        r, c = inf[0]
        raise ValueError(f"{csv_path}: infinite value in column {use[c]!r} for case {ids.iloc[r]!r}")
    return ids.tolist(), x, use, dropped
