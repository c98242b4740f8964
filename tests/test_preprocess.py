"""Preprocessing: geometry of the crop, intensities, provenance, reruns and failures.

Tiny HECKTOR-like cases are built here: CT int16 on a 1 x 1 x 2.5 mm grid, PET on a 4 mm
grid with another origin (a hot spot at the tumour's physical position), labels on the CT
grid. Small output sizes keep the tests fast; the code path is the one of the paper sizes.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from pipeline.cache import PreprocessedCache, case_file
from pipeline.cli.preprocess import preprocess as preprocess_cli
from pipeline.demo_cohort import image_from_array, uniform_manifest, write_image
from pipeline.manifest import MANIFEST_COLUMNS, write_manifest
from pipeline.preprocess import (
    SURVIVAL_CHANNELS,
    CaseError,
    InputCheckError,
    PreprocessParams,
    centred_grid,
    compute_crop_size,
    even_ceil,
    locate_tumour,
    nifti_nonfinite_counts,
    normalise_pet_fm,
    preprocess_case,
    resized_grid,
    run_preprocessing,
    survival_input,
)
from pipeline.resample_torch import continuous_index

PARAMS = PreprocessParams(survival_size_xyz=(16, 16, 8), ctfm_size_xyz=(24, 24, 8), petfm_size_xyz=(16, 16, 16))
CT_SPACING = (1.0, 1.0, 2.5)
CT_SIZE = (40, 40, 20)  # x, y, z -> 40 x 40 x 50 mm
CT_ORIGIN = (-20.0, -20.0, 0.0)
PET_SPACING = (4.0, 4.0, 4.0)
PET_SIZE = (13, 13, 15)
PET_ORIGIN = (-23.3, -22.1, -2.9)
CT_MIN = -1000
PET_MIN = 0.05

# case id -> list of (label, centre_mm_xyz, semi-axes_mm_xyz) ellipsoids
CASES = {
    "CHUM-001": [(1, (2.3, -1.7, 24.6), (6.0, 6.0, 6.0))],
    "CHUM-002": [(1, (-13.0, 11.0, 20.0), (5.0, 5.0, 5.0))],  # near the border: crop pads
    "CHUP-003": [(1, (4.0, 3.0, 26.0), (3.5, 3.5, 12.0))],  # elongated along z
}


def _grid_points(size, spacing, origin):
    """Physical coordinates of voxel centres, arrays [D, H, W] (identity direction)."""
    idx = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")  # z, y, x
    return [origin[a] + spacing[a] * idx[2 - a] for a in range(3)]  # x, y, z


def make_case(root: Path, cid: str, blobs, *, empty: bool = False) -> None:
    """Write imagesTr/<cid>__CT/__PT.nii.gz and labelsTr/<cid>.nii.gz under ``root``."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    x, y, z = _grid_points(CT_SIZE, CT_SPACING, CT_ORIGIN)
    ct = 3.0 * x + 2.0 * y + z - 100.0  # smooth, so interpolation has work to do
    lab = np.zeros(ct.shape, np.uint8)
    for value, c, r in blobs:
        inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
        lab[inside] = 0 if empty else value
        ct[inside] += 300.0
    ct[0, 0, 0] = CT_MIN  # the volume minimum, used for padding
    write_image(np.round(ct).astype(np.int16), CT_SPACING, CT_ORIGIN, root / "imagesTr" / f"{cid}__CT.nii.gz")
    write_image(lab, CT_SPACING, CT_ORIGIN, root / "labelsTr" / f"{cid}.nii.gz")
    px, py, pz = _grid_points(PET_SIZE, PET_SPACING, PET_ORIGIN)
    pet = 1.0 + 0.01 * py
    for _, c, r in blobs:
        d2 = ((px - c[0]) / r[0]) ** 2 + ((py - c[1]) / r[1]) ** 2 + ((pz - c[2]) / r[2]) ** 2
        pet += 9.0 * np.exp(-d2)
    pet[-1, -1, -1] = PET_MIN
    write_image(pet.astype(np.float32), PET_SPACING, PET_ORIGIN, root / "imagesTr" / f"{cid}__PT.nii.gz")


def _read_case(root: Path, cid: str):
    ct = sitk.ReadImage(str(root / "imagesTr" / f"{cid}__CT.nii.gz"))
    pet = sitk.ReadImage(str(root / "imagesTr" / f"{cid}__PT.nii.gz"))
    lab = sitk.ReadImage(str(root / "labelsTr" / f"{cid}.nii.gz"))
    return ct, pet, lab


def _resample_nearest(img: sitk.Image, grid) -> np.ndarray:
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(grid.origin_xyz)
    f.SetOutputSpacing(grid.spacing_xyz)
    f.SetOutputDirection(grid.direction)
    f.SetSize([int(v) for v in grid.size_xyz])
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    return sitk.GetArrayFromImage(f.Execute(img))


