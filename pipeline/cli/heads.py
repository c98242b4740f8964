"""``fit-heads`` (classical peers and fast embedding heads on the shared folds) and
``import-features`` (an external per-case feature CSV into the embedding-cache format)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from pipeline.artefacts import ProvenanceError, missing_path_message
from pipeline.cache import COHORT_FILE
from pipeline.embeddings import MissingCasesError, RandomInitWarning, embedding_dims, random_init_datasets
from pipeline.feature_tables import import_feature_table
from pipeline.manifest import read_manifest
from pipeline.peers import HeadConfig, fit_peer_run, projection_excess

PROJ_CHOICES = ("64", "128", "256", "orig")
DEFAULT_FOLDS = "runs/folds.json"
DEFAULT_CACHE = "cache/preprocessed"
DEFAULT_MANIFEST = "data_manifest.csv"


def _fail(message: object) -> None:
    click.secho(f"error: {message}", err=True, fg="red")
    sys.exit(1)


def _is_default(name: str) -> bool:
    return click.get_current_context().get_parameter_source(name) == ParameterSource.DEFAULT


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100},
    epilog="\b\nExample:\n  fit-heads --peer embeddings --embeddings embeddings/ctpet.h5 --proj 256 "
    f"--folds {DEFAULT_FOLDS} --out runs/heads/ctpet-d256",
)
@click.option(
    "--manifest",
    default=DEFAULT_MANIFEST,
    type=click.Path(dir_okay=False),
    help="Case manifest (cases with an endpoint are used).",
)
@click.option(
    "--cache",
    "cache_root",
    default=None,
    type=click.Path(file_okay=False),
    help="Preprocessed cache: required by --peer radiomics; checks embedding provenance.",
)
@click.option(
    "--peer",
    type=click.Choice(["clinical", "radiomics", "embeddings"]),
    default="embeddings",
    help="clinical Cox, radiomics-lite Cox, or penalised Cox on embeddings / imported features.",
)
@click.option(
    "--embeddings",
    "features_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Embeddings (extract-embeddings) or imported features (import-features) HDF5.",
)
@click.option(
    "--modalities",
    "datasets",
    default=None,
    help="Comma list of the file's datasets: encoders, e.g. 'ct' or 'ct,pet', or an imported table's name [all].",
)
@click.option(
    "--proj",
    type=click.Choice(PROJ_CHOICES),
    default="orig",
    help="PCA size per dataset fitted on each training fold, or 'orig' (no projection); "
    "at most the number of features of each dataset.",
)
@click.option(
    "--clinical/--no-clinical",
    "with_clinical",
    default=None,
    help="Add the clinical covariates [embeddings: yes, radiomics: no; clinical peer: always].",
)
@click.option(
    "--model",
    type=click.Choice(["ridge", "coxnet"]),
    default=None,
    help="Cox fit [clinical/radiomics: ridge; embeddings: coxnet with inner-CV penalty].",
)
@click.option(
    "--ridge-alpha",
    type=float,
    default=None,
    help="L2 weight of the ridge Cox [default: chosen by inner CV on each training fold].",
)
@click.option("--l1-ratio", type=float, default=0.1, help="Elastic-net mixing of coxnet (1 = lasso).")
@click.option("--inner-folds", type=int, default=3, help="Inner CV folds choosing the penalty.")
@click.option("--seed", type=int, default=42, help="Seed of the inner folds.")
@click.option(
    "--folds",
    "folds_path",
    default=DEFAULT_FOLDS,
    type=click.Path(dir_okay=False),
    help="Shared CV folds (the CNN's, written by train-survival and run-study), so peers and "
    "CNN are compared on identical splits.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run folder, e.g. runs/heads/<name>: oof_predictions.csv + summary.json.",
)
def fit_heads(
    manifest,
    cache_root,
    peer,
    features_path,
    datasets,
    proj,
    with_clinical,
    model,
    ridge_alpha,
    l1_ratio,
    inner_folds,
    seed,
    folds_path,
    out_dir,
):
    """Fit a classical peer or a fast embedding head on every fold; seconds, no CNN."""
    if with_clinical is None:
        with_clinical = peer != "radiomics"
    if peer == "clinical" and not with_clinical:
        raise click.BadParameter("the clinical peer needs the clinical covariates", param_hint="--no-clinical")
    if peer == "radiomics" and cache_root is None:
        raise click.UsageError(
            f"--peer radiomics needs the preprocessed cache: pass --cache PATH (e.g. --cache {DEFAULT_CACHE})"
        )
    if peer == "embeddings" and features_path is None:
        raise click.UsageError("--peer embeddings needs --embeddings PATH (from extract-embeddings or import-features)")
    if not Path(folds_path).is_file():
        _fail(
            f"no folds file {folds_path}: `train-survival` and `run-study` write {DEFAULT_FOLDS}; "
            "run one of them first, or pass --folds PATH"
        )
    model = model or ("coxnet" if peer == "embeddings" else "ridge")
    names = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
    size = None if proj == "orig" else int(proj)
    if peer == "embeddings" and size is not None and Path(features_path).is_file():
        _check_projection(features_path, size, names)
    # The library warns on every read (and Python shows it besides): said once below.
    warnings.simplefilter("ignore", RandomInitWarning)
    try:
        cfg = HeadConfig(
            model=model,
            ridge_alpha=ridge_alpha,
            with_clinical=with_clinical,
            proj=size,
            l1_ratio=l1_ratio,
            inner_folds=inner_folds,
            seed=seed,
        )
        summary = fit_peer_run(
            peer,
            manifest_path=manifest,
            folds_path=folds_path,
            out_dir=out_dir,
            cache_root=cache_root,
            features_path=features_path,
            datasets=names,
            config=cfg,
        )
    except (ValueError, FileNotFoundError, ProvenanceError) as exc:
        _fail(exc)
    except KeyError as exc:
        _fail(exc.args[0] if exc.args else exc)
    random = random_init_datasets(features_path) if peer == "embeddings" else []
    if random:
        click.secho(
            f"WARNING: {features_path}: {random} embeddings come from RANDOMLY INITIALISED encoders, "
            "not the foundation models; fine for a demo, meaningless for results",
            fg="red",
            err=True,
        )
    ci, auc = summary["c_index"], summary["auc_1y"]

    def fmt(s):
        return (
            "undefined"
            if s["mean"] is None
            else f"{s['mean']:.3f} +- {(s['sd'] or 0):.3f} ({s['n_defined']}/{s['n_total']} folds)"
        )

    click.echo(f"{peer}: C-index {fmt(ci)}; 1-year AUROC {fmt(auc)}; {summary['seconds']:.1f} s -> {out_dir}")


def _check_projection(features_path: str, size: int, names: list[str] | None) -> None:
    """Refuse a --proj larger than a dataset's features: a PCA cannot add components."""
    dims = embedding_dims(features_path)
    narrow = projection_excess(size, {n: d for n, d in dims.items() if names is None or n in names})
    if narrow:
        widths = ", ".join(f"{n!r} has {d}" for n, d in narrow.items())
        raise click.BadParameter(
            f"{size} is larger than the input: {features_path}: {widths} feature(s), and a PCA "
            f"keeps at most that many components; use --proj orig or a size <= {min(narrow.values())}",
            param_hint="--proj",
        )


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100},
    epilog="\b\nExample:\n  import-features data/radiomics.csv --out embeddings/radiomics.h5 --id-column Patient_ID\n\n"
    f"The file is bound to {DEFAULT_CACHE} when that cache exists and checked against {DEFAULT_MANIFEST} "
    "when it exists.",
)
@click.argument("csv_path", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out_h5",
    required=True,
    type=click.Path(dir_okay=False),
    help="Destination HDF5, e.g. embeddings/<name>.h5.",
)
@click.option(
    "--cache",
    "cache_root",
    default=DEFAULT_CACHE,
    type=click.Path(file_okay=False),
    help="Preprocessed cache the features belong to (records its params hash and case "
    "fingerprints). When the default is absent, the table is imported without one.",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Import without a preprocessed cache: no fingerprints, so the cache checks of "
    "fit-heads / train-survival do not apply to this file.",
)
@click.option(
    "--manifest",
    default=DEFAULT_MANIFEST,
    type=click.Path(dir_okay=False),
    help="Manifest whose cases the table must cover (skipped when the default is absent).",
)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Import a table that lacks some manifest cases (listed in a warning); fit-heads and "
    "train-survival then refuse those cases.",
)
@click.option("--id-column", default="PatientID", help="Column holding the case ids.")
@click.option("--name", default=None, help="Dataset name of the features in the file [the output file's stem].")
@click.option("--columns", default=None, help="Comma list of feature columns [every numeric column].")
def import_features(csv_path, out_h5, cache_root, no_cache, manifest, allow_missing, id_column, name, columns):
    """Bring a per-case feature table into the embedding-cache format for fit-heads.

    Every case of the manifest must have a row (NaN where a feature is unknown: it is filled
    with the training-fold mean); a table that misses cases is refused with their list
    unless --allow-missing.
    """
    name = name or Path(out_h5).stem
    cache = _import_cache(cache_root, no_cache)
    expected = _manifest_cases(manifest)
    try:
        res = import_feature_table(
            csv_path,
            out_h5,
            id_column=id_column,
            name=name,
            cache=cache,
            columns=[c.strip() for c in columns.split(",")] if columns else None,
            expected_case_ids=expected,
            allow_missing=allow_missing,
        )
    except MissingCasesError as exc:
        _fail(f"{exc} (cases from --manifest {manifest})")
    except (ValueError, FileNotFoundError, ProvenanceError) as exc:
        _fail(exc)
    click.echo(f"{res['n_cases']} cases x {res['n_features']} features -> {res['path']}")
    _report_import(res, cache, manifest)


