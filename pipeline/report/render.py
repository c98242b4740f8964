"""Rendering of the study report from the results object of :func:`pipeline.report.analysis.analyse` alone.

:func:`render_report` writes into one folder:

* ``report.md``: Markdown, figures linked relatively; it opens with the headline (baseline,
  best d per embedding set, the classical peers and the oracle C-index, unbiased protocol
  first, each with its paired Δ vs the baseline and 95 % CI) and two or three generated
  sentences, then the complete tables;
* ``report.html``: the same content, self-contained (figures embedded as base64 PNG);
* ``figure2_c_index.png``, ``figure3_auc_1y.png``: grouped bars of mean +- SD per projection
  size for CT, PET and CT+PET, with the baseline mean (dashed) and its +- SD band, one
  panel per model-selection protocol;
* ``figure4_learning_curves.png``: loss parts, train / validation C-index and validation
  Dice per epoch, one column per embedding set, one line per d, folds averaged;
* ``figure5_paired_delta_c.png``, ``figure6_calibration_1y.png``, ``figure7_km_risk_groups.png``:
  paired differences, calibration, risk-group Kaplan-Meier.

Figures are numbered in the order the report shows them.

Every figure carries the random-init / synthetic stamp (:mod:`pipeline.report.figures`), so a copied figure keeps
the warning. Rows that are identical for a stated reason (:func:`pipeline.report.analysis.identical_groups`)
are shown once, with the reason under the table.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.artefacts import atomic_path
from pipeline.embedding_sets import embedding_set, set_names
from pipeline.metrics import reason_text
from pipeline.report.figures import (
    FIGURE_CALIBRATION,
    FIGURE_CURVES,
    FIGURE_KM,
    FIGURE_PAIRED,
    FIGURES,
    figure_label,
    plot_calibration,
    plot_figure,
    plot_km,
    plot_learning_curves,
    plot_paired,
)
from pipeline.report.format import (
    fmt_ci,
    fmt_delta,
    fmt_mean_sd,
    fmt_p,
    fmt_signed,
    identical_notes,
    merged_rows,
    relabel,
    undefined_text,
)
from pipeline.report.labels import (
    METRIC_LABELS,
    PROTOCOL_LABELS,
    PROTOCOL_ORDER,
    embedding_label,
    finite,
    group_label,
    model_label,
    peer_group_labels,
    table1_cnn,
)
from pipeline.report.results import Results
from pipeline.runtime import ENVIRONMENT_KEYS
from pipeline.study_spec import BASELINE

#: The seed paper's Table 1 baseline (C-index, 1-year AUROC; mean, SD), for side-by-side
#: reading; each embedding set's row is in the registry (``EmbeddingSet.paper_table1``).
PAPER_BASELINE = ("-", (0.616, 0.082), (0.671, 0.158))
SHORT_PROTOCOL = {"paper": "paper", "inner": "unbiased"}
CLIP_NOTE = "† the t-interval left [0, 1] and is clipped to it."


def headline_display(head: dict[str, Any], identical: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """The headline as one table: a row per group, protocols side by side (unbiased first)."""
    _, d_merged = merged_rows(identical)
    protos = head["protocols"]
    by_proto = {p: {r["group"]: r for r in head["rows"][p]} for p in protos}
    groups = list(dict.fromkeys(r["group"] for p in protos for r in head["rows"][p]))
    rows = []
    for g in groups:
        row = {"model": group_label(g)}
        for p in protos:
            r = by_proto[p].get(g, {"status": "pending"})
            short = SHORT_PROTOCOL[p]
            done = r["status"] == "done"
            row[f"d ({short})"] = d_merged.get(r.get("config"), r.get("d")) if done else "-"
            row[f"C-index ({short})"] = (
                fmt_mean_sd(r.get("c_mean"), r.get("c_sd"), r.get("c_n"), r.get("n_folds")) if done else "pending"
            )
            row[f"Δ vs baseline [95 % CI] ({short})"] = fmt_delta(r) if done else "-"
            row[f"1-y AUROC ({short})"] = (
                fmt_mean_sd(r.get("auc_mean"), r.get("auc_sd"), r.get("auc_n"), r.get("n_folds")) if done else "pending"
            )
        rows.append(row)
    if finite(head.get("oracle_c_index")):
        oracle = {k: "-" for k in rows[0]} if rows else {}
        oracle["model"] = "oracle: true risk of the synthetic cohort"
        for p in protos:
            oracle[f"C-index ({SHORT_PROTOCOL[p]})"] = f"{head['oracle_c_index']:.3f}"
        rows.append(oracle)
    return pd.DataFrame(rows)


def table1_display(
    t1: pd.DataFrame | list[dict[str, Any]], protocol: str, identical: Sequence[dict[str, Any]] = ()
) -> pd.DataFrame:
    """Table 1 of one protocol with the paper's values alongside."""
    _, d_merged = merged_rows(identical)
    rows = []
    for r in t1.to_dict("records") if isinstance(t1, pd.DataFrame) else t1:
        group = r["group"]
        label = (
            "DeepMTS+DAFT baseline"
            if group == BASELINE
            else (f"+ {embedding_set(group).label}" if group in set_names() else peer_group_labels()[group])
        )
        paper = (
            PAPER_BASELINE if group == BASELINE else embedding_set(group).paper_table1 if group in set_names() else None
        )
        ref = f"d={paper[0]}: {paper[1][0]:.3f} / {paper[2][0]:.3f}" if paper else "-"
        if r["status"] == "pending":
            rows.append(
                {
                    "configuration": label,
                    "best d": "pending",
                    "C-index": "pending",
                    "1-year AUROC": "pending",
                    "Δ C-index": "-",
                    "Δ AUROC": "-",
                    "paper (C / AUROC)": ref,
                }
            )
            continue
        rows.append(
            {
                "configuration": label,
                "best d": d_merged.get(r["config"], r["d"]),
                "C-index": fmt_mean_sd(r["c_mean"], r["c_sd"], r["c_n"], r["n_folds"]),
                "1-year AUROC": fmt_mean_sd(r["auc_mean"], r["auc_sd"], r["auc_n"], r["n_folds"]),
                "Δ C-index": fmt_signed(r.get("delta_c")),
                "Δ AUROC": fmt_signed(r.get("delta_auc")),
                "paper (C / AUROC)": ref,
            }
        )
    return pd.DataFrame(rows)


