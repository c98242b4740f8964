"""The report's figures, drawn from the results object alone (matplotlib, Agg backend).

Every figure carries the random-init / synthetic stamp in a footer band under the plot, so a
copied figure keeps the warning without the stamp covering the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artefacts import atomic_path
from pipeline.embedding_sets import embedding_set, set_names
from pipeline.layout import EVAL_COLUMNS
from pipeline.report.format import fmt_p, merged_rows, relabel, short_label
from pipeline.report.labels import (
    LOSS_COLUMNS,
    METRIC_LABELS,
    PROTOCOL_LABELS,
    PROTOCOL_ORDER,
    finite,
)
from pipeline.study_spec import BASELINE, PROJ_SIZES, proj_label

#: Figure files, numbered in the order the report shows them (Figures 2-3 as in the paper).
FIGURES = {"c_index": "figure2_c_index.png", "auc_1y": "figure3_auc_1y.png"}
FIGURE_CURVES = "figure4_learning_curves.png"
FIGURE_PAIRED = "figure5_paired_delta_c.png"
FIGURE_CALIBRATION = "figure6_calibration_1y.png"
FIGURE_KM = "figure7_km_risk_groups.png"
#: The first CV split: its folds are pooled for calibration and risk groups.
FIRST_SPLIT_TEXT = "first CV split (cv0), its folds pooled"
D_LABELS = tuple(proj_label(p) for p in PROJ_SIZES)
CURVE_TITLES = {
    "dice": "training loss: Dice part",
    "cox": "training loss: Cox part",
    "train_c_index": "train C-index (fit rows)",
    "val_c_index_inner": "validation C-index, inner",
    "val_c_index_outer": "validation C-index, outer",
    "val_dice_outer": "validation Dice, outer",
}


def _pyplot():
    import matplotlib  # local: heavy, and only the figures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_label(name: str) -> str:
    """``"figure6_calibration_1y.png"`` -> ``"Figure 6"``: titles and captions read the number
    from the file name, so they cannot disagree with it."""
    return "Figure " + name.split("_", 1)[0].removeprefix("figure")


def stamp(fig, text: str | None) -> None:
    """Draw the random-init / synthetic warning into the figure: a red footer in the bottom band
    under the plots (each figure leaves that band free), so a copied figure keeps the warning
    and no panel's data is covered."""
    if not text:
        return
    fig.text(0.5, 0.004, text, ha="center", va="bottom", fontsize=8, color="#b00000", weight="bold")


def _save(fig, path: str | os.PathLike, text: str | None) -> Path:
    plt = _pyplot()
    stamp(fig, text)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_figure(
    summary: pd.DataFrame, metric: str, path: str | os.PathLike, *, title: str, stamp_text: str | None = None
) -> Path:
    """Grouped bars (CT, PET, CT+PET x d) of mean +- SD, baseline dashed with +- SD band.

    One panel per model-selection protocol (unbiased first). Configurations without a
    finished fold are marked "pending" at their bar position.

    Args:
        summary: :func:`pipeline.report.summarise_records` rows.
        metric: ``"c_index"`` (Figure 2) or ``"auc_1y"`` (Figure 3).
        path: PNG destination (written atomically).
        title: figure title.
        stamp_text: warning drawn in the figure (:func:`stamp`).
    """
    plt = _pyplot()
    from matplotlib.patches import Patch  # local: matplotlib, as in _pyplot

    pre = "c" if metric == "c_index" else "auc"
    summary = summary[summary["kind"] == "cnn"] if "kind" in summary else summary
    protocols = [p for p in PROTOCOL_ORDER if p in set(summary["protocol"])]
    fig, axes = plt.subplots(
        1, max(1, len(protocols)), figsize=(6.2 * max(1, len(protocols)), 4.6), sharey=True, squeeze=False
    )
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(D_LABELS)))
    lows = (summary[f"{pre}_mean"].astype(float) - summary[f"{pre}_sd"].astype(float).fillna(0)).dropna()
    y_low = min(0.5, math.floor(float(lows.min()) * 10) / 10) if len(lows) else 0.5
    for ax, proto in zip(axes[0], protocols):
        _bars(ax, summary[summary["protocol"] == proto].set_index("config"), pre, y_low, colours)
        ax.set_title(PROTOCOL_LABELS[proto], fontsize=10)
    shown_d = {c.partition("-d")[2] for c in summary["config"]}
    handles = [Patch(color=colours[j], label=f"d = {d}") for j, d in enumerate(D_LABELS) if d in shown_d]
    handles += [
        plt.Line2D([], [], ls="--", color="black", label="baseline mean"),
        Patch(color="grey", alpha=0.2, label="baseline ± SD"),
    ]
    axes[0][0].set_ylabel(f"{METRIC_LABELS[metric]} (mean ± SD over folds)")
    fig.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.04), ncol=len(handles), fontsize=8, frameon=False
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, path, stamp_text)


