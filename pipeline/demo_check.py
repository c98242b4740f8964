"""The demo's reference digest, and the comparison every ``make demo`` ends with.

``pipeline/demo_reference.json`` holds what ``make demo`` computed under portable numerics
(:mod:`pipeline.numerics`): the SHA-256 of every cell's out-of-fold risks (``oof.csv``) and of
every peer's (``oof_predictions.csv``), the report's headline numbers, the settings' hash and
the environment that decided the bits. A demo run compares its own digest with it and says,
in one line, whether it computed the same bytes, or how many cells differ and which
environment fields differ from the reference's. A demo with other settings, on a GPU, or
with native numerics says so instead of comparing: only the CPU's portable path is meant to
give the same bytes everywhere.

The README's demo figures are rendered from this file (:func:`readme_block`), and a test
holds the README to it, so the documentation quotes one run.

Written by ``make demo-reference`` (``python -m pipeline.demo_check --write``) after a
``make demo`` on a clean tree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.artefacts import params_hash, read_json, sha256_file, write_json_atomic
from pipeline.layout import PeerRunLayout
from pipeline.runtime import CPU_ENVIRONMENT_KEYS
from pipeline.study_spec import FIRST_SPLIT, StudySpec, cell_layout, grid, load_study

#: The committed reference (package data, so an installed copy finds it too).
REFERENCE = Path(__file__).with_name("demo_reference.json")

#: Where ``make demo`` leaves its study and report (``run-study --demo``'s defaults).
DEMO_STUDY, DEMO_REPORT = Path("runs/demo_study"), Path("reports/demo")

#: Environment fields (:func:`pipeline.runtime.environment_record`) that decide a CPU run's
#: bits or tell machines apart; the comparison names those that differ from the reference's.
DECIDING_FIELDS = CPU_ENVIRONMENT_KEYS + ("python",)

#: StudySpec fields that are paths (they differ between clones and decide no number).
_PATH_FIELDS = ("manifest", "cache_root", "embeddings", "study_dir")


def settings_hash(spec: StudySpec) -> str:
    """Hash of the study's settings, paths left out."""
    return params_hash({k: v for k, v in spec.to_dict().items() if k not in _PATH_FIELDS})


def _environment(spec: StudySpec) -> dict[str, Any]:
    """The first finished cell's environment record, reduced to :data:`DECIDING_FIELDS`."""
    for cell in grid(spec):
        layout = cell_layout(spec, cell)
        if layout.is_done(cell.fold):
            env = read_json(layout.done(cell.fold)).get("environment") or {}
            return {k: env.get(k) for k in DECIDING_FIELDS}
    return {}


def _headline(results: dict[str, Any]) -> dict[str, Any]:
    """The report's headline (rows per protocol, oracle, training noise) and the baseline's
    per-fold C-index and AUROC per protocol, from ``results.json``."""
    head = results["headline"]
    folds: dict[str, dict[str, list]] = {}
    for r in results.get("records") or []:
        if (
            r.get("config") == "baseline"
            and r.get("split", FIRST_SPLIT) == FIRST_SPLIT
            and r.get("kind", "cnn") == "cnn"
            and not r.get("seed")
        ):
            per = folds.setdefault(r["protocol"], {"c_index": [], "auc_1y": []})
            per["c_index"].append(r.get("c_index"))
            per["auc_1y"].append(r.get("auc_1y"))
    return {
        "rows": head.get("rows"),
        "oracle_c_index": head.get("oracle_c_index"),
        "training_noise": head.get("training_noise"),
        "baseline_folds": folds,
    }


def demo_digest(study_dir: str | Path = DEMO_STUDY, report_dir: str | Path = DEMO_REPORT) -> dict[str, Any]:
    """The digest of a finished demo: settings hash, per-cell and per-peer OOF SHA-256,
    headline numbers and the deciding environment."""
    spec, _ = load_study(study_dir)
    cells = {}
    for cell in grid(spec):
        layout = cell_layout(spec, cell)
        if layout.is_done(cell.fold):
            cells[cell.key] = sha256_file(layout.oof(cell.fold))
    peers = {}
    for split in spec.splits():
        for peer in spec.peer_list():
            path = PeerRunLayout(spec.peer_dir(peer, split)).oof_predictions
            if path.is_file():
                peers[f"{split}/{peer.name}"] = sha256_file(path)
    results = read_json(Path(report_dir) / "results.json")
    return {
        "settings_hash": settings_hash(spec),
        "cells": cells,
        "peers": peers,
        "headline": _headline(results),
        "environment": _environment(spec),
    }


def why_not_compared(digest: dict[str, Any], reference: dict[str, Any]) -> str | None:
    """Why a digest is not comparable with the reference (None when it is)."""
    env = digest["environment"]
    if digest["settings_hash"] != reference["settings_hash"]:
        return "this demo ran with other settings than the reference's"
    if str(env.get("device", "cpu")) != "cpu":
        return f"this demo trained on {env.get('device')}, which keeps its own numerics"
    if env.get("numerics") != "portable" or not env.get("numerics_in_force"):
        return f"this demo ran with {env.get('numerics')} numerics (in force: {env.get('numerics_in_force')})"
    return None


