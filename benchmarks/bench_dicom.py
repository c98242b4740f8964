"""Seconds per case of ``import-dicom`` vs the floor of merely reading the files' pixel data.

Inputs are written here at HECKTOR size with the project's DICOM writer
(:mod:`pipeline.dicom.demo_writer`): per case a CT series of 512 x 512 x 200 int16 HU at
0.977 x 0.977 x 3 mm (body, bone ring, air, Gaussian noise of 20 HU so gzip has real work),
a PET series of 192 x 192 x 200 in Bq/ml (int16 with a RescaleSlope per slice) at
3.65 x 3.65 x 3 mm with another origin, and an RT Structure Set with a primary and a node
(voxel-edge outlines on every slice they cross).

Measured per case (one process; best of ``--repeats`` runs):

* read floor: ``pydicom.dcmread(path).pixel_array`` of every CT and PET file, and
  ``dcmread`` of the structure set;
* import: :func:`pipeline.dicom.convert.import_dicom` over all cases (scan of every header,
  sorting and checks, pixel data with the rescale per slice, SUV, contour fill, three gzip
  NIfTI files, provenance), divided by the number of cases;
* write floor: ``sitk.WriteImage`` of the import's three gzip NIfTI files, one after another
  (the HECKTOR layout's ``.nii.gz``; gzip of a noisy 512 x 512 x 200 CT dominates);
* ratios: import / read floor (the aim: <= 1.5) and import / (read + write floor), the
  import's own overhead (below 1 where it compresses while reading).

Usage::

    python benchmarks/bench_dicom.py --cases 2 --out benchmarks/dicom.md
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.demo_cohort import image_from_array
from pipeline.dicom.convert import import_dicom
from pipeline.dicom.demo_writer import suv_per_bqml, write_rtstruct, write_series

CT_SIZE, CT_SPACING = (512, 512, 200), (0.977, 0.977, 3.0)
PET_SIZE, PET_SPACING = (192, 192, 200), (3.65, 3.65, 3.0)


def _phantom(rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """CT (HU), PET (SUV) and label of one case; numpy (z, y, x), images (x, y, z)."""
    nx, ny, nz = CT_SIZE
    y, x = np.mgrid[0:ny, 0:nx]
    r = np.hypot((x - nx / 2) / (nx * 0.38), (y - ny / 2) / (ny * 0.3))
    plane = np.where(r < 1, 40.0, -1000.0) + np.where((r > 0.55) & (r < 0.62), 700.0, 0.0)
    ct = np.repeat(plane[None], nz, axis=0) + rng.normal(0, 20, (nz, ny, nx))
    zz, yy, xx = np.ogrid[0:nz, 0:ny, 0:nx]
    label = np.zeros((nz, ny, nx), np.uint8)
    label[((xx - 240) / 30.0) ** 2 + ((yy - 250) / 25.0) ** 2 + ((zz - 100) / 8.0) ** 2 < 1] = 1
    label[((xx - 300) / 12.0) ** 2 + ((yy - 230) / 12.0) ** 2 + ((zz - 90) / 4.0) ** 2 < 1] = 2
    origin = (-250.0, -250.0, -300.0)
    ct_img = image_from_array(np.clip(np.round(ct), -1024, 3000).astype(np.int16), CT_SPACING, origin)
    lab = image_from_array(label, CT_SPACING, origin)
    px, py, pz = PET_SIZE
    pet = np.abs(rng.normal(1.0, 0.2, (pz, py, px))) + 8.0 * np.exp(
        -(((np.arange(px) - 96) / 8.0) ** 2)[None, None, :] - (((np.arange(py) - 100) / 8.0) ** 2)[None, :, None]
    )
    pet_img = image_from_array(pet, PET_SPACING, (-348.0, -345.0, -300.0))
    return ct_img, pet_img, lab


def write_cases(folder: Path, n: int) -> None:
    """``n`` HECKTOR-size cases as DICOM under ``folder`` (see the module doc)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        pid = f"BENCH-{i + 1:03d}"
        patient = {"id": pid, "age": "060Y", "sex": "M", "weight": 80.0}
        uids = {k: pydicom.uid.generate_uid(entropy_srcs=[pid, k]) for k in ("study", "frame", "CT", "PT", "RTSTRUCT")}
        ct, pet, label = _phantom(rng)
        sops = write_series(ct, folder / pid / "ct", "CT", patient, uids)
        write_series(sitk.Cast(pet, sitk.sitkFloat64) / suv_per_bqml(80.0), folder / pid / "pet", "PT", patient, uids)
        write_rtstruct(label, ct, sops, folder / pid / "rs" / "rs.dcm", patient, uids)


def read_floor(folder: Path) -> float:
    """Seconds to read every file's pixel data (and the structure sets) once."""
    start = time.perf_counter()
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if "PixelData" in ds:
            ds.pixel_array  # noqa: B018 - decoding is what is timed
    return time.perf_counter() - start


def write_floor(root: Path, scratch: Path) -> float:
    """Seconds to write the import's three NIfTI files per case again with SimpleITK, one after another."""
    images = [sitk.ReadImage(str(p)) for p in sorted(root.glob("*Tr/*.nii.gz"))]
    scratch.mkdir(exist_ok=True)
    start = time.perf_counter()
    for i, image in enumerate(images):
        sitk.WriteImage(image, str(scratch / f"{i}.nii.gz"), True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to write the result to.")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_dicom-"))
    try:
        write_cases(work / "src", args.cases)
        floor = min(read_floor(work / "src") for _ in range(args.repeats)) / args.cases
        times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            import_dicom(work / "src", work / f"out{r}", center_id=9)
            times.append((time.perf_counter() - start) / args.cases)
        best = min(times)
        written = min(write_floor(work / "out0", work / "rewrite") for _ in range(args.repeats)) / args.cases
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (
        f"# import-dicom vs read floor\n\n{args.cases} case(s) of CT {CT_SIZE} + PET {PET_SIZE} + RTSTRUCT; "
        f"best of {args.repeats}; {platform.processor() or platform.machine()}, Python {sys.version.split()[0]}\n\n"
        f"| read floor s/case | write floor s/case | import s/case | import / read floor | "
        f"import / (read + write floor) |\n| ---: | ---: | ---: | ---: | ---: |\n"
        f"| {floor:.2f} | {written:.2f} | {best:.2f} | {best / floor:.2f}x | {best / (floor + written):.2f}x |\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