def not_requested(t1: pd.DataFrame | list[dict[str, Any]]) -> list[str]:
    """Table 1 labels of the CNN rows the study did not request (Table 1 leaves them out)."""
    present = {r["group"] for r in (t1.to_dict("records") if isinstance(t1, pd.DataFrame) else t1)}
    return [group_label(g) for g in table1_cnn() if g not in present]


def _summary_rows(summary: pd.DataFrame | list[dict[str, Any]], identical: Sequence[dict[str, Any]]):
    """(config, first row, rows by protocol, d label) per shown configuration of a summary."""
    df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame(summary)
    hidden, d_merged = merged_rows(identical)
    for config, g in df.groupby("config", sort=False):
        if config in hidden:
            continue
        g = g.set_index("protocol")
        first = g.iloc[0]
        yield config, first, g, d_merged.get(config, first["d"])


def ablation_table(
    summary: pd.DataFrame | list[dict[str, Any]], identical: Sequence[dict[str, Any]] = ()
) -> pd.DataFrame:
    """One row per configuration (CNN, then peers), both protocols (unbiased first)."""
    rows = []
    for _, first, g, d in _summary_rows(summary, identical):
        row = {
            "model": model_label(first["group"]),
            "embeddings": embedding_label(first["group"]),
            "d": d,
            "folds done": f"{int(first['n_done'])}/{int(first['n_folds'])}",
        }
        for proto in [p for p in PROTOCOL_ORDER if p in g.index]:
            r, short = g.loc[proto], SHORT_PROTOCOL[proto]
            row[f"C-index ({short})"] = fmt_mean_sd(r["c_mean"], r["c_sd"], r["c_n"], r["n_folds"])
            row[f"1-y AUROC ({short})"] = fmt_mean_sd(r["auc_mean"], r["auc_sd"], r["auc_n"], r["n_folds"])
        rows.append(row)
    return pd.DataFrame(rows)


def _repeats(row: Any) -> int:
    """CV repeats of a summary row: ``n_repeats`` (``n_splits`` in results written before
    schema 4)."""
    return int(row.get("n_repeats", row.get("n_splits", 1)))


