"""Names, labels and small value helpers shared by the report's analysis, rendering and figures.

Only constants and pure functions live here, so every other module of :mod:`pipeline.report`
may import it and it imports none of them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.embedding_sets import EMBEDDING_SETS, SET_NAMES
from pipeline.study import BASELINE

PROTOCOL_LABELS = {"paper": "paper protocol (optimistic)", "inner": "unbiased inner selection"}
#: Protocols in the order the report shows them: the one to trust first.
PROTOCOL_ORDER = ("inner", "paper")
#: Table 1 rows: the CNN's four (always listed, pending when missing), then the peers'.
TABLE1_CNN = (BASELINE, *SET_NAMES)
TABLE1_PEERS = ("clinical", "radiomics", *(f"head-{n}" for n in SET_NAMES))
PEER_GROUP_LABELS = {"clinical": "peer: clinical Cox", "radiomics": "peer: radiomics-lite Cox",
                     **{f"head-{n}": f"peer: {s.label} embedding head" for n, s in EMBEDDING_SETS.items()}}
#: Range of the bounded metrics: their t-intervals are clipped to it (and say so).
UNIT_RANGE = (0.0, 1.0)
HORIZON = 365.0
N_BOOT = 2000
#: Learning-curve columns of ``curves.csv`` drawn (any may be missing in older runs), with
#: :data:`pipeline.layout.EVAL_COLUMNS`.
LOSS_COLUMNS = ("dice", "cox")
METRIC_LABELS = {"c_index": "C-index", "auc_1y": "1-year AUROC"}
PRED_COLUMNS = ["model", "kind", "split", "protocol", "fold", "role", "case_id", "risk", "time", "event"]



# --- small helpers ---------------------------------------------------------------------------


def as_float(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


def finite(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and math.isfinite(float(x))


def float_or_none(x: Any) -> float | None:
    return float(x) if finite(x) else None


def difference(a: Any, b: Any) -> float:
    return float(a) - float(b) if finite(a) and finite(b) else float("nan")


def clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python numbers, frames -> records."""
    if isinstance(x, pd.DataFrame):
        return clean(x.to_dict("records"))
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def group_label(modality: str) -> str:
    """Row label of a Table 1 / headline group: ``baseline``, ``ct`` ... ``head-ctpet``."""
    if modality == BASELINE:
        return "DeepMTS+DAFT baseline"
    if modality in TABLE1_CNN:
        return f"DeepMTS+DAFT + {EMBEDDING_SETS[modality].label}"
    return PEER_GROUP_LABELS.get(modality, modality)


def model_label(modality: str) -> str:
    return "DeepMTS+DAFT" if modality in TABLE1_CNN else PEER_GROUP_LABELS.get(modality, modality)


def embedding_label(modality: str) -> str:
    if modality in EMBEDDING_SETS:
        return EMBEDDING_SETS[modality].label
    if modality.startswith("head-"):
        return EMBEDDING_SETS[modality[5:]].label
    return "none (baseline)" if modality == BASELINE else "-"
