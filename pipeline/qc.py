"""One picture per patient: what the model saw, where, and what to be careful about.

:func:`case_picture` draws, from the native images of a manifest row and the case's entry in
a preprocessed cache, axial, coronal and sagittal slices through the tumour centre used for
the crop: the CT in a soft-tissue window (W 400, L 40 HU), the PET (SUV, 0 to the case's
SUVmax in the tumour) as a translucent overlay, the tumour contour (the label's outline), the
crop box (the global crop G around that centre, the box every model input is cut from), and
beside them a text panel (the prediction, if any, and every flag: out of the training
range, covariates filled, tumour cut at the crop border, random-init encoders).
:func:`write_index` writes an ``index.html`` listing the pictures with their flags.

Layouts: slices are taken in the CT's index space (x, y, z) at the centre's nearest voxel;
every image is resampled onto those planes (linear for CT and PET, nearest for the label),
so the three views share the CT's grid whatever the PET's. Axes are in millimetres from the
CT's first voxel; axial views show y downwards (anterior at the top), coronal and sagittal
views z upwards (superior at the top).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.cache import CENTER_MM_XYZ, CENTER_SOURCE

#: CT display window (HU): soft tissue, W 400 / L 40.
CT_WINDOW = (-160.0, 240.0)


def _plane(ct: sitk.Image, axis: int, index: int) -> sitk.Image:
    """A one-voxel-thick reference image of the CT grid at ``index`` along ``axis`` (0 = x)."""
    size = list(ct.GetSize())
    size[axis] = 1
    start = [0, 0, 0]
    start[axis] = index
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(ct.GetSpacing())
    ref.SetDirection(ct.GetDirection())
    ref.SetOrigin(ct.TransformIndexToPhysicalPoint(start))
    return ref


def _sample(image: sitk.Image, ref: sitk.Image, nearest: bool, default: float) -> np.ndarray:
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, sitk.Transform(), interp, default)
    return sitk.GetArrayFromImage(out)  # (z, y, x) with one axis of size 1


def _crop_box_index(ct: sitk.Image, origin_xyz, size_xyz, spacing_xyz) -> np.ndarray:
    """The crop box's 8 corners (voxel edges, not centres) as CT continuous indices, (8, 3)."""
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    spacing = np.asarray(spacing_xyz, dtype=float)
    lo = -0.5 * np.ones(3)
    hi = np.asarray(size_xyz, dtype=float) - 0.5
    corners = np.array([[a[0], b[1], c[2]] for a in (lo, hi) for b in (lo, hi) for c in (lo, hi)])
    points = np.asarray(origin_xyz, dtype=float) + (corners * spacing) @ direction.T
    return np.array([ct.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])


