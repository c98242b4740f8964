"""``train-survival``: stage two, DeepMTS+DAFT with optional cached FM embeddings, 5-fold CV."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

PROJ_CHOICES = ("64", "128", "256", "orig")


def parse_proj(value: str | None) -> int | None:
    if value is None or value == "orig":
        return None
    return int(value)


def default_run_name(embeddings: str | None, modalities: tuple[str, ...] | None, proj: int | None) -> str:
    if embeddings is None:
        return "baseline"
    mods = "+".join(modalities) if modalities else Path(embeddings).stem
    return f"{mods}-d{proj if proj is not None else 'orig'}"


# Option name -> TrainConfig field, for the scalar options that map one to one.
_SCALARS = {
    "epochs": int, "steps_per_epoch": int, "batch_size": int, "eval_batch_size": int,
    "lr": float, "warmup_epochs": int, "lr_step_epochs": int, "lr_gamma": float,
    "ema_decay": float, "wd_classifier": float, "wd_densenet": float, "patience": int,
    "cox_weight": float, "seed": int, "inner_val_fraction": float,
}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--manifest", default="data_manifest.csv", type=click.Path(dir_okay=False),
              help="Case manifest (cases with an endpoint are used).")
@click.option("--cache", "cache_root", default="cache/preprocessed", type=click.Path(file_okay=False),
              help="Preprocessed cache written by `preprocess`.")
@click.option("--embeddings", default=None, type=click.Path(dir_okay=False),
              help="Stage-one HDF5 (e.g. embeddings/ctpet.h5). Omit for the DeepMTS+DAFT baseline.")
@click.option("--modalities", default=None,
              help="Comma list of embedding modalities to use from the file (default: all in it), e.g. 'ct' or 'ct,pet'.")
@click.option("--proj", type=click.Choice(PROJ_CHOICES), default="orig",
              help="Linear projection size of each FM embedding, or 'orig' for the native size (512 CT, 768 PET).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder [default: runs/<baseline | modalities-d<proj>>]. An existing run with the same settings resumes.")
@click.option("--folds", "folds_path", default="runs/folds.json", type=click.Path(dir_okay=False),
              help="Shared CV folds: created once (stratified by event x RFS quartile), then reused by every configuration.")
@click.option("--n-folds", default=5, type=int, help="Number of CV folds when the folds file is created.")
@click.option("--fold", "only_folds", multiple=True, type=int,
              help="Train only this fold (repeatable); default all. Used by the study runner and cluster jobs.")
@click.option("--config", "config_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSON file of training options (TrainConfig fields); command-line options override it.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs [paper: 100].")
@click.option("--steps-per-epoch", type=int, default=None, help="Steps per epoch [paper: 50].")
@click.option("--batch-size", type=int, default=None, help="Training batch, half events [paper: 8].")
@click.option("--eval-batch-size", type=int, default=None, help="Validation batch [paper: 16].")
@click.option("--lr", type=float, default=None, help="Adam learning rate [paper: 1e-3].")
@click.option("--warmup-epochs", type=int, default=None, help="Linear warm-up epochs [paper: 5].")
@click.option("--lr-step-epochs", type=int, default=None, help="Decay the learning rate every N epochs [paper: 25].")
@click.option("--lr-gamma", type=float, default=None, help="Step-decay factor [paper: 0.3].")
@click.option("--ema-decay", type=float, default=None, help="EMA decay of weights used for evaluation [paper: 0.999].")
@click.option("--wd-classifier", type=float, default=None, help="Weight decay of the risk head [paper: 0.1].")
@click.option("--wd-densenet", type=float, default=None, help="Weight decay of the survival DenseNet [paper: 1e-4].")
@click.option("--patience", type=int, default=None, help="Early-stopping patience on validation C-index [paper: 40].")
@click.option("--cox-weight", type=float, default=None, help="L = L_dice + w * L_cox [paper: 2].")
@click.option("--seed", type=int, default=None, help="Seed [paper: 42].")
@click.option("--inner-val-fraction", type=float, default=None,
              help="Share of each training fold held out for unbiased model selection [0.2]; 0 = paper protocol only.")
@click.option("--tumour-input", type=click.Choice(["gate", "binary", "soft"]), default=None,
              help="Tumour map into the survival net: 'gate' (seed paper: images x thresholded map), "
                   "'binary' (thresholded map as a channel) or 'soft' (DeepMTS: probability as a channel).")
@click.option("--model-config", default=None,
              help='JSON of DeepMTSConfig overrides, e.g. \'{"preset": "demo"}\' (the narrow demo network) or \'{"seg_filters": [4, 8, 16, 32, 64]}\'.')
@click.option("--no-fm-standardise", is_flag=True, default=False,
              help="Do not z-score FM embeddings with training-fold statistics before projection.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="auto = CUDA when present, else CPU.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_survival(manifest, cache_root, embeddings, modalities, proj, out, folds_path, n_folds,
                   only_folds, config_file, model_config, no_fm_standardise, device, quiet, tumour_input, **scalars):
    """Train DeepMTS+DAFT by stratified K-fold CV, optionally with cached FM embeddings.

    Without --embeddings this trains the baseline; `--embeddings embeddings/ctpet.h5
    --proj 256` trains the paper's best configuration. Reports Harrell's C-index and the
    1-year time-dependent AUROC per fold, mean +- SD, under two model-selection protocols:
    the paper's (optimistic) and an unbiased inner-split one.
    """
    from pipeline.artefacts import ProvenanceError
    from pipeline.cache import PreprocessedCache
    from pipeline.dataset import load_cohort
    from pipeline.train import TrainConfig, format_summary, get_folds, train_survival as run

    try:
        options = json.loads(Path(config_file).read_text()) if config_file else {}
        for name, value in scalars.items():
            if value is not None:
                options[name] = _SCALARS[name](value)
        if model_config:
            options["model"] = json.loads(model_config)
        if tumour_input:
            options["tumour_input"] = tumour_input
        if device:
            options["device"] = device
        if no_fm_standardise:
            options["fm_standardise"] = False
        options["proj"] = parse_proj(proj)
        cfg = TrainConfig.from_dict(options)
        mods = tuple(m.strip() for m in modalities.split(",")) if modalities else None
        run_dir = Path(out) if out else Path("runs") / default_run_name(embeddings, mods, cfg.proj)

        cohort = load_cohort(manifest, cache_root, embeddings, mods)
        if cohort.embedding_attrs.get("random_init"):
            click.secho("WARNING: these embeddings come from RANDOMLY INITIALISED encoders, not the "
                        "foundation models; results say nothing about the FMs.", fg="red", err=True)
        folds = get_folds(folds_path, cohort, n_folds=n_folds, seed=cfg.seed)
        click.echo(f"{len(cohort)} cases, {int(cohort.event.sum())} events, "
                   f"embeddings: {', '.join(f'{k} [{v.shape[1]}]' for k, v in cohort.embeddings.items()) or 'none'}, "
                   f"proj: {proj}; run folder {run_dir}")
        summary = run(cohort, cfg, run_dir, folds,
                      cache_params_hash=PreprocessedCache(cache_root).params_hash,
                      only_folds=list(only_folds) or None, progress=not quiet)
    except (ValueError, KeyError, FileNotFoundError, ProvenanceError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    click.echo(format_summary(summary))
    click.echo(f"results: {run_dir / 'summary.json'}")