def ci_table(summary: pd.DataFrame | list[dict[str, Any]], identical: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Repeated-CV table: mean [95 % t-interval, clipped to [0, 1]] per model."""
    rows = []
    for _, first, g, d in _summary_rows(summary, identical):
        row = {
            "model": model_label(first["group"]),
            "embeddings": embedding_label(first["group"]),
            "d": d,
            "repeats": _repeats(first),
            "folds done": f"{int(first['n_done'])}/{int(first['n_folds'])}",
        }
        for proto in [p for p in PROTOCOL_ORDER if p in g.index]:
            r, short = g.loc[proto], SHORT_PROTOCOL[proto]
            row[f"C-index ({short})"] = fmt_ci(
                r["c_mean"], r["c_low"], r["c_high"], r["c_n"], r["n_folds"], r.get("c_clipped")
            )
            row[f"1-y AUROC ({short})"] = fmt_ci(
                r["auc_mean"], r["auc_low"], r["auc_high"], r["auc_n"], r["n_folds"], r.get("auc_clipped")
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _shown(items: Sequence[dict[str, Any]], identical: Sequence[dict[str, Any]]) -> Iterator[tuple[dict, str]]:
    """The items (``model``, ``label``) of a table not merged away as identical
    (:func:`merged_rows`), each with its display label."""
    hidden, d_merged = merged_rows(identical)
    for item in items:
        if item["model"] not in hidden:
            yield item, relabel(item["label"], item["model"], d_merged)


def paired_display(rows: list[dict[str, Any]], identical: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Markdown-ready paired-comparison table."""
    out = []
    for r, label in _shown(rows, identical):
        row = {"model": label, "repeats": len(r.get("splits", []))}
        if r["status"] != "done":
            row.update(
                {
                    "J folds": "-",
                    "C-index (model / reference)": "-",
                    "Δ C-index [95 % CI]": r["status"]
                    if r["status"] == "pending"
                    else f"undefined: {r.get('reason', '')}",
                    "bootstrap p": "-",
                    "corrected t-test p": "-",
                }
            )
        else:
            ft = r.get("fold_test") or {}
            row.update(
                {
                    "J folds": r["n_groups"],
                    "C-index (model / reference)": f"{r['b']:.3f} / {r['a']:.3f}",
                    "Δ C-index [95 % CI]": fmt_delta(r),
                    "bootstrap p": fmt_p(r["p_value"]),
                    "corrected t-test p": fmt_p(ft.get("p_value")) if ft else "-",
                }
            )
        out.append(row)
    return pd.DataFrame(out)


def loco_display(loco: dict[str, Any], identical: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """One row per model, one column per held-out centre (``C / AUROC`` or the reason)."""
    rows = []
    for m, label in _shown(loco.get("models", []), identical):
        row = {"model": label + (f" ({SHORT_PROTOCOL[m['protocol']]})" if m["kind"] == "cnn" else "")}
        for p, ci in zip(m["per_centre"], loco["centres"]):
            col = f"{ci['centre']} (n={ci['n']}, ev={ci['events']})"
            if not p["done"]:
                row[col] = "pending"
                continue
            c = f"{p['c_index']:.3f}" if p["c_index"] is not None else undefined_text(p["c_index_reason"])
            a = f"{p['auc_1y']:.3f}" if p["auc_1y"] is not None else undefined_text(p["auc_1y_reason"])
            row[col] = f"C {c}; AUROC {a}"
        mc, ma = m["mean_c_index"], m["mean_auc_1y"]
        row["mean over centres (C / AUROC)"] = " / ".join(
            f"{m_['mean']:.3f} ({m_['n']})" if m_["mean"] is not None else "-" for m_ in (mc, ma)
        )
        row["pooled C"] = f"{m['pooled_c_index']:.3f}" if m["pooled_c_index"] is not None else "-"
        rows.append(row)
    return pd.DataFrame(rows)


def survival_display(analyses: Sequence[dict[str, Any]], identical: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """IBS, calibration-in-the-large at 1 year and the risk-group log-rank p per model."""
    _, d_merged = merged_rows(identical)
    rows = []
    for a in analyses:
        ibs, null = a["ibs"]["mean"], a["ibs"]["null_mean"]
        row = {
            "model": relabel(a["label"], a["model"], d_merged),
            "IBS (lower = better)": f"{ibs['mean']:.3f} ({ibs['n']} folds)" if ibs["mean"] is not None else "pending",
            "IBS, no-covariate reference": f"{null['mean']:.3f}" if null["mean"] is not None else "-",
        }
        if a.get("status") == "done":
            ov = a["calibration"]["overall"]
            row["1-y predicted / KM observed"] = f"{ov['pred_mean']:.3f} / " + (
                f"{ov['observed']:.3f}" if finite(ov.get("observed")) else "n/a"
            )
            km = a["km"]
            if km.get("status") == "done":
                g = km["groups"]
                row["risk groups high / low (n, events)"] = " / ".join(
                    f"{g[k]['n']}, {g[k]['events']}" for k in ("high", "low") if k in g
                )
                row["log-rank p"] = fmt_p(km["p_value"])
            else:
                row["risk groups high / low (n, events)"] = f"undefined: {km.get('reason')}"
                row["log-rank p"] = "-"
        else:
            row.update(
                {
                    "1-y predicted / KM observed": "pending",
                    "risk groups high / low (n, events)": "pending",
                    "log-rank p": "-",
                }
            )
        rows.append(row)
    return pd.DataFrame(rows)


def dice_table(cells: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per configuration, per fold: outer validation Dice at the start -> at the end."""
    df = pd.DataFrame(cells)
    if df.empty:
        return df
    multi = df["split"].nunique() > 1
    rows = []
    for (split, config), g in df.groupby(["split", "config"], sort=False):
        row = {"configuration": f"{split}/{config}" if multi else config}
        for r in g.sort_values("fold").to_dict("records"):
            row[f"fold {r['fold']}"] = f"{_f2(r['dice_start'])} → {_f2(r['dice_end'])} ({_epochs(r)})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("pending")


def _epochs(r: dict[str, Any]) -> str:
    return f"{int(r['epochs_run'])} ep" if finite(r.get("epochs_run")) else "? ep"


def _f2(x: Any) -> str:
    return f"{float(x):.2f}" if finite(x) else "n/a"


@dataclass
class Block:
    """One piece of the document: ``h1/h2/h3`` (text), ``p``, ``warn``, ``table`` (DataFrame),
    ``img`` (path, caption in ``extra``) or ``code``."""

    kind: str
    content: Any
    extra: Any = None


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines)


def render_md(blocks: list[Block]) -> str:
    """Markdown of the blocks; images linked by file name (same folder)."""
    heads = {"h1": "# ", "h2": "## ", "h3": "### "}
    out = []
    for b in blocks:
        if b.kind in heads:
            out.append(heads[b.kind] + b.content)
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


def section_ids(blocks: Sequence[Block]) -> dict[int, str]:
    """An HTML id per ``h2``/``h3`` block (index -> id): its words in lower case, joined by
    hyphens, numbered on a repeat (``table-1-unbiased``, ``figure-2-2``)."""
    ids: dict[int, str] = {}
    seen: dict[str, int] = {}
    for i, b in enumerate(blocks):
        if b.kind in ("h2", "h3"):
            slug = "-".join(re.findall(r"[a-z0-9]+", str(b.content).lower()))[:60].strip("-") or "section"
            seen[slug] = seen.get(slug, 0) + 1
            ids[i] = slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"
    return ids


def contents_html(blocks: Sequence[Block], ids: dict[int, str]) -> str:
    """The report's contents list: a link per ``h2`` section, its ``h3`` subsections nested."""
    out: list[str] = []
    in_section = in_sub = False
    for i, b in enumerate(blocks):
        if i not in ids:
            continue
        link = f'<a href="#{ids[i]}">{html.escape(str(b.content))}</a>'
        if b.kind == "h3" and in_section:
            out.append(("" if in_sub else "<ul>") + f"<li>{link}</li>")
            in_sub = True
            continue
        out.append(("</ul>" if in_sub else "") + ("</li>" if in_section else "") + f"<li>{link}")
        in_section, in_sub = True, False
    out.append(("</ul>" if in_sub else "") + ("</li>" if in_section else ""))
    return (
        '<nav class="contents" aria-label="Contents"><p><strong>Contents</strong></p><ul>'
        + "".join(out)
        + "</ul></nav>"
    )


def render_html(blocks: list[Block], title: str) -> str:
    """Self-contained HTML of the blocks (figures embedded as base64 PNG), with a contents
    list after the title that links to every section; wide tables scroll inside their box,
    never the page."""
    body = []
    ids = section_ids(blocks)
    placed = False
    for i, b in enumerate(blocks):
        if b.kind in ("h2", "h3") and not placed:
            body.append(contents_html(blocks, ids))
            placed = True
        if b.kind in ("h1", "h2", "h3"):
            anchor = f' id="{ids[i]}"' if i in ids else ""
            body.append(f"<{b.kind}{anchor}>{html.escape(b.content)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{html.escape(b.content)}</p>")
        elif b.kind == "warn":
            body.append(f'<p class="warn">WARNING: {html.escape(b.content)}</p>')
        elif b.kind == "table":
            body.append('<div class="wide">' + b.content.to_html(index=False, escape=True, border=0) + "</div>")
        elif b.kind == "img":
            data = base64.b64encode(Path(b.content).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(b.extra)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.extra)}</figcaption></figure>"
            )
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.content)}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
        ".warn{background:#fdd;border:2px solid #c00;padding:.6em;font-weight:bold}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:.6em;overflow-x:auto}"
        ".wide{overflow-x:auto;max-width:100%}.contents ul{margin:.2em 0}"
        "@media print{.wide{overflow:visible}}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _kv_table(rows: Sequence[Sequence[Any]]) -> pd.DataFrame:
    return pd.DataFrame([[str(k), "-" if v is None else str(v)] for k, v in rows], columns=["item", "value"])


