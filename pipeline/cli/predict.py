"""``predict-survival``: score new patients with a trained configuration's fold ensemble."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from pipeline.artefacts import ProvenanceError, missing_path_message
from pipeline.cli.options import encoder_weights_options
from pipeline.embedding_sets import weights_by_encoder
from pipeline.embeddings import RandomInitWarning


def _must_exist(what: str, pattern: str):
    """Option callback: an absent path is refused naming what exists nearby (not click's bare
    "does not exist"), as the library does for the other commands."""

    def check(ctx, param, value):
        if value is not None and not Path(value).exists():
            raise click.BadParameter(missing_path_message(value, what, pattern))
        return value

    return check


#: Where ``make demo`` (``run-study --demo``) leaves its trained configurations.
DEMO_RUNS = Path("runs/demo_study/runs")


def _run_exists(ctx, param, value):
    """An absent run folder is refused naming where models are: what exists nearby, and where
    ``make demo`` and ``train-survival`` leave them."""
    if value is None or Path(value).is_dir():
        return value
    message = missing_path_message(value, "run folder", "*/run.json")
    made = sorted(p.parent.name for p in DEMO_RUNS.glob("*/run.json"))
    hint = (
        f"; `make demo` leaves its models in {DEMO_RUNS}/<config>"
        + (f" (here: {', '.join(made)}), e.g. --run {DEMO_RUNS / Path(value).name}" if made else "")
        + "; train-survival writes runs/<config>"
    )
    raise click.BadParameter(message + hint)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.option(
    "--manifest",
    required=True,
    type=click.Path(dir_okay=False),
    callback=_must_exist("manifest", "*.csv"),
    help="Manifest of the new cases (`build-manifest`); endpoints are not needed.",
)
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    callback=_run_exists,
    help="A finished run folder (its folds form the ensemble): runs/<config> from train-survival, "
    "or <study>/runs/<config> from run-study; `make demo` leaves runs/demo_study/runs/<config>.",
)
@click.option(
    "--train-cache",
    required=True,
    type=click.Path(file_okay=False),
    callback=_must_exist("preprocessed cache", "*/cohort.json"),
    help="The preprocessed cache the run was trained on: its crop size G and parameters are reused.",
)
@click.option(
    "--out",
    "out_csv",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output CSV, per patient: log_relative_hazard (+ SD over folds), percentile_among_training, "
    "risk_group and its rule, relapse_probability_1y_percent, covariates_filled, "
    "out_of_distribution (+ reasons), random_init_embeddings, tumour_cut_at_border, picture "
    "(+ .json provenance beside it; pictures and index.html in <stem>_pictures/).",
)
@click.option(
    "--work-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Folder for the new cases' preprocessed cache and embeddings [default: beside --out].",
)
@click.option(
    "--protocol",
    type=click.Choice(["inner", "paper"]),
    default="inner",
    help="Checkpoint per fold: selected on the inner split (unbiased) or on the outer fold (paper).",
)
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(dir_okay=False),
    callback=_must_exist("embedding file", "*.h5"),
    help="Precomputed embeddings of the new cases; checked against the run's encoders and weights.",
)
@encoder_weights_options(
    lambda entry: f"{entry.label} weights; their sha256 must equal the training run's.", must_exist=True
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="auto = CUDA when present.")
@click.option("--workers", default=2, type=int, help="Preprocessing processes.")
@click.option("--no-pictures", is_flag=True, help="No PNG per patient (they take a second or two each).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict_survival(
    manifest,
    run_dir,
    train_cache,
    out_csv,
    work_dir,
    protocol,
    embeddings,
    device,
    workers,
    no_pictures,
    quiet,
    **weights_options,
):
    """Per-patient log relative hazard, risk group (with its rule), probability of relapse within
    one year (percent), what to be careful about, and a picture, for new cases.

    New cases are cropped with the training cohort's G, embedded with the run's encoders,
    and scored by every finished fold; inputs whose preprocessing or weights differ from the
    trained model's are refused. Per patient the console and the CSV say which covariates were
    filled and with what, and whether the patient lies outside the training patients' range
    (tumour volume, SUVmax, covariates). Runs on random-init embeddings (the demo) are flagged
    in every row and in the provenance record.

    \b
    Example:
      predict-survival --manifest data/new_patients.csv --run runs/demo_study/runs/ctpet-d256 \\
                       --train-cache cache/preprocessed --out predictions/new_patients.csv
    """
    from pipeline.predict import predict_patients  # local: torch and the network; --help stays fast

    # Embedding, checking and loading would each repeat the random-init warning: said once below.
    warnings.simplefilter("ignore", RandomInitWarning)
    try:
        out = predict_patients(
            manifest,
            run_dir,
            train_cache,
            out_csv,
            work_dir=work_dir,
            protocol=protocol,
            embeddings=embeddings,
            weights=weights_by_encoder(weights_options),
            device=device,
            workers=workers,
            progress=not quiet,
            pictures=not no_pictures,
        )
    except (ValueError, KeyError, FileNotFoundError, ProvenanceError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    if out["random_init_embeddings"].any():
        click.secho(
            "WARNING: the run's embeddings come from RANDOMLY INITIALISED encoders, not the "
            "foundation models: these predictions only test the pipeline.",
            fg="red",
            err=True,
        )
    counts = out["risk_group"].value_counts().to_dict()
    for row in out.itertuples(index=False):
        click.echo(
            f"{row.case_id}: log relative hazard {row.log_relative_hazard:+.2f} (above "
            f"{row.percentile_among_training:.0f} % of the training patients), {row.risk_group} risk group, "
            f"relapse within 1 year {row.relapse_probability_1y_percent:.1f} %"
        )
        if row.covariates_filled:
            click.echo(f"  covariates filled: {row.covariates_filled}")
        if row.out_of_distribution:
            click.secho(f"  OUTSIDE THE TRAINING DATA: {row.out_of_distribution_reasons}", fg="red")
    click.echo(f"risk group: {out['risk_group_rule'].iloc[0]}")
    click.echo(
        f"{len(out)} patients scored by {int(out['n_folds'].iloc[0])} folds "
        f"({counts.get('high', 0)} high risk, {counts.get('low', 0)} low); predictions: {out_csv}"
    )
    if out["picture"].astype(bool).any():
        from pipeline.predict import picture_dir

        click.echo(f"pictures: {picture_dir(out_csv) / 'index.html'}")
    cut = out.loc[out["tumour_cut_at_border"], "case_id"].tolist()
    if cut:
        click.secho(
            f"WARNING: {len(cut)} patient(s) with the tumour cut at the crop border (larger than the "
            f"training crop G; column tumour_cut_at_border): {cut}",
            fg="red",
            err=True,
        )
