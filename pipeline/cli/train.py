"""``train-survival``: stage two, DeepMTS+DAFT with optional cached FM embeddings, 5-fold CV."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from pipeline.artefacts import ProvenanceError, read_json
from pipeline.cache import PreprocessedCache
from pipeline.cli.options import train_scalar_options, train_scalars
from pipeline.clinical import ClinicalTransform
from pipeline.demo import DEMO_SURVIVAL_SIZE_XYZ, demo_train_options
from pipeline.embedding_sets import set_of_encoders
from pipeline.embeddings import RandomInitWarning
from pipeline.layout import RunLayout
from pipeline.manifest import read_manifest, survival_cases
from pipeline.study_spec import parse_proj_label

PROJ_CHOICES = ("64", "128", "256", "orig")
PRESETS = ("auto", "paper", "demo")
_DEMO_SIZE = " x ".join(map(str, DEMO_SURVIVAL_SIZE_XYZ))  # (x, y, z)


def default_run_name(datasets: list[str] | tuple[str, ...], proj: int | None) -> str:
    """Run folder name, the study's configuration names: ``baseline``, ``ct-d64`` ... ``ctpet-dorig``.

    Args:
        datasets: the embedding datasets the run reads (empty for the baseline); named by
            the embedding set that reads those encoders (:mod:`pipeline.embedding_sets`),
            other combinations (an imported table) joined with ``+``.
        proj: projection size, None for the native size ("orig").
    """
    if not datasets:
        return "baseline"
    names = sorted(datasets)
    try:
        key = set_of_encoders(names)
    except ValueError:
        key = "+".join(names)
    return f"{key}-d{proj if proj is not None else 'orig'}"


def resolve_preset(preset: str, survival_size_xyz: tuple[int, ...]) -> tuple[str, str]:
    """The preset to apply and why, for ``--preset auto|paper|demo``.

    Args:
        preset: the option's value.
        survival_size_xyz: the cache's survival input size (x, y, z).

    Returns:
        (``"paper"`` or ``"demo"``, a one-line reason).
    """
    size = " x ".join(str(s) for s in survival_size_xyz)
    if preset != "auto":
        return preset, f"--preset {preset}"
    if tuple(survival_size_xyz) == tuple(DEMO_SURVIVAL_SIZE_XYZ):
        return (
            "demo",
            f"--preset auto: the cache holds the demo's {size} volumes; --preset paper for the paper's settings",
        )
    return "paper", f"--preset auto: the cache holds {size} volumes, not the demo's"


def _json_option(value: str | None, option: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}): {value!r}", param_hint=option) from None


def training_options(
    preset: str,
    config_file: str | None,
    scalars: dict[str, Any],
    model: dict | None,
    tumour_input: str | None,
    device: str | None,
    no_fm_standardise: bool,
    proj: str,
) -> tuple[dict[str, Any], list[str]]:
    """TrainConfig options: the preset's, then the --config file's, then explicit options.

    Returns:
        The options and notes on preset values adapted to explicit ones (to print).
    """
    options = demo_train_options() if preset == "demo" else {}
    explicit = json.loads(Path(config_file).read_text()) if config_file else {}
    explicit.update(train_scalars(scalars))
    options.update(explicit)
    notes = []
    # The preset's first selectable epoch must not outlast a shorter explicit --epochs.
    first = options.get("select_from_epoch", 0)
    if "epochs" in explicit and "select_from_epoch" not in explicit and first >= explicit["epochs"] >= 1:
        options["select_from_epoch"] = explicit["epochs"] - 1
        notes.append(
            f"the {preset} preset's select_from_epoch {first} lowered to {explicit['epochs'] - 1} "
            f"for --epochs {explicit['epochs']} (--select-from-epoch sets it)"
        )
    if model is not None:
        options["model"] = model
    if tumour_input:
        options["tumour_input"] = tumour_input
    if device:
        options["device"] = device
    if no_fm_standardise:
        options["fm_standardise"] = False
    options["proj"] = None if proj is None else parse_proj_label(proj)
    return options, notes


def check_network_fits(cohort, cfg, preset: str, cache_root: str, size_xyz: tuple[int, ...]) -> None:
    """Build the network once, before any file is written, so a misfit fails early.

    Raises:
        ValueError: the network does not fit the cached volumes; names the options that fix it.
    """
    from pipeline.train import build_model  # local: torch, imported when training, not for --help

    try:
        build_model(cohort, ClinicalTransform().n_features, cfg)
    except ValueError as exc:
        size = " x ".join(str(s) for s in size_xyz)
        demo = _DEMO_SIZE
        if preset == "paper" and tuple(size_xyz) == tuple(DEMO_SURVIVAL_SIZE_XYZ):
            fix = "these are the demo's volumes: use --preset demo (or --preset auto)"
        else:
            fix = (
                f"use --preset demo (a 4-level network for the demo's {demo}), another network with "
                "--model-config, or re-run `preprocess` with --survival-size 80,80,48 (the paper's)"
            )
        raise ValueError(
            f"the {preset} network does not fit the volumes of {cache_root} ({size}, x, y, z): {exc}; {fix}"
        ) from None


def cache_survival_size(cache_root: str, manifest: str) -> tuple[int, ...]:
    """The cache's survival input size (x, y, z), or an error naming the command that makes it."""
    try:
        return tuple(int(s) for s in PreprocessedCache(cache_root).params["survival_size_xyz"])
    except FileNotFoundError as exc:
        if not Path(cache_root).exists():
            raise  # a mistyped path: the message lists the caches nearby
        raise FileNotFoundError(
            f"{exc}. Make it with `preprocess --manifest {manifest} --out {cache_root}` (add --demo for "
            "the demo's sizes), or `run-study --demo` for the whole demo"
        ) from None


