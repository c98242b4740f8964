"""The study report: ablation table, Table 1, Figures 2-3, from whatever cells are finished.

:func:`write_report` can run at any time, during or after a study: finished cells
(``done.json``) are read, missing ones are shown as pending. It writes into one folder:

* ``report.md``: Markdown, figures linked relatively;
* ``report.html``: the same content, self-contained (figures embedded as base64 PNG);
* ``figure2_c_index.png``, ``figure3_auc_1y.png``: grouped bars of mean +- SD per projection
  size for CT, PET and CT+PET, with the baseline mean (dashed) and its +- SD band, one
  panel per model-selection protocol;
* ``results.csv``: one row per cell x protocol (per-fold values, pending rows included);
* ``results.json``: summaries, Table 1 and provenance.

Model-selection protocols (see :mod:`pipeline.train`): "paper protocol (optimistic)" selects
the checkpoint on the outer fold it reports; "unbiased inner selection" selects on an inner
split of the training fold. Table 1 picks the best d per embedding set the same way: by the
mean outer C-index under the paper protocol (as the paper did), and by the mean **inner**
validation C-index under the unbiased protocol, so no outer-fold number leaks into that
choice either.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.artefacts import atomic_path, code_version, read_json, utc_now, write_json_atomic
from pipeline.metrics import summarise
from pipeline.study import (
    BASELINE,
    CELL_FILE,
    MODALITY_LABELS,
    PROJ_SIZES,
    StudySpec,
    cell_dir,
    grid,
    load_study,
    proj_label,
)

PROTOCOL_LABELS = {"paper": "paper protocol (optimistic)", "inner": "unbiased inner selection"}
METRIC_LABELS = {"c_index": "C-index", "auc_1y": "1-year AUROC"}
FIGURES = {"c_index": "figure2_c_index.png", "auc_1y": "figure3_auc_1y.png"}
D_LABELS = tuple(proj_label(p) for p in PROJ_SIZES)
#: The seed paper's Table 1 (C-index, 1-year AUROC; mean, SD), for side-by-side reading.
PAPER_TABLE1 = {
    BASELINE: ("-", (0.616, 0.082), (0.671, 0.158)),
    "ct": ("orig", (0.715, 0.075), (0.710, 0.083)),
    "pet": ("128", (0.736, 0.060), (0.712, 0.100)),
    "ctpet": ("256", (0.743, 0.067), (0.744, 0.094)),
}


# --- collection and arithmetic ---------------------------------------------------------------


def collect_records(spec: StudySpec) -> pd.DataFrame:
    """One row per cell x protocol from the finished cells; pending cells give NaN rows.

    Columns: ``config, modality, d, fold, protocol, done, c_index, auc_1y, auc_1y_reason,
    selection_c_index, selected_epoch, epochs_run, seconds``. ``modality`` is
    ``"baseline"`` for the baseline, ``d`` is ``"-"`` there.
    """
    from pipeline.train import DONE_FILE, PROTOCOLS

    rows = []
    for cell in grid(spec):
        folder = cell_dir(spec, cell)
        base = {"config": cell.config.name, "modality": cell.config.modality or BASELINE,
                "d": cell.config.d_label, "fold": cell.fold}
        done = (folder / DONE_FILE).is_file()
        rec = read_json(folder / DONE_FILE) if done else {}
        info = read_json(folder / CELL_FILE) if (folder / CELL_FILE).is_file() else {}
        for proto in PROTOCOLS:
            res = rec.get("protocols", {}).get(proto) if done else None
            if done and res is None:
                continue  # e.g. inner_val_fraction = 0: only the paper protocol exists
            res = res or {}
            rows.append(base | {
                "protocol": proto, "done": done,
                "c_index": _num(res.get("c_index")), "auc_1y": _num(res.get("auc_1y")),
                "auc_1y_reason": res.get("auc_1y_undefined_reason"),
                "selection_c_index": _num(res.get("selection_c_index")),
                "selected_epoch": res.get("selected_epoch"),
                "epochs_run": rec.get("epochs_run"), "seconds": info.get("seconds"),
            })
    return pd.DataFrame(rows)


def _num(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


def summarise_records(records: pd.DataFrame, n_folds: int) -> pd.DataFrame:
    """Mean +- SD over finished folds per protocol x configuration.

    Uses :func:`pipeline.metrics.summarise` (sample SD, undefined folds excluded and
    counted). Columns: ``protocol, config, modality, d, n_done, n_folds, c_mean, c_sd,
    c_n, auc_mean, auc_sd, auc_n, sel_mean``; ``c_n``/``auc_n`` are the defined folds.
    """
    out = []
    for (proto, config), g in records.groupby(["protocol", "config"], sort=False):
        fin = g[g["done"]]
        c = summarise(fin["c_index"].tolist())
        a = summarise(fin["auc_1y"].tolist())
        s = summarise(fin["selection_c_index"].tolist())
        out.append({
            "protocol": proto, "config": config, "modality": g["modality"].iloc[0], "d": g["d"].iloc[0],
            "n_done": int(len(fin)), "n_folds": int(n_folds),
            "c_mean": c["mean"], "c_sd": c["sd"], "c_n": c["n_defined"],
            "auc_mean": a["mean"], "auc_sd": a["sd"], "auc_n": a["n_defined"],
            "sel_mean": s["mean"],
        })
    return pd.DataFrame(out)


def table1(summary: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Baseline plus, per embedding set, its best projection size, with deltas vs baseline.

    The best d maximises the mean outer C-index under the ``paper`` protocol and the mean
    inner-validation C-index (``sel_mean``) under ``inner``. Only configurations with all
    folds finished compete; an embedding set without one is listed as pending.

    Returns:
        Rows ``baseline, ct, pet, ctpet`` with ``modality, config, d, c_mean, c_sd,
        auc_mean, auc_sd, c_n, auc_n, delta_c, delta_auc, status`` (deltas are differences
        of means vs the baseline; NaN when either side is missing).
    """
    s = summary[summary["protocol"] == protocol]
    complete = s[s["n_done"] == s["n_folds"]]
    key = "c_mean" if protocol == "paper" else "sel_mean"
    rows = []
    base = complete[complete["modality"] == BASELINE]
    base_row = base.iloc[0] if len(base) else None
    for modality in (BASELINE, "ct", "pet", "ctpet"):
        cand = complete[(complete["modality"] == modality) & complete[key].notna()]
        if cand.empty:
            rows.append({"modality": modality, "config": None, "d": None, "status": "pending"})
            continue
        best = cand.loc[cand[key].idxmax()]
        row = {k: best[k] for k in ("modality", "config", "d", "c_mean", "c_sd", "auc_mean",
                                     "auc_sd", "c_n", "auc_n", "n_folds")}
        row["selected_by"] = key
        row["status"] = "done"
        if base_row is not None and modality != BASELINE:
            row["delta_c"] = _diff(best["c_mean"], base_row["c_mean"])
            row["delta_auc"] = _diff(best["auc_mean"], base_row["auc_mean"])
        rows.append(row)
    return pd.DataFrame(rows)


