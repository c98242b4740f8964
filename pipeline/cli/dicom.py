"""``import-dicom``: a clinic's DICOM (CT, PET, RTSTRUCT) -> a HECKTOR 2022 training root.

Parsing and printing only; the work is in :mod:`pipeline.dicom`.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from pipeline.dicom.convert import import_dicom as _import_dicom
from pipeline.dicom.errors import DicomImportError
from pipeline.dicom.rtstruct import DEFAULT_LABELS
from pipeline.hecktor import HecktorFormatError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_DEFAULT_RULES = " ".join(f"{k}={v}" for k, v in DEFAULT_LABELS.items())


def _labels(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[int, str] | None:
    if not values:
        return None
    rules: dict[int, str] = {}
    for text in values:
        value, sep, pattern = text.partition("=")
        if not sep or not value.strip().isdigit() or not 1 <= int(value) <= 255 or not pattern:
            raise click.BadParameter(f"{text!r} is not VALUE=REGEX with VALUE in 1..255, e.g. 1=GTVp", ctx, param)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise click.BadParameter(f"{text!r}: {pattern!r} is not a regular expression ({exc})", ctx, param)
        rules[int(value)] = pattern
    return rules


@click.command(name="import-dicom", context_settings=_CONTEXT, epilog=(
    "\b\nExamples:\n"
    "  import-dicom /archive/export --out data/clinic --center-id 9 --label 1=GTV_Mass_CT"
    "   # not run: needs your DICOM"))
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="HECKTOR 2022 training root to write (imagesTr/, labelsTr/, the clinical CSV, "
                   "dicom_import/<ID>.json provenance); must not exist or be empty.")
@click.option("--label", "labels", multiple=True, callback=_labels, metavar="VALUE=REGEX",
              help=f"ROI name pattern (case-insensitive regular expression) per label value; repeat for "
                   f"several labels [default: {_DEFAULT_RULES}]. A case whose ROIs match no rule stops "
                   "with the ROI names found.")
@click.option("--series", "series", multiple=True, metavar="UID",
              help="SeriesInstanceUID to use where a patient has several candidate CT or PET series; repeat.")
@click.option("--center-id", type=int, default=None,
              help="CenterID of the imported cases (needed unless --clinical has a CenterID column); "
                   "ids outside HECKTOR's 1..7 are new centres (C<id>).")
@click.option("--clinical", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV keyed by PatientID with HECKTOR clinical columns (HPV, Tobacco, ...) to merge; "
                   "its values win over the headers'.")
@click.option("--endpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV PatientID,Relapse,RFS written as the endpoint file. Without it the root has none, "
                   "and its manifest serves predict-survival, not training.")
@click.option("--pseudonymise", is_flag=True,
              help="Case ids P0001, P0002, ... instead of PatientIDs (the mapping goes to --mapping only).")
@click.option("--mapping", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --pseudonymise: CSV case_id,PatientID to write, outside --out.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier import at --out.")
def import_dicom(src: Path, out: Path, labels: dict[int, str] | None, series: tuple[str, ...],
                 center_id: int | None, clinical: Path | None, endpoint: Path | None, pseudonymise: bool,
                 mapping: Path | None, overwrite: bool) -> None:
    """Import every patient's CT, PET and RT Structure Set (or DICOM SEG) found under SRC (any folder layout;
    files are identified by their tags) into a HECKTOR 2022 training root that build-manifest
    reads as it is. PET becomes body-weight SUV (QIBA); contours are filled at voxel centres
    (even-odd rule) on the CT grid. Any case that cannot be imported stops the command,
    naming patient, series and value, and nothing is written."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        records = _import_dicom(src, out, labels=labels, series=series, clinical=clinical, endpoint=endpoint,
                                center_id=center_id, pseudonymise=pseudonymise, mapping=mapping,
                                overwrite=overwrite)
    except (DicomImportError, HecktorFormatError, FileExistsError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    for record in records:
        for warning in record["warnings"]:
            click.echo(f"warning: {record['case_id']}: {warning}", err=True)
    click.echo(f"{len(records)} case(s) -> {out}" + (f" (mapping {mapping})" if pseudonymise else ""))