def undefined_metric_lines(run_dir: Path) -> list[str]:
    """One line per finished fold, protocol and metric (C-index, 1-year AUROC) that is
    undefined, with the reason in words."""
    from pipeline.metrics import reason_text  # local: loads scikit-survival; --help stays fast

    layout = RunLayout(run_dir)
    lines = []
    for k in layout.finished_folds():
        record = read_json(layout.done(k))
        for proto, res in record["protocols"].items():
            for key, label in (("c_index", "C-index"), ("auc_1y", "1-year AUROC")):
                value = res.get(key)
                if value is None or value != value:  # None, or NaN in runs before the reason was kept
                    reason = res.get(f"{key}_undefined_reason")
                    words = reason_text(reason) if reason else "no reason recorded"
                    lines.append(f"  {label} undefined in fold {record['fold']} ({proto}): {words}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.option(
    "--manifest",
    default="data_manifest.csv",
    type=click.Path(dir_okay=False),
    help="Case manifest (cases with an endpoint are used).",
)
@click.option(
    "--cache",
    "cache_root",
    default="cache/preprocessed",
    type=click.Path(file_okay=False),
    help="Preprocessed cache written by `preprocess`.",
)
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(dir_okay=False),
    help="Stage-one HDF5 (e.g. embeddings/ctpet.h5). Omit for the DeepMTS+DAFT baseline.",
)
@click.option(
    "--modalities",
    "datasets",
    default=None,
    help="Comma list of the file's embedding datasets to use (default: all in it): encoders, e.g. "
    "'ct' or 'ct,pet', or an imported table's name.",
)
@click.option(
    "--proj",
    type=click.Choice(PROJ_CHOICES),
    default="orig",
    help="Linear projection size of each FM embedding, or 'orig' for the native size (512 CT, 768 PET).",
)
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default="auto",
    help="Network and schedule: 'paper' (the TrainConfig defaults), 'demo' (the demo's narrow "
    "network and short schedule, pipeline/demo.py) or 'auto' (demo when the cache holds the "
    f"demo's {_DEMO_SIZE} volumes, else paper). Explicit options override "
    "the preset.",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Run folder [default: runs/<baseline | ct | pet | ctpet>-d<proj>, the study's configuration "
    "names]. An existing run with the same settings resumes.",
)
@click.option(
    "--folds",
    "folds_path",
    default="runs/folds.json",
    type=click.Path(dir_okay=False),
    help="Shared CV folds: created once (stratified by event x RFS quartile), then reused by every configuration.",
)
@click.option("--n-folds", default=5, type=int, help="Number of CV folds when the folds file is created.")
@click.option(
    "--fold",
    "only_folds",
    multiple=True,
    type=int,
    help="Train only this fold (repeatable); default all. Used by the study runner and cluster jobs.",
)
@click.option(
    "--config",
    "config_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="JSON file of training options (TrainConfig fields); command-line options override it.",
)
@train_scalar_options()
@click.option(
    "--tumour-input",
    type=click.Choice(["gate", "binary", "soft"]),
    default=None,
    help="Tumour map into the survival net: 'gate' (seed paper: images x thresholded map), "
    "'binary' (thresholded map as a channel) or 'soft' (DeepMTS: probability as a channel).",
)
@click.option(
    "--model-config",
    default=None,
    help='JSON of DeepMTSConfig overrides, replacing the preset\'s network, e.g. \'{"preset": "demo"}\' '
    "(the narrow demo network) or '{\"seg_filters\": [4, 8, 16, 32, 64]}'.",
)
@click.option(
    "--no-fm-standardise",
    is_flag=True,
    default=False,
    help="Do not z-score FM embeddings with training-fold statistics before projection.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="auto = CUDA when present, else CPU."
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=1),
    help="Folds trained at once, each in its own process on --threads threads; the numbers do "
    "not depend on it. [default: as many as the CPUs this process may use hold, up to the "
    "folds left; 1 on a GPU]",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train_survival(
    manifest,
    cache_root,
    embeddings,
    datasets,
    proj,
    preset,
    out,
    folds_path,
    n_folds,
    only_folds,
    config_file,
    model_config,
    no_fm_standardise,
    device,
    workers,
    quiet,
    tumour_input,
    **scalars,
):
    """Train DeepMTS+DAFT by stratified K-fold CV, optionally with cached FM embeddings.

    Without --embeddings this trains the baseline; `--embeddings embeddings/ctpet.h5
    --proj 256` trains the paper's best configuration. Reports Harrell's C-index and the
    1-year time-dependent AUROC per fold, mean +- SD, under two model-selection protocols:
    the paper's (optimistic) and an unbiased inner-split one. The network and schedule are
    the paper's, or the demo's on a cache made with the demo's sizes (--preset).

    \b
    Examples:
      train-survival                                                # baseline
      train-survival --embeddings embeddings/ctpet.h5 --proj 256    # the paper's best configuration
      train-survival --embeddings embeddings/ctpet.h5 --modalities pet --proj 128 --fold 0 --epochs 2
    """
    # local: torch and the network, imported when training, so --help stays quick
    from pipeline.dataset import load_cohort
    from pipeline.splits import get_folds
    from pipeline.train import TrainConfig, format_summary
    from pipeline.train import train_survival as run

    # Loading the embeddings would repeat the random-init warning: said once below.
    warnings.simplefilter("ignore", RandomInitWarning)

    model = _json_option(model_config, "--model-config")
    try:
        survival_cases(read_manifest(manifest))  # a manifest without endpoints: refused before any work
        size_xyz = cache_survival_size(cache_root, manifest)
        preset, why = resolve_preset(preset, size_xyz)
        options, notes = training_options(
            preset, config_file, scalars, model, tumour_input, device, no_fm_standardise, proj
        )
        cfg = TrainConfig.from_dict(options)
        click.echo(f"preset: {preset} ({why})")
        for note in notes:
            click.echo(f"note: {note}")
        names = tuple(d.strip() for d in datasets.split(",") if d.strip()) if datasets else None
        cohort = load_cohort(manifest, cache_root, embeddings, names)
        check_network_fits(cohort, cfg, preset, cache_root, size_xyz)
        run_dir = Path(out) if out else Path("runs") / default_run_name(list(cohort.embeddings), cfg.proj)
        if cohort.embedding_attrs.get("random_init"):
            click.secho(
                "WARNING: these embeddings come from RANDOMLY INITIALISED encoders, not the "
                "foundation models; results say nothing about the FMs.",
                fg="red",
                err=True,
            )
        folds = get_folds(folds_path, cohort, n_folds=n_folds, seed=cfg.seed)
        click.echo(
            f"{len(cohort)} cases, {int(cohort.event.sum())} events, "
            f"embeddings: {', '.join(f'{k} [{v.shape[1]}]' for k, v in cohort.embeddings.items()) or 'none'}, "
            f"proj: {proj}; run folder {run_dir}"
        )
        summary = run(
            cohort,
            cfg,
            run_dir,
            folds,
            cache_params_hash=PreprocessedCache(cache_root).params_hash,
            only_folds=list(only_folds) or None,
            progress=not quiet,
            workers=workers,
        )
    except (ValueError, KeyError, FileNotFoundError, ProvenanceError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        click.secho(f"error: {msg}", fg="red", err=True)
        sys.exit(1)
    click.echo(format_summary(summary))
    for line in undefined_metric_lines(run_dir):
        click.echo(line)
    click.echo(f"results: {RunLayout(run_dir).summary}")
