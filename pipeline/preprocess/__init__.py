"""PET/CT preprocessing into the preprocessed cache (paper section 3 and appendix A).

Steps (sizes in SimpleITK (x, y, z) order; arrays in numpy/torch ``[D, H, W]`` = (z, y, x)):

1. CT, PET and mask go into one physical frame at ``spacing_mm_xyz`` (1 x 1 x 3 mm) with
   the CT's direction: linear interpolation for images, nearest for the mask, PET straight
   into the CT frame. Only the crop region is ever resampled: the crop's output grid is
   built directly and every native volume is resampled once onto it.
2. Tumour centre (:func:`locate_tumour`): physical centroid of the tumour voxels (labels
   ``tumour_labels``) on the native label grid; then refined = centroid of the mask
   resampled (nearest) onto a 1 x 1 x 3 mm grid centred on the native centroid. At both
   steps the **bounding-box centre replaces the centroid when the voxel nearest to the
   centroid is not tumour** (a non-convex or multi-part mask whose centroid falls in a gap,
   e.g. a primary plus a distant node); the centre then stays central to the whole extent.
   If the refined mask is empty (a tumour thinner than the new slice spacing), the native
   centre is kept. An empty native mask is an error naming the case and label file.
3. Global crop **G** (:func:`compute_crop_size`): per case, the extent needed around the
   centre = 2 x the largest distance, along each CT axis, from the centre to the far edge
   of any native tumour voxel, in voxels of ``spacing_mm_xyz``, rounded up to an **even**
   integer; G = per-axis maximum over the cohort. Because it is measured on native voxel
   edges, a crop of size G around any case's centre contains every tumour voxel whole.
4. Crop grid (:func:`centred_grid`): size G, spacing 1 x 1 x 3 mm, CT direction, origin
   placed so that the physical box is centred on the tumour centre (the centre lies at
   continuous index ``(G - 1) / 2``, the boundary between voxels ``G/2 - 1`` and ``G/2``).
   Outside the native image: images padded with that volume's minimum, mask with 0.
5. Size-only resampling of the crop (:func:`resized_grid`) to ``survival_size_xyz``
   (80 x 80 x 48: PET, CT, mask), ``ctfm_size_xyz`` (128 x 128 x 48: CT) and
   ``petfm_size_xyz`` (128^3: PET). Same physical box (voxel-centre convention, like
   ``align_corners=False``): ``spacing' = G * spacing / n`` and
   ``origin' = origin + direction @ ((spacing' - spacing) / 2)``, so the outer voxel *edges*
   coincide and the tumour centre sits at continuous index ``(n - 1) / 2``. Linear for
   images, nearest for the mask.
6. FM normalisation (:func:`normalise_ct_fm`, :func:`normalise_pet_fm`): CT clip
   [-1000, 2000] HU then (x + 1000) / 3000 -> [0, 1]; PET clip to its own p0.5 / p99.5
   computed over **all voxels of the 128^3 PET-FM input** (the resized crop, padding
   included) then min-max -> [0, 1]; if p99.5 == p0.5 (a constant crop) the output is 0.

The cache stores the survival volumes in physical units (HU, SUV); the survival-network
normalisation, which the paper does not give, is applied at load time by
:func:`survival_input` (see :class:`PreprocessParams` for the choice and why).

Input checks, before any resampling (:class:`InputCheckError`, each message naming the
check, the measured figure and the option setting its limit): no NaN or infinite voxel in
CT or PET (counted on a NIfTI file's bytes, since SimpleITK reads them as 0); the PET field
of view holds at least ``min_tumour_coverage`` (default 95 %) of the tumour's voxels; the CT
and the PET fields of view each hold at least ``min_crop_coverage`` (default 50 %) of the
crop (measured on the survival grid's voxel centres, which sample the crop's box evenly).
A PET whose header places it away from the CT would otherwise give an all-padding PET
crop without a word. The limits decide acceptance only, so they are not part of
:class:`PreprocessParams` (nor of its hash); the measured shares are per-case attributes.

Two passes (:func:`preprocess_cohort`): pass 1 reads only the labels and measures G; pass 2
writes one HDF5 per case through :func:`pipeline.cache.write_case` (atomic), in parallel,
skipping cases whose file already holds the same fingerprint and passed the input checks
under the current limits; ``cohort.json`` is written last, only when every case succeeded.
New patients reuse a training cache's G and parameters through ``reference_cache``.

Modules: :mod:`~pipeline.preprocess.params` (parameters), :mod:`~pipeline.preprocess.checks`
(input checks), :mod:`~pipeline.preprocess.grid` and :mod:`~pipeline.preprocess.locate` (crop
grid, tumour location), :mod:`~pipeline.preprocess.resample` (the two resampling backends,
pure functions without I/O), :mod:`~pipeline.preprocess.normalise`,
:mod:`~pipeline.preprocess.case` (one case) and :mod:`~pipeline.preprocess.run` (the cohort).
"""

from __future__ import annotations

from pipeline.preprocess.case import CaseResult, preprocess_case
from pipeline.preprocess.checks import (
    MIN_CROP_COVERAGE,
    MIN_TUMOUR_COVERAGE,
    InputCheckError,
    box_mm,
    check_crop_coverage,
    check_file_finite,
    check_finite,
    check_tumour_coverage,
    fov_box_mm,
    fov_share,
    grid_points_mm,
    nifti_nonfinite_counts,
    nonfinite_counts,
    nonfinite_message,
    tumour_points_mm,
)
from pipeline.preprocess.grid import centred_grid, even_ceil, geometry_of, resized_grid
from pipeline.preprocess.locate import TumourLocation, locate_tumour
from pipeline.preprocess.normalise import normalise_ct_fm, normalise_pet_fm, survival_input
from pipeline.preprocess.params import (
    BACKENDS,
    CASE_DATASETS,
    SURVIVAL_CHANNELS,
    CaseError,
    PreprocessParams,
)
from pipeline.preprocess.run import (
    PreprocessReport,
    _case_error,  # noqa: F401  (re-exported: tests build the error a failing case raises)
    compute_crop_size,
    locate_cohort,
    preprocess_cohort,
    run_preprocessing,
)

__all__ = [
    "BACKENDS",
    "CASE_DATASETS",
    "MIN_CROP_COVERAGE",
    "MIN_TUMOUR_COVERAGE",
    "SURVIVAL_CHANNELS",
    "CaseError",
    "CaseResult",
    "InputCheckError",
    "PreprocessParams",
    "PreprocessReport",
    "TumourLocation",
    "box_mm",
    "centred_grid",
    "check_crop_coverage",
    "check_file_finite",
    "check_finite",
    "check_tumour_coverage",
    "compute_crop_size",
    "even_ceil",
    "fov_box_mm",
    "fov_share",
    "geometry_of",
    "grid_points_mm",
    "locate_cohort",
    "locate_tumour",
    "nifti_nonfinite_counts",
    "nonfinite_counts",
    "nonfinite_message",
    "normalise_ct_fm",
    "normalise_pet_fm",
    "preprocess_case",
    "preprocess_cohort",
    "resized_grid",
    "run_preprocessing",
    "survival_input",
    "tumour_points_mm",
]