def _opening_blocks(results: Results) -> list[Block]:
    """Title, warnings, status and the headline: the first screen."""
    study, cells, head = results.study, results.cells, results.headline
    emb = study.get("embeddings") or {}
    b = [Block("h1", "Projection ablation: DeepMTS+DAFT with frozen CT/PET foundation-model embeddings")]
    if emb.get("random_init"):
        b.append(
            Block(
                "warn",
                "the embeddings come from RANDOMLY INITIALISED encoders "
                f"({', '.join(emb.get('random_init_modalities', []))}), not the foundation models. "
                "These numbers test the pipeline; they say nothing about CT-FM or PET-FM.",
            )
        )
    if study.get("info", {}).get("synthetic"):
        b.append(Block("warn", "the data are a SYNTHETIC demo cohort, not HECKTOR 2022."))
    if cells.done < cells.total:
        b.append(
            Block(
                "p",
                f"Status: {cells.done} of {cells.total} cells finished; the rest are shown as "
                "pending. Rerun `run-study` (finished cells are skipped) or `run-study --report-only` "
                "to refresh.",
            )
        )
    b.append(Block("h2", "Headline"))
    b.append(
        Block(
            "p",
            "Baseline, the best projection size d of each embedding set (Table 1's choice) and the "
            "classical peers. C-index: mean ± SD over every finished fold; Δ: paired difference from the "
            "baseline on identical folds, 95 % patient-bootstrap CI. The unbiased protocol (checkpoint "
            "chosen on an inner split) comes first; the paper protocol chooses it on the scored folds "
            "and is optimistic. Δ uses the CV repeats both models finished, so a peer's Δ may cover "
            "fewer repeats than its C-index.",
        )
    )
    if head["protocols"]:
        b.append(Block("table", headline_display(head, results.identical)))
        missing = not_requested(results.table1[head["protocols"][0]])
        if missing:
            b.append(Block("p", "Not part of this study: " + ", ".join(missing) + " (not requested, so not run)."))
    b.append(Block("p", " ".join(head.get("sentences", []))))
    return b


def _settings_blocks(results: Results) -> list[Block]:
    blocks = [
        Block("h2", "Data and settings"),
        Block("table", _kv_table(results.settings)),
        Block(
            "p",
            "Metrics are computed on each outer validation fold and summarised as mean ± SD "
            "(sample SD) over folds; `(k/n)` marks folds where the metric is undefined or pending "
            "(a fold without an event before 365 days has no 1-year AUROC; it is never counted as 0.5). "
            "Paper protocol (optimistic): the checkpoint is selected on the outer fold it is scored on, "
            "as in the paper. Unbiased inner selection: selected on an inner split of the training fold; "
            "the outer fold is scored once." + selection_sentence(results.selection) + seeds_sentence(results.seeds),
        ),
    ]
    text = undefined_sentence(results.undefined)
    return blocks + ([Block("p", text)] if text else [])


def selection_sentence(selection: dict[str, Any]) -> str:
    """`` Of epochs with equal selection scores ...; a tie decided the checkpoint in 2 of 10 cells ...``:
    the stated selection rule and its tie count (:func:`pipeline.report.analysis.selection_section`);
    empty for results written before it."""
    if not selection:
        return ""
    text = f" Both protocols: {selection['rule']}"
    first = selection.get("select_from_epoch") or 0
    text += f"; epochs before epoch {first} (0-based) are trained but not selectable." if first else "."
    ties = selection.get("ties") or {}
    parts = [
        f"{t['n_ties']} of {t['n_cells']} cells under {PROTOCOL_LABELS[p]}"
        for p, t in ties.items()
        if p in PROTOCOL_LABELS
    ]
    if parts:
        text += (
            " In this study an earlier selectable epoch had exactly the selected epoch's score, so the tie "
            "rule chose the checkpoint, in " + " and ".join(parts) + "."
        )
    return text