def case_picture(
    ct_path: str | os.PathLike,
    pet_path: str | os.PathLike,
    label_path: str | os.PathLike,
    attrs: dict[str, Any],
    spacing_xyz: Sequence[float],
    out_png: str | os.PathLike,
    *,
    title: str,
    lines: Sequence[str] = (),
    flags: Sequence[str] = (),
    tumour_labels: Sequence[int] = (1, 2),
) -> Path:
    """Write one patient's picture (see the module doc).

    Args:
        ct_path, pet_path, label_path: the native images (a manifest row's files).
        attrs: the case's cache attributes (:data:`~pipeline.cache.CENTER_MM_XYZ`, ``crop_origin_xyz``,
            ``crop_size_vox_xyz``).
        spacing_xyz: the cache's resampling spacing (mm), the crop grid's.
        out_png: where to write.
        title: first line (the case id). lines: facts (the prediction). flags: warnings, in red.
        tumour_labels: label values outlined.

    Returns:
        ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ct = sitk.ReadImage(str(ct_path))
    pet = sitk.ReadImage(str(pet_path))
    label = sitk.ReadImage(str(label_path))
    centre = ct.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in attrs[CENTER_MM_XYZ]))
    size = ct.GetSize()
    idx = [int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, size)]
    box = _crop_box_index(ct, attrs["crop_origin_xyz"], attrs["crop_size_vox_xyz"], spacing_xyz)
    tumour = sitk.GetArrayFromImage(label)
    tumour = np.isin(tumour, list(tumour_labels))
    pet_arr = _sample(pet, _plane(ct, 2, idx[2]), False, 0.0)  # for the display range only
    suv_top = float(max(np.percentile(pet_arr, 99.5), 1e-3))

    fig = plt.figure(figsize=(12.0, 4.2), dpi=72)
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.15], wspace=0.25)
    views = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))
    for col, (name, axis, (u, v)) in enumerate(views):
        ax = fig.add_subplot(grid[0, col])
        _draw_view(ax, ct, pet, label, name, axis, (u, v), idx, centre, box, suv_top, tumour_labels)
    _draw_text_panel(fig.add_subplot(grid[0, 3]), title, lines, flags, suv_top, attrs["crop_size_vox_xyz"])
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return out_png


def _draw_view(
    ax: Any,
    ct: sitk.Image,
    pet: sitk.Image,
    label: sitk.Image,
    name: str,
    axis: int,
    uv: tuple[int, int],
    idx: Sequence[int],
    centre: Sequence[float],
    box: np.ndarray,
    suv_top: float,
    tumour_labels: Sequence[int],
) -> None:
    """Draw one view on ``ax``: the CT slice through ``idx`` normal to ``axis``, the PET overlay, the
    tumour contour, the crop box and the centre; ``uv`` are the CT axes shown across and down."""
    import matplotlib.pyplot as plt

    u, v = uv
    size = ct.GetSize()
    sp = ct.GetSpacing()
    ref = _plane(ct, axis, idx[axis])
    img = np.squeeze(_sample(ct, ref, False, -1024.0), axis=2 - axis)
    suv = np.squeeze(_sample(pet, ref, False, 0.0), axis=2 - axis)
    lab = np.squeeze(_sample(sitk.Cast(label, sitk.sitkUInt8), ref, True, 0.0), axis=2 - axis)
    lab = np.isin(np.rint(lab).astype(int), list(tumour_labels))
    extent = (-0.5 * sp[u], (size[u] - 0.5) * sp[u], (size[v] - 0.5) * sp[v], -0.5 * sp[v])
    origin = "upper" if name == "axial" else "lower"
    if origin == "lower":
        extent = (extent[0], extent[1], extent[3], extent[2])
    ax.imshow(
        img,
        cmap="gray",
        vmin=CT_WINDOW[0],
        vmax=CT_WINDOW[1],
        extent=extent,
        origin=origin,
        interpolation="nearest",
    )
    shown = np.ma.masked_less(suv, 0.2 * suv_top)
    ax.imshow(
        shown, cmap="hot", vmin=0.0, vmax=suv_top, alpha=0.4, extent=extent, origin=origin, interpolation="nearest"
    )
    if lab.any():
        ys = (np.arange(lab.shape[0])) * sp[v]
        xs = (np.arange(lab.shape[1])) * sp[u]
        ax.contour(xs, ys, lab.astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=1.2)
    lo, hi = box[:, [u, v]].min(axis=0), box[:, [u, v]].max(axis=0)
    ax.add_patch(
        plt.Rectangle(
            (lo[0] * sp[u], lo[1] * sp[v]),
            (hi[0] - lo[0]) * sp[u],
            (hi[1] - lo[1]) * sp[v],
            fill=False,
            edgecolor="#7CFC00",
            linewidth=1.2,
            linestyle="--",
        )
    )
    ax.plot(centre[u] * sp[u], centre[v] * sp[v], "+", color="#7CFC00", markersize=8)
    ax.set_title(f"{name} (slice {idx[axis]})", fontsize=9)
    ax.tick_params(labelsize=6)
    ax.set_xlabel("mm", fontsize=6)


def _draw_text_panel(
    text: Any, title: str, lines: Sequence[str], flags: Sequence[str], suv_top: float, crop_size_vox_xyz: Sequence[int]
) -> None:
    """Write the text panel on the axes ``text``: the title, the facts, the flags in red and the legend."""
    text.axis("off")
    y = 1.0
    text.text(0.0, y, title, fontsize=11, fontweight="bold", va="top", transform=text.transAxes)
    y -= 0.09
    legend = (
        f"CT W400/L40; PET SUV 0-{suv_top:.1f} (hot); tumour contour (cyan); "
        f"crop box {' x '.join(str(int(v)) for v in crop_size_vox_xyz)} voxels (green, dashed)"
    )
    for line, colour in [(s, "black") for s in lines] + [(s, "#c00000") for s in flags] + [(legend, "#555555")]:
        wrapped = _wrap(line, 52)
        text.text(0.0, y, wrapped, fontsize=7.5, color=colour, va="top", transform=text.transAxes)
        y -= 0.058 * (wrapped.count("\n") + 1) + 0.015


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def write_index(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, title: str) -> Path:
    """``index.html`` in ``out_dir``: one row per picture (``case_id``, ``png`` relative to
    ``out_dir``, ``lines`` and ``flags``), flagged patients marked."""
    out_dir = Path(out_dir)
    body = []
    for row in rows:
        flags = "".join(f"<li class=flag>{html.escape(f)}</li>" for f in row.get("flags", ()))
        lines = "".join(f"<li>{html.escape(s)}</li>" for s in row.get("lines", ()))
        body.append(
            f"<tr><td><b>{html.escape(str(row['case_id']))}</b><ul>{lines}{flags}</ul></td>"
            f'<td><a href="{html.escape(row["png"])}"><img src="{html.escape(row["png"])}" '
            "width=720></a></td></tr>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif} td{vertical-align:top;padding:6px} .flag{color:#c00000}</style>"
        f"<h1>{html.escape(title)}</h1><table>{''.join(body)}</table>\n"
    )
    path = out_dir / "index.html"
    path.write_text(page)
    return path


def cache_pictures(
    manifest_path: str | os.PathLike,
    cache_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    extra: dict[str, dict[str, list[str]]] | None = None,
    title: str = "",
) -> list[dict[str, Any]]:
    """A picture of every case of a preprocessed cache (native images from its manifest) and the
    index; ``extra``: case id -> {"lines": [...], "flags": [...]} added to its own flags.

    Returns:
        The index rows (``case_id``, ``png``, ``lines``, ``flags``).
    """
    from pipeline.cache import PreprocessedCache
    from pipeline.manifest import read_manifest

    cache = PreprocessedCache(cache_root)
    manifest = read_manifest(manifest_path)  # indexed by case id, absolute paths
    spacing = cache.cohort.get("spacing_mm_xyz") or cache.params.get("spacing_mm_xyz") or (1.0, 1.0, 3.0)
    labels = cache.params.get("tumour_labels", (1, 2))
    rows = []
    out_dir = Path(out_dir)
    for cid in manifest.index:
        if not cache.path(cid).is_file():
            continue
        attrs = cache.attrs(cid)
        row = manifest.loc[cid]
        more = (extra or {}).get(cid, {})
        flags = list(more.get("flags", []))
        if not bool(attrs.get("tumour_fits_crop", True)):
            flags.append("tumour larger than the crop G: cut at the crop border")
        lines = [f"tumour {float(attrs['tumour_volume_ml']):.1f} ml, centre from the {attrs.get(CENTER_SOURCE, '')}"]
        lines += list(more.get("lines", []))
        png = case_picture(
            row["ct_path"],
            row["pet_path"],
            row["label_path"],
            attrs,
            spacing,
            out_dir / f"{cid}.png",
            title=str(cid),
            lines=lines,
            flags=flags,
            tumour_labels=labels,
        )
        rows.append({"case_id": cid, "png": png.name, "lines": lines, "flags": flags})
    write_index(rows, out_dir, title or f"{len(rows)} case(s) of {cache.root}")
    return rows
