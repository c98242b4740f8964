"""``preprocess``: manifest -> preprocessed cache (see :mod:`pipeline.preprocess`)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

import click

from pipeline.cache import PreprocessedCache
from pipeline.cli.options import min_tumour_coverage_option
from pipeline.demo import DEMO_CTFM_SIZE_XYZ, DEMO_PETFM_SIZE_XYZ, DEMO_SURVIVAL_SIZE_XYZ, demo_preprocess_params
from pipeline.preprocess import (
    BACKENDS,
    MIN_CROP_COVERAGE,
    PreprocessParams,
    run_preprocessing,
)

#: Size options: option -> PreprocessParams field.
_SIZE_OPTIONS = {
    "--survival-size": "survival_size_xyz",
    "--ctfm-size": "ctfm_size_xyz",
    "--petfm-size": "petfm_size_xyz",
}


def _xyz(size: tuple[int, ...]) -> str:
    return ",".join(map(str, size))


def _int_tuple(text: str, n: int | None, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None
    if not values or (n is not None and len(values) != n):
        want = f"{n} integers" if n else "at least one integer"
        raise click.BadParameter(f"{text!r}: expected {want}", param_hint=option)
    return values


def _params(
    reference_cache: str | None, demo: bool, tumour_labels: str | None, sizes: dict[str, str | None]
) -> PreprocessParams | None:
    """Parameters from the options; ``None`` = take the reference cache's as they are."""
    if reference_cache is not None and not demo and tumour_labels is None and not any(sizes.values()):
        return None
    if demo:
        params = demo_preprocess_params()
    elif reference_cache is not None:
        # Start from the reference's values so only the named options can differ.
        params = PreprocessParams.from_dict({**PreprocessedCache(reference_cache).params, "crop_size_vox_xyz": None})
    else:
        params = PreprocessParams()
    if tumour_labels is not None:
        params = replace(params, tumour_labels=_int_tuple(tumour_labels, None, "--tumour-labels"))
    for option, text in sizes.items():
        if text is not None:
            params = replace(params, **{_SIZE_OPTIONS[option]: _int_tuple(text, 3, option)})
    return params


@click.command("preprocess", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--manifest",
    "manifest",
    required=True,
    type=click.Path(dir_okay=False),
    help="Case manifest CSV written by build-manifest (image paths relative to it).",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output cache folder: cases/<ID>.h5 per case, cohort.json written last.",
)
@click.option(
    "--reference-cache",
    type=click.Path(file_okay=False),
    default=None,
    help="Existing (training) cache whose crop size G and parameters are reused, "
    "so new patients are cropped exactly like the training cohort. Must be a "
    "different folder from --out.",
)
@click.option(
    "--demo",
    is_flag=True,
    help=f"The demo's sizes (pipeline.demo: survival {_xyz(DEMO_SURVIVAL_SIZE_XYZ)}, CT-FM "
    f"{_xyz(DEMO_CTFM_SIZE_XYZ)}, PET-FM {_xyz(DEMO_PETFM_SIZE_XYZ)}), as run-study --demo makes "
    "them; the size options below still override. Train on such a cache with "
    "train-survival --preset demo.",
)
@click.option(
    "--tumour-labels",
    default=None,
    help="Label values forming the tumour: 1 = GTVp, 2 = GTVn; e.g. '1' for the "
    "primary only.  [default: 1,2, or the reference cache's]",
)
@click.option(
    "--survival-size",
    default=None,
    help="Survival-network input size x,y,z (z = slice axis). The paper network is "
    f"built for the default; the demo's {_xyz(DEMO_SURVIVAL_SIZE_XYZ)} (--demo) goes with "
    "train-survival --preset demo.  [default: 80,80,48, or the reference cache's]",
)
@click.option(
    "--ctfm-size",
    default=None,
    help=f"CT-FM input size x,y,z (the demo's: {_xyz(DEMO_CTFM_SIZE_XYZ)}).  "
    "[default: 128,128,48, or the reference cache's]",
)
@click.option(
    "--petfm-size",
    default=None,
    help="PET-FM input size x,y,z, cubic. The published PET-FM takes 128,128,128; "
    f"another cube (the demo's {_xyz(DEMO_PETFM_SIZE_XYZ)}) sizes the encoder's token grid "
    "and windows at extraction.  [default: 128,128,128, or the reference cache's]",
)
@min_tumour_coverage_option
@click.option(
    "--min-crop-coverage",
    type=click.FloatRange(0.0, 1.0),
    default=MIN_CROP_COVERAGE,
    show_default=True,
    help="Least share (0-1) of a case's crop inside its CT field of view, and inside "
    "its PET's; a case below (a crop mostly padding) is refused.",
)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes (cases run in parallel; 1 = in this process).",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="sitk",
    show_default=True,
    help="Resampling engine: SimpleITK, or torch grid_sample (same numbers to "
    "~1e-4 of the local intensity step; can run on a GPU).",
)
@click.option(
    "--device", default="cpu", show_default=True, help="Torch device for --backend torch (cpu, cuda, cuda:1...)."
)
@click.option(
    "--qc",
    is_flag=True,
    help="Also draw one PNG per case into <out>/qc/ (axial, coronal and sagittal slices through the "
    "tumour centre: CT, PET overlay, contour, crop box, flags) and an index.html of them.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def preprocess(
    manifest,
    out,
    reference_cache,
    demo,
    tumour_labels,
    survival_size,
    ctfm_size,
    petfm_size,
    min_tumour_coverage,
    min_crop_coverage,
    workers,
    backend,
    device,
    qc,
    quiet,
):
    """Resample, crop and resize every case of MANIFEST into the preprocessed cache.

    Pass 1 measures the global crop size G on the tumour masks (skipped with
    --reference-cache); pass 2 checks each case's inputs (no NaN/inf voxel, PET covering
    the tumour, CT and PET covering the crop) and writes it atomically. A rerun skips cases
    already done with the same inputs and parameters; cohort.json appears only when every
    case succeeded.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sizes = {"--survival-size": survival_size, "--ctfm-size": ctfm_size, "--petfm-size": petfm_size}
    try:
        params = _params(reference_cache, demo, tumour_labels, sizes)
        report = run_preprocessing(
            manifest,
            out,
            params,
            reference_cache=reference_cache,
            workers=workers,
            backend=backend,
            device=device,
            progress=not quiet,
            min_tumour_coverage=min_tumour_coverage,
            min_crop_coverage=min_crop_coverage,
        )
    except click.ClickException:
        raise
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    if qc:
        from pipeline.qc import cache_pictures

        rows = cache_pictures(manifest, report.cache.root, report.cache.root / "qc")
        click.echo(f"qc: {len(rows)} picture(s), index {report.cache.root / 'qc' / 'index.html'}")
    gx, gy, gz = report.crop_size_vox_xyz
    if report.exceeding_crop:
        click.echo(
            f"warning: tumour larger than G (cut at the crop border) in "
            f"{len(report.exceeding_crop)} case(s): {', '.join(report.exceeding_crop)}",
            err=True,
        )
    click.echo(
        f"preprocess: {len(report.processed)} case(s) done, {len(report.skipped)} skipped; "
        f"G = {gx} x {gy} x {gz} voxels ({report.crop_size_source}); "
        f"{report.seconds:.1f} s; cache: {report.cache.root}"
    )