def seeds_sentence(seeds: dict[str, Any]) -> str:
    """Whether the training noise is measured (``run-study --seeds``); empty for older results."""
    if not seeds:
        return ""
    if not seeds.get("seed_configs"):
        return (
            " Each configuration is trained with one training seed, so the training noise (seed-to-seed "
            "spread) is not measured here (`run-study --seeds S`)."
        )
    return (
        f" Trained with {seeds['n_seeds']} training seeds on cv0: {', '.join(seeds['seed_configs'])} (see "
        '"Training noise"); every other table reads the study\'s own training seed (seed index 0).'
    )


def undefined_sentence(undefined: Sequence[dict[str, Any]]) -> str:
    """``"Undefined in the finished CV folds: 1-year AUROC in 3 of 40 (no event before 365 d: 3)."``;
    empty when every metric is defined (:func:`pipeline.report.undefined_metrics`)."""
    parts = [
        f"{METRIC_LABELS[u['metric']]} in {u['n_undefined']} of {u['n_results']} ("
        + "; ".join(f"{reason_text(code)}: {n}" for code, n in u["reasons"].items())
        + ")"
        for u in undefined
        if u["n_undefined"]
    ]
    if not parts:
        return ""
    return "Undefined in the finished CV fold results (each model, protocol and fold): " + ", ".join(parts) + "."


def _table_blocks(results: Results, out: Path) -> list[Block]:
    """Table 1 per protocol, the full ablation table and Figures 2-3."""
    b: list[Block] = []
    for proto in results.protocols:
        how = (
            "best d by mean outer validation C-index, as in the paper"
            if proto == "paper"
            else "best d by mean inner-validation C-index; the outer folds play no part in the choice"
        )
        b.append(Block("h2", f"Table 1 - {PROTOCOL_LABELS[proto]}"))
        b.append(
            Block(
                "p",
                f"Best projection size per embedding set ({how}); Δ = difference of means vs the "
                "baseline. The last column repeats the paper's reported values for reference. Peers are "
                "means over every repeat they ran, which may be more than the CNN's: for a like-for-like "
                "difference read the paired comparisons below.",
            )
        )
        b.append(Block("table", table1_display(results.table1[proto], proto, results.identical)))
        missing = not_requested(results.table1[proto])
        if missing:
            b.append(Block("p", "Not part of this study: " + ", ".join(missing) + " (not requested, so not run)."))
    identical = results.identical
    b.append(Block("h2", "Full projection ablation (both protocols)"))
    b.append(
        Block(
            "p",
            "Rows marked `peer:` are classical models fitted on the same folds files as the CNN "
            "(no checkpoint selection, so both protocol columns hold the same numbers): ridge Cox on "
            "the clinical covariates, ridge Cox on radiomics-lite features (log volume, SUVmax, "
            "SUVmean, log TLG from the preprocessed mask), and elastic-net Cox heads on the cached "
            "embeddings + clinical covariates with the CNN's projection sizes (per-encoder PCA to d "
            "components fitted on the training fold; orig = no projection), penalty by inner CV.",
        )
    )
    b.append(Block("table", ablation_table(results.summary, identical)))
    if identical:
        b.append(Block("p", "Rows shown once (`d = a = b`): " + identical_notes(identical)))
    summary, cells = pd.DataFrame(results.summary), results.cells
    b.append(Block("h2", "Figures"))
    for metric, fname in FIGURES.items():
        num = figure_label(fname)
        path = plot_figure(
            summary,
            metric,
            out / fname,
            stamp_text=results.stamp,
            title=f"{num}: {METRIC_LABELS[metric]} by FM projection size ({cells.done}/{cells.total} cells finished)",
        )
        b.append(Block("img", path, f"{num}: {METRIC_LABELS[metric]} by projection size"))
    return b


def _training_blocks(results: Results, out: Path) -> list[Block]:
    """Learning curves (Figure 4), per-cell Dice at start and end, and what they say."""
    curves, cells, summ = results.training.curves, results.training.cells, results.training.summary
    b = [Block("h2", "Training: did it converge?")]
    if not curves.get("configs"):
        return b + [Block("p", "No learning curves yet (no finished cell with `curves.csv`).")]
    b.append(Block("p", _training_text(summ)))
    b.append(
        Block(
            "img",
            plot_learning_curves(curves, out / FIGURE_CURVES, results.stamp),
            f"{figure_label(FIGURE_CURVES)}: learning curves per embedding set (mean over folds)",
        )
    )
    if cells:
        b.append(
            Block(
                "p",
                "Outer-validation segmentation Dice (mean per-case hard Dice on cases with a tumour) "
                "before the first step → after the last epoch, per cell, with the epochs run. "
                "`n/a`: not recorded by the run (older runs).",
            )
        )
        b.append(Block("table", dice_table(cells)))
    return b