def _bars(ax, s: pd.DataFrame, pre: str, y_low: float, colours) -> None:
    """One protocol's panel of :func:`plot_figure`."""
    width = 0.8 / len(D_LABELS)
    # Embedding sets the study did not request get no empty slot.
    groups = [g for g in set_names() if any(f"{g}-d{d}" in s.index for d in D_LABELS)] or list(set_names())
    if BASELINE in s.index and finite(s.loc[BASELINE, f"{pre}_mean"]):
        m, sd = float(s.loc[BASELINE, f"{pre}_mean"]), s.loc[BASELINE, f"{pre}_sd"]
        ax.axhline(m, ls="--", color="black", lw=1.2, zorder=3)
        if finite(sd):
            ax.axhspan(m - float(sd), m + float(sd), color="grey", alpha=0.2, lw=0, zorder=0)
    for j, d in enumerate(D_LABELS):
        for i, group in enumerate(groups):
            name = f"{group}-d{d}"
            if name not in s.index:
                continue  # not part of this study's grid
            x = i + (j - (len(D_LABELS) - 1) / 2) * width
            mean, sd = s.loc[name, f"{pre}_mean"], s.loc[name, f"{pre}_sd"]
            if not finite(mean):
                ax.text(x, y_low + 0.01, "pending", rotation=90, ha="center", va="bottom", fontsize=7, color="dimgrey")
                continue
            ax.bar(
                x,
                float(mean) - y_low,
                width * 0.92,
                bottom=y_low,
                color=colours[j],
                zorder=2,
                yerr=float(sd) if finite(sd) else None,
                capsize=3,
                error_kw={"lw": 1},
            )
            n_done, n_folds = int(s.loc[name, "n_done"]), int(s.loc[name, "n_folds"])
            if n_done < n_folds:
                ax.text(
                    x,
                    y_low + 0.01,
                    f"{n_done}/{n_folds}",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    color="white",
                    rotation=90,
                    zorder=4,
                )
    ax.set_xticks(range(len(groups)), [embedding_set(g).label for g in groups])
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylim(y_low, 1.0)
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _grid_axes(n: int, width: float = 3.2, height: float = 3.2, cols: int = 4, **kw):
    plt = _pyplot()
    n = max(1, n)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.3), squeeze=False, **kw)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes


def _titled(analyses: Sequence[dict[str, Any]], identical: Sequence[dict[str, Any]]) -> list[tuple[str, dict]]:
    """(short panel title, analysis) per model, merged d labels included."""
    _, d_merged = merged_rows(identical)
    return [(short_label(relabel(a["label"], a["model"], d_merged)), a) for a in analyses]


