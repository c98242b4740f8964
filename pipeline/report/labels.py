"""Names, labels and small value helpers shared by the report's analysis, rendering and figures.

Only constants and pure functions live here, so every other module of :mod:`pipeline.report`
may import it and it imports none of them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from pipeline.embedding_sets import embedding_set, head_group, set_names, set_of_group
from pipeline.study_spec import BASELINE

PROTOCOL_LABELS = {"paper": "paper protocol (optimistic)", "inner": "unbiased inner selection"}
#: Protocols in the order the report shows them: the one to trust first.
PROTOCOL_ORDER = ("inner", "paper")
#: Labels of the peers' groups that are no embedding head.
PEER_LABELS = {"clinical": "peer: clinical Cox", "radiomics": "peer: radiomics-lite Cox"}
#: Range of the bounded metrics: their t-intervals are clipped to it (and say so).
UNIT_RANGE = (0.0, 1.0)
N_BOOT = 2000
#: Learning-curve columns of ``curves.csv`` drawn (any may be missing in older runs), with
#: :data:`pipeline.layout.EVAL_COLUMNS`.
LOSS_COLUMNS = ("dice", "cox")
METRIC_LABELS = {"c_index": "C-index", "auc_1y": "1-year AUROC"}
PRED_COLUMNS = ["model", "kind", "split", "protocol", "fold", "role", "case_id", "risk", "time", "event"]


# --- report groups (read from the registry of embedding sets when asked) --------------------


def table1_cnn() -> tuple[str, ...]:
    """Table 1's CNN groups: the baseline and every embedding set (always listed, pending when missing)."""
    return (BASELINE, *set_names())


def table1_peers() -> tuple[str, ...]:
    """Table 1's peer groups: clinical and radiomics Cox, then an embedding head per set."""
    return (*PEER_LABELS, *(head_group(n) for n in set_names()))


def peer_group_labels() -> dict[str, str]:
    """Peer group -> label: ``head-ctpet`` -> ``peer: CT+PET embedding head``."""
    return PEER_LABELS | {head_group(n): f"peer: {embedding_set(n).label} embedding head" for n in set_names()}


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


def group_label(group: str) -> str:
    """Row label of a Table 1 / headline group: ``baseline``, ``ct`` ... ``head-ctpet``."""
    if group == BASELINE:
        return "DeepMTS+DAFT baseline"
    if group in set_names():
        return f"DeepMTS+DAFT + {embedding_set(group).label}"
    return peer_group_labels().get(group, group)


def model_label(group: str) -> str:
    return "DeepMTS+DAFT" if group in table1_cnn() else peer_group_labels().get(group, group)


def embedding_label(group: str) -> str:
    """The embedding set a group shows (``ct`` and ``head-ct``: ``CT``)."""
    set_name = set_of_group(group)
    if set_name is not None:
        return embedding_set(set_name).label
    return "none (baseline)" if group == BASELINE else "-"