def _training_text(s: dict[str, Any]) -> str:
    """A sentence or two from :func:`pipeline.report.training_summary`."""
    parts = []
    if finite(s.get("train_c_start")) and finite(s.get("train_c_end")):
        parts.append(
            f"mean train C-index {s['train_c_start']:.3f} before training → {s['train_c_end']:.3f} after the last epoch"
        )
    if finite(s.get("dice_start")) and finite(s.get("dice_end")):
        parts.append(f"mean outer validation Dice {s['dice_start']:.2f} → {s['dice_end']:.2f}")
    text = (
        f"Over {s.get('n_cells', 0)} finished cells: "
        + ("; ".join(parts) if parts else "start / end values not recorded")
        + "."
    )
    if s.get("train_c_epochs") and s.get("epochs_run"):
        text += (
            f" The train C-index (fit rows, a diagnostic) was scored on {_span(s['train_c_epochs'])} of "
            f"{_span(s['epochs_run'])} epochs per cell (every `train_c_every`-th and the last; the curves "
            "join those points); selection and every metric use all the rows they need at every epoch."
        )
    for proto in PROTOCOL_ORDER:
        n, last = s.get(f"n_selected_{proto}"), s.get(f"selected_last_{proto}")
        if n:
            text += f" {PROTOCOL_LABELS[proto].capitalize()} picked the last epoch in {last} of {n} cells" + (
                " (still improving when training stopped: more epochs may help)." if last > n / 2 else "."
            )
    return text


def _span(lo_hi: list[int]) -> str:
    """``[3, 3]`` -> ``3``, ``[2, 4]`` -> ``2-4``."""
    lo, hi = lo_hi
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _beyond_blocks(results: Results, out: Path) -> list[Block]:
    """Sections beyond the paper: analyses run, repeated CV, paired tests, LOCO, IBS/calibration/KM."""
    spec = results.study["spec"]
    identical, stamp_text = results.identical, results.stamp
    repeats, seed = int(spec.get("repeats", 1)), int(spec.get("folds_seed", 42))
    cvs = (
        "cv0 (the first CV split) is"
        if repeats == 1
        else f"cv0..cv{repeats - 1} (one per CV repeat; cv0 the first) are"
    )
    seeds = f"{seed}" if repeats == 1 else f"{seed}..{seed + repeats - 1}"
    b = [
        Block("h2", "Which analyses ran on which models"),
        Block(
            "p",
            f"Splits: {cvs} stratified {spec['n_folds']}-fold CV with split seed(s) {seeds} (one shared "
            "folds file per repeat, identical for every model)"
            + ("; loco holds out one centre per fold." if spec.get("loco") else "."),
        ),
        Block(
            "table",
            pd.DataFrame(
                [
                    {
                        "analysis": r["analysis"],
                        "CNN (DeepMTS+DAFT) splits": ", ".join(r["cnn"]) or "not run",
                        "peer splits": ", ".join(r["peers"]) or "not run",
                    }
                    for r in results.analyses
                ]
            ),
        ),
    ]
    b.append(Block("h2", "Repeated cross-validation: mean and 95 % CI"))
    b.append(
        Block(
            "p",
            "Mean over every finished fold of every repeat with a Student-t 95 % interval "
            "(`pipeline.stats.mean_ci`). Folds share training cases, so these intervals are too narrow "
            f"for comparing models; use the paired comparisons below for that. {CLIP_NOTE}",
        )
    )
    b.append(Block("table", ci_table(results.summary, identical)))
    b += _paired_blocks(results, out)
    b += seed_blocks(results)
    b += _loco_blocks(results, spec)
    sel = results.survival.protocol
    analyses = results.survival.models
    b.append(Block("h2", "Beyond ranking: integrated Brier score, calibration, risk groups"))
    b.append(
        Block(
            "p",
            f"Models: the baseline, the Table 1 choice of each embedding set and the Table 1 peers "
            f"({PROTOCOL_LABELS[sel]} for the CNN). Per fold the Breslow baseline hazard is fitted "
            "on the training fold's risks (`train_risk_*.csv`) and turns held-out risks into survival "
            "curves. IBS: mean over every finished CV fold (50-point grid where the score is defined), "
            "beside the no-covariate reference on the same folds. Calibration at 365 d: predicted vs "
            "Kaplan-Meier observed event probability, all folds of the first CV split (cv0) pooled (quintiles in "
            f"{figure_label(FIGURE_CALIBRATION)}). "
            "Risk groups: above / below the training fold's median risk, cv0 folds pooled, log-rank test.",
        )
    )
    b.append(Block("table", survival_display(analyses, results.identical)))
    b.append(
        Block(
            "img",
            plot_calibration(analyses, out / FIGURE_CALIBRATION, stamp_text, identical),
            f"{figure_label(FIGURE_CALIBRATION)}: 1-year calibration",
        )
    )
    b.append(
        Block(
            "img",
            plot_km(analyses, out / FIGURE_KM, stamp_text, identical),
            f"{figure_label(FIGURE_KM)}: Kaplan-Meier curves of risk groups",
        )
    )
    return b


def _paired_blocks(results: Results, out: Path) -> list[Block]:
    paired, vs_clinical = results.paired_vs_baseline, results.paired_vs_clinical_cox
    identical = results.identical
    b: list[Block] = []
    if paired:
        b.append(Block("h2", "Paired comparisons against the DeepMTS+DAFT baseline"))
        b.append(
            Block(
                "p",
                "Each model minus the baseline on identical folds (every CV repeat both have finished). "
                "Δ = difference of the mean per-fold C-index; 95 % CI and p from a paired patient "
                f"bootstrap within each fold ({results.n_boot} draws, "
                "`paired_bootstrap_delta`); 'corrected "
                "t-test' is the Nadeau-Bengio corrected resampled t-test over the J per-fold deltas "
                "(folds x repeats). The unbiased protocol is the one to trust; the paper protocol "
                "selects checkpoints on the folds it scores.",
            )
        )
        for proto in [p for p in PROTOCOL_ORDER if p in paired]:
            b.append(Block("h3", PROTOCOL_LABELS[proto]))
            b.append(Block("table", paired_display(paired[proto], identical)))
        b.append(
            Block(
                "img",
                plot_paired(paired, out / FIGURE_PAIRED, identical, results.stamp),
                f"{figure_label(FIGURE_PAIRED)}: Δ C-index vs the baseline",
            )
        )
    if vs_clinical:
        b.append(Block("h2", "Do the embeddings help a Cox model? Peers against the clinical Cox"))
        b.append(
            Block(
                "p",
                "Same statistics, reference = the clinical-only Cox peer, over every CV repeat: an "
                "embedding head adds the FM embeddings to the same clinical covariates, so its Δ "
                "isolates what the embeddings add.",
            )
        )
        b.append(Block("table", paired_display(vs_clinical, identical)))
    return b


