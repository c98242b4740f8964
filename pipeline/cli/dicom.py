"""``import-dicom``: a clinic's DICOM (CT, PET, RTSTRUCT) -> a HECKTOR 2022 training root.

Parsing and printing only; the work is in :mod:`pipeline.dicom`.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import click

from pipeline.cli.options import PARTIAL_EXIT, continue_on_error_option, refused_table
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
            raise click.BadParameter(f"{text!r}: {pattern!r} is not a regular expression ({exc})", ctx, param) from None
        rules[int(value)] = pattern
    return rules


def _pairs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in values:
        src, sep, dst = text.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise click.BadParameter(
                f"{text!r} is not SRC=NAME (a column of --clinical = a HECKTOR column)", ctx, param
            )
        out[src.strip()] = dst.strip()
    return out


@click.command(
    name="import-dicom",
    context_settings=_CONTEXT,
    epilog=(
        "\b\nExamples:\n"
        "  import-dicom /archive/export --out data/clinic --center-id 9 --label 1=GTV_Mass_CT\n"
        "  import-dicom /archive/batch2 /links/batch2 --out data/clinic --add --continue-on-error --center-id 9 "
        "--pseudonymise --prefix HN --mapping ~/clinic_ids.csv\n"
        "\b\nExit status: 0 every patient imported; 1 nothing written (the error names every patient refused); "
        f"{PARTIAL_EXIT} with --continue-on-error, the others imported and the refused ones listed."
    ),
)
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="HECKTOR 2022 training root to write (imagesTr/, labelsTr/, the clinical CSV, "
    "dicom_import/<ID>.json provenance); must not exist or be empty (see --add, --overwrite).",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    callback=_labels,
    metavar="VALUE=REGEX",
    help=f"ROI name pattern (case-insensitive regular expression) per label value; repeat for "
    f"several labels [default: {_DEFAULT_RULES}]. A case whose ROIs match no rule stops "
    "with the ROI names found; a label matching several ROIs unites them and says so.",
)
@click.option(
    "--series",
    "series",
    multiple=True,
    metavar="UID",
    help="SeriesInstanceUID to use where a patient has several candidate CT or PET series; repeat.",
)
@click.option(
    "--accept-frame",
    "accept_frames",
    multiple=True,
    metavar="UID",
    help="A FrameOfReferenceUID you know to be the same patient space as the CT's (an ROI defined in "
    "another frame is otherwise refused); recorded in the provenance; repeat.",
)
@click.option(
    "--center-id",
    type=int,
    default=None,
    help="CenterID of the imported cases (needed unless --clinical has a CenterID column); "
    "ids outside HECKTOR's 1..7 are new centres (C<id>).",
)
@click.option(
    "--clinical",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV keyed by PatientID with HECKTOR clinical columns (Tobacco, 'HPV status (0=-, 1=+)', ...) "
    "to merge; its values win over the headers'. Other columns are refused unless mapped or "
    "ignored; patients without a row are named.",
)
@click.option(
    "--clinical-column",
    "clinical_columns",
    multiple=True,
    callback=_pairs,
    metavar="SRC=NAME",
    help="Read --clinical's column SRC as the HECKTOR column NAME, e.g. 'HPV=HPV status (0=-, 1=+)'; repeat.",
)
@click.option(
    "--ignore-column",
    "ignore_columns",
    multiple=True,
    metavar="SRC",
    help="Leave --clinical's column SRC out on purpose; repeat.",
)
@click.option(
    "--endpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV PatientID,Relapse,RFS written as the endpoint file. Without it the root has none, "
    "and its manifest serves predict-survival, not training.",
)
@click.option(
    "--pseudonymise",
    is_flag=True,
    help="Case ids P0001, P0002, ... instead of PatientIDs (the mapping goes to --mapping only).",
)
@click.option(
    "--prefix", default="P", show_default=True, help="With --pseudonymise: the case ids' prefix (e.g. one per centre)."
)
@click.option(
    "--mapping",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --pseudonymise: CSV case_id,PatientID, outside --out. An existing one is continued: "
    "known patients keep their id, new ones are numbered after its last.",
)
@continue_on_error_option("patient")
@click.option(
    "--add",
    is_flag=True,
    help="Add the patients to the root an earlier import-dicom wrote at --out; what it holds is kept "
    "as it is, patients already there are skipped.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier import at --out.")
def import_dicom(
    src: tuple[Path, ...],
    out: Path,
    labels: dict[int, str] | None,
    series: tuple[str, ...],
    accept_frames: tuple[str, ...],
    center_id: int | None,
    clinical: Path | None,
    clinical_columns: dict[str, str],
    ignore_columns: tuple[str, ...],
    endpoint: Path | None,
    pseudonymise: bool,
    prefix: str,
    mapping: Path | None,
    continue_on_error: bool,
    add: bool,
    overwrite: bool,
) -> None:
    """Import every patient's CT, PET and RT Structure Set (or DICOM SEG) found under each SRC (any folder
    layout, symbolic links followed; files are identified by their tags) into a HECKTOR 2022 training root
    that build-manifest reads as it is. PET becomes body-weight SUV (QIBA); contours are filled at voxel
    centres (even-odd rule) on the CT grid. A patient that cannot be imported (an ROI in another frame of
    reference or without contours, a missing SUV tag, ...) is refused naming patient, series and value;
    without --continue-on-error nothing is written and every refused patient is listed."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        records = _import_dicom(
            list(src),
            out,
            labels=labels,
            series=series,
            clinical=clinical,
            endpoint=endpoint,
            center_id=center_id,
            pseudonymise=pseudonymise,
            mapping=mapping,
            overwrite=overwrite,
            add=add,
            continue_on_error=continue_on_error,
            accept_frames=accept_frames,
            prefix=prefix,
            clinical_columns=clinical_columns,
            ignore_columns=ignore_columns,
        )
    except (DicomImportError, HecktorFormatError, FileExistsError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    for note in records.notes:
        click.echo(f"note: {note}", err=True)
    for record in records:
        for warning in record["warnings"]:
            click.echo(f"warning: {record['case_id']}: {warning}", err=True)
    click.echo(
        f"{len(records)} case(s) -> {out}"
        + (" (added)" if add else "")
        + (f" (mapping {mapping})" if pseudonymise else "")
    )
    if records.refused:
        click.echo(refused_table([(r["patient"], r["reason"]) for r in records.refused], "patient"), err=True)
        sys.exit(PARTIAL_EXIT)