def _diff(a: Any, b: Any) -> float:
    return float(a) - float(b) if _finite(a) and _finite(b) else float("nan")


def _finite(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and math.isfinite(float(x))


def fmt_mean_sd(mean: Any, sd: Any, n: Any = None, total: Any = None) -> str:
    """``0.712 ± 0.100`` (+ `` (4/5)`` when some folds are undefined or pending)."""
    if not _finite(mean):
        return "pending" if not n else "undefined"
    text = f"{float(mean):.3f} ± {float(sd):.3f}" if _finite(sd) else f"{float(mean):.3f} ± n/a"
    if n is not None and total is not None and int(n) != int(total):
        text += f" ({int(n)}/{int(total)})"
    return text


def _signed(x: Any) -> str:
    return f"{float(x):+.3f}" if _finite(x) else "-"


# --- figures -------------------------------------------------------------------------------


def plot_figure(summary: pd.DataFrame, metric: str, path: str | os.PathLike, *, title: str) -> Path:
    """Grouped bars (CT, PET, CT+PET x d) of mean +- SD, baseline dashed with +- SD band.

    One panel per model-selection protocol. Configurations without a finished fold are
    marked "pending" at their bar position.

    Args:
        summary: :func:`summarise_records` output.
        metric: ``"c_index"`` (Figure 2) or ``"auc_1y"`` (Figure 3).
        path: PNG destination (written atomically).
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    pre = "c" if metric == "c_index" else "auc"
    protocols = [p for p in PROTOCOL_LABELS if p in set(summary["protocol"])]
    fig, axes = plt.subplots(1, max(1, len(protocols)), figsize=(6.2 * max(1, len(protocols)), 4.4),
                             sharey=True, squeeze=False)
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, len(D_LABELS)))
    width = 0.8 / len(D_LABELS)
    groups = ["ct", "pet", "ctpet"]
    # Shared y range: from 0.5 (chance) or lower when a mean - SD falls below it, up to 1.
    lows = (summary[f"{pre}_mean"] - summary[f"{pre}_sd"].fillna(0)).dropna()
    y_low = min(0.5, math.floor(float(lows.min()) * 10) / 10) if len(lows) else 0.5
    handles = []
    for ax, proto in zip(axes[0], protocols):
        s = summary[summary["protocol"] == proto].set_index("config")
        if BASELINE in s.index and _finite(s.loc[BASELINE, f"{pre}_mean"]):
            m, sd = float(s.loc[BASELINE, f"{pre}_mean"]), s.loc[BASELINE, f"{pre}_sd"]
            ax.axhline(m, ls="--", color="black", lw=1.2, zorder=3)
            if _finite(sd):
                ax.axhspan(m - float(sd), m + float(sd), color="grey", alpha=0.2, lw=0, zorder=0)
        for j, d in enumerate(D_LABELS):
            for i, mod in enumerate(groups):
                name = f"{mod}-d{d}"
                if name not in s.index:
                    continue  # not part of this study's grid
                x = i + (j - (len(D_LABELS) - 1) / 2) * width
                mean, sd = s.loc[name, f"{pre}_mean"], s.loc[name, f"{pre}_sd"]
                if _finite(mean):
                    ax.bar(x, float(mean) - y_low, width * 0.92, bottom=y_low, color=colours[j], zorder=2,
                           yerr=float(sd) if _finite(sd) else None, capsize=3, error_kw={"lw": 1})
                    n_done = int(s.loc[name, "n_done"])
                    if n_done < int(s.loc[name, "n_folds"]):
                        ax.text(x, y_low + 0.01, f"{n_done}/{int(s.loc[name, 'n_folds'])}", ha="center",
                                va="bottom", fontsize=6, color="white", rotation=90, zorder=4)
                else:
                    ax.text(x, y_low + 0.01, "pending", rotation=90, ha="center", va="bottom", fontsize=7,
                            color="dimgrey")
        ax.set_xticks(range(len(groups)), [MODALITY_LABELS[g] for g in groups])
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_title(PROTOCOL_LABELS[proto], fontsize=10)
        ax.set_ylim(y_low, 1.0)
        ax.grid(axis="y", alpha=0.3, zorder=0)
    handles = [Patch(color=colours[j], label=f"d = {d}") for j, d in enumerate(D_LABELS)]
    handles += [plt.Line2D([], [], ls="--", color="black", label="baseline mean"),
                Patch(color="grey", alpha=0.2, label="baseline ± SD")]
    axes[0][0].set_ylabel(f"{METRIC_LABELS[metric]} (mean ± SD over folds)")
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


# --- document --------------------------------------------------------------------------


@dataclass
class _Block:
    kind: str  # "h1", "h2", "p", "warn", "table", "img", "code"
    content: Any
    extra: Any = None


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def _render_md(blocks: list[_Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.content}")
        elif b.kind == "h2":
            out.append(f"## {b.content}")
        elif b.kind == "h3":
            out.append(f"### {b.content}")
        elif b.kind == "p":
            out.append(b.content)
        elif b.kind == "warn":
            out.append(f"> **WARNING: {b.content}**")
        elif b.kind == "table":
            out.append(_md_table(b.content))
        elif b.kind == "img":
            out.append(f"![{b.extra}]({Path(b.content).name})")
        elif b.kind == "code":
            out.append("```\n" + b.content + "\n```")
    return "\n\n".join(out) + "\n"


def _render_html(blocks: list[_Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.content)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.content)}</p>")
        elif b.kind == "warn":
            body.append(f'<p class="warn">WARNING: {html.escape(b.content)}</p>')
        elif b.kind == "table":
            body.append(b.content.to_html(index=False, escape=True, border=0))
        elif b.kind == "img":
            data = base64.b64encode(Path(b.content).read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.extra)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.extra)}</figcaption></figure>")
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.content)}</pre>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
             ".warn{background:#fdd;border:2px solid #c00;padding:.6em;font-weight:bold}"
             "img{max-width:100%}pre{background:#f4f4f4;padding:.6em;overflow-x:auto}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Display table: one row per configuration, both protocols' C-index and AUROC."""
    rows = []
    for config, g in summary.groupby("config", sort=False):
        g = g.set_index("protocol")
        first = g.iloc[0]
        row = {"embeddings": MODALITY_LABELS.get(first["modality"], "none (baseline)"), "d": first["d"],
               "folds done": f"{int(first['n_done'])}/{int(first['n_folds'])}"}
        for proto, label in PROTOCOL_LABELS.items():
            if proto not in g.index:
                continue
            r = g.loc[proto]
            short = "paper" if proto == "paper" else "unbiased"
            row[f"C-index ({short})"] = fmt_mean_sd(r["c_mean"], r["c_sd"], r["c_n"], r["n_folds"])
            row[f"1-y AUROC ({short})"] = fmt_mean_sd(r["auc_mean"], r["auc_sd"], r["auc_n"], r["n_folds"])
        rows.append(row)
    return pd.DataFrame(rows)


def table1_display(t1: pd.DataFrame, protocol: str) -> pd.DataFrame:
    rows = []
    for r in t1.to_dict("records"):
        label = "DeepMTS+DAFT baseline" if r["modality"] == BASELINE else f"+ {MODALITY_LABELS[r['modality']]}"
        if r["status"] == "pending":
            paper = PAPER_TABLE1[r["modality"]]
            rows.append({"configuration": label, "best d": "pending", "C-index": "pending",
                         "1-year AUROC": "pending", "Δ C-index": "-", "Δ AUROC": "-",
                         "paper (C / AUROC)": f"d={paper[0]}: {paper[1][0]:.3f} / {paper[2][0]:.3f}"})
            continue
        paper = PAPER_TABLE1[r["modality"]]
        rows.append({
            "configuration": label, "best d": r["d"],
            "C-index": fmt_mean_sd(r["c_mean"], r["c_sd"], r["c_n"], r["n_folds"]),
            "1-year AUROC": fmt_mean_sd(r["auc_mean"], r["auc_sd"], r["auc_n"], r["n_folds"]),
            "Δ C-index": _signed(r.get("delta_c")), "Δ AUROC": _signed(r.get("delta_auc")),
            "paper (C / AUROC)": f"d={paper[0]}: {paper[1][0]:.3f} / {paper[2][0]:.3f}",
        })
    return pd.DataFrame(rows)


def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Build the report from the study folder's finished cells; returns ``report.md``'s path.

    Args:
        study_dir: a folder prepared by :func:`pipeline.study.prepare_study`.
        out_dir: destination; default ``<study_dir>/report``.
    """
    spec, study = load_study(study_dir)
    out = Path(out_dir) if out_dir else Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = collect_records(spec)
    summary = summarise_records(records, spec.n_folds)
    protocols = [p for p in PROTOCOL_LABELS if p in set(summary["protocol"])]
    t1 = {p: table1(summary, p) for p in protocols}
    n_cells = len(grid(spec))
    n_done = int(records.drop_duplicates(["config", "fold"])["done"].sum())
    info = study.get("info", {})
    emb = study.get("embeddings") or {}
    cohort = study["cohort"]

    fig_paths = {}
    for metric, fname in FIGURES.items():
        num = "Figure 2" if metric == "c_index" else "Figure 3"
        fig_paths[metric] = plot_figure(
            summary, metric, out / fname,
            title=f"{num}: {METRIC_LABELS[metric]} by FM projection size "
                  f"({n_done}/{n_cells} cells finished)")

    b: list[_Block] = [_Block("h1", "Projection ablation: DeepMTS+DAFT with frozen CT/PET foundation-model embeddings")]
    if emb.get("random_init"):
        b.append(_Block("warn", "the embeddings come from RANDOMLY INITIALISED encoders "
                                f"({', '.join(emb.get('random_init_modalities', []))}), not the foundation models. "
                                "These numbers test the pipeline; they say nothing about CT-FM or PET-FM."))
    if info.get("synthetic"):
        b.append(_Block("warn", "the data are a SYNTHETIC demo cohort, not HECKTOR 2022."))
    if n_done < n_cells:
        b.append(_Block("p", f"Status: {n_done} of {n_cells} cells finished; the rest are shown as pending. "
                             "Rerun `run-study` (finished cells are skipped) or `run-study --report-only` to refresh."))
    b.append(_Block("h2", "Data and settings"))
    facts = [
        ("data source", info.get("data_source", spec.manifest)),
        ("cases / events", f"{cohort['n_cases']} / {cohort['n_events']} "
                           f"({100 * cohort['n_events'] / max(1, cohort['n_cases']):.0f} % events), "
                           f"{cohort.get('n_centres', '?')} centre(s)"),
        ("oracle C-index (true risk of the synthetic cohort)",
         f"{info['oracle_c_index']:.3f}" if _finite(info.get("oracle_c_index")) else "n/a (no truth file)"),
        ("embeddings", "none" if not emb else
         f"{emb['path']} (sha256 {emb['sha256'][:16]}…; "
         + ", ".join(f"{m}: {a.get('encoder', '?')}, weights {str(a.get('weights_sha256', '?'))[:16]}"
                     for m, a in emb.get("modalities", {}).items()) + ")"),
        ("FM weights", "RANDOM-INIT (demo)" if emb.get("random_init") else ("pretrained" if emb else "-")),
        ("settings", info.get("settings", "paper")),
        ("survival input (D, H, W)", str(tuple(cohort.get("survival_input_size_dhw", [])))),
        ("CV", f"{spec.n_folds} folds, stratified by event and RFS quartile, seed {spec.folds_seed}; "
               "identical folds for every configuration"),
        ("training options (non-default)", ", ".join(f"{k}={v}" for k, v in sorted(spec.train.items())) or "paper defaults"),
    ]
    b.append(_Block("table", pd.DataFrame(facts, columns=["item", "value"])))
    b.append(_Block("p", "Metrics are computed on each outer validation fold and summarised as mean ± SD "
                         "(sample SD) over folds; `(k/n)` marks folds where the metric is undefined or pending "
                         "(a fold without an event before 365 days has no 1-year AUROC; it is never counted as 0.5). "
                         "Paper protocol (optimistic): the checkpoint is selected on the outer fold it is scored on, "
                         "as in the paper. Unbiased inner selection: selected on an inner split of the training fold; "
                         "the outer fold is scored once."))

    for proto in protocols:
        how = ("best d by mean outer validation C-index, as in the paper" if proto == "paper"
               else "best d by mean inner-validation C-index; the outer folds play no part in the choice")
        b.append(_Block("h2", f"Table 1 - {PROTOCOL_LABELS[proto]}"))
        b.append(_Block("p", f"Best projection size per embedding set ({how}); Δ = difference of means vs the baseline. "
                             "The last column repeats the paper's reported values for reference."))
        b.append(_Block("table", table1_display(t1[proto], proto)))

    b.append(_Block("h2", "Full projection ablation (both protocols)"))
    b.append(_Block("table", ablation_table(summary)))
    b.append(_Block("h2", "Figures"))
    b.append(_Block("img", fig_paths["c_index"], "Figure 2: C-index by projection size"))
    b.append(_Block("img", fig_paths["auc_1y"], "Figure 3: 1-year AUROC by projection size"))

    secs = records.drop_duplicates(["config", "fold"])["seconds"].dropna()
    if len(secs):
        b.append(_Block("p", f"Compute: {len(secs)} cells trained here, {secs.sum() / 60:.1f} min of cell time "
                             f"(median {secs.median():.1f} s per cell)."))
    b.append(_Block("h2", "Provenance"))
    prov = [
        ("report code version", code_version()),
        ("study code version", study.get("code_version")),
        ("study spec hash", study.get("spec_hash")),
        ("manifest", spec.manifest),
        ("preprocessed cache", f"{spec.cache_root} (params hash {study.get('cache_params_hash')})"),
        ("embeddings sha256", emb.get("sha256", "-")),
        ("embeddings attributes", ", ".join(f"{k}={v}" for k, v in sorted(emb.get("attrs", {}).items())
                                            if k not in ("created",)) or "-"),
        ("folds hash", study.get("folds_hash")),
        ("case set sha256", cohort.get("case_set_sha256")),
        ("generated", utc_now()),
    ]
    b.append(_Block("table", pd.DataFrame(prov, columns=["item", "value"])))

    title = "hnfm-survival projection ablation"
    md_path = out / "report.md"
    with atomic_path(md_path, suffix=".md") as tmp:
        tmp.write_text(_render_md(b))
    with atomic_path(out / "report.html", suffix=".html") as tmp:
        tmp.write_text(_render_html(b, title))
    with atomic_path(out / "results.csv", suffix=".csv") as tmp:
        records.to_csv(tmp, index=False)
    write_json_atomic(out / "results.json", {
        "study": study, "report_code_version": code_version(), "generated": utc_now(),
        "cells": {"total": n_cells, "done": n_done},
        "summary": _records(summary),
        "table1": {p: _records(t) for p, t in t1.items()},
        "protocol_labels": PROTOCOL_LABELS,
    })
    return md_path


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.to_dict("records")]
