"""grid_sample resampling against SimpleITK's ResampleImageFilter (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from pipeline.cache import GridGeometry
from pipeline.resample_torch import SourceGrid, continuous_index, resample_to_grid

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _rotation_z(theta: float) -> tuple[float, ...]:
    c, s = np.cos(theta), np.sin(theta)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def _smooth_image(dtype=np.float32) -> tuple[np.ndarray, sitk.Image]:
    """[D, H, W] = [18, 22, 26] smooth field on an anisotropic, rotated grid."""
    z, y, x = np.meshgrid(np.arange(18), np.arange(22), np.arange(26), indexing="ij")
    arr = (300 * np.sin(x / 4.0) + 200 * np.cos(y / 5.0) * z / 9.0 + 5 * x).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.9, 1.2, 2.5))
    img.SetOrigin((-11.0, 4.0, 30.0))
    img.SetDirection(_rotation_z(0.25))
    return arr, img


def _sitk(img: sitk.Image, dst: GridGeometry, linear: bool, default: float) -> np.ndarray:
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(dst.origin_xyz)
    f.SetOutputSpacing(dst.spacing_xyz)
    f.SetOutputDirection(dst.direction)
    f.SetSize(dst.size_xyz)
    f.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(default)
    f.SetOutputPixelType(sitk.sitkFloat32 if linear else img.GetPixelID())
    return sitk.GetArrayFromImage(f.Execute(img))


def _src(img: sitk.Image) -> SourceGrid:
    return SourceGrid(img.GetOrigin(), img.GetSpacing(), img.GetDirection())


# Output grids: partly outside the input (padding), fully inside with another direction,
# and a fine grid that samples the outer half voxel of the input.
GRIDS = [
    GridGeometry((-16.0, -2.0, 25.0), (1.0, 1.0, 3.0), IDENTITY, (40, 36, 20)),
    GridGeometry((-4.0, 12.0, 36.0), (0.5, 0.7, 1.3), _rotation_z(0.25), (24, 20, 16)),
    GridGeometry((-11.6, 3.5, 28.9), (0.3, 0.4, 0.9), _rotation_z(0.25), (12, 10, 8)),
]


@pytest.mark.parametrize("dst", GRIDS)
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_linear_matches_simpleitk(dst, dtype):
    arr, img = _smooth_image(dtype)
    ref = _sitk(img, dst, linear=True, default=-777.0)
    out = resample_to_grid(arr, _src(img), dst, default_value=-777.0)
    assert out.dtype == torch.float32 and tuple(out.shape) == dst.size_xyz[::-1]
    out = out.numpy()
    # Same voxels fall outside (default value), and inside values agree closely.
    np.testing.assert_array_equal(out == -777.0, ref == -777.0)
    assert np.abs(out - ref).max() < 1e-3 * float(np.ptp(arr))
    if dtype == np.int16:  # an int16 input must not be rounded to int on the way
        inside = ref != -777.0
        assert np.any(np.abs(out[inside] - np.round(out[inside])) > 1e-2)


def test_outer_half_voxel_repeats_edge_and_beyond_is_default():
    """ITK: index in [-0.5, 0) takes the edge value, index < -0.5 the default."""
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    src = SourceGrid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), IDENTITY)
    img = sitk.GetImageFromArray(arr)
    # x positions -0.75 (outside), -0.25 (outer half voxel), 2.0, 5.25 (outer half), 5.75.
    dst = GridGeometry((-0.75, 2.0, 1.0), (0.5, 1.0, 1.0), IDENTITY, (14, 1, 1))
    out = resample_to_grid(arr, src, dst, default_value=-1.0).numpy()[0, 0]
    ref = _sitk(img, dst, linear=True, default=-1.0)[0, 0]
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert out[0] == -1.0 and out[1] == arr[1, 2, 0]  # -0.75 outside, -0.25 = edge value
    assert out[12] == arr[1, 2, 5] and out[13] == -1.0  # 5.25 = edge value, 5.75 outside


def test_nearest_matches_simpleitk_including_half_up_ties():
    arr, img = _smooth_image()
    lab = (arr > 100).astype(np.uint8) + (arr > 300).astype(np.uint8)
    lab_img = sitk.GetImageFromArray(lab)
    lab_img.CopyInformation(img)
    for dst in GRIDS:
        ref = _sitk(lab_img, dst, linear=False, default=0)
        out = resample_to_grid(lab, _src(img), dst, mode="nearest", out_dtype=None).numpy()
        assert out.dtype == np.uint8
        ci = continuous_index(_src(img), dst)
        tie = (np.abs(np.abs(ci - np.floor(ci)) - 0.5) < 1e-6).any(axis=-1)
        assert np.array_equal(out[~tie], ref[~tie])
        assert (out != ref).mean() < 0.01

    # Exact ties (index k + 0.5): ITK rounds half up; grid_sample's nearest would round to even.
    line = np.arange(8, dtype=np.int16).reshape(1, 1, 8)
    src = SourceGrid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), IDENTITY)
    dst = GridGeometry((0.5, 0.0, 0.0), (1.0, 1.0, 1.0), IDENTITY, (7, 1, 1))
    out = resample_to_grid(line, src, dst, mode="nearest", out_dtype=None).numpy().ravel()
    ref = _sitk(sitk.GetImageFromArray(line), dst, linear=False, default=0).ravel()
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, np.arange(1, 8))


def test_grid_entirely_outside_gives_default():
    arr, img = _smooth_image()
    dst = GridGeometry((500.0, 500.0, 500.0), (1.0, 1.0, 1.0), IDENTITY, (3, 4, 5))
    out = resample_to_grid(arr, _src(img), dst, default_value=-5.0)
    assert tuple(out.shape) == (5, 4, 3) and torch.all(out == -5.0)


def test_accepts_tensor_input_and_rejects_bad_arguments():
    arr, img = _smooth_image()
    dst = GRIDS[1]
    a = resample_to_grid(arr, _src(img), dst)
    b = resample_to_grid(torch.from_numpy(arr), _src(img), dst)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        resample_to_grid(arr, _src(img), dst, mode="cubic")
    with pytest.raises(ValueError, match=r"\[D, H, W\]"):
        resample_to_grid(arr[0], _src(img), dst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.cuda
def test_cuda_matches_cpu():
    arr, img = _smooth_image()
    for dst in GRIDS:
        cpu = resample_to_grid(arr, _src(img), dst, default_value=-1.0)
        gpu = resample_to_grid(arr, _src(img), dst, default_value=-1.0, device="cuda").cpu()
        assert torch.allclose(cpu, gpu, atol=1e-3)