def plot_calibration(
    analyses: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    stamp_text: str | None = None,
    identical: Sequence[dict[str, Any]] = (),
) -> Path:
    """One panel per model: predicted vs KM-observed 1-year event probability (95 % CI)."""
    done = [(t, a) for t, a in _titled(analyses, identical) if a.get("status") == "done"]
    top = calibration_limit([a["calibration"] for _, a in done])
    fig, axes = _grid_axes(len(done))
    for ax, (title, a) in zip(axes.ravel(), done):
        g = pd.DataFrame(a["calibration"]["groups"])
        g = g[g["followed_to_horizon"].astype(bool)]
        if len(g):
            obs, lo, hi = (g[c].astype(float) for c in ("observed", "observed_low", "observed_high"))
            ax.errorbar(g["pred_mean"], obs, yerr=np.clip(np.vstack([obs - lo, hi - obs]), 0, None), fmt="o", capsize=3)
        ov = a["calibration"]["overall"]
        obs = f"{ov['observed']:.2f}" if finite(ov.get("observed")) else "n/a"
        ax.set_title(f"{title}\npred {ov['pred_mean']:.2f} / KM {obs}", fontsize=8)
        ax.plot([0, top], [0, top], ls="--", color="grey", lw=1)
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel("predicted P(relapse by 1 y)", fontsize=7)
        ax.set_ylabel("observed (1 - KM)", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        f"{figure_label(FIGURE_CALIBRATION)}: 1-year calibration (Breslow baseline of each training fold; "
        f"{FIRST_SPLIT_TEXT}; axes 0-{top:g})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path, stamp_text)


def calibration_limit(calibrations: Sequence[dict[str, Any]]) -> float:
    """Shared upper limit of the calibration axes: the largest predicted or observed value
    (CI included) rounded up to the next 0.1 with a margin, at most 1, so points all below
    0.3 are not squeezed into a corner of a 0-1 square."""
    values = []
    for cal in calibrations:
        g = pd.DataFrame(cal.get("groups") or [])
        if len(g):
            g = g[g["followed_to_horizon"].astype(bool)]
            values += [
                float(v) for c in ("pred_mean", "observed", "observed_high") if c in g for v in g[c] if finite(v)
            ]
        values += [
            float(v) for v in (cal.get("overall") or {}).values() if isinstance(v, float) and finite(v) and 0 <= v <= 1
        ]
    if not values:
        return 1.0
    return float(min(1.0, math.ceil(max(values) * 1.1 * 10) / 10))


def plot_km(
    analyses: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    stamp_text: str | None = None,
    identical: Sequence[dict[str, Any]] = (),
) -> Path:
    """One panel per model: KM curves of the high / low risk groups with the log-rank p."""
    done = [
        (t, a) for t, a in _titled(analyses, identical) if a.get("status") == "done" and a["km"].get("status") == "done"
    ]
    fig, axes = _grid_axes(len(done), height=3.0, sharey=True)
    colours = {"low": "tab:blue", "high": "tab:red"}
    for ax, (title, a) in zip(axes.ravel(), done):
        for name, g in a["km"]["groups"].items():
            ax.step(
                g["timeline"],
                g["survival"],
                where="post",
                color=colours.get(name),
                lw=1.4,
                label=f"{name} risk (n={g['n']}, ev={g['events']})",
            )
            ax.fill_between(
                g["timeline"], g["ci_low"], g["ci_high"], step="post", alpha=0.15, color=colours.get(name), lw=0
            )
        ax.set_title(f"{title}\nlog-rank p = {fmt_p(a['km']['p_value'])}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("days", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left", frameon=False)
    axes[0][0].set_ylabel("relapse-free survival", fontsize=7)
    fig.suptitle(
        f"{figure_label(FIGURE_KM)}: Kaplan-Meier by risk group (cut-off = training-fold median risk; "
        f"{FIRST_SPLIT_TEXT})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path, stamp_text)


def plot_paired(
    paired: dict[str, list[dict[str, Any]]],
    path: str | os.PathLike,
    identical: Sequence[dict[str, Any]] = (),
    stamp_text: str | None = None,
) -> Path:
    """Forest plot: Δ C-index vs the CNN baseline with 95 % bootstrap CI, one panel per protocol."""
    plt = _pyplot()
    hidden, d_merged = merged_rows(identical)
    protos = [p for p in PROTOCOL_ORDER if p in paired]
    shown = {p: [r for r in paired[p] if r["model"] not in hidden] for p in protos}
    n_rows = max([len(shown[p]) for p in protos] + [1])
    fig, axes = plt.subplots(
        1, max(1, len(protos)), figsize=(6.5 * max(1, len(protos)), 0.36 * n_rows + 2.0), squeeze=False, sharey=True
    )
    for ax, proto in zip(axes[0], protos):
        rows = shown[proto]
        for i, r in enumerate(rows):
            if r["status"] != "done":
                ax.text(0, i, r["status"], fontsize=8, va="center", ha="center", color="dimgrey")
                continue
            colour = "tab:blue" if r["kind"] == "cnn" else "tab:orange"
            ax.errorbar(
                r["delta"],
                i,
                xerr=[[r["delta"] - r["ci_low"]], [r["ci_high"] - r["delta"]]],
                fmt="o",
                color=colour,
                capsize=3,
                ms=4,
            )
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(
            range(len(rows)), [short_label(relabel(r["label"], r["model"], d_merged)) for r in rows], fontsize=9
        )
        ax.set_xlabel("Δ C-index vs DeepMTS+DAFT baseline (95 % CI)", fontsize=9)
        ax.set_title(PROTOCOL_LABELS[proto], fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].invert_yaxis()  # once: the panels share the y axis, a second call would undo it
    fig.suptitle(
        f"{figure_label(FIGURE_PAIRED)}: paired differences on identical folds (blue: CNN, orange: peers)", fontsize=11
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, path, stamp_text)


def plot_learning_curves(curves: dict[str, Any], path: str | os.PathLike, stamp_text: str | None = None) -> Path:
    """Small multiples: one row per curve column, one column per embedding set; in each panel
    one line per projection size (colour = d, as in Figures 2-3) and the baseline (black,
    dashed) for reference. Fold means; x = epochs completed (loss parts start at epoch 1,
    scores at 0, before the first step)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator  # local: matplotlib, as in _pyplot

    cols = curves["columns"] or list(LOSS_COLUMNS + EVAL_COLUMNS)
    by_set = _curves_by_set(curves["configs"])
    sets = [n for n in set_names() if n in by_set] or [BASELINE]
    fig, axes = plt.subplots(
        len(cols),
        len(sets),
        figsize=(max(3.4 * len(sets) + 0.6, 8.0), 2.3 * len(cols) + 1.2),
        squeeze=False,
        sharex=True,
    )
    colours = dict(zip(D_LABELS, plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(D_LABELS)))))
    for j, name in enumerate(sets):
        axes[0][j].set_title(embedding_set(name).label if name in set_names() else "baseline", fontsize=10)
        for i, col in enumerate(cols):
            ax = axes[i][j]
            for c in by_set.get(BASELINE, []):
                _curve(ax, c, col, color="black", ls="--", label="baseline")
            for c in by_set.get(name, []) if name != BASELINE else []:
                d = c["config"].partition("-d")[2]
                _curve(ax, c, col, color=colours.get(d, "grey"), ls="-", label=f"d = {d}")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(CURVE_TITLES.get(col, col).replace(": ", ":\n", 1), fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epochs completed (0 = before training)", fontsize=7)
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(
        handles,
        labels,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.025),
        ncol=max(1, len(labels)),
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"{figure_label(FIGURE_CURVES)}: learning curves ({curves['split']}, mean over folds)\n"
        "one column per embedding set, colour = d, baseline dashed",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.985))
    return _save(fig, path, stamp_text)


def _curves_by_set(configs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Learning-curve rows grouped by embedding set (``baseline`` for the baseline)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        out.setdefault(c["config"].partition("-d")[0], []).append(c)
    return out


def _curve(ax, c: dict[str, Any], col: str, **style: Any) -> None:
    y = np.array([np.nan if v is None else v for v in c.get(col, [])], dtype=float)
    ok = np.isfinite(y)  # a column scored on some epochs only (train C: train_c_every) joins its points
    if ok.any():
        ax.plot(np.asarray(c["x"])[ok], y[ok], lw=1.2, marker="o", ms=2.5, **style)