def seed_blocks(results: Results) -> list[Block]:
    """ "Training noise": each seeded configuration's mean and SD over seeds, and Δ vs the
    baseline with a CI holding the seeds' variance (empty when no configuration has seeds)."""
    seeds = results.seeds or {}
    if not seeds.get("seed_configs"):
        return []
    b = [
        Block("h2", "Training noise: training seeds"),
        Block(
            "p",
            f"Trained with {seeds['n_seeds']} training seeds on the first CV split (cv0): "
            f"{', '.join(seeds['seed_configs'])}. Seed index s trains with the study's training seed + s "
            "(initialisation, dropout, batch order, augmentation) on the same outer folds and the same "
            "inner selection split, so the spread over seeds is training noise alone. Per configuration: "
            "the mean over seeds of its fold-mean C-index (Table 1's statistic), the SD over seeds (the "
            "training noise of that mean) and the per-seed means. Rule: "
            f"{seeds['noise_rule']}.",
        ),
    ]
    if seeds.get("noise"):
        b.append(Block("table", noise_display(seeds["noise"])))
    paired = seeds.get("paired_vs_baseline") or {}
    if any(paired.values()):
        b.append(
            Block(
                "p",
                "Δ vs the baseline on cv0 (model minus baseline, each the mean over its seeds): paired "
                f"patient bootstrap within each fold ({results.n_boot} draws) in which every replicate "
                "also draws one training seed per model among its seeds "
                "(`paired_bootstrap_delta_seeds`), so the 95 % CI holds the seeds' variance as well as "
                "the patients'. A model trained with one seed adds no training noise of its own (it is "
                "not measured), so its CI is still too narrow by that much. With one seed per model this "
                "is the paired comparison above.",
            )
        )
        for proto in [p for p in PROTOCOL_ORDER if paired.get(p)]:
            b.append(Block("h3", f"{PROTOCOL_LABELS[proto]} (cv0, seeds)"))
            b.append(Block("table", seed_paired_display(paired[proto])))
    return b


