"""Command-line entry points of the data stage: ``build-manifest`` and ``make-demo-cohort``.

Parsing and printing only; the work is in :mod:`pipeline.hecktor` and
:mod:`pipeline.demo_cohort`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from pipeline.demo_cohort import DEFAULT_ROOT, generate_demo_cohort, oracle_c_index
from pipeline.hecktor import (
    HecktorFormatError,
    build_manifest as _build_manifest,
    default_error_report,
    summarize_manifest,
)


def _summary(manifest, path: Path) -> str:
    s = summarize_manifest(manifest)
    return (f"{s['cases']} cases ({s['with_endpoint']} with endpoint), {s['events']} events, "
            f"{s['centres']} centres -> {path}")


@click.command(name="build-manifest")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data_manifest.csv"), show_default=True,
              help="Manifest CSV to write; image paths in it are relative to its folder. "
                   "A provenance record <stem>.json is written beside it.")
@click.option("--no-checksums", is_flag=True,
              help="Skip the SHA-256 of every image (faster; sha256 columns stay empty).")
@click.option("--continue-on-error", is_flag=True,
              help="Leave bad cases out and list them in an error report instead of failing.")
@click.option("--error-report", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Error report CSV (case_id,file,error) for --continue-on-error "
                   "[default: <out stem>.errors.csv].")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads reading images in parallel.")
def build_manifest(root: Path, out: Path, no_checksums: bool, continue_on_error: bool,
                   error_report: Path | None, workers: int) -> None:
    """Validate a HECKTOR 2022 training ROOT (imagesTr/, labelsTr/, the clinical and
    endpoint CSVs) and write the case manifest. On any problem nothing is written and the
    command exits with status 1, unless --continue-on-error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        manifest = _build_manifest(root, out, checksums=not no_checksums,
                                   continue_on_error=continue_on_error,
                                   error_report=error_report, workers=workers)
    except (HecktorFormatError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(_summary(manifest, out))
    if continue_on_error:
        report = error_report or default_error_report(out)
        click.echo(f"error report -> {report}")


@click.command(name="make-demo-cohort")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_ROOT, show_default=True,
              help="Folder to write the synthetic cohort to (HECKTOR 2022 layout).")
@click.option("--n-cases", type=click.IntRange(min=2), default=100, show_default=True,
              help="Number of cases.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Master seed; the same seed and size give byte-identical files.")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("data_manifest.csv"), show_default=True,
              help="Manifest CSV built from the new cohort (plus its <stem>.json record).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Processes rendering cases (and threads reading them back).")
@click.option("--spacing-scale", type=click.FloatRange(min=0.25, max=8.0), default=1.0,
              show_default=True,
              help="Multiply every voxel spacing (2 = coarser, 8x fewer voxels; for quick tries).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing demo cohort at --out.")
def make_demo_cohort(out: Path, n_cases: int, seed: int, manifest: Path, workers: int,
                     spacing_scale: float, overwrite: bool) -> None:
    """Generate the synthetic HECKTOR-format PET/CT cohort, then build its manifest."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        root = generate_demo_cohort(out, n_cases=n_cases, seed=seed, workers=workers,
                                    spacing_scale=spacing_scale, overwrite=overwrite)
        table = _build_manifest(root, manifest, workers=workers)
    except (HecktorFormatError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{_summary(table, manifest)} (cohort {out}, oracle C-index "
               f"{oracle_c_index(root):.3f})")
