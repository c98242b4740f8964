"""``fit-heads`` (classical peers and fast embedding heads on the shared folds) and
``import-features`` (an external per-case feature CSV into the embedding-cache format)."""

from __future__ import annotations

import sys

import click

from pipeline.artefacts import ProvenanceError

PROJ_CHOICES = ("64", "128", "256", "orig")


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100},
    epilog="Example: fit-heads --peer embeddings --embeddings embeddings/ctpet.h5 --proj 256 "
    "--folds runs/folds.csv --out runs/heads/ctpet-d256",
)
@click.option("--manifest", default="data_manifest.csv", type=click.Path(dir_okay=False),
              help="Case manifest (cases with an endpoint are used).")
@click.option("--cache", "cache_root", default=None, type=click.Path(file_okay=False),
              help="Preprocessed cache: required by --peer radiomics; checks embedding provenance.")
@click.option("--peer", type=click.Choice(["clinical", "radiomics", "embeddings"]), default="embeddings",
              help="clinical Cox, radiomics-lite Cox, or penalised Cox on embeddings / imported features.")
@click.option("--embeddings", "features_path", default=None, type=click.Path(dir_okay=False),
              help="Embeddings (extract-embeddings) or imported features (import-features) HDF5.")
@click.option("--modalities", default=None, help="Comma list of modalities in the file, e.g. 'ct' or 'ct,pet' [all].")
@click.option("--proj", type=click.Choice(PROJ_CHOICES), default="orig",
              help="Per-modality PCA size fitted on each training fold, or 'orig' (no projection).")
@click.option("--clinical/--no-clinical", "with_clinical", default=None,
              help="Add the clinical covariates [embeddings: yes, radiomics: no; clinical peer: always].")
@click.option("--model", type=click.Choice(["ridge", "coxnet"]), default=None,
              help="Cox fit [clinical/radiomics: ridge; embeddings: coxnet with inner-CV penalty].")
@click.option("--ridge-alpha", type=float, default=None,
              help="L2 weight of the ridge Cox [default: chosen by inner CV on each training fold].")
@click.option("--l1-ratio", type=float, default=0.1, help="Elastic-net mixing of coxnet (1 = lasso).")
@click.option("--inner-folds", type=int, default=3, help="Inner CV folds choosing the coxnet penalty.")
@click.option("--seed", type=int, default=42, help="Seed of the inner folds.")
@click.option("--folds", "folds_path", default="runs/folds.csv", type=click.Path(exists=True, dir_okay=False),
              help="Shared CV folds (the CNN's), so peers and CNN are compared on identical splits.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder, e.g. runs/heads/<name>: oof_predictions.csv + summary.json.")
def fit_heads(manifest, cache_root, peer, features_path, modalities, proj, with_clinical, model,
              ridge_alpha, l1_ratio, inner_folds, seed, folds_path, out_dir):
    """Fit a classical peer or a fast embedding head on every fold; seconds, no CNN."""
    from pipeline.peers import HeadConfig, fit_peer_run

    if with_clinical is None:
        with_clinical = peer != "radiomics"
    if peer == "clinical" and not with_clinical:
        raise click.BadParameter("the clinical peer needs the clinical covariates", param_hint="--no-clinical")
    model = model or ("coxnet" if peer == "embeddings" else "ridge")
    try:
        cfg = HeadConfig(model=model, ridge_alpha=ridge_alpha, with_clinical=with_clinical,
                         proj=None if proj == "orig" else int(proj), l1_ratio=l1_ratio,
                         inner_folds=inner_folds, seed=seed)
        mods = [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None
        summary = fit_peer_run(peer, manifest_path=manifest, folds_path=folds_path, out_dir=out_dir,
                               cache_root=cache_root, features_path=features_path, modalities=mods,
                               config=cfg)
    except (ValueError, FileNotFoundError, KeyError, ProvenanceError) as exc:
        click.echo(f"fit-heads: {exc}", err=True)
        sys.exit(2)
    ci, auc = summary["c_index"], summary["auc_1y"]

    def fmt(s):
        return "undefined" if s["mean"] is None else f"{s['mean']:.3f} +- {(s['sd'] or 0):.3f} ({s['n_defined']}/{s['n_total']} folds)"

    click.echo(f"{peer}: C-index {fmt(ci)}; 1-year AUROC {fmt(auc)}; {summary['seconds']:.1f} s -> {out_dir}")


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100},
    epilog="Example: import-features radiomics.csv --out embeddings/radiomics.h5 --cache cache/preprocessed",
)
@click.argument("csv_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_h5", required=True, type=click.Path(dir_okay=False),
              help="Destination HDF5, e.g. embeddings/<name>.h5.")
@click.option("--cache", "cache_root", default="cache/preprocessed", type=click.Path(file_okay=False),
              help="Preprocessed cache the features belong to (records its params hash and case fingerprints).")
@click.option("--id-column", default="PatientID", help="Column holding the case ids.")
@click.option("--name", default=None, help="Modality name of the features [the output file's stem].")
@click.option("--columns", default=None, help="Comma list of feature columns [every numeric column].")
def import_features(csv_path, out_h5, cache_root, id_column, name, columns):
    """Bring a per-case feature table into the embedding-cache format for fit-heads."""
    from pathlib import Path

    from pipeline.peers import import_feature_table

    name = name or Path(out_h5).stem
    try:
        res = import_feature_table(csv_path, out_h5, id_column=id_column, name=name, cache=cache_root,
                                   columns=[c.strip() for c in columns.split(",")] if columns else None)
    except (ValueError, FileNotFoundError, ProvenanceError) as exc:
        click.echo(f"import-features: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{res['n_cases']} cases x {res['n_features']} features -> {res['path']}")
    if res["dropped_columns"]:
        click.echo(f"left out non-numeric columns: {res['dropped_columns']}")
    if res["not_in_cache"]:
        click.echo(f"WARNING: {len(res['not_in_cache'])} case(s) are not in the cache: {res['not_in_cache'][:10]}", err=True)