def noise_display(noise: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per seeded configuration: mean ± seed SD (seeds) and the per-seed means, per protocol."""
    rows: dict[str, dict[str, Any]] = {}
    for r in sorted(noise, key=lambda r: PROTOCOL_ORDER.index(r["protocol"])):  # unbiased columns first
        row = rows.setdefault(r["config"], {"model": _config_label(r["group"], r["d"])})
        short = SHORT_PROTOCOL[r["protocol"]]
        row[f"C-index, mean over seeds ± seed SD ({short})"] = (
            "pending"
            if r["mean"] is None
            else f"{r['mean']:.3f} ± "
            + (f"{r['sd']:.3f}" if r["sd"] is not None else "n/a")
            + f" ({r['n_seeds']} seeds)"
        )
        row[f"per seed ({short})"] = ", ".join(f"{m:.3f}" for m in r["seed_means"]) or "-"
    return pd.DataFrame(list(rows.values()))


def seed_paired_display(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Δ vs the baseline with the seed-aware CI, and whether it lies within the baseline's noise."""
    out = []
    for r in rows:
        row = {"model": r["label"], "seeds (model / baseline)": f"{r['n_seeds']} / {r['n_seeds_reference']}"}
        if r["status"] != "done":
            row.update(
                {
                    "Δ C-index [95 % CI, patients + seeds]": r["status"]
                    if r["status"] == "pending"
                    else f"undefined: {r.get('reason', '')}",
                    "bootstrap p": "-",
                    "within the baseline's noise": "-",
                }
            )
        else:
            within = r.get("within_baseline_noise")
            row.update(
                {
                    "Δ C-index [95 % CI, patients + seeds]": fmt_delta(r),
                    "bootstrap p": fmt_p(r["p_value"]),
                    "within the baseline's noise": "n/a (baseline has one seed)"
                    if within is None
                    else ("yes" if within else "no"),
                }
            )
        out.append(row)
    return pd.DataFrame(out)


def _config_label(group: str, d: Any) -> str:
    """``DeepMTS+DAFT baseline`` / ``DeepMTS+DAFT + CT, d = 64``."""
    return group_label(group) + ("" if group == BASELINE else f", d = {d}")


def _loco_blocks(results: Results, spec: dict[str, Any]) -> list[Block]:
    loco = results.loco
    if loco:
        return [
            Block("h2", "Leave-one-centre-out"),
            Block(
                "p",
                "Each column holds out one centre (n cases, ev events) and trains on the others. A "
                "metric that does not exist for a centre is reported with its reason, never as a number. "
                "Mean over centres uses the centres where the metric is defined (count in brackets); "
                "pooled C = Harrell's C over all held-out predictions together.",
            ),
            Block("table", loco_display(loco, results.identical)),
        ]
    if spec.get("loco"):
        return [Block("h2", "Leave-one-centre-out"), Block("p", "pending: the LOCO folds file is not written yet.")]
    return []


def _closing_blocks(results: Results) -> list[Block]:
    b: list[Block] = []
    comp = results.compute or {}
    if comp.get("n_cnn_cells"):
        b.append(
            Block(
                "p",
                f"Compute: {comp['n_cnn_cells']} CNN cells trained here, {comp['cnn_minutes']:.1f} min of "
                f"cell time (median {comp['median_cell_seconds']:.1f} s per cell); peers "
                f"{comp['peer_minutes']:.1f} min in all.",
            )
        )
    b += environment_blocks(results.environment)
    b.append(Block("h2", "Provenance"))
    b.append(Block("table", _kv_table(results.provenance)))
    return b


#: Environment fields shown first, in this order; any others the runs recorded follow.
ENVIRONMENT_ORDER = ENVIRONMENT_KEYS


def environment_blocks(environments: Sequence[dict[str, Any]]) -> list[Block]:
    """ "What can still change these numbers": the distinct environments the runs recorded."""
    b = [Block("h2", "What can still change these numbers")]
    if not environments:
        return b + [
            Block(
                "p",
                "The runs recorded no environment (runs written before it was recorded): the torch "
                "version, device and thread count behind these numbers are unknown. Same inputs and "
                "settings give the same numbers only on the same software and hardware.",
            )
        ]
    b.append(
        Block(
            "p",
            "Same inputs and settings give the same numbers wherever the fields below agree. On a "
            "CPU, portable numerics (the default) pin every library's kernels to the AVX2 path, so "
            "any x86-64 CPU with AVX2 computes the same bytes whatever its model, caches or core "
            "count: the CPU fields below then say where the runs ran, not why they differ. What "
            "still changes the floating-point sums: native numerics (HNFM_NUMERICS=native) or "
            "pins not in force, other kernel levels (ATen, oneDNN, OpenBLAS, numpy) or library "
            "versions (torch, oneDNN, MKL, numpy), a thread count, deterministic mode, a GPU (its "
            "model, CUDA, cuDNN, TF32), or the precision; that moves the last digits of every "
            "metric and, through the checkpoint choice, sometimes more. "
            + (
                "All runs recorded one environment:"
                if len(environments) == 1
                else f"The runs recorded {len(environments)} different environments:"
            ),
        )
    )
    return b + [Block("table", environment_table(environments))]


def environment_table(environments: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per environment field, one column per distinct environment (with its run count)."""
    keys = [k for k in ENVIRONMENT_ORDER if any(k in e["environment"] for e in environments)]
    keys += sorted({k for e in environments for k in e["environment"]} - set(keys))
    cols = {}
    for i, e in enumerate(environments, 1):
        n = len(e["runs"])
        name = (
            f"environment {i} ({n} run{'s' if n != 1 else ''})"
            if len(environments) > 1
            else f"{n} run{'s' if n != 1 else ''}"
        )
        cols[name] = [_environment_value(e["environment"].get(k)) for k in keys]
    return pd.DataFrame({"field": keys, **cols})


def _environment_value(value: Any) -> str:
    """One cell of the environment table: dicts as ``key=value`` pairs, lists joined, None as -."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "; ".join(f"{k}={_environment_value(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_environment_value(v) for v in value)
    return str(value)


def report_blocks(results: Results, out: Path) -> list[Block]:
    """The whole document, drawing the figures into ``out`` on the way."""
    return (
        _opening_blocks(results)
        + _settings_blocks(results)
        + _table_blocks(results, out)
        + _training_blocks(results, out)
        + _beyond_blocks(results, out)
        + _closing_blocks(results)
    )


def render_report(results: Results | dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``report.md``, ``report.html`` and the figures from a results object alone.

    Args:
        results: a JSON-safe :class:`~pipeline.report.results.Results`
            (:meth:`~pipeline.report.results.Results.clean`), or a loaded ``results.json``.
        out_dir: destination folder.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(results, Results):
        results = Results.from_json(results)
    blocks = report_blocks(results, out)
    md_path = out / "report.md"
    with atomic_path(md_path, suffix=".md") as tmp:
        tmp.write_text(render_md(blocks))
    with atomic_path(out / "report.html", suffix=".html") as tmp:
        tmp.write_text(render_html(blocks, "hnfm-survival projection ablation"))
    return md_path


def headline_text(results: Results | dict[str, Any]) -> str:
    """The headline for a console: one line per row, unbiased protocol, then the sentences."""
    head = (results if isinstance(results, Results) else Results.from_json(results)).headline
    if not head["protocols"]:
        return "headline: no configuration finished yet"
    proto = head["protocols"][0]
    lines = [
        f"headline ({PROTOCOL_LABELS[proto]}; mean ± SD over folds, (k/n) = folds where defined; "
        "Δ C-index vs baseline [95 % CI]):",
        f"  {'model':<44} {'C-index':<22} {'1-year AUROC':<22} Δ C-index",
    ]
    for r in head["rows"][proto]:
        done = r["status"] == "done"
        name = r["label"] + (f", d = {r['d']}" if done and r.get("d") not in (None, "-") else "")
        c = fmt_mean_sd(r.get("c_mean"), r.get("c_sd"), r.get("c_n"), r.get("n_folds")) if done else "pending"
        auc = fmt_mean_sd(r.get("auc_mean"), r.get("auc_sd"), r.get("auc_n"), r.get("n_folds")) if done else "-"
        delta = fmt_delta(r) if done else "-"
        lines.append(f"  {name:<44} {c:<22} {auc:<22} {'' if delta == '-' else delta}".rstrip())
    if finite(head.get("oracle_c_index")):
        lines.append(f"  {'oracle: true risk (synthetic cohort)':<44} {head['oracle_c_index']:.3f}")
    return "\n".join(lines + [""] + head.get("sentences", []))
