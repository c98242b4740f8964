"""Seconds per case of preprocessing vs the floor of merely reading the same inputs.

Inputs are built here at HECKTOR size (they are not the demo cohort, so the numbers do not
depend on its design): per case a CT of 512 x 512 x 150 int16 HU at 0.977 x 0.977 x 3 mm
with a body, bone ring, air and Gaussian noise (sigma 20 HU, so gzip has real work), a PET
of 192 x 192 x 150 float32 SUV at 3.65 x 3.65 x 3 mm with another origin and multiplicative
noise, and a uint8 label on the CT grid (a primary and a node), all gzip-compressed NIfTI.

Measured per case (one process, SimpleITK threads = all cores):

* read floor: ``sitk.ReadImage`` of CT, PET and label (median over cases);
* pass 1: read the label (+ CT header) and locate the tumour (:func:`locate_tumour`);
* pass 2: read, resample the crop, resize to 80x80x48 / 128x128x48 / 128^3, normalise,
  write the HDF5: one :func:`pipeline.preprocess.run_preprocessing` over all cases with a
  given G (sha256 given in the manifest, as ``build-manifest`` writes it), divided by the
  number of cases;
* total = pass 1 + pass 2, and its ratio to the read floor (aim: <= 2).

Usage::

    python benchmarks/bench_preprocess.py --cases 3 --out benchmarks/preprocess.md
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from pipeline.demo_cohort import uniform_manifest, write_image
from pipeline.manifest import read_manifest
from pipeline.preprocess import PreprocessParams, compute_crop_size, run_preprocessing

CT_SIZE, CT_SPACING = (512, 512, 150), (0.977, 0.977, 3.0)
PET_SIZE, PET_SPACING = (192, 192, 150), (3.65, 3.65, 3.0)


def make_case(root: Path, cid: str, rng: np.random.Generator) -> None:
    """One HECKTOR-size case under ``root`` (imagesTr/, labelsTr/)."""
    ct_origin = (-250.0 + rng.uniform(-5, 5), -250.0 + rng.uniform(-5, 5), -400.0)
    nz, ny, nx = CT_SIZE[::-1]
    z = (np.arange(nz) * CT_SPACING[2] + ct_origin[2])[:, None, None]
    y = (np.arange(ny) * CT_SPACING[1] + ct_origin[1])[None, :, None]
    x = (np.arange(nx) * CT_SPACING[0] + ct_origin[0])[None, None, :]
    body = (x / 150.0) ** 2 + (y / 120.0) ** 2 <= 1.0
    bone = np.abs(np.hypot(x, y + 40.0) - 15.0) < 4.0
    ct = np.where(body, 40.0, -1000.0) + np.where(bone, 800.0, 0.0)
    ct = np.broadcast_to(ct, (nz, ny, nx)).astype(np.float32)
    ct = ct + rng.normal(0, 20, size=ct.shape).astype(np.float32)
    lab = np.zeros((nz, ny, nx), np.uint8)
    primary = np.array([rng.uniform(-30, 30), rng.uniform(10, 40), rng.uniform(-250, -150)])
    node = np.array([rng.uniform(40, 70), rng.uniform(-10, 20), rng.uniform(-250, -150)])
    lesions = [(1, primary, 15.0), (2, node, 8.0)]
    for value, c, r in lesions:
        inside = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= r**2
        lab[inside] = value
        ct[inside] += 20.0
    write_image(
        np.clip(ct, -1024, 3071).astype(np.int16), CT_SPACING, ct_origin, root / "imagesTr" / f"{cid}__CT.nii.gz"
    )
    write_image(lab, CT_SPACING, ct_origin, root / "labelsTr" / f"{cid}.nii.gz")
    del ct, lab
    pet_origin = tuple(o + rng.uniform(-4, 4) for o in (-350.0, -350.0, -400.0))
    pz, py, px = PET_SIZE[::-1]
    z = (np.arange(pz) * PET_SPACING[2] + pet_origin[2])[:, None, None]
    y = (np.arange(py) * PET_SPACING[1] + pet_origin[1])[None, :, None]
    x = (np.arange(px) * PET_SPACING[0] + pet_origin[0])[None, None, :]
    pet = np.broadcast_to(np.where((x / 150.0) ** 2 + (y / 120.0) ** 2 <= 1.0, 1.0, 0.02), (pz, py, px)).astype(
        np.float32
    )
    for _, c, r in lesions:
        d2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        pet = pet + 8.0 * np.exp(-d2 / (2 * r**2))
    pet = pet * rng.gamma(25.0, 1 / 25.0, size=pet.shape)
    write_image(pet.astype(np.float32), PET_SPACING, pet_origin, root / "imagesTr" / f"{cid}__PT.nii.gz")


def read_floor(manifest: pd.DataFrame) -> list[float]:
    out = []
    for row in manifest.itertuples(index=False):
        t0 = time.perf_counter()
        for p in (row.ct_path, row.pet_path, row.label_path):
            sitk.ReadImage(p)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="keep inputs here (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    ap.add_argument("--backends", default="sitk,torch")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    threads = os.cpu_count() or 1
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(threads)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        ids = [f"BENCH-{i:03d}" for i in range(args.cases)]
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        built = 0
        for cid in ids:
            if not (root / "imagesTr" / f"{cid}__PT.nii.gz").is_file():
                make_case(root, cid, rng)
                built += 1
        build_s = time.perf_counter() - t0
        manifest_path = uniform_manifest(root, ids, checksums=True, has_gtvn=1)
        manifest = read_manifest(manifest_path)
        sizes_mb = (
            sum(os.path.getsize(p) for c in ("ct_path", "pet_path", "label_path") for p in manifest[c]) / 1e6 / len(ids)
        )

        read_floor(manifest.iloc[:1])  # warm the page cache, so every pass reads from memory
        floor = statistics.median(read_floor(manifest))
        params = PreprocessParams()
        t0 = time.perf_counter()
        g = compute_crop_size(manifest, params, workers=1, progress=False)
        pass1 = (time.perf_counter() - t0) / len(ids)
        fixed = PreprocessParams(crop_size_vox_xyz=g)

        rows = []
        for backend in args.backends.split(","):
            device = args.device if backend == "torch" else "cpu"
            out = root / f"cache-{backend}"
            shutil.rmtree(out, ignore_errors=True)  # a kept workdir must not skip
            report = run_preprocessing(
                manifest_path, out, fixed, workers=1, backend=backend, device=device, progress=False
            )
            assert sorted(report.processed) == ids, report.processed
            pass2 = report.seconds / len(ids)
            rows.append((backend, device, pass1, pass2, pass1 + pass2, (pass1 + pass2) / floor))

    lines = [
        "# Preprocessing benchmark",
        "",
        f"Command: `python benchmarks/bench_preprocess.py --cases {args.cases}"
        f"{' --out ' + str(args.out) if args.out else ''}`",
        "",
        f"Inputs: {args.cases} synthetic HECKTOR-size cases built by the benchmark: CT "
        f"{'x'.join(map(str, CT_SIZE))} int16 at {CT_SPACING} mm, PET "
        f"{'x'.join(map(str, PET_SIZE))} float32 at {PET_SPACING} mm (other origin), "
        "uint8 label on the CT grid; gzip NIfTI, "
        f"{sizes_mb:.1f} MB per case on disk ({built} built in {build_s:.0f} s, "
        f"{len(ids) - built} reused from --workdir).",
        f"Outputs: paper sizes (survival 80x80x48, CT-FM 128x128x48, PET-FM 128^3), G = {g} "
        "voxels at 1x1x3 mm, one HDF5 per case.",
        f"Machine: {platform.processor() or platform.machine()}, {threads} CPU cores "
        f"(shared with other jobs, so timings are noisy), Python {platform.python_version()}, "
        f"SimpleITK {sitk.Version.VersionString()}, torch {torch.__version__}; one process, "
        f"SimpleITK/torch threads = {threads}; files in the page cache.",
        "",
        f"Read floor (sitk.ReadImage of CT + PET + label, median per case): **{floor:.2f} s**",
        "",
        "| backend | device | pass 1 s/case | pass 2 s/case | total s/case | total / read floor |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for backend, device, p1, p2, tot, ratio in rows:
        lines.append(f"| {backend} | {device} | {p1:.2f} | {p2:.2f} | {tot:.2f} | {ratio:.2f}x |")
    lines += [
        "",
        "Pass 1 reads the label and the CT header and locates the tumour (done once per cohort); "
        "pass 2 reads CT, PET and label again, resamples only the crop, resizes, normalises "
        "and writes the case. Hashing inputs (when the manifest has no sha256) is extra.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
