"""Text formatting of the report's numbers and row labels (tables and figures share it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.metrics import reason_text
from pipeline.report.labels import embedding_label, finite, model_label


def fmt_mean_sd(mean: Any, sd: Any, n: Any = None, total: Any = None) -> str:
    """``0.712 ± 0.100`` (+ `` (4/5)`` when some folds are undefined or pending)."""
    if not finite(mean):
        return "pending" if not n else "undefined"
    text = f"{float(mean):.3f} ± {float(sd):.3f}" if finite(sd) else f"{float(mean):.3f} ± n/a"
    if finite(n) and finite(total) and int(n) != int(total):
        text += f" ({int(n)}/{int(total)})"
    return text


def fmt_ci(mean: Any, low: Any, high: Any, n: Any, total: Any, clipped: Any = False) -> str:
    """``0.712 [0.650, 0.774]`` (``†`` when clipped to [0, 1], `` (4/5)`` when folds are missing)."""
    if not finite(mean):
        return "pending" if not n else "undefined"
    text = f"{float(mean):.3f} [{float(low):.3f}, {float(high):.3f}]" if finite(low) else f"{float(mean):.3f} [n/a]"
    if finite(clipped) and bool(clipped):
        text += " †"
    if finite(n) and finite(total) and int(n) != int(total):
        text += f" ({int(n)}/{int(total)})"
    return text


def fmt_delta(row: dict[str, Any]) -> str:
    """``+0.021 [-0.030, +0.070]`` of a paired comparison, or its status."""
    status = row.get("paired_status", row.get("status"))
    if status != "done":
        return "-" if status in (None, "reference") else status
    return f"{row['delta']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def fmt_signed(x: Any) -> str:
    return f"{float(x):+.3f}" if finite(x) else "-"


def fmt_p(x: Any) -> str:
    if not finite(x):
        return "-"
    return "<0.001" if float(x) < 0.001 else f"{float(x):.3f}"


def undefined_text(reason: str | None) -> str:
    """``"no_event_before_horizon"`` -> ``"undefined: no event before 365 d"``."""
    return "undefined: " + reason_text(reason)


def short_label(label: str) -> str:
    return label.replace("DeepMTS+DAFT", "CNN").replace("embedding head", "head").replace("peer: ", "")


# --- rows identical for a stated reason ----------------------------------------------------------


def merged_rows(identical: Sequence[dict[str, Any]]) -> tuple[set[str], dict[str, str]]:
    """Configurations to hide (all but the first of each group), and the merged d label
    (``64 = 128``) of every configuration in a group."""
    hidden = {c for g in identical for c in g["configs"][1:]}
    return hidden, {c: " = ".join(g["d"]) for g in identical for c in g["configs"]}


def relabel(label: str, config: str | None, d_merged: dict[str, str]) -> str:
    """``"..., d = 128"`` -> ``"..., d = 64 = 128"`` for a configuration of a merged group."""
    stem, sep, _ = label.partition(", d = ")
    return f"{stem}, d = {d_merged[config]}" if sep and config in d_merged else label


def identical_notes(identical: Sequence[dict[str, Any]]) -> str:
    """One line per group of identical rows: which, and why."""
    return " ".join(
        f"{model_label(g['group'])} ({embedding_label(g['group'])}), d = {' = '.join(g['d'])}: {g['reason']}."
        for g in identical
    )


# --- display tables -----------------------------------------------------------------------------