def _centroid(arr: np.ndarray) -> np.ndarray:
    """Weighted centroid in array index order (z, y, x)."""
    w = arr.astype(np.float64)
    idx = np.indices(arr.shape).reshape(3, -1)
    return (idx * w.ravel()).sum(axis=1) / w.sum()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three cases preprocessed once with two worker processes (exercises the pool)."""
    root = tmp_path_factory.mktemp("hecktor")
    for cid, blobs in CASES.items():
        make_case(root, cid, blobs)
    manifest = uniform_manifest(root, list(CASES))
    report = run_preprocessing(manifest, root / "cache", PARAMS, workers=2, progress=False)
    return root, manifest, report


# --------------------------------------------------------------------------- parameters


def test_params_round_trip_and_validation():
    p = replace(PARAMS, crop_size_vox_xyz=(12, 14, 6), tumour_labels=(2, 1))
    assert p.tumour_labels == (1, 2)
    again = PreprocessParams.from_dict(json.loads(json.dumps(p.as_dict())))
    assert again == p and again.hash() == p.hash()
    assert replace(p, tumour_labels=(1,)).hash() != p.hash()
    with pytest.raises(ValueError, match=r"crop_size_vox_xyz must be even.*\(12, 13, 6\)"):
        replace(p, crop_size_vox_xyz=(12, 13, 6))
    with pytest.raises(ValueError, match="tumour_labels"):
        replace(p, tumour_labels=())
    with pytest.raises(ValueError, match="ct_fm_window_hu"):
        replace(p, ct_fm_window_hu=(100.0, -100.0))
    with pytest.raises(ValueError, match=r"unknown preprocessing parameters \['bogus'\]"):
        PreprocessParams.from_dict({**p.as_dict(), "bogus": 1})
    defaults = PreprocessParams()
    assert defaults.spacing_mm_xyz == (1.0, 1.0, 3.0) and defaults.survival_size_xyz == (80, 80, 48)
    assert defaults.ctfm_size_xyz == (128, 128, 48) and defaults.petfm_size_xyz == (128, 128, 128)


def test_even_ceil_and_resized_grid_keep_the_physical_box():
    assert [even_ceil(v) for v in (3.0, 4.0, 4.0000001, 4.2, 0.3)] == [4, 4, 4, 6, 2]
    crop = centred_grid((10.0, -5.0, 30.0), (12, 14, 6), (1.0, 1.0, 3.0), (0, -1, 0, 1, 0, 0, 0, 0, 1))
    for size in [(16, 16, 8), (5, 7, 3)]:
        small = resized_grid(crop, size)
        for g in (crop, small):  # box edges along each axis: origin -/+ half a voxel
            d = np.asarray(g.direction).reshape(3, 3)
            sp, n = np.asarray(g.spacing_xyz), np.asarray(g.size_xyz)
            lo = np.asarray(g.origin_xyz) - d @ (sp / 2)
            hi = np.asarray(g.origin_xyz) + d @ (sp * (n - 0.5))
            np.testing.assert_allclose((lo + hi) / 2, (10.0, -5.0, 30.0), atol=1e-9)
            np.testing.assert_allclose(np.abs(d.T @ (hi - lo)), (12.0, 14.0, 18.0), atol=1e-9)


def test_survival_input_normalisation_and_channel_order():
    shape = (2, 3, 4)
    pet = np.full(shape, 10.0, np.float32)
    pet[0, 0, 0], pet[0, 0, 1] = 40.0, -1.0
    ct = np.zeros(shape, np.float32)
    ct[0, 0, 0], ct[0, 0, 1], ct[0, 0, 2] = 1024.0, -3000.0, 512.0
    x = survival_input({"survival/pet": pet, "survival/ct": ct, "survival/mask": ct}, PARAMS)
    assert x.shape == (2, *shape) and x.dtype == np.float32 and SURVIVAL_CHANNELS == ("pet", "ct")
    assert x[0, 1, 1, 1] == pytest.approx(2.0)  # SUV 10 / 5: absolute scale kept
    assert x[0, 0, 0, 0] == pytest.approx(5.0) and x[0, 0, 0, 1] == 0.0  # clipped to [0, 25]
    assert x[1, 0, 0, 0] == pytest.approx(1.0) and x[1, 0, 0, 1] == pytest.approx(-1.0)
    assert x[1, 0, 0, 2] == pytest.approx(0.5) and x[1, 1, 1, 1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="survival/ct"):
        survival_input({"survival/pet": pet}, PARAMS)


def test_pet_fm_percentile_normalisation_and_zero_range_guard():
    rng = np.random.default_rng(0)
    pet = rng.gamma(2.0, 1.0, size=(16, 16, 16)).astype(np.float32)
    out, (lo, hi) = normalise_pet_fm(pet, PARAMS)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(pet, [0.5, 99.5])))
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 1.0) == pytest.approx(0.005, abs=0.001)  # top 0.5 % clipped
    flat, _ = normalise_pet_fm(np.full((4, 4, 4), 3.0, np.float32), PARAMS)
    assert np.all(flat == 0.0) and np.isfinite(flat).all()


# --------------------------------------------------------------------------- geometry


def test_tumour_lands_at_the_crop_centre_in_every_output(cohort):
    root, _, report = cohort
    cache = report.cache
    for cid, blobs in CASES.items():
        centre = np.asarray(blobs[0][1])
        attrs = cache.attrs(cid)
        np.testing.assert_allclose(attrs["center_mm_xyz"], centre, atol=0.6)
        arrays = cache.read(cid, ("survival/mask", "survival/pet", "ctfm/ct", "petfm/pet"))
        for name, arr in arrays.items():
            n_zyx = np.asarray(arr.shape)
            # Bright object (mask, CT +300 HU, PET hot spot) centred at index (n - 1) / 2.
            obj = arr > (0.5 if name.endswith("mask") else arr.min() + 0.6 * np.ptp(arr))
            got = _centroid(obj)
            vox = np.asarray(cache.geometry(cid, name.split("/")[0]).spacing_xyz[::-1])
            assert np.all(np.abs(got - (n_zyx - 1) / 2) * vox < 1.6), (cid, name, got)
            # And the stored geometry maps that voxel back to the tumour in millimetres.
            geom = cache.geometry(cid, name.split("/")[0])
            d = np.asarray(geom.direction).reshape(3, 3)
            mm = np.asarray(geom.origin_xyz) + d @ (np.asarray(geom.spacing_xyz) * got[::-1])
            assert np.linalg.norm(mm - centre) < 1.6, (cid, name, mm)


def test_pet_hot_spot_lands_on_the_tumour_despite_other_pet_grid(cohort):
    _, _, report = cohort
    for cid in CASES:
        a = report.cache.read(cid, ("survival/pet", "survival/mask"))
        peak = np.unravel_index(np.argmax(a["survival/pet"]), a["survival/pet"].shape)
        assert a["survival/mask"][peak] == 1, cid
        # PET-weighted centroid of the hot spot coincides with the mask centroid.
        pet = a["survival/pet"]
        hot = np.where(pet > pet.min() + 0.5 * np.ptp(pet), pet, 0)
        assert np.all(np.abs(_centroid(hot) - _centroid(a["survival/mask"])) < 1.0), cid


def test_global_crop_is_even_covers_every_case_and_loses_no_tumour(cohort):
    root, manifest, report = cohort
    g = np.asarray(report.crop_size_vox_xyz)
    assert np.all(g % 2 == 0)
    cohort_json = json.loads((root / "cache" / "cohort.json").read_text())
    assert cohort_json["crop_size_vox_xyz"] == g.tolist()
    assert cohort_json["params"]["crop_size_vox_xyz"] == g.tolist()
    assert cohort_json["crop_size_source"] == "cohort" and cohort_json["case_ids"] == list(CASES)
    params = PreprocessParams.from_dict(cohort_json["params"])
    needed = []
    for cid in CASES:
        ct, pet, lab = _read_case(root, cid)
        loc = locate_tumour(lab, ct.GetDirection(), params)
        needed.append(loc.crop_size_vox_xyz)
        res = preprocess_case(ct, pet, lab, params, keep_crop=True)
        mask = res.crop["mask"]
        # Whole tumour inside: the crop holds exactly the tumour voxels that resampling the
        # same grid, extended by 10 voxels per side, gives, and none on the crop faces.
        wide = centred_grid(loc.centre_mm_xyz, g + 20, params.spacing_mm_xyz, ct.GetDirection())
        wide_mask = _resample_nearest(lab, wide)
        assert mask.sum() == (wide_mask > 0).sum() > 0, cid
        # (Nearest 2.5 -> 3 mm slices may drop or repeat a slice of a small sphere.)
        assert mask.sum() * 3.0 / 1000 == pytest.approx(loc.volume_ml, rel=0.35), cid
        for ax in range(3):
            assert not np.take(mask, [0, -1], axis=ax).any(), (cid, ax)
        # Every native tumour voxel centre lies inside the crop box.
        lab_img = sitk.GetArrayViewFromImage(lab)
        zyx = np.argwhere(lab_img > 0)
        pts = np.asarray([lab.TransformIndexToPhysicalPoint([int(v) for v in p[::-1]]) for p in zyx])
        ci = (pts - np.asarray(res.crop_geometry.origin_xyz)) / np.asarray(params.spacing_mm_xyz)
        assert np.all(ci >= -0.5) and np.all(ci < g - 0.5), cid
    np.testing.assert_array_equal(g, np.max(needed, axis=0))
    # compute_crop_size (pass 1 on its own) agrees.
    from pipeline.manifest import read_manifest

    assert compute_crop_size(read_manifest(manifest), PARAMS, workers=1, progress=False) == tuple(g)


def test_padding_is_the_volume_minimum(cohort):
    root, _, report = cohort
    params = PreprocessParams.from_dict(report.cache.params)
    # A crop larger than the image forces padding on every side (more than the crop
    # coverage check allows by default, hence the limit 0).
    big = replace(params, crop_size_vox_xyz=(60, 60, 24))
    ct, pet, lab = _read_case(root, "CHUM-002")
    res = preprocess_case(ct, pet, lab, big, keep_crop=True, min_crop_coverage=0.0)
    from pipeline.cache import GridGeometry
    from pipeline.preprocess import geometry_of

    for name, img, pad in (("ct", ct, CT_MIN), ("pet", pet, PET_MIN), ("mask", lab, 0)):
        ci = continuous_index(geometry_of(img), res.crop_geometry)
        size = np.asarray(img.GetSize())
        outside = ((ci < -0.5) | (ci >= size - 0.5)).any(axis=-1)
        assert outside.mean() > 0.2
        np.testing.assert_allclose(res.crop[name][outside], pad, rtol=0, atol=1e-6)
        assert np.all(res.crop[name][~outside] >= pad)
    assert res.attrs["pad_value_ct"] == CT_MIN and res.attrs["pad_value_pet"] == pytest.approx(PET_MIN)
    assert isinstance(res.crop_geometry, GridGeometry)


def test_fm_inputs_lie_in_unit_range_and_ct_keeps_fractional_hu(cohort):
    root, _, report = cohort
    for cid in CASES:
        a = report.cache.read(cid, ("ctfm/ct", "petfm/pet", "survival/ct"))
        for name in ("ctfm/ct", "petfm/pet"):
            assert a[name].dtype == np.float32 and a[name].min() >= 0 and a[name].max() <= 1
        assert a["petfm/pet"].max() == 1.0 and a["petfm/pet"].min() == 0.0
        # An int16 CT must be interpolated in float, not rounded back to whole HU.
        assert np.any(np.abs(a["survival/ct"] - np.round(a["survival/ct"])) > 0.01)
    # CT-FM = (HU + 1000) / 3000 of the same crop (no extra scaling).
    ct, pet, lab = _read_case(root, "CHUM-001")
    params = PreprocessParams.from_dict(report.cache.params)
    res = preprocess_case(ct, pet, lab, replace(params, ctfm_size_xyz=params.crop_size_vox_xyz), keep_crop=True)
    np.testing.assert_allclose(res.arrays["ctfm/ct"], (np.clip(res.crop["ct"], -1000, 2000) + 1000) / 3000, atol=1e-5)


def test_slice_axis_is_array_axis_zero():
    """CHUP-003 is 24 mm long in z, 7 mm in x and y: the stored geometry must say so."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_case(root, "CHUP-003", CASES["CHUP-003"])
        ct, pet, lab = _read_case(root, "CHUP-003")
        params = replace(PARAMS, crop_size_vox_xyz=(20, 20, 12))
        res = preprocess_case(ct, pet, lab, params)
    mask = res.arrays["survival/mask"]
    assert mask.shape == (8, 16, 16)  # [D, H, W] = (z, y, x) of survival_size_xyz (16, 16, 8)
    sp = res.geometry["survival"].spacing_xyz  # x, y, z
    idx = np.argwhere(mask)
    extent_mm = (np.ptp(idx, axis=0) + 1) * np.asarray(sp[::-1])  # z, y, x
    assert extent_mm[0] > 18 and extent_mm[1] < 12 and extent_mm[2] < 12, extent_mm


