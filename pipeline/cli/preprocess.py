"""``preprocess``: manifest -> preprocessed cache (see :mod:`pipeline.preprocess`)."""

from __future__ import annotations

import logging
from dataclasses import replace

import click

from pipeline.cache import PreprocessedCache
from pipeline.preprocess import BACKENDS, PreprocessParams, run_preprocessing


def _int_tuple(text: str, n: int | None, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers",
                                 param_hint=option) from None
    if not values or (n is not None and len(values) != n):
        want = f"{n} integers" if n else "at least one integer"
        raise click.BadParameter(f"{text!r}: expected {want}", param_hint=option)
    return values


@click.command("preprocess")
@click.option("--manifest", "manifest", required=True, type=click.Path(dir_okay=False),
              help="Case manifest CSV written by build-manifest (image paths relative to it).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output cache folder: cases/<ID>.h5 per case, cohort.json written last.")
@click.option("--reference-cache", type=click.Path(file_okay=False), default=None,
              help="Existing (training) cache whose crop size G and parameters are reused, "
                   "so new patients are cropped exactly like the training cohort. Must be a "
                   "different folder from --out.")
@click.option("--tumour-labels", default=None,
              help="Label values forming the tumour: 1 = GTVp, 2 = GTVn; e.g. '1' for the "
                   "primary only.  [default: 1,2, or the reference cache's]")
@click.option("--survival-size", default=None,
              help="Survival-network input size x,y,z (z = slice axis); smaller sizes make "
                   "quick demo runs.  [default: 80,80,48, or the reference cache's]")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=1),
              help="Worker processes (cases run in parallel; 1 = in this process).")
@click.option("--backend", type=click.Choice(BACKENDS), default="sitk", show_default=True,
              help="Resampling engine: SimpleITK, or torch grid_sample (same numbers to "
                   "~1e-4 of the local intensity step; can run on a GPU).")
@click.option("--device", default="cpu", show_default=True,
              help="Torch device for --backend torch (cpu, cuda, cuda:1...).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def preprocess(manifest, out, reference_cache, tumour_labels, survival_size, workers, backend,
               device, quiet):
    """Resample, crop and resize every case of MANIFEST into the preprocessed cache.

    Pass 1 measures the global crop size G on the tumour masks (skipped with
    --reference-cache); pass 2 writes each case atomically. A rerun skips cases already
    done with the same inputs and parameters; cohort.json appears only when every case
    succeeded.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        params = None
        if reference_cache is None or tumour_labels is not None or survival_size is not None:
            params = PreprocessParams()
            if reference_cache is not None:
                # Start from the reference's values so only the named options can differ.
                params = PreprocessParams.from_dict(
                    {**PreprocessedCache(reference_cache).params, "crop_size_vox_xyz": None})
            if tumour_labels is not None:
                params = replace(params, tumour_labels=_int_tuple(tumour_labels, None,
                                                                  "--tumour-labels"))
            if survival_size is not None:
                params = replace(params, survival_size_xyz=_int_tuple(survival_size, 3,
                                                                      "--survival-size"))
        report = run_preprocessing(
            manifest, out, params, reference_cache=reference_cache, workers=workers,
            backend=backend, device=device, progress=not quiet,
        )
    except click.ClickException:
        raise
    except (ValueError, FileNotFoundError, KeyError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    gx, gy, gz = report.crop_size_vox_xyz
    if report.exceeding_crop:
        click.echo(f"warning: tumour larger than G (cut at the crop border) in "
                   f"{len(report.exceeding_crop)} case(s): {', '.join(report.exceeding_crop)}",
                   err=True)
    click.echo(
        f"preprocess: {len(report.processed)} case(s) done, {len(report.skipped)} skipped; "
        f"G = {gx} x {gy} x {gz} voxels ({report.crop_size_source}); "
        f"{report.seconds:.1f} s; cache: {report.cache.root}"
    )