def compare(digest: dict[str, Any], reference: dict[str, Any]) -> str:
    """One line: identical to the reference, or what differs (cells, peers, headline, and the
    environment fields that differ from the reference's), or why no comparison was made."""
    reason = why_not_compared(digest, reference)
    if reason:
        return f"demo check: not compared with the reference ({reason})."
    cells = sorted(
        k for k in set(reference["cells"]) | set(digest["cells"]) if reference["cells"].get(k) != digest["cells"].get(k)
    )
    peers = sorted(
        k for k in set(reference["peers"]) | set(digest["peers"]) if reference["peers"].get(k) != digest["peers"].get(k)
    )
    same_head = digest["headline"] == reference["headline"]
    if not cells and not peers and same_head:
        return (
            f"demo check: identical to the reference ({len(reference['cells'])} cells and "
            f"{len(reference['peers'])} peers, byte for byte; {REFERENCE.name})."
        )
    env = sorted(
        k
        for k in set(reference["environment"]) | set(digest["environment"])
        if reference["environment"].get(k) != digest["environment"].get(k)
    )
    parts = [
        f"{len(cells)} of {len(reference['cells'])} cells differ"
        + (f" ({', '.join(cells[:4])}{', ...' if len(cells) > 4 else ''})" if cells else "")
    ]
    if peers:
        parts.append(f"{len(peers)} peers differ")
    if not same_head:
        parts.append("the headline differs")
    parts.append("environment fields that differ from the reference's: " + (", ".join(env) if env else "none"))
    return "demo check: DIFFERENT from the reference: " + "; ".join(parts) + "."


def check_demo(
    study_dir: str | Path = DEMO_STUDY, report_dir: str | Path = DEMO_REPORT, reference: str | Path = REFERENCE
) -> str:
    """:func:`compare` of a finished demo with the committed reference."""
    if not Path(reference).is_file():
        return f"demo check: no reference at {reference} to compare with (make demo-reference writes one)."
    return compare(demo_digest(study_dir, report_dir), read_json(reference))


# -- the README's demo figures ----------------------------------------------------------------


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


#: How the README names the two selection protocols.
_PROTOCOL_NAMES = {"inner": "unbiased (inner split)", "paper": "paper protocol (optimistic)"}


def readme_block(reference: dict[str, Any]) -> str:
    """The README's demo tables, rendered from the reference (a test compares the two): the
    baseline per protocol with its folds and training noise, then the headline rows of the
    unbiased protocol with their paired Δ."""
    head = reference["headline"]
    rows_of = head["rows"] or {}
    lines = [
        "| protocol | baseline C-index, mean of 5 folds (folds) | 1-year AUROC (defined folds) | "
        "training noise: seed SD of the 5-fold mean (seeds) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for proto, rows in rows_of.items():
        base = next(r for r in rows if r.get("config") == "baseline")
        folds = head["baseline_folds"].get(proto, {}).get("c_index", [])
        noise = (head.get("training_noise") or {}).get(proto)
        lines.append(
            f"| {_PROTOCOL_NAMES.get(proto, proto)} | **{_f(base['c_mean'])}** ({', '.join(_f(c) for c in folds)}) | "
            f"{_f(base['auc_mean'])} ({base['auc_n']} of {base['n_folds']}) | "
            + (f"{_f(noise['sd'])} ({noise['n_seeds']})" if noise else "-")
            + " |"
        )
    if head.get("oracle_c_index") is not None:
        lines.append(f"| oracle (true linear predictor) | {_f(head['oracle_c_index'])} | | |")
    proto = next(iter(rows_of), None)
    if proto is None:
        return "\n".join(lines)
    lines += [
        "",
        f"Headline, {_PROTOCOL_NAMES.get(proto, proto)} (best d per embedding set, classical peers):",
        "",
        "| model | C-index | 1-year AUROC | Δ C-index vs baseline [95 % CI] | within the baseline's training noise |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows_of[proto]:
        if r.get("config") == "baseline":
            continue
        within = {True: "yes", False: "no"}.get(r.get("within_baseline_noise"), "-")
        lines.append(
            f"| {r['label']} (`{r['config']}`) | {_f(r['c_mean'])} | {_f(r['auc_mean'])} | "
            f"{r['delta']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {within} |"
        )
    return "\n".join(lines)


def write_reference(
    study_dir: str | Path = DEMO_STUDY, report_dir: str | Path = DEMO_REPORT, out: str | Path = REFERENCE
) -> dict[str, Any]:
    """Write a finished demo's digest as the reference (refused unless portable CPU numerics
    were in force)."""
    digest = demo_digest(study_dir, report_dir)
    env = digest["environment"]
    if str(env.get("device")) != "cpu" or env.get("numerics") != "portable" or not env.get("numerics_in_force"):
        raise ValueError(
            f"the reference must come from a CPU demo under portable numerics; this one ran on "
            f"{env.get('device')} with {env.get('numerics')} numerics (in force: "
            f"{env.get('numerics_in_force')})"
        )
    write_json_atomic(out, digest)
    return digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the finished demo's digest as the reference")
    parser.add_argument("--study", default=str(DEMO_STUDY), help="the demo's study folder [runs/demo_study]")
    parser.add_argument("--report", default=str(DEMO_REPORT), help="the demo's report folder [reports/demo]")
    args = parser.parse_args(argv)
    if args.write:
        digest = write_reference(args.study, args.report)
        print(f"wrote {REFERENCE} ({len(digest['cells'])} cells, {len(digest['peers'])} peers)")
        print(readme_block(digest))
        return 0
    print(check_demo(args.study, args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