def _import_cache(cache_root: str, no_cache: bool) -> str | None:
    """The cache to bind the table to, or None (said on the console)."""
    if no_cache:
        click.echo(
            "importing without a preprocessed cache (--no-cache): no fingerprints; the file's "
            "cache_bound attribute is false and cache checks do not apply to it"
        )
        return None
    if not (Path(cache_root) / COHORT_FILE).is_file():
        if not _is_default("cache_root") and not Path(cache_root).exists():
            _fail(
                missing_path_message(cache_root, "preprocessed cache", f"*/{COHORT_FILE}")
                + "; pass the right --cache PATH, or --no-cache to import without one"
            )
        if not _is_default("cache_root"):
            _fail(
                f"{cache_root}: no preprocessed cache there (no {COHORT_FILE}); pass the right "
                "--cache PATH, or --no-cache to import without one"
            )
        click.echo(
            f"no preprocessed cache at {cache_root}: importing without one (no fingerprints; "
            "the file's cache_bound attribute is false and cache checks do not apply to it; "
            "pass --cache PATH to bind the table to a cache)"
        )
        return None
    return cache_root


def _manifest_cases(manifest: str) -> list[str] | None:
    if Path(manifest).is_file():
        try:
            return read_manifest(manifest, resolve_paths=False)["case_id"].astype(str).tolist()
        except ValueError as exc:
            _fail(f"{exc} (--manifest)")
    if not _is_default("manifest"):
        _fail(f"{missing_path_message(manifest, 'manifest', '*.csv')}; pass the right --manifest PATH")
    click.echo(f"no manifest at {manifest}: the table's coverage is not checked (pass --manifest PATH)")
    return None


def _report_import(res: dict, cache: str | None, manifest: str) -> None:
    cov = res["coverage"]
    if cov is not None:
        click.echo(f"covers {cov['covered']} of the {cov['expected']} cases of {manifest}")
        if cov["missing"]:
            click.secho(
                f"WARNING: {len(cov['missing'])} case(s) of {manifest} have no row (imported with "
                f"--allow-missing; fit-heads and train-survival will refuse them): {cov['missing']}",
                err=True,
                fg="red",
                bold=True,
            )
        if cov["not_expected"]:
            click.echo(f"{len(cov['not_expected'])} row(s) are not cases of {manifest}: {cov['not_expected'][:10]}")
    if res["dropped_columns"]:
        click.echo(f"left out non-numeric columns: {res['dropped_columns']}")
    if cache is not None and res["not_in_cache"]:
        click.secho(
            f"WARNING: {len(res['not_in_cache'])} case(s) are not in the cache {cache}: {res['not_in_cache'][:10]}",
            err=True,
            fg="red",
        )