def _label_image(lab: np.ndarray, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    return image_from_array(lab, CT_SPACING, CT_ORIGIN, direction)


def test_centre_falls_back_to_bbox_centre_when_centroid_is_outside_the_tumour():
    x, y, z = _grid_points(CT_SIZE, CT_SPACING, CT_ORIGIN)
    lab = np.zeros(x.shape, np.uint8)
    lab[(x + 14) ** 2 + y**2 + (z - 25) ** 2 <= 5**2] = 1  # primary, x in [-19, -9]
    lab[(x - 12) ** 2 + y**2 + (z - 25) ** 2 <= 4**2] = 2  # node, x in [8, 16]
    # Volume-weighted centroid x ~ -5 lies in the gap; bbox centre x = (-19 + 16) / 2.
    params = PARAMS
    loc = locate_tumour(_label_image(lab), (1, 0, 0, 0, 1, 0, 0, 0, 1), params)
    assert loc.centre_source == "bbox_centre"
    np.testing.assert_allclose(loc.centre_mm_xyz, (-1.5, 0.0, 25.0), atol=0.6)
    # The crop around the bbox centre spans both lesions: 35 mm + voxel edges in x.
    assert loc.crop_size_vox_xyz[0] in (36, 38)
    # Primary only: a convex sphere, centroid kept.
    only_gtvp = locate_tumour(_label_image(lab), (1, 0, 0, 0, 1, 0, 0, 0, 1), replace(params, tumour_labels=(1,)))
    assert only_gtvp.centre_source == "centroid"
    np.testing.assert_allclose(only_gtvp.centre_mm_xyz, (-14.0, 0.0, 25.0), atol=0.6)
    assert only_gtvp.volume_ml == pytest.approx(4 / 3 * np.pi * 125 / 1000, rel=0.1)
    with pytest.raises(ValueError, match=r"case 'X-1': label file lab.nii.gz has no voxel"):
        locate_tumour(
            _label_image(np.where(lab == 2, 2, 0).astype(np.uint8)),
            (1, 0, 0, 0, 1, 0, 0, 0, 1),
            replace(params, tumour_labels=(1,)),
            case_id="X-1",
            label_path="lab.nii.gz",
        )


def test_flipped_ct_direction_keeps_tumour_centred_and_torch_agrees():
    """HECKTOR has a centre storing CT/label with x flipped (direction diag(-1, 1, 1))."""
    flip = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    x, y, z = _grid_points(CT_SIZE, CT_SPACING, (0.0, 0.0, 0.0))
    phys_x = 10.0 - x  # origin x = 10 mm, direction -1: voxel i sits at 10 - i
    centre = (-6.0, 7.0, 22.0)
    blob = (phys_x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 36
    ct_arr = (3.0 * phys_x + y + 300.0 * blob - 50).astype(np.int16)
    ct, lab = (image_from_array(arr, CT_SPACING, (10.0, 0.0, 0.0), flip) for arr in (ct_arr, blob.astype(np.uint8)))
    px, py, pz = _grid_points(PET_SIZE, PET_SPACING, (-35.0, -10.0, -5.0))
    pet_arr = 1 + 9 * np.exp(-((px - centre[0]) ** 2 + (py - centre[1]) ** 2 + (pz - centre[2]) ** 2) / 36)
    pet = image_from_array(pet_arr.astype(np.float32), PET_SPACING, (-35.0, -10.0, -5.0))
    params = replace(PARAMS, crop_size_vox_xyz=(16, 16, 6))
    a = preprocess_case(ct, pet, lab, params, backend="sitk")
    b = preprocess_case(ct, pet, lab, params, backend="torch")
    assert a.geometry["survival"].direction == flip
    np.testing.assert_allclose(a.location.centre_mm_xyz, centre, atol=0.6)
    mask = a.arrays["survival/mask"]
    assert np.all(np.abs(_centroid(mask) - (np.asarray(mask.shape) - 1) / 2) < 1.0)
    peak = np.unravel_index(np.argmax(a.arrays["survival/pet"]), mask.shape)
    assert mask[peak] == 1
    for name in ("survival/pet", "survival/ct", "ctfm/ct", "petfm/pet"):
        assert np.abs(a.arrays[name] - b.arrays[name]).max() < 1e-3 * max(np.ptp(a.arrays[name]), 1e-6)
    assert np.mean(a.arrays["survival/mask"] != b.arrays["survival/mask"]) < 0.005


# --------------------------------------------------------------------------- cohort runs


def test_cache_provenance_attributes(cohort):
    root, _, report = cohort
    cache = report.cache
    from pipeline.artefacts import sha256_file
    from pipeline.cache import case_fingerprint

    attrs = cache.attrs("CHUM-001")
    assert attrs["params_hash"] == cache.params_hash == PreprocessParams.from_dict(cache.params).hash()
    assert attrs["source_sha256"]["ct"] == sha256_file(root / "imagesTr" / "CHUM-001__CT.nii.gz")
    assert attrs["source_sha256"]["label"] == sha256_file(root / "labelsTr" / "CHUM-001.nii.gz")
    assert attrs["fingerprint"] == case_fingerprint(attrs["params_hash"], attrs["source_sha256"])
    assert attrs["tumour_volume_ml"] == pytest.approx(4 / 3 * np.pi * 6**3 / 1000, rel=0.15)
    assert attrs["code_version"] and attrs["backend"] == "sitk"
    a = cache.read("CHUM-001", ("survival/pet", "survival/ct", "survival/mask", "ctfm/ct", "petfm/pet"))
    assert a["survival/pet"].shape == (8, 16, 16) and a["survival/mask"].dtype == np.uint8
    assert a["ctfm/ct"].shape == (8, 24, 24) and a["petfm/pet"].shape == (16, 16, 16)
    assert set(np.unique(a["survival/mask"])) == {0, 1}
    assert cache.geometry("CHUM-001", "petfm").size_xyz == (16, 16, 16)


def test_rerun_skips_and_a_changed_source_is_redone(cohort, tmp_path):
    root, manifest, _ = cohort
    out = tmp_path / "cache"
    first = run_preprocessing(manifest, out, PARAMS, workers=1, progress=False, case_ids=["CHUM-001", "CHUP-003"])
    assert sorted(first.processed) == ["CHUM-001", "CHUP-003"] and first.skipped == []
    mtime = case_file(out, "CHUM-001").stat().st_mtime_ns
    again = run_preprocessing(manifest, out, PARAMS, workers=1, progress=False, case_ids=["CHUM-001", "CHUP-003"])
    assert again.processed == [] and sorted(again.skipped) == ["CHUM-001", "CHUP-003"]
    assert case_file(out, "CHUM-001").stat().st_mtime_ns == mtime
    assert (out / "cohort.json").is_file()
    # Other parameters -> other fingerprint -> redone.
    other = run_preprocessing(
        manifest,
        out,
        replace(PARAMS, pet_fm_percentiles=(1.0, 99.0)),
        workers=1,
        progress=False,
        case_ids=["CHUM-001", "CHUP-003"],
    )
    assert sorted(other.processed) == ["CHUM-001", "CHUP-003"]


def test_reference_cache_keeps_g_for_new_patients(cohort, tmp_path):
    root, _, report = cohort
    # A new patient with a larger tumour than any training case.
    make_case(root, "MDA-104", [(1, (0.0, 0.0, 25.0), (9.0, 9.0, 9.0))])
    new_manifest = uniform_manifest(root, ["MDA-104"], name="new_manifest.csv")
    ref = root / "cache"
    out = run_preprocessing(new_manifest, tmp_path / "new", None, reference_cache=ref, workers=1, progress=False)
    assert out.crop_size_vox_xyz == report.crop_size_vox_xyz
    assert out.cache.params == report.cache.params and out.cache.params_hash == report.cache.params_hash
    assert out.cache.cohort["crop_size_source"] == str(ref.resolve())
    assert out.exceeding_crop == ["MDA-104"]
    assert out.cache.attrs("MDA-104")["tumour_fits_crop"] in (False, 0)
    with pytest.raises(ValueError, match=r"parameters \['tumour_labels'\] differ"):
        run_preprocessing(
            new_manifest,
            tmp_path / "new2",
            replace(PARAMS, tumour_labels=(1,)),
            reference_cache=ref,
            workers=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="is the output folder"):
        run_preprocessing(new_manifest, ref, None, reference_cache=ref, workers=1, progress=False)


def test_failing_case_leaves_no_partial_file_and_no_cohort_record(tmp_path):
    root = tmp_path / "data"
    make_case(root, "CHUM-001", CASES["CHUM-001"])
    make_case(root, "CHUS-009", CASES["CHUM-001"], empty=True)
    manifest = uniform_manifest(root, ["CHUM-001", "CHUS-009"])
    out = tmp_path / "cache"
    label = str((root / "labelsTr" / "CHUS-009.nii.gz").resolve())
    with pytest.raises(CaseError, match=rf"'CHUS-009'.*{label}.*no voxel with tumour labels"):
        run_preprocessing(manifest, out, PARAMS, workers=1, progress=False)
    assert not (out / "cohort.json").exists()
    # With a given G (no pass 1) the first case is written, the failing one leaves nothing.
    g = replace(PARAMS, crop_size_vox_xyz=(14, 14, 6))
    with pytest.raises(CaseError, match="CHUS-009"):
        run_preprocessing(manifest, out, g, workers=1, progress=False)
    assert case_file(out, "CHUM-001").is_file() and not case_file(out, "CHUS-009").exists()
    assert not (out / "cohort.json").exists()
    assert [p.name for p in (out / "cases").iterdir()] == ["CHUM-001.h5"]  # no temp files
    with h5py.File(case_file(out, "CHUM-001")) as h5:
        assert "petfm/pet" in h5
    # A corrupt CT names the case and the file.
    (root / "imagesTr" / "CHUM-001__CT.nii.gz").write_bytes(b"not a nifti")
    ct_path = str((root / "imagesTr" / "CHUM-001__CT.nii.gz").resolve())
    with pytest.raises(CaseError, match=rf"'CHUM-001'.*CT file {ct_path}"):
        run_preprocessing(manifest, tmp_path / "c2", g, workers=1, progress=False, case_ids=["CHUM-001"])


# --------------------------------------------------------------------------- input checks


def _rewrite(path: Path, edit) -> None:
    """Replace a NIfTI file by ``edit(image)``."""
    sitk.WriteImage(edit(sitk.ReadImage(str(path))), str(path), useCompression=True)


def _shift_origin(mm):
    def edit(img):
        img.SetOrigin(tuple(o + d for o, d in zip(img.GetOrigin(), mm)))
        return img

    return edit


def _set_voxels(values):
    """Set voxels (array index z, y, x) to values, e.g. NaN."""

    def edit(img):
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        for idx, v in values:
            arr[idx] = v
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        return out

    return edit


BAD_IMAGES = {
    # name: (case blobs, G, file to edit, edit, texts the message must hold)
    "PET shifted off the tumour": (
        CASES["CHUM-001"],
        (16, 16, 8),
        "imagesTr/{}__PT.nii.gz",
        _shift_origin((0, 0, 400)),
        ["tumour coverage check: PET field of view covers 0.0 % of the tumour", "--min-tumour-coverage"],
    ),
    "NaN and inf in the PET": (
        CASES["CHUM-001"],
        (16, 16, 8),
        "imagesTr/{}__PT.nii.gz",
        _set_voxels([((1, 2, 3), np.nan), ((4, 5, 6), np.inf)]),
        ["finite-voxel check: PET holds 2 non-finite voxel(s) (1 NaN, 1 inf)"],
    ),
    "NaN in a float CT": (
        CASES["CHUM-001"],
        (16, 16, 8),
        "imagesTr/{}__CT.nii.gz",
        _set_voxels([((3, 3, 3), np.nan)]),
        ["finite-voxel check: CT holds 1 non-finite voxel(s) (1 NaN, 0 inf)"],
    ),
    "crop mostly outside the CT": (  # tumour near the CT border, crop 60 x 60 x 72 mm
        CASES["CHUM-002"],
        (60, 60, 24),
        "imagesTr/{}__CT.nii.gz",
        lambda img: img,
        ["crop coverage check: CT field of view covers 24.4 % of the crop", "--min-crop-coverage"],
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_image_is_refused_naming_case_files_check_and_figure(name, tmp_path):
    blobs, g, rel, edit, texts = BAD_IMAGES[name]
    root, cid = tmp_path / "data", "CHUV-017"
    make_case(root, cid, blobs)
    _rewrite(root / rel.format(cid), edit)
    manifest = uniform_manifest(root, [cid])
    out = tmp_path / "cache"
    params = replace(PARAMS, crop_size_vox_xyz=g)
    with pytest.raises(CaseError) as info:
        run_preprocessing(manifest, out, params, workers=1, progress=False)
    message = str(info.value)
    for text in [f"case '{cid}'", *texts]:
        assert text in message, message
    for path in (f"imagesTr/{cid}__CT.nii.gz", f"imagesTr/{cid}__PT.nii.gz", f"labelsTr/{cid}.nii.gz"):
        assert str((root / path).resolve()) in message, message
    assert not case_file(out, cid).exists() and not (out / "cohort.json").exists()


def test_coverage_limits_are_parameters_and_recorded(tmp_path):
    root = tmp_path / "data"
    make_case(root, "CHUM-001", CASES["CHUM-001"])
    _rewrite(root / "imagesTr" / "CHUM-001__PT.nii.gz", _shift_origin((0, 0, 400)))
    manifest = uniform_manifest(root, ["CHUM-001"])
    # Limits of 0 accept a PET that misses everything: its crop is then pure padding.
    report = run_preprocessing(
        manifest, tmp_path / "c", PARAMS, workers=1, progress=False, min_tumour_coverage=0.0, min_crop_coverage=0.0
    )
    attrs = report.cache.attrs("CHUM-001")
    assert attrs["pet_tumour_coverage"] == 0.0 and attrs["pet_crop_coverage"] == 0.0
    assert attrs["ct_crop_coverage"] == 1.0
    assert np.ptp(report.cache.read("CHUM-001", ("survival/pet",))["survival/pet"]) == 0.0
    assert report.cache.cohort["input_checks"] == {"min_tumour_coverage": 0.0, "min_crop_coverage": 0.0}
    # A rerun under the default limits does not skip the case: it is redone and refused.
    with pytest.raises(CaseError, match="tumour coverage check"):
        run_preprocessing(manifest, tmp_path / "c", PARAMS, workers=1, progress=False)
    with pytest.raises(ValueError, match=r"min_crop_coverage must be a share in \[0, 1\], got 50"):
        run_preprocessing(manifest, tmp_path / "d", PARAMS, min_crop_coverage=50)


def test_case_written_before_the_checks_is_redone(cohort, tmp_path):
    _, manifest, _ = cohort
    out = tmp_path / "cache"
    run_preprocessing(manifest, out, PARAMS, workers=1, progress=False, case_ids=["CHUM-001"])
    with h5py.File(case_file(out, "CHUM-001"), "r+") as h5:  # as an older version wrote it
        for key in ("pet_tumour_coverage", "ct_crop_coverage", "pet_crop_coverage"):
            del h5.attrs[key]
    again = run_preprocessing(manifest, out, PARAMS, workers=1, progress=False, case_ids=["CHUM-001"])
    assert again.processed == ["CHUM-001"] and again.skipped == []
    assert PreprocessedCache(out).attrs("CHUM-001")["pet_tumour_coverage"] == 1.0


def test_nonfinite_voxels_counted_on_the_file_and_on_other_formats(tmp_path):
    # SimpleITK reads NaN and inf in a NIfTI as 0, so the file's own bytes are counted.
    arr = np.ones((4, 5, 6), np.float32)
    arr[0, 0, 0], arr[1, 2, 3], arr[3, 4, 5] = np.nan, np.inf, -np.inf
    img = sitk.GetImageFromArray(arr)
    for name in ("pet.nii.gz", "pet.nii"):
        sitk.WriteImage(img, str(tmp_path / name), useCompression=name.endswith(".gz"))
        assert nifti_nonfinite_counts(tmp_path / name) == (1, 2)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "ct.nii.gz"))
    assert nifti_nonfinite_counts(tmp_path / "ct.nii.gz", whole_stream=True) == (0, 0)
    # Formats that keep NaN through SimpleITK are refused on the read image.
    make_case(tmp_path / "data", "CHUM-001", CASES["CHUM-001"])
    ct, _, lab = _read_case(tmp_path / "data", "CHUM-001")
    with pytest.raises(InputCheckError, match=r"PET holds 3 non-finite voxel\(s\) \(1 NaN, 2 inf\)"):
        preprocess_case(ct, img, lab, replace(PARAMS, crop_size_vox_xyz=(16, 16, 8)))


def test_torch_backend_agrees_with_simpleitk(cohort):
    root, _, report = cohort
    params = PreprocessParams.from_dict(report.cache.params)
    for cid in ("CHUM-001", "CHUM-002"):  # CHUM-002 pads
        ct, pet, lab = _read_case(root, cid)
        a = preprocess_case(ct, pet, lab, params, backend="sitk")
        b = preprocess_case(ct, pet, lab, params, backend="torch", device="cpu")
        for name in ("survival/pet", "survival/ct", "ctfm/ct", "petfm/pet"):
            rng = max(float(np.ptp(a.arrays[name])), 1e-6)
            assert np.abs(a.arrays[name] - b.arrays[name]).max() < 1e-3 * rng, (cid, name)
        mask_a, mask_b = a.arrays["survival/mask"], b.arrays["survival/mask"]
        assert mask_b.dtype == np.uint8 and np.mean(mask_a != mask_b) < 0.005, cid
        assert a.geometry == b.geometry


def test_real_petct_case(sts_root, tmp_path):
    manifest_dir = tmp_path / "m"
    manifest_dir.mkdir()
    row = {c: "" for c in MANIFEST_COLUMNS}
    rel = os.path.relpath(sts_root, manifest_dir)
    row.update(
        case_id="STS-001",
        center_id=1,
        center="CHUM",
        ct_path=f"{rel}/imagesTr/STS-001__CT.nii.gz",
        pet_path=f"{rel}/imagesTr/STS-001__PT.nii.gz",
        label_path=f"{rel}/labelsTr/STS-001.nii.gz",
        task1=1,
        task2=0,
        has_endpoint=0,
        gender="M",
        age=50,
        chemotherapy=0,
        has_gtvp=1,
        has_gtvn=0,
    )
    manifest = manifest_dir / "manifest.csv"
    write_manifest(pd.DataFrame([row]), manifest)
    # A HECKTOR-sized crop (paper sizes otherwise) larger than this cropped scan: must pad.
    params = PreprocessParams(crop_size_vox_xyz=(200, 200, 64), tumour_labels=(1,))
    cache = run_preprocessing(manifest, tmp_path / "cache", params, workers=1, progress=False).cache
    a = cache.read("STS-001", ("survival/pet", "survival/ct", "survival/mask", "ctfm/ct", "petfm/pet"))
    assert a["survival/pet"].shape == (48, 80, 80) and a["petfm/pet"].shape == (128, 128, 128)
    assert a["ctfm/ct"].shape == (48, 128, 128)
    attrs = cache.attrs("STS-001")
    assert attrs["pad_value_ct"] == -1000.0 and attrs["pad_value_pet"] == 0.0
    # The crop leaves the scan: its voxels outside the native grids hold each volume's minimum.
    from pipeline.preprocess import geometry_of

    imgs = [
        sitk.ReadImage(str(sts_root / f))
        for f in ("imagesTr/STS-001__CT.nii.gz", "imagesTr/STS-001__PT.nii.gz", "labelsTr/STS-001.nii.gz")
    ]
    res = preprocess_case(*imgs, PreprocessParams.from_dict(cache.params), keep_crop=True)
    np.testing.assert_allclose(res.arrays["petfm/pet"], a["petfm/pet"])  # same as the cache
    for img, name in zip(imgs, ("ct", "pet", "mask")):
        ci = continuous_index(geometry_of(img), res.crop_geometry)
        outside = ((ci < -0.5) | (ci >= np.asarray(img.GetSize()) - 0.5)).any(axis=-1)
        assert outside.mean() > 0.05, name
        pad = sitk.GetArrayViewFromImage(img).min()
        assert np.all(res.crop[name][outside] == pad), name
    mask, pet = a["survival/mask"].astype(bool), a["survival/pet"]
    assert mask.any() and attrs["tumour_fits_crop"] in (True, 1)
    peak = np.unravel_index(np.argmax(pet), pet.shape)
    near = np.argwhere(mask)
    sp = np.asarray(cache.geometry("STS-001", "survival").spacing_xyz[::-1])
    assert np.linalg.norm((near - np.asarray(peak)) * sp, axis=1).min() < 5.0  # within 5 mm
    assert pet[mask].mean() > 2 * pet[~mask].mean()  # FDG-avid tumour


# --------------------------------------------------------------------------- CLI


def test_cli_summary_and_clean_errors(cohort, tmp_path):
    root, manifest, report = cohort
    runner = CliRunner()
    res = runner.invoke(
        preprocess_cli,
        [
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "c"),
            "--survival-size",
            "16,16,8",
            "--workers",
            "1",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "3 case(s) done, 0 skipped" in res.output and str(tmp_path / "c") in res.output
    gx, gy, gz = PreprocessedCache(tmp_path / "c").crop_size_vox_xyz
    assert f"G = {gx} x {gy} x {gz}" in res.output
    bad = runner.invoke(
        preprocess_cli, ["--manifest", str(manifest), "--out", str(tmp_path / "d"), "--survival-size", "16,16"]
    )
    assert bad.exit_code != 0 and "expected 3 integers" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(preprocess_cli, ["--manifest", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "e")])
    assert missing.exit_code == 1 and "nope.csv: no such manifest (path does not exist)" in missing.output
    assert "Traceback" not in missing.output


def test_cli_demo_preset_fm_sizes_and_refused_case(tmp_path):
    from pipeline.demo import DEMO_SURVIVAL_SIZE_XYZ

    root = tmp_path / "data"
    make_case(root, "CHUM-001", CASES["CHUM-001"])
    manifest = str(uniform_manifest(root, ["CHUM-001"]))
    runner = CliRunner()
    helptext = runner.invoke(preprocess_cli, ["-h"])
    assert helptext.exit_code == 0
    for opt in (
        "--demo",
        "--ctfm-size",
        "--petfm-size",
        "--min-tumour-coverage",
        "--min-crop-coverage",
        "train-survival --preset demo",
    ):
        assert opt in " ".join(helptext.output.split()), opt
    # --demo sets the demo's sizes; the FM size options override them.
    res = runner.invoke(
        preprocess_cli,
        [
            "--manifest",
            manifest,
            "--out",
            str(tmp_path / "c"),
            "--demo",
            "--ctfm-size",
            "24,24,8",
            "--petfm-size",
            "32,32,32",
            "--workers",
            "1",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    params = PreprocessedCache(tmp_path / "c").params
    assert params["survival_size_xyz"] == list(DEMO_SURVIVAL_SIZE_XYZ)
    assert params["ctfm_size_xyz"] == [24, 24, 8] and params["petfm_size_xyz"] == [32, 32, 32]
    a = PreprocessedCache(tmp_path / "c").read("CHUM-001", ("ctfm/ct", "petfm/pet"))
    assert a["ctfm/ct"].shape == (8, 24, 24) and a["petfm/pet"].shape == (32, 32, 32)
    bad = runner.invoke(preprocess_cli, ["--manifest", manifest, "--out", str(tmp_path / "d"), "--petfm-size", "64,64"])
    assert bad.exit_code == 2 and "--petfm-size" in bad.output and "expected 3 integers" in bad.output
    # A PET placed away from the tumour: "error: ..." on stderr, exit 1, the option named.
    _rewrite(root / "imagesTr" / "CHUM-001__PT.nii.gz", _shift_origin((0, 0, 400)))
    args = ["--manifest", manifest, "--out", str(tmp_path / "e"), "--demo", "--workers", "1", "--quiet"]
    refused = runner.invoke(preprocess_cli, args)
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert refused.stderr.startswith(
        "error: case 'CHUM-001': tumour coverage check: PET field of view covers 0.0 % of the tumour"
    ), refused.stderr
    assert "--min-tumour-coverage" in refused.stderr
    allowed = runner.invoke(preprocess_cli, [*args, "--min-tumour-coverage", "0", "--min-crop-coverage", "0"])
    assert allowed.exit_code == 0, allowed.output
