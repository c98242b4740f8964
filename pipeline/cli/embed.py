"""``extract-embeddings``: stage one, frozen foundation-model embeddings per cached case."""

from __future__ import annotations

import json
import sys
import warnings

import click

from pipeline.artefacts import ProvenanceError
from pipeline.cli.options import encoder_weights_options, weights_lookup_help
from pipeline.embedding_sets import set_help, set_names, weights_by_encoder
from pipeline.embeddings import RandomInitWarning
from pipeline.extraction import ExtractionLockedError, run_extraction


def _parse_encoder_config(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        cfg = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}): {value!r}") from exc
    if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
        raise click.BadParameter(f'expected an object such as {{"ct": {{"init_filters": 4}}}}, got {value!r}')
    return cfg


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\nExamples:\n"
    "  extract-embeddings --modality ctpet --ct-weights model.safetensors --pet-weights seganypet_v1.pth"
    "  # needs the FM weights\n"
    "  extract-embeddings --modality pet --random-init   # no weights: tests the pipeline as the demo does",
)
@click.option(
    "--modality",
    "embedding_set",
    type=click.Choice(list(set_names())),
    required=True,
    help=f"Which embedding set (encoders): {set_help()} "
    "(reuses embeddings already computed by runs of the same encoders with the same provenance).",
)
@click.option(
    "--cache",
    "cache_root",
    default="cache/preprocessed",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Complete preprocessed cache written by `preprocess` (or `run-study --demo`).",
)
@click.option(
    "--out",
    "out_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="Output HDF5 file [default: embeddings/<set>.h5].",
)
@encoder_weights_options(weights_lookup_help)
@click.option(
    "--random-init",
    is_flag=True,
    help="Demo only: randomly initialised encoders instead of weights. Recorded in the "
    "file (weights_sha256 = random-init) and warned about on every read.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --random-init.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="auto = CUDA with bf16 autocast when present, else CPU in fp32.",
)
@click.option(
    "--batch-size",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Cases per forward pass; halved automatically on CUDA out-of-memory.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="CPU threads of the encoders on CPU [default: the CPUs this process may use, "
    "whatever OMP_NUM_THREADS says]. Recorded with the device in the file's "
    "provenance: on some CPUs the count moves the last bits, so a rerun with another "
    "count is refused, not mixed.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing output made with other weights or preprocessing "
    "(without it such a run is refused; rows are never mixed).",
)
@click.option(
    "--shard-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Per-case shard store used for resume and reuse [default: <out folder>/.shards].",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--encoder-config",
    default=None,
    callback=_parse_encoder_config,
    help="Advanced, for tests and small demos: JSON of encoder constructor overrides "
    'per encoder, e.g. \'{"ct": {"init_filters": 4}}\'. Recorded in the file; '
    "leave unset for the published architectures. The PET-FM img_size (and a "
    "window that fits it) always come from the cache's PET-FM input size.",
)
def extract_embeddings(
    cache_root,
    embedding_set,
    out_path,
    random_init,
    seed,
    device,
    batch_size,
    threads,
    overwrite,
    shard_dir,
    no_progress,
    encoder_config,
    **weights_options,
):
    """Compute frozen CT-FM / PET-FM embeddings of every preprocessed case into one HDF5.

    Safe to kill and rerun: finished cases are kept as per-case shards and never recomputed,
    and the HDF5 appears only when complete. A rerun on a complete file does nothing.
    """
    # One plain line instead of the library's per-encoder RandomInitWarning.
    warnings.simplefilter("ignore", RandomInitWarning)
    if random_init:
        click.secho(
            "WARNING: --random-init: randomly initialised encoders (recorded in the file); fine "
            "to test the pipeline, meaningless for results",
            err=True,
            fg="red",
        )
    try:
        result = run_extraction(
            cache_root,
            embedding_set,
            out_path,
            weights=weights_by_encoder(weights_options),
            random_init=random_init,
            seed=seed,
            device=device,
            batch_size=batch_size,
            encoder_kwargs=encoder_config,
            progress=not no_progress,
            overwrite=overwrite,
            shard_dir=shard_dir,
            threads=threads,
        )
    except (ProvenanceError, ValueError, KeyError, FileNotFoundError, ExtractionLockedError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        click.secho(f"error: {msg}", err=True, fg="red")
        sys.exit(1)
    click.echo(result.summary())


if __name__ == "__main__":  # python -m pipeline.cli.embed
    extract_embeddings()
