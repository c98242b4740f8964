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
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline.artefacts import atomic_path, code_version, read_json, utc_now, write_json_atomic
from pipeline.metrics import summarise
from pipeline.study import (
    BASELINE,
    CELL_FILE,
    FIRST_SPLIT,
    LOCO,
    MODALITY_LABELS,
    PEER_FILE,
    PROJ_SIZES,
    Configuration,
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
    """One row per CNN cell x protocol from the finished cells; pending cells give NaN rows.

    Covers every split the CNN trains on. Columns: ``split, kind, config, modality, d,
    fold, protocol, done, c_index, c_index_reason, auc_1y, auc_1y_reason,
    selection_c_index, selected_epoch, epochs_run, seconds``. ``kind`` is ``"cnn"``,
    ``modality`` is ``"baseline"`` for the baseline, ``d`` is ``"-"`` there. An undefined
    C-index (e.g. a LOCO centre without an event) is NaN with its reason code.
    """
    from pipeline.train import DONE_FILE, PROTOCOLS

    rows = []
    for cell in grid(spec):
        folder = cell_dir(spec, cell)
        base = {"split": cell.split, "kind": "cnn", "config": cell.config.name,
                "modality": cell.config.modality or BASELINE, "d": cell.config.d_label, "fold": cell.fold}
        done = (folder / DONE_FILE).is_file()
        rec = read_json(folder / DONE_FILE) if done else {}
        info = read_json(folder / CELL_FILE) if (folder / CELL_FILE).is_file() else {}
        for proto in PROTOCOLS:
            res = rec.get("protocols", {}).get(proto) if done else None
            if done and res is None:
                continue  # e.g. inner_val_fraction = 0: only the paper protocol exists
            res = res or {}
            c = _num(res.get("c_index"))
            rows.append(base | {
                "protocol": proto, "done": done,
                "c_index": c, "c_index_reason": _c_reason(spec, cell, res) if done and math.isnan(c) else None,
                "auc_1y": _num(res.get("auc_1y")),
                "auc_1y_reason": res.get("auc_1y_undefined_reason"),
                "selection_c_index": _num(res.get("selection_c_index")),
                "selected_epoch": res.get("selected_epoch"),
                "epochs_run": rec.get("epochs_run"), "seconds": info.get("seconds"),
            })
    return pd.DataFrame(rows)


def _c_reason(spec: StudySpec, cell, res: dict[str, Any]) -> str:
    """Why a finished cell has no C-index, from its held-out fold's endpoints."""
    from pipeline.metrics import NO_COMPARABLE_PAIR, NO_EVENTS

    held = _held_out(spec, cell.split, cell.fold)
    if held is None:
        return "unknown"
    t, e = held["time"].to_numpy(float), held["event"].to_numpy(int).astype(bool)
    if not e.any():
        return NO_EVENTS
    if not any((t > ti).any() or ((t == ti) & ~e).any() for ti in t[e]):
        return NO_COMPARABLE_PAIR
    return "no valid epoch"


def _held_out(spec: StudySpec, split: str, fold: int) -> pd.DataFrame | None:
    """``case_id, time, event`` of one held-out fold, from the folds file and the manifest."""
    path = spec.folds_path_of(split)
    if not path.is_file():
        return None
    from pipeline.splits import load_folds

    folds = load_folds(path)
    surv = _survival(spec)
    ids = folds.loc[folds["fold"] == fold, "case_id"].astype(str)
    return surv.loc[ids].reset_index()


def _survival(spec: StudySpec) -> pd.DataFrame:
    from pipeline.manifest import read_manifest, survival_cases

    m = survival_cases(read_manifest(spec.manifest))
    return pd.DataFrame({"time": m["rfs_days"].astype(float).to_numpy(), "event": m["relapse"].astype(int).to_numpy()},
                        index=pd.Index(m["case_id"].astype(str), name="case_id"))


def collect_peer_records(spec: StudySpec, protocols: Sequence[str] = ("paper", "inner")) -> pd.DataFrame:
    """The peers' per-fold metrics on every split, in the layout of :func:`collect_records`.

    A peer has no checkpoint selection (``protocol = "fit"`` in its OOF file); its rows
    are repeated under each CNN protocol so every table can put it beside the CNN.
    ``selection_c_index`` is the mean inner-CV C-index of the penalty choice (embedding
    heads), used to pick a head's projection size without the outer folds. ``kind`` is
    ``"peer"``; ``modality`` is ``clinical``, ``radiomics`` or ``head-<set>``.
    """
    from pipeline.study import peer_done, split_n_folds

    rows = []
    for split in spec.splits():
        n_folds = split_n_folds(spec, split)
        for peer in spec.peer_list():
            done = peer_done(spec, peer, split)
            summ = read_json(spec.peer_dir(peer, split) / "summary.json") if done else {}
            per_fold = {int(r["fold"]): r for r in summ.get("per_fold", [])}
            fits = {int(r["fold"]): r for r in summ.get("fit", [])}
            seconds = read_json(spec.peer_dir(peer, split) / PEER_FILE).get("seconds") if done else None
            base = {"split": split, "kind": "peer", "config": peer.name,
                    "modality": f"head-{peer.modality}" if peer.kind == "embeddings" else peer.kind,
                    "d": proj_label(peer.proj) if peer.kind == "embeddings" else "-"}
            for k in range(n_folds):
                r, f = per_fold.get(k, {}), fits.get(k, {})
                for proto in protocols:
                    rows.append(base | {
                        "fold": k, "protocol": proto, "done": done and bool(r),
                        "c_index": _num(r.get("c_index")), "c_index_reason": r.get("c_index_reason"),
                        "auc_1y": _num(r.get("auroc")), "auc_1y_reason": r.get("auroc_reason"),
                        "selection_c_index": _num(f.get("inner_c_index")), "selected_epoch": None,
                        "epochs_run": None, "seconds": seconds / n_folds if seconds else None,
                    })
    return pd.DataFrame(rows)


def _num(x: Any) -> float:
    return float(x) if x is not None and math.isfinite(float(x)) else float("nan")


def summarise_records(records: pd.DataFrame, n_folds: int | None = None) -> pd.DataFrame:
    """Mean +- SD and 95 % t-interval over finished folds per protocol x configuration.

    Uses :func:`pipeline.metrics.summarise` (sample SD, undefined folds excluded and
    counted) and :func:`pipeline.stats.mean_ci` (Student-t interval over the defined folds
    of every repeat; folds share training cases, so it is narrower than the truth: read
    the paired comparisons for differences). Columns: ``protocol, config, kind, modality,
    d, n_done, n_folds, n_splits, c_mean, c_sd, c_n, c_low, c_high, auc_mean, auc_sd,
    auc_n, auc_low, auc_high, sel_mean``; ``c_n``/``auc_n`` are the defined folds.

    Args:
        records: :func:`collect_records` / :func:`collect_peer_records` rows (one per fold
            slot, pending included).
        n_folds: fold slots per configuration; default: the rows of each group.
    """
    from pipeline.stats import mean_ci

    out = []
    for (proto, config), g in records.groupby(["protocol", "config"], sort=False):
        fin = g[g["done"]]
        c = summarise(fin["c_index"].tolist())
        a = summarise(fin["auc_1y"].tolist())
        s = summarise(fin["selection_c_index"].tolist())
        c_ci, a_ci = mean_ci(fin["c_index"].tolist()), mean_ci(fin["auc_1y"].tolist())
        out.append({
            "protocol": proto, "config": config, "kind": g["kind"].iloc[0] if "kind" in g else "cnn",
            "modality": g["modality"].iloc[0], "d": g["d"].iloc[0],
            "n_done": int(len(fin)), "n_folds": int(n_folds if n_folds is not None else len(g)),
            "n_splits": int(g["split"].nunique()) if "split" in g else 1,
            "c_mean": c["mean"], "c_sd": c["sd"], "c_n": c["n_defined"], "c_low": c_ci["low"], "c_high": c_ci["high"],
            "auc_mean": a["mean"], "auc_sd": a["sd"], "auc_n": a["n_defined"],
            "auc_low": a_ci["low"], "auc_high": a_ci["high"],
            "sel_mean": s["mean"],
        })
    return pd.DataFrame(out).astype({"c_mean": float, "c_sd": float, "auc_mean": float, "auc_sd": float,
                                     "sel_mean": float, "c_low": float, "c_high": float,
                                     "auc_low": float, "auc_high": float})


#: Table 1 rows: the CNN's four (always listed, pending when missing), then the peers'.
TABLE1_CNN = (BASELINE, "ct", "pet", "ctpet")
TABLE1_PEERS = ("clinical", "radiomics", "head-ct", "head-pet", "head-ctpet")
PEER_GROUP_LABELS = {"clinical": "peer: clinical Cox", "radiomics": "peer: radiomics-lite Cox",
                     "head-ct": "peer: CT embedding head", "head-pet": "peer: PET embedding head",
                     "head-ctpet": "peer: CT+PET embedding head"}


def table1(summary: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """Baseline plus, per embedding set, its best projection size, with deltas vs baseline.

    The best d maximises the mean outer C-index under the ``paper`` protocol and the mean
    inner-validation C-index (``sel_mean``) under ``inner``. Only configurations with all
    folds finished compete; an embedding set without one is listed as pending. The peers
    follow (clinical Cox, radiomics-lite Cox, and per embedding set the embedding head
    whose PCA size is chosen the same way, by the inner-CV C-index of its penalty choice
    under ``inner``); a peer family that did not run is left out.

    Returns:
        Rows ``baseline, ct, pet, ctpet`` [, peers] with ``modality, config, d, c_mean,
        c_sd, auc_mean, auc_sd, c_n, auc_n, delta_c, delta_auc, status`` (deltas are
        differences of means vs the CNN baseline; NaN when either side is missing).
    """
    s = summary[summary["protocol"] == protocol]
    complete = s[s["n_done"] == s["n_folds"]]
    key = "c_mean" if protocol == "paper" else "sel_mean"
    rows = []
    base = complete[complete["modality"] == BASELINE]
    base_row = base.iloc[0] if len(base) else None
    for modality in TABLE1_CNN + TABLE1_PEERS:
        cand = complete[(complete["modality"] == modality) & complete[key].notna()]
        if cand.empty and modality in TABLE1_PEERS:
            # A single fixed model (clinical / radiomics Cox) has nothing to select.
            cand = complete[complete["modality"] == modality]
            if len(cand) != 1:
                if len(s[s["modality"] == modality]):
                    rows.append({"modality": modality, "config": None, "d": None, "status": "pending"})
                continue
        if cand.empty:
            rows.append({"modality": modality, "config": None, "d": None, "status": "pending"})
            continue
        best = cand.loc[cand[key].idxmax()] if cand[key].notna().any() else cand.iloc[0]
        row = {k: best[k] for k in ("modality", "config", "d", "c_mean", "c_sd", "auc_mean",
                                     "auc_sd", "c_n", "auc_n", "n_folds")}
        row["selected_by"] = key if len(cand) > 1 else "-"
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


def _model_label(modality: str) -> str:
    return "DeepMTS+DAFT" if modality in TABLE1_CNN else PEER_GROUP_LABELS.get(modality, modality)


def _emb_label(modality: str) -> str:
    if modality in MODALITY_LABELS:
        return MODALITY_LABELS[modality]
    if modality.startswith("head-"):
        return MODALITY_LABELS[modality[5:]]
    return "none (baseline)" if modality == BASELINE else "-"


def ablation_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Display table: one row per configuration (CNN, then peers), both protocols."""
    rows = []
    for config, g in summary.groupby("config", sort=False):
        g = g.set_index("protocol")
        first = g.iloc[0]
        row = {"model": _model_label(first["modality"]), "embeddings": _emb_label(first["modality"]),
               "d": first["d"], "folds done": f"{int(first['n_done'])}/{int(first['n_folds'])}"}
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
        mod = r["modality"]
        if mod == BASELINE:
            label = "DeepMTS+DAFT baseline"
        elif mod in TABLE1_CNN:
            label = f"+ {MODALITY_LABELS[mod]}"
        else:
            label = PEER_GROUP_LABELS[mod]
        paper = PAPER_TABLE1.get(mod)
        ref = f"d={paper[0]}: {paper[1][0]:.3f} / {paper[2][0]:.3f}" if paper else "-"
        if r["status"] == "pending":
            rows.append({"configuration": label, "best d": "pending", "C-index": "pending",
                         "1-year AUROC": "pending", "Δ C-index": "-", "Δ AUROC": "-", "paper (C / AUROC)": ref})
            continue
        rows.append({
            "configuration": label, "best d": r["d"],
            "C-index": fmt_mean_sd(r["c_mean"], r["c_sd"], r["c_n"], r["n_folds"]),
            "1-year AUROC": fmt_mean_sd(r["auc_mean"], r["auc_sd"], r["auc_n"], r["n_folds"]),
            "Δ C-index": _signed(r.get("delta_c")), "Δ AUROC": _signed(r.get("delta_auc")),
            "paper (C / AUROC)": ref,
        })
    return pd.DataFrame(rows)


# --- beyond the paper: OOF files, paired comparisons, LOCO, IBS / calibration / KM -------------

#: Text of the reason codes of :mod:`pipeline.metrics` (and ``pipeline.train``) in tables.
REASON_TEXT = {
    "no_events": "no event in the held-out fold",
    "no_comparable_pair": "no comparable pair",
    "no_event_before_horizon": "no event before 365 d",
    "horizon_beyond_followup": "no follow-up beyond 365 d",
    "horizon_before_followup": "follow-up starts after 365 d",
    "censoring_distribution_undefined": "censoring distribution undefined",
    "no valid epoch": "no valid epoch",
}
HORIZON = 365.0
N_BOOT = 2000
FIGURE_CALIBRATION = "figure4_calibration_1y.png"
FIGURE_KM = "figure5_km_risk_groups.png"
FIGURE_PAIRED = "figure6_paired_delta_c.png"


def undefined_text(reason: str | None) -> str:
    """``"no_event_before_horizon"`` -> ``"undefined: no event before 365 d"``."""
    return "undefined: " + REASON_TEXT.get(reason or "", reason or "reason unknown")


@dataclass(frozen=True)
class ModelRef:
    """A model of the study: a CNN configuration or a peer (:class:`pipeline.study.Peer`).

    ``oof_protocol(protocol)`` is the protocol of its OOF rows: the CNN's own, or
    ``"fit"`` for a peer (no checkpoint selection).
    """

    name: str
    kind: str  # "cnn" | "peer"
    label: str

    def oof_protocol(self, protocol: str) -> str:
        return protocol if self.kind == "cnn" else "fit"


def study_models(spec: StudySpec) -> list[ModelRef]:
    """The CNN configurations, then the peers, as :class:`ModelRef`."""
    out = []
    for c in spec.configurations():
        label = "DeepMTS+DAFT baseline" if c.modality is None else \
            f"DeepMTS+DAFT + {MODALITY_LABELS[c.modality]}, d = {c.d_label}"
        out.append(ModelRef(c.name, "cnn", label))
    out += [ModelRef(p.name, "peer", p.label) for p in spec.peer_list()]
    return out


def fold_predictions(spec: StudySpec, model: ModelRef, split: str,
                     protocol: str) -> dict[int, tuple[pd.DataFrame, pd.DataFrame | None]]:
    """Saved predictions of every finished fold of one model on one split.

    CNN: ``fold_<k>/oof.csv`` rows of ``protocol`` and ``fold_<k>/train_risk_<protocol>.csv``
    (the selected checkpoint's risks on that fold's training rows). Peer:
    ``oof_predictions.csv`` and ``train_risk.csv`` of its run, split by fold.

    Returns:
        ``{fold: (oof [case_id, fold, risk, time, event], train or None)}``; a fold whose
        protocol has no OOF rows (no valid epoch) is left out.
    """
    from pipeline.study import peer_done, split_n_folds

    out: dict[int, tuple[pd.DataFrame, pd.DataFrame | None]] = {}
    cols = ["case_id", "fold", "risk", "time", "event"]
    if model.kind == "cnn":
        from pipeline.train import DONE_FILE

        config = Configuration.from_name(model.name)
        if split not in spec.cnn_splits():
            return out
        for k in range(split_n_folds(spec, split)):
            folder = spec.run_dir(config, split) / f"fold_{k}"
            if not (folder / DONE_FILE).is_file() or not (folder / "oof.csv").is_file():
                continue
            oof = pd.read_csv(folder / "oof.csv", dtype={"case_id": str})
            oof = oof[oof["protocol"] == protocol]
            if oof.empty:
                continue
            tr_path = folder / f"train_risk_{protocol}.csv"
            train = pd.read_csv(tr_path, dtype={"case_id": str}) if tr_path.is_file() else None
            out[k] = (oof[cols].reset_index(drop=True), train)
        return out
    peer = {p.name: p for p in spec.peer_list()}[model.name]
    if not peer_done(spec, peer, split):
        return out
    folder = spec.peer_dir(peer, split)
    oof = pd.read_csv(folder / "oof_predictions.csv", dtype={"case_id": str})
    train = pd.read_csv(folder / "train_risk.csv", dtype={"case_id": str}) if (folder / "train_risk.csv").is_file() else None
    for k, g in oof.groupby("fold", sort=True):
        tr = train[train["fold"] == k][["case_id", "risk", "time", "event"]] if train is not None else None
        out[int(k)] = (g[cols].reset_index(drop=True), tr)
    return out


def split_oof(spec: StudySpec, model: ModelRef, split: str, protocol: str) -> pd.DataFrame | None:
    """The whole OOF frame of one split when every fold is finished, else None."""
    from pipeline.study import split_n_folds

    folds = fold_predictions(spec, model, split, model.oof_protocol(protocol))
    if len(folds) != split_n_folds(spec, split):
        return None
    return pd.concat([f[0] for f in folds.values()], ignore_index=True)


def cv_splits(spec: StudySpec) -> list[str]:
    return [s for s in spec.splits() if s != LOCO]


def paired_comparisons(spec: StudySpec, models: Sequence[ModelRef], reference: ModelRef, protocol: str,
                       *, n_boot: int = N_BOOT, seed: int = 0) -> list[dict[str, Any]]:
    """Each model vs ``reference`` on identical folds: Δ C-index with CI and p-values.

    Uses every CV repeat that both have finished (all folds); the OOF frames get a
    ``repeat`` column so :func:`pipeline.stats.paired_bootstrap_delta` resamples patients
    within each (repeat, fold) and runs the Nadeau-Bengio corrected resampled t-test over
    the J = folds x repeats per-fold deltas.

    Returns:
        One record per model: ``model, label, kind, reference, protocol, splits, status``
        and, when done, the :class:`pipeline.stats.PairedComparison` fields (``delta,
        ci_low, ci_high, p_value, fold_test``, per-fold values ...).
    """
    from pipeline.stats import paired_bootstrap_delta

    out = []
    for m in models:
        if m.name == reference.name:
            continue
        rec: dict[str, Any] = {"model": m.name, "label": m.label, "kind": m.kind, "reference": reference.name,
                               "protocol": protocol}
        frames_a, frames_b, shared = [], [], []
        for split in cv_splits(spec):
            a = split_oof(spec, reference, split, protocol)
            b = split_oof(spec, m, split, protocol)
            if a is None or b is None:
                continue
            r = int(split[2:])
            frames_a.append(a.assign(repeat=r))
            frames_b.append(b.assign(repeat=r))
            shared.append(split)
        rec["splits"] = shared
        if not shared:
            rec["status"] = "pending"
            out.append(rec)
            continue
        try:
            res = paired_bootstrap_delta(pd.concat(frames_a), pd.concat(frames_b), n_boot=n_boot, seed=seed)
        except ValueError as exc:
            rec.update(status="undefined", reason=str(exc))
        else:
            rec.update(status="done", **res.to_dict())
        out.append(rec)
    return out


def paired_display(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Markdown-ready paired-comparison table."""
    out = []
    for r in rows:
        row = {"model": r["label"], "repeats": len(r.get("splits", []))}
        if r["status"] != "done":
            row.update({"J folds": "-", "C-index (model / reference)": "-",
                        "Δ C-index [95 % CI]": r["status"] if r["status"] == "pending" else
                        f"undefined: {r.get('reason', '')}", "bootstrap p": "-", "corrected t-test p": "-"})
        else:
            ft = r.get("fold_test") or {}
            row.update({
                "J folds": r["n_groups"],
                "C-index (model / reference)": f"{r['b']:.3f} / {r['a']:.3f}",
                "Δ C-index [95 % CI]": f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
                "bootstrap p": _p(r["p_value"]),
                "corrected t-test p": _p(ft.get("p_value")) if ft else "-",
            })
        out.append(row)
    return pd.DataFrame(out)


def _p(x: Any) -> str:
    if not _finite(x):
        return "-"
    return "<0.001" if float(x) < 0.001 else f"{float(x):.3f}"


def ci_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Repeated-CV table: mean [95 % t-interval] of C-index and 1-year AUROC per model."""
    rows = []
    for config, g in summary.groupby("config", sort=False):
        g = g.set_index("protocol")
        first = g.iloc[0]
        row = {"model": _model_label(first["modality"]), "embeddings": _emb_label(first["modality"]),
               "d": first["d"], "repeats": int(first.get("n_splits", 1)),
               "folds done": f"{int(first['n_done'])}/{int(first['n_folds'])}"}
        for proto in PROTOCOL_LABELS:
            if proto not in g.index:
                continue
            r = g.loc[proto]
            short = "paper" if proto == "paper" else "unbiased"
            row[f"C-index ({short})"] = _fmt_ci(r["c_mean"], r["c_low"], r["c_high"], r["c_n"], r["n_folds"])
            row[f"1-y AUROC ({short})"] = _fmt_ci(r["auc_mean"], r["auc_low"], r["auc_high"], r["auc_n"], r["n_folds"])
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_ci(mean: Any, low: Any, high: Any, n: Any, total: Any) -> str:
    if not _finite(mean):
        return "pending" if not n else "undefined"
    text = f"{float(mean):.3f} [{float(low):.3f}, {float(high):.3f}]" if _finite(low) else f"{float(mean):.3f} [n/a]"
    if int(n) != int(total):
        text += f" ({int(n)}/{int(total)})"
    return text


def loco_results(spec: StudySpec, records: pd.DataFrame, models: Sequence[ModelRef],
                 protocols: Sequence[str]) -> dict[str, Any]:
    """Leave-one-centre-out: per held-out centre metrics and the pooled result per model.

    Per centre: C-index and 1-year AUROC, or the reason they are undefined (a centre
    without an event, or without an event before 365 d). Pooled: the mean over centres
    where the metric is defined, and Harrell's C of all held-out predictions pooled
    (risks of different fold models side by side: a summary, not a fold metric).

    Returns:
        ``{"centres": [{"fold", "centre", "n", "events", "events_before_365"}],
        "models": [{"model", "label", "protocol", "per_centre": [...], "mean_c_index",
        "mean_auc_1y", "pooled_c_index", "n_done"}]}``; empty dict without a LOCO split.
    """
    from pipeline.metrics import c_index
    from pipeline.stats import mean_ci
    from pipeline.study import loco_centres

    if LOCO not in spec.splits() or not spec.folds_path_of(LOCO).is_file():
        return {}
    centres = loco_centres(spec)
    cinfo = []
    for k, centre in enumerate(centres):
        held = _held_out(spec, LOCO, k)
        t, e = held["time"].to_numpy(float), held["event"].to_numpy(int)
        cinfo.append({"fold": k, "centre": centre, "n": int(len(held)), "events": int(e.sum()),
                      "events_before_365": int(((t <= HORIZON) & (e == 1)).sum())})
    loco = records[records["split"] == LOCO]
    out_models = []
    for m in models:
        for proto in (protocols if m.kind == "cnn" else protocols[:1]):
            g = loco[(loco["config"] == m.name) & (loco["protocol"] == proto)].set_index("fold")
            if g.empty:
                continue
            per = []
            for ci in cinfo:
                r = g.loc[ci["fold"]] if ci["fold"] in g.index else None
                done = bool(r is not None and r["done"])
                per.append({"fold": ci["fold"], "centre": ci["centre"], "done": done,
                            "c_index": _none(r["c_index"]) if done else None,
                            "c_index_reason": (r["c_index_reason"] or None) if done and not _finite(r["c_index"]) else None,
                            "auc_1y": _none(r["auc_1y"]) if done else None,
                            "auc_1y_reason": (r["auc_1y_reason"] or None) if done and not _finite(r["auc_1y"]) else None})
            pooled = None
            oof = split_oof(spec, m, LOCO, proto)
            if oof is not None:
                try:
                    pooled = c_index(oof["time"].to_numpy(float), oof["event"].to_numpy(int), oof["risk"].to_numpy(float))
                except ValueError:
                    pooled = None
            out_models.append({
                "model": m.name, "label": m.label, "kind": m.kind, "protocol": proto if m.kind == "cnn" else "fit",
                "per_centre": per, "n_done": sum(p["done"] for p in per),
                "mean_c_index": mean_ci([p["c_index"] for p in per if p["c_index"] is not None] or [np.nan]),
                "mean_auc_1y": mean_ci([p["auc_1y"] for p in per if p["auc_1y"] is not None] or [np.nan]),
                "pooled_c_index": pooled,
            })
    return {"centres": cinfo, "models": out_models}


def _none(x: Any) -> float | None:
    return float(x) if _finite(x) else None


def loco_display(loco: dict[str, Any]) -> pd.DataFrame:
    """One row per model, one column per held-out centre (``C / AUROC`` or the reason)."""
    rows = []
    for m in loco.get("models", []):
        label = m["label"] + (f" ({'paper' if m['protocol'] == 'paper' else 'unbiased'})" if m["kind"] == "cnn" else "")
        row = {"model": label}
        for p, ci in zip(m["per_centre"], loco["centres"]):
            col = f"{ci['centre']} (n={ci['n']}, ev={ci['events']})"
            if not p["done"]:
                row[col] = "pending"
                continue
            c = f"{p['c_index']:.3f}" if p["c_index"] is not None else undefined_text(p["c_index_reason"])
            a = f"{p['auc_1y']:.3f}" if p["auc_1y"] is not None else undefined_text(p["auc_1y_reason"])
            row[col] = f"C {c}; AUROC {a}"
        mc, ma = m["mean_c_index"], m["mean_auc_1y"]
        row["mean over centres (C / AUROC)"] = (f"{mc['mean']:.3f} ({mc['n']}) / " if mc["mean"] is not None else "- / ") + \
            (f"{ma['mean']:.3f} ({ma['n']})" if ma["mean"] is not None else "-")
        row["pooled C"] = f"{m['pooled_c_index']:.3f}" if m["pooled_c_index"] is not None else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def survival_analysis(spec: StudySpec, model: ModelRef, protocol: str, *, horizon: float = HORIZON,
                      n_groups: int = 5) -> dict[str, Any]:
    """Integrated Brier score, calibration at ``horizon`` and risk-group KM of one model.

    Per fold, the Breslow baseline hazard is fitted on that fold's TRAINING risks
    (``train_risk_*.csv``) and turns the held-out risks into S(t | x)
    (:func:`pipeline.stats.breslow_survival`):

    * IBS (:func:`pipeline.stats.integrated_brier_score`) on the fold's valid time grid
      (:func:`pipeline.stats.ibs_time_grid`, 50 points), for every finished CV fold of
      every repeat; the covariate-free reference (all risks 0: the Breslow estimate is then
      the Nelson-Aalen curve of the training fold) is computed on the same folds;
    * calibration at ``horizon``: predicted P(event by horizon) pooled over the folds of
      ``cv0`` (each patient once) vs the Kaplan-Meier observed proportion per quantile
      group (:func:`pipeline.stats.calibration_at`), plus one all-cases group;
    * risk groups on ``cv0``: high when the risk exceeds the TRAINING fold's median
      (:func:`pipeline.stats.risk_groups`), pooled, Kaplan-Meier and log-rank
      (:func:`pipeline.stats.km_logrank`).

    Returns:
        ``{"model", "label", "protocol", "status", "ibs": {"per_fold", "mean", "null_mean"},
        "calibration": {"groups", "overall"}, "km": KMResult.to_dict() + "status"}``;
        ``status`` is ``"pending"`` until every fold of ``cv0`` is finished with its
        training risks.
    """
    from pipeline.stats import (
        breslow_survival,
        calibration_at,
        ibs_time_grid,
        integrated_brier_score,
        km_logrank,
        mean_ci,
        risk_groups,
    )
    from pipeline.study import split_n_folds

    proto = model.oof_protocol(protocol)
    out: dict[str, Any] = {"model": model.name, "label": model.label, "kind": model.kind,
                           "protocol": proto, "horizon": horizon}
    ibs_rows = []
    for split in cv_splits(spec):
        for k, (oof, train) in fold_predictions(spec, model, split, proto).items():
            if train is None:
                continue
            row = {"split": split, "fold": k}
            tr_t, tr_e = train["time"].to_numpy(float), train["event"].to_numpy(int)
            te_t, te_e = oof["time"].to_numpy(float), oof["event"].to_numpy(int)
            grid_t = ibs_time_grid(tr_t, te_t, n=50)
            try:
                surv = breslow_survival(train["risk"].to_numpy(float), tr_t, tr_e, oof["risk"].to_numpy(float), grid_t)
                row["ibs"] = integrated_brier_score(tr_t, tr_e, te_t, te_e, surv, grid_t)
                null = breslow_survival(np.zeros(len(tr_t)), tr_t, tr_e, np.zeros(len(te_t)), grid_t)
                row["ibs_null"] = integrated_brier_score(tr_t, tr_e, te_t, te_e, null, grid_t)
            except ValueError as exc:
                row.update(ibs=None, ibs_null=None, reason=str(exc))
            ibs_rows.append(row)
    out["ibs"] = {"per_fold": ibs_rows,
                  "mean": mean_ci([r["ibs"] for r in ibs_rows if r.get("ibs") is not None] or [np.nan]),
                  "null_mean": mean_ci([r["ibs_null"] for r in ibs_rows if r.get("ibs_null") is not None] or [np.nan])}

    first = fold_predictions(spec, model, FIRST_SPLIT, proto)
    if len(first) != split_n_folds(spec, FIRST_SPLIT) or any(tr is None for _, tr in first.values()):
        out["status"] = "pending"
        return out
    probs, groups, frames = [], [], []
    for k, (oof, train) in sorted(first.items()):
        s = breslow_survival(train["risk"].to_numpy(float), train["time"].to_numpy(float),
                             train["event"].to_numpy(int), oof["risk"].to_numpy(float), [horizon])
        probs.append(1.0 - s[:, 0])
        groups.append(risk_groups(train["risk"].to_numpy(float), oof["risk"].to_numpy(float)))
        frames.append(oof)
    pooled = pd.concat(frames, ignore_index=True)
    p, grp = np.concatenate(probs), np.concatenate(groups)
    t, e = pooled["time"].to_numpy(float), pooled["event"].to_numpy(int)
    out["calibration"] = {
        "groups": _records(calibration_at(horizon, p, t, e, n_groups=n_groups)),
        "overall": _records(calibration_at(horizon, p, t, e, n_groups=1))[0],
    }
    if len(np.unique(grp)) < 2:
        out["km"] = {"status": "undefined", "reason": "every case falls in one risk group"}
    else:
        km = km_logrank(t, e, np.where(grp == 1, "high", "low"))
        out["km"] = {"status": "done", **km.to_dict()}
    out["status"] = "done"
    return out


def plot_calibration(analyses: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per model: predicted vs KM-observed 1-year event probability (95 % CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [a for a in analyses if a.get("status") == "done"]
    n = max(1, len(done))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(done):]:
        ax.axis("off")
    for ax, a in zip(axes.ravel(), done):
        g = pd.DataFrame(a["calibration"]["groups"])
        g = g[g["followed_to_horizon"]]
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        if len(g):
            yerr = np.vstack([g["observed"] - g["observed_low"], g["observed_high"] - g["observed"]])
            ax.errorbar(g["pred_mean"], g["observed"], yerr=np.clip(yerr, 0, None), fmt="o", capsize=3)
        ov = a["calibration"]["overall"]
        obs = f"{ov['observed']:.2f}" if _finite(ov.get("observed")) else "n/a"
        ax.set_title(f"{_short(a['label'])}\npred {ov['pred_mean']:.2f} / KM {obs}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted P(relapse by 1 y)", fontsize=7)
        ax.set_ylabel("observed (1 - KM)", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle("Figure 4: 1-year calibration (Breslow baseline of each training fold; cv0, pooled folds)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_km(analyses: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per model: KM curves of the high / low risk groups with the log-rank p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [a for a in analyses if a.get("status") == "done" and a["km"].get("status") == "done"]
    n = max(1, len(done))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax in axes.ravel()[len(done):]:
        ax.axis("off")
    colours = {"low": "tab:blue", "high": "tab:red"}
    for ax, a in zip(axes.ravel(), done):
        for name, g in a["km"]["groups"].items():
            ax.step(g["timeline"], g["survival"], where="post", color=colours.get(name), lw=1.4,
                    label=f"{name} risk (n={g['n']}, ev={g['events']})")
            ax.fill_between(g["timeline"], g["ci_low"], g["ci_high"], step="post", alpha=0.15,
                            color=colours.get(name), lw=0)
        ax.set_title(f"{_short(a['label'])}\nlog-rank p = {_p(a['km']['p_value'])}", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("days", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left", frameon=False)
    axes[0][0].set_ylabel("relapse-free survival", fontsize=7)
    fig.suptitle("Figure 5: Kaplan-Meier by risk group (cut-off = training-fold median risk; cv0, pooled folds)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_paired(paired: dict[str, list[dict[str, Any]]], path: str | os.PathLike) -> Path:
    """Forest plot: Δ C-index vs the CNN baseline with 95 % bootstrap CI, one panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protos = [p for p in PROTOCOL_LABELS if p in paired]
    n_rows = max([len(paired[p]) for p in protos] + [1])
    fig, axes = plt.subplots(1, max(1, len(protos)), figsize=(5.5 * max(1, len(protos)), 0.28 * n_rows + 1.6),
                             squeeze=False, sharey=True)
    for ax, proto in zip(axes[0], protos):
        rows = paired[proto]
        for i, r in enumerate(rows):
            if r["status"] != "done":
                ax.text(0, i, r["status"], fontsize=6, va="center", ha="center", color="dimgrey")
                continue
            colour = "tab:blue" if r["kind"] == "cnn" else "tab:orange"
            ax.errorbar(r["delta"], i, xerr=[[r["delta"] - r["ci_low"]], [r["ci_high"] - r["delta"]]],
                        fmt="o", color=colour, capsize=2, ms=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)), [_short(r["label"]) for r in rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("Δ C-index vs DeepMTS+DAFT baseline (95 % CI)", fontsize=7)
        ax.set_title(PROTOCOL_LABELS[proto], fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Figure 6: paired differences on identical folds (blue: CNN, orange: peers)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _short(label: str) -> str:
    return label.replace("DeepMTS+DAFT", "CNN").replace("embedding head", "head").replace("peer: ", "")


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def survival_display(analyses: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """IBS, calibration-in-the-large at 1 year and the risk-group log-rank p per model."""
    rows = []
    for a in analyses:
        ibs, null = a["ibs"]["mean"], a["ibs"]["null_mean"]
        row = {"model": a["label"],
               "IBS (lower = better)": f"{ibs['mean']:.3f} ({ibs['n']} folds)" if ibs["mean"] is not None else "pending",
               "IBS, no-covariate reference": f"{null['mean']:.3f}" if null["mean"] is not None else "-"}
        if a.get("status") == "done":
            ov = a["calibration"]["overall"]
            row["1-y predicted / KM observed"] = (f"{ov['pred_mean']:.3f} / "
                                                  + (f"{ov['observed']:.3f}" if _finite(ov.get("observed")) else "n/a"))
            km = a["km"]
            if km.get("status") == "done":
                g = km["groups"]
                row["risk groups high / low (n, events)"] = " / ".join(
                    f"{g[k]['n']}, {g[k]['events']}" for k in ("high", "low") if k in g)
                row["log-rank p"] = _p(km["p_value"])
            else:
                row["risk groups high / low (n, events)"] = f"undefined: {km.get('reason')}"
                row["log-rank p"] = "-"
        else:
            row.update({"1-y predicted / KM observed": "pending", "risk groups high / low (n, events)": "pending",
                        "log-rank p": "-"})
        rows.append(row)
    return pd.DataFrame(rows)


def selected_models(spec: StudySpec, t1: pd.DataFrame) -> list[ModelRef]:
    """Baseline, the Table 1 winner of each embedding set, and the Table 1 peers."""
    by_name = {m.name: m for m in study_models(spec)}
    names = [BASELINE] if BASELINE in by_name else []
    names += [r["config"] for r in t1.to_dict("records") if r.get("status") == "done" and r["config"] != BASELINE]
    return [by_name[n] for n in dict.fromkeys(names) if n in by_name]


def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Build the report from the study folder's finished cells; returns ``report.md``'s path.

    Args:
        study_dir: a folder prepared by :func:`pipeline.study.prepare_study`.
        out_dir: destination; default ``<study_dir>/report``.
    """
    spec, study = load_study(study_dir)
    out = Path(out_dir) if out_dir else Path(study_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    cnn_records = collect_records(spec)
    protocols = [p for p in PROTOCOL_LABELS if p in set(cnn_records["protocol"])] if len(cnn_records) \
        else list(PROTOCOL_LABELS)
    peer_records = collect_peer_records(spec, protocols)
    records = pd.concat([r for r in (cnn_records, peer_records) if len(r)], ignore_index=True)
    summary = summarise_records(records[records["split"] != LOCO])
    t1 = {p: table1(summary, p) for p in protocols}
    n_cells = len(grid(spec))
    n_done = int(cnn_records.drop_duplicates(["split", "config", "fold"])["done"].sum())
    models = study_models(spec)
    by_name = {m.name: m for m in models}
    paired = {}
    if BASELINE in by_name:
        paired = {p: paired_comparisons(spec, models, by_name[BASELINE], p) for p in protocols}
    peers_only = [m for m in models if m.kind == "peer"]
    vs_clinical = (paired_comparisons(spec, peers_only, by_name["clinical-cox"], protocols[0])
                   if "clinical-cox" in by_name else [])
    loco = loco_results(spec, records, models, protocols)
    sel_proto = "inner" if "inner" in protocols else protocols[0]
    analyses = [survival_analysis(spec, m, sel_proto) for m in selected_models(spec, t1[sel_proto])]
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
                             "The last column repeats the paper's reported values for reference. Peers are means over "
                             "every repeat they ran, which may be more than the CNN's: for a like-for-like difference "
                             "read the paired comparisons below."))
        b.append(_Block("table", table1_display(t1[proto], proto)))

    b.append(_Block("h2", "Full projection ablation (both protocols)"))
    b.append(_Block("p", "Rows marked `peer:` are classical models fitted on the same folds files as the CNN "
                         "(no checkpoint selection, so both protocol columns hold the same numbers): ridge Cox on "
                         "the clinical covariates, ridge Cox on radiomics-lite features (log volume, SUVmax, "
                         "SUVmean, log TLG from the preprocessed mask), and elastic-net Cox heads on the cached "
                         "embeddings + clinical covariates with the CNN's projection sizes (per-modality PCA to d "
                         "components fitted on the training fold; orig = no projection), penalty by inner CV."))
    b.append(_Block("table", ablation_table(summary)))
    b.append(_Block("h2", "Figures"))
    b.append(_Block("img", fig_paths["c_index"], "Figure 2: C-index by projection size"))
    b.append(_Block("img", fig_paths["auc_1y"], "Figure 3: 1-year AUROC by projection size"))

    b += _beyond_blocks(spec, summary, paired, vs_clinical, loco, analyses, sel_proto, out)

    secs = cnn_records.drop_duplicates(["split", "config", "fold"])["seconds"].dropna()
    if len(secs):
        peer_secs = peer_records.drop_duplicates(["split", "config", "fold"])["seconds"].dropna().sum() \
            if len(peer_records) else 0.0
        b.append(_Block("p", f"Compute: {len(secs)} CNN cells trained here, {secs.sum() / 60:.1f} min of cell time "
                             f"(median {secs.median():.1f} s per cell); peers {peer_secs / 60:.1f} min in all."))
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
    write_json_atomic(out / "results.json", _clean({
        "study": study, "report_code_version": code_version(), "generated": utc_now(),
        "cells": {"total": n_cells, "done": n_done},
        "analyses": analyses_run(spec),
        "summary": _records(summary),
        "table1": {p: _records(t) for p, t in t1.items()},
        "paired_vs_baseline": paired,
        "paired_vs_clinical_cox": vs_clinical,
        "loco": loco,
        "survival": {"protocol": sel_proto, "horizon_days": HORIZON, "models": analyses},
        "protocol_labels": PROTOCOL_LABELS,
    }))
    return md_path


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def analyses_run(spec: StudySpec) -> list[dict[str, Any]]:
    """Which analysis ran on which models (stated in the report and results.json)."""
    cnn = spec.cnn_splits()
    peers = [p.name for p in spec.peer_list()]
    cv_all = [s for s in spec.splits() if s != LOCO]
    cv_cnn = [s for s in cnn if s != LOCO]
    rows = [
        {"analysis": f"cross-validation ({spec.n_folds} folds), repeats", "cnn": cv_cnn, "peers": cv_all if peers else []},
        {"analysis": "leave-one-centre-out", "cnn": [LOCO] if LOCO in cnn else [],
         "peers": [LOCO] if LOCO in spec.splits() and peers else []},
        {"analysis": "paired comparisons vs CNN baseline", "cnn": cv_cnn, "peers": cv_cnn if peers else []},
        {"analysis": "peers vs clinical Cox (paired)", "cnn": [], "peers": cv_all if "clinical-cox" in peers else []},
        {"analysis": "IBS (every CV fold), calibration and KM risk groups (cv0)", "cnn": cv_cnn,
         "peers": cv_all if peers else []},
    ]
    return rows


def _beyond_blocks(spec: StudySpec, summary: pd.DataFrame, paired: dict[str, list[dict[str, Any]]],
                   vs_clinical: list[dict[str, Any]], loco: dict[str, Any], analyses: list[dict[str, Any]],
                   sel_proto: str, out: Path) -> list[_Block]:
    """Report sections beyond the paper: repeated CV, paired tests, LOCO, IBS/calibration/KM."""
    b: list[_Block] = [_Block("h2", "Which analyses ran on which models")]
    b.append(_Block("table", pd.DataFrame([
        {"analysis": r["analysis"], "CNN (DeepMTS+DAFT) splits": ", ".join(r["cnn"]) or "not run",
         "peer splits": ", ".join(r["peers"]) or "not run"} for r in analyses_run(spec)])))
    cvs = "cv0 is" if spec.repeats == 1 else f"cv0..cv{spec.repeats - 1} are"
    seeds = f"{spec.folds_seed}" if spec.repeats == 1 else f"{spec.folds_seed}..{spec.folds_seed + spec.repeats - 1}"
    b.append(_Block("p", f"Splits: {cvs} stratified {spec.n_folds}-fold CV with split seed(s) {seeds} (one shared "
                         "folds file per repeat, identical for every model)"
                         + ("; loco holds out one centre per fold." if spec.loco else ".")))

    b.append(_Block("h2", "Repeated cross-validation: mean and 95 % CI"))
    b.append(_Block("p", "Mean over every finished fold of every repeat with a Student-t 95 % interval "
                         "(`pipeline.stats.mean_ci`). Folds share training cases, so these intervals are too narrow "
                         "for comparing models; use the paired comparisons below for that."))
    b.append(_Block("table", ci_table(summary)))

    if paired:
        b.append(_Block("h2", "Paired comparisons against the DeepMTS+DAFT baseline"))
        b.append(_Block("p", "Each model minus the baseline on identical folds (every CV repeat both have finished). "
                             "Δ = difference of the mean per-fold C-index; 95 % CI and p from a paired patient "
                             f"bootstrap within each fold ({N_BOOT} draws, `paired_bootstrap_delta`); 'corrected "
                             "t-test' is the Nadeau-Bengio corrected resampled t-test over the J per-fold deltas "
                             "(folds x repeats). The unbiased protocol is the one to trust; the paper protocol "
                             "selects checkpoints on the folds it scores."))
        for proto in PROTOCOL_LABELS:
            if proto in paired:
                b.append(_Block("h3", PROTOCOL_LABELS[proto]))
                b.append(_Block("table", paired_display(paired[proto])))
        b.append(_Block("img", plot_paired(paired, out / FIGURE_PAIRED), "Figure 6: Δ C-index vs the baseline"))
    if vs_clinical:
        b.append(_Block("h2", "Do the embeddings help a Cox model? Peers against the clinical Cox"))
        b.append(_Block("p", "Same statistics, reference = the clinical-only Cox peer, over every CV repeat: an "
                             "embedding head adds the FM embeddings to the same clinical covariates, so its Δ "
                             "isolates what the embeddings add."))
        b.append(_Block("table", paired_display(vs_clinical)))

    if loco:
        b.append(_Block("h2", "Leave-one-centre-out"))
        b.append(_Block("p", "Each column holds out one centre (n cases, ev events) and trains on the others. A "
                             "metric that does not exist for a centre is reported with its reason, never as a number. "
                             "Mean over centres uses the centres where the metric is defined (count in brackets); "
                             "pooled C = Harrell's C over all held-out predictions together."))
        b.append(_Block("table", loco_display(loco)))
    elif LOCO in spec.splits():
        b.append(_Block("h2", "Leave-one-centre-out"))
        b.append(_Block("p", "pending: the LOCO folds file is not written yet."))

    b.append(_Block("h2", "Beyond ranking: integrated Brier score, calibration, risk groups"))
    b.append(_Block("p", f"Models: the baseline, the Table 1 choice of each embedding set and the Table 1 peers "
                         f"({PROTOCOL_LABELS[sel_proto]} for the CNN). Per fold the Breslow baseline hazard is fitted "
                         "on the training fold's risks (`train_risk_*.csv`) and turns held-out risks into survival "
                         "curves. IBS: mean over every finished CV fold (50-point grid where the score is defined), "
                         "beside the no-covariate reference on the same folds. Calibration at 365 d: predicted vs "
                         "Kaplan-Meier observed event probability, all cv0 folds pooled (quintiles in Figure 4). "
                         "Risk groups: above / below the training fold's median risk, cv0 folds pooled, log-rank test."))
    b.append(_Block("table", survival_display(analyses)))
    b.append(_Block("img", plot_calibration(analyses, out / FIGURE_CALIBRATION), "Figure 4: 1-year calibration"))
    b.append(_Block("img", plot_km(analyses, out / FIGURE_KM), "Figure 5: Kaplan-Meier curves of risk groups"))
    return b


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in df.to_dict("records")]
