"""Command-line entry points of the data stage: ``build-manifest`` and ``make-demo-cohort``.

Parsing and printing only; the work is in :mod:`pipeline.hecktor` and
:mod:`pipeline.demo_cohort`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import click

from pipeline.cli.options import PARTIAL_EXIT, continue_on_error_option, min_tumour_coverage_option, refused_table
from pipeline.demo_cohort import DEFAULT_ROOT, generate_demo_cohort, oracle_c_index
from pipeline.hecktor import (
    HecktorFormatError,
    check_manifest_absent,
    default_error_report,
    manifest_sidecar_path,
    summarize_manifest,
)
from pipeline.hecktor import (
    build_manifest as _build_manifest,
)

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _summary(manifest, path: Path) -> str:
    s = summarize_manifest(manifest)
    return (
        f"{s['cases']} cases ({s['with_endpoint']} with endpoint), {s['events']} events, "
        f"{s['centres']} centres -> {path}"
    )


def _fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


def _refuse_existing(path: Path, option: str) -> None:
    """Refuse an existing manifest before any work, naming the options that fix it."""
    try:
        check_manifest_absent(path)
    except FileExistsError:
        which = path if path.exists() else manifest_sidecar_path(path)
        _fail(f"{which} exists; pass --overwrite to replace it, or write the manifest elsewhere with {option}")


@click.command(name="build-manifest", context_settings=_CONTEXT)
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("data_manifest.csv"),
    show_default=True,
    help="Manifest CSV to write; image paths in it are relative to its folder. "
    "A provenance record <stem>.json is written beside it.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing manifest at --out (and its <stem>.json); without it "
    "an existing one, such as the committed demo manifest, is left alone.",
)
@click.option(
    "--no-checksums", is_flag=True, help="Skip the SHA-256 of every image (faster; sha256 columns stay empty)."
)
@continue_on_error_option("case")
@click.option(
    "--error-report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Error report CSV (case_id,file,error) of the cases --continue-on-error left out "
    "[default: <out stem>.errors.csv].",
)
@min_tumour_coverage_option
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Threads reading images in parallel."
)
def build_manifest(
    root: Path,
    out: Path,
    overwrite: bool,
    no_checksums: bool,
    continue_on_error: bool,
    error_report: Path | None,
    min_tumour_coverage: float,
    workers: int,
) -> None:
    """Validate a HECKTOR 2022 training ROOT (imagesTr/, labelsTr/, the clinical and
    endpoint CSVs) and write the case manifest. On any problem nothing is written and the
    command exits with status 1, unless --continue-on-error (then exit status 3 when cases
    were left out)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if not overwrite:
        _refuse_existing(out, "--out")
    try:
        manifest = _build_manifest(
            root,
            out,
            checksums=not no_checksums,
            continue_on_error=continue_on_error,
            error_report=error_report,
            workers=workers,
            min_tumour_coverage=min_tumour_coverage,
            overwrite=True,
        )
    except (HecktorFormatError, ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(_summary(manifest, out))
    if continue_on_error:
        report = error_report or default_error_report(out)
        click.echo(f"error report -> {report}")
        refused = _refused_cases(report)
        if refused:
            click.echo(refused_table(refused, "case"), err=True)
            sys.exit(PARTIAL_EXIT)


def _refused_cases(report: Path) -> list[tuple[str, str]]:
    """(case, reason) rows of a build-manifest error report; none when it is absent or empty."""
    import csv

    if not Path(report).is_file():
        return []
    with open(report, newline="") as f:
        return [
            (row.get("case_id", ""), f"{row.get('file', '')}: {row.get('error', '')}".strip(": "))
            for row in csv.DictReader(f)
        ]


@click.command(name="make-demo-cohort", context_settings=_CONTEXT)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_ROOT,
    show_default=True,
    help="Folder to write the synthetic cohort to (HECKTOR 2022 layout; DICOM with "
    "--format dicom, which needs a folder of its own).",
)
@click.option("--n-cases", type=click.IntRange(min=2), default=100, show_default=True, help="Number of cases.")
@click.option(
    "--seed",
    type=int,
    default=42,
    show_default=True,
    help="Master seed; the same seed and size give byte-identical files.",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("data_manifest.csv"),
    show_default=True,
    help="Manifest CSV built from the new cohort (plus its <stem>.json record).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Processes rendering cases (and threads reading them back).",
)
@click.option(
    "--spacing-scale",
    type=click.FloatRange(min=0.25, max=8.0),
    default=1.0,
    show_default=True,
    help="Multiply every voxel spacing (2 = coarser, 8x fewer voxels; for quick tries).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing demo cohort at --out and manifest at --manifest.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["nifti", "dicom"]),
    default="nifti",
    show_default=True,
    help="nifti: the HECKTOR 2022 layout and its manifest. dicom: the same cohort as a scanner "
    "and planning system export it (CT, PET in Bq/ml, RTSTRUCT per patient, plus clinical.csv "
    "and endpoint.csv) for import-dicom; no manifest is built.",
)
def make_demo_cohort(
    out: Path, n_cases: int, seed: int, manifest: Path, workers: int, spacing_scale: float, overwrite: bool, fmt: str
) -> None:
    """Generate the synthetic HECKTOR-format PET/CT cohort, then build its manifest.

    The committed data_manifest.csv already describes the default cohort: `run-study --demo`
    regenerates its files from it, so this command is only needed for another cohort."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if fmt == "dicom":
        _demo_dicom(out, overwrite, n_cases=n_cases, seed=seed, workers=workers, spacing_scale=spacing_scale)
        return
    if not overwrite:
        _refuse_existing(manifest, "--manifest")
    try:
        root = generate_demo_cohort(
            out, n_cases=n_cases, seed=seed, workers=workers, spacing_scale=spacing_scale, overwrite=overwrite
        )
        table = _build_manifest(root, manifest, workers=workers, overwrite=True)
    except (HecktorFormatError, ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(f"{_summary(table, manifest)} (cohort {out}, oracle C-index {oracle_c_index(root):.3f})")


def _demo_dicom(out: Path, overwrite: bool, **cohort) -> None:
    from pipeline.dicom.demo_writer import generate_dicom_demo_cohort

    try:
        root = generate_dicom_demo_cohort(out, overwrite=overwrite, **cohort)
    except (HecktorFormatError, ValueError, OSError) as exc:
        _fail(str(exc))
    click.echo(
        f"{cohort['n_cases']} cases as DICOM -> {root} (import them with: import-dicom {out} --out ROOT "
        f"--clinical {out / 'clinical.csv'})"
    )
