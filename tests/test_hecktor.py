"""HECKTOR 2022 reader: CSV format, manifest content, and every rejected input."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from pipeline.artefacts import read_json, sha256_file
from pipeline.cli.data import build_manifest as build_manifest_cli
from pipeline.cli.data import make_demo_cohort as make_demo_cohort_cli
from pipeline.demo_cohort import write_image
from pipeline.hecktor import (
    CLINICAL_CSV,
    ENDPOINT_CSV,
    HecktorFormatError,
    build_manifest,
    default_error_report,
    manifest_sidecar_path,
)
from pipeline.manifest import MANIFEST_COLUMNS, read_manifest
from pipeline.splits import leave_one_centre_out

HEADER = (
    "PatientID,Task 1,Task 2,CenterID,Gender,Age,Weight,Tobacco,Alcohol,"
    'Performance status,"HPV status (0=-, 1=+)",Surgery,Chemotherapy'
)
CLINICAL_ROWS = [
    "CHUM-001,1,1,1,M,63,82.5,1,NaN,0,0,NaN,1",
    "CHUP-002,1,1,2,F,55,NaN,0,0,NaN,1,0,1",  # no GTVp
    "MDA-105,1,0,5,M,70,90.0,NaN,NaN,2,NaN,1,0",  # Task 1 only, no endpoint
]
ENDPOINT_ROWS = ["CHUM-001,1,412", "CHUP-002,0,1803"]
LABELS = {"CHUM-001": (1, 2), "CHUP-002": (2,), "MDA-105": (1,)}


def _write_case(root: Path, cid: str, values=(1, 2)) -> None:
    ct = np.full((4, 8, 8), -1000, np.int16)
    ct[1:3, 2:6, 2:6] = 40
    label = np.zeros((4, 8, 8), np.uint8)
    for i, v in enumerate(values):
        label[1:3, 2 + 2 * i : 4 + 2 * i, 3:5] = v
    pet = np.ones((3, 4, 4), np.float32)
    write_image(ct, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), root / "imagesTr" / f"{cid}__CT.nii.gz")
    write_image(label, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), root / "labelsTr" / f"{cid}.nii.gz")
    write_image(pet, (2.5, 2.5, 3.0), (1.5, -2.0, 0.5), root / "imagesTr" / f"{cid}__PT.nii.gz")


def _write_csv(path: Path, header: str, rows: list[str], newline: str = "\r\n") -> None:
    path.write_bytes((newline.join([header, *rows]) + newline).encode())


def make_root(root: Path, clinical=CLINICAL_ROWS, endpoint=ENDPOINT_ROWS, newline="\r\n", labels=LABELS) -> Path:
    for cid, values in labels.items():
        _write_case(root, cid, values)
    _write_csv(root / CLINICAL_CSV, HEADER, list(clinical), newline)
    _write_csv(root / ENDPOINT_CSV, "PatientID,Relapse,RFS", list(endpoint), newline)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "hecktor")


def test_manifest_from_crlf_csvs_with_nan(root: Path, tmp_path: Path):
    assert b"\r\n" in (root / CLINICAL_CSV).read_bytes()
    out = tmp_path / "out" / "data_manifest.csv"
    df = build_manifest(root, out, workers=2, progress=False)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    m = read_manifest(out)
    assert list(m.index) == ["CHUM-001", "CHUP-002", "MDA-105"]
    a, b, c = m.loc["CHUM-001"], m.loc["CHUP-002"], m.loc["MDA-105"]
    # Task flags, endpoint and centre.
    assert (a.task1, a.task2, c.task2) == (1, 1, 0)
    assert (a.has_endpoint, b.has_endpoint, c.has_endpoint) == (1, 1, 0)
    assert (a.relapse, a.rfs_days, b.relapse, b.rfs_days) == (1, 412, 0, 1803)
    assert pd.isna(c.relapse) and pd.isna(c.rfs_days)
    assert (a.center, b.center, c.center) == ("CHUM", "CHUP", "MDA")
    # "NaN" text -> missing; values kept otherwise.
    assert pd.isna(a.alcohol) and pd.isna(a.surgery) and a.tobacco == 1 and a.weight == 82.5
    assert pd.isna(b.weight) and pd.isna(b.performance_status) and b.hpv_status == 1
    assert (a.gender, b.gender, a.age) == ("M", "F", 63)
    # Labels: a case without GTVp.
    assert (a.has_gtvp, a.has_gtvn) == (1, 1)
    assert (b.has_gtvp, b.has_gtvn) == (0, 1)
    assert (c.has_gtvp, c.has_gtvn) == (1, 0)
    # Paths are stored relative to the manifest folder and resolve to the files.
    raw = pd.read_csv(out)
    assert raw.loc[0, "ct_path"] == "../hecktor/imagesTr/CHUM-001__CT.nii.gz"
    assert Path(m.loc["CHUP-002", "label_path"]) == (root / "labelsTr" / "CHUP-002.nii.gz").resolve()
    assert m.loc["CHUM-001", "pet_sha256"] == sha256_file(root / "imagesTr" / "CHUM-001__PT.nii.gz")
    # Integer columns are written as integers, not "1.0".
    fields = dict(zip(MANIFEST_COLUMNS, out.read_text().splitlines()[1].split(",")))
    assert [fields[k] for k in ("task1", "task2", "has_endpoint", "relapse", "rfs_days", "tobacco", "alcohol")] == [
        "1",
        "1",
        "1",
        "1",
        "412",
        "1",
        "",
    ]
    record = read_json(manifest_sidecar_path(out))
    assert record["clinical_csv_sha256"] == sha256_file(root / CLINICAL_CSV)
    assert record["n_cases"] == 3 and record["n_events"] == 1 and "demo_cohort" not in record


def test_lf_endings_bom_and_padded_ids_are_accepted(tmp_path: Path):
    clinical = [" CHUM-001 ,1,1,1,M,63,82.5,1,NaN,0,0,NaN,1", "CHUP-002,1,1,2,F,55,,0,0,NaN,1,0,1"]
    root = make_root(
        tmp_path / "r",
        clinical=clinical,
        endpoint=["CHUM-001 ,1,412", "CHUP-002,0,9"],
        newline="\n",
        labels={"CHUM-001": (1,), "CHUP-002": (2,)},
    )
    (root / ENDPOINT_CSV).write_bytes(b"\xef\xbb\xbf" + (root / ENDPOINT_CSV).read_bytes())
    m = build_manifest(root, tmp_path / "m.csv", checksums=False, progress=False)
    assert list(m["case_id"]) == ["CHUM-001", "CHUP-002"]
    assert list(m["rfs_days"]) == [412, 9]
    assert pd.isna(m.loc[1, "weight"])
    assert (m["ct_sha256"] == "").all() and (read_manifest(tmp_path / "m.csv")["ct_sha256"] == "").all()


def _remove(rel):
    return lambda root: (root / rel).unlink()


def _edit_csv(name, old, new):
    def edit(root):
        path = root / name
        text = path.read_bytes().decode()
        assert old in text
        path.write_bytes(text.replace(old, new, 1).encode())

    return edit


def _append_csv(name, row):
    return lambda root: (root / name).write_bytes((root / name).read_bytes() + (row + "\r\n").encode())


def _garbage(rel):
    return lambda root: (root / rel).write_bytes(b"this is not a NIfTI file at all" * 20)


def _truncate(rel):
    def edit(root):
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])

    return edit


def _label_value_3(root):
    arr = np.zeros((4, 8, 8), np.uint8)
    arr[1, 1, 1] = 3
    write_image(arr, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), root / "labelsTr" / "CHUP-002.nii.gz")


def _label_off_grid(root):
    write_image(np.zeros((4, 8, 8), np.uint8), (1.0, 1.0, 2.0), (5.0, 0.0, 0.0), root / "labelsTr" / "CHUM-001.nii.gz")


def _pet_moved(root, cid="CHUM-001", shift=(0.0, 0.0, 300.0)):
    """The PET's header places it 30 cm away: the file is fine, the geometry is not."""
    path = root / "imagesTr" / f"{cid}__PT.nii.gz"
    img = sitk.ReadImage(str(path))
    img.SetOrigin(tuple(o + d for o, d in zip(img.GetOrigin(), shift)))
    sitk.WriteImage(img, str(path), useCompression=True)


def _pet_nan(root):
    pet = np.ones((3, 4, 4), np.float32)
    pet[1, 2, 2], pet[0, 0, 1] = np.nan, -np.inf
    write_image(pet, (2.5, 2.5, 3.0), (1.5, -2.0, 0.5), root / "imagesTr" / "MDA-105__PT.nii.gz")


BAD_INPUTS = {
    # name: (mutation, case id in the message, file name in the message, other text)
    "missing CT": (_remove("imagesTr/CHUM-001__CT.nii.gz"), "CHUM-001", "CHUM-001__CT.nii.gz", "not found"),
    "missing PET": (_remove("imagesTr/MDA-105__PT.nii.gz"), "MDA-105", "MDA-105__PT.nii.gz", "not found"),
    "missing label": (_remove("labelsTr/CHUP-002.nii.gz"), "CHUP-002", "CHUP-002.nii.gz", "not found"),
    "duplicate clinical id": (_append_csv(CLINICAL_CSV, CLINICAL_ROWS[1]), "CHUP-002", CLINICAL_CSV, "duplicate"),
    "duplicate endpoint id": (_append_csv(ENDPOINT_CSV, "CHUM-001,0,20"), "CHUM-001", ENDPOINT_CSV, "duplicate"),
    "endpoint row without images": (_append_csv(ENDPOINT_CSV, "HGJ-077,0,300"), "HGJ-077", ENDPOINT_CSV, "no images"),
    "negative RFS": (_edit_csv(ENDPOINT_CSV, "CHUP-002,0,1803", "CHUP-002,0,-3"), "CHUP-002", ENDPOINT_CSV, "'RFS'"),
    "non-numeric RFS": (
        _edit_csv(ENDPOINT_CSV, "CHUM-001,1,412", "CHUM-001,1,12d"),
        "CHUM-001",
        ENDPOINT_CSV,
        "non-numeric",
    ),
    "relapse not 0/1": (
        _edit_csv(ENDPOINT_CSV, "CHUM-001,1,412", "CHUM-001,2,412"),
        "CHUM-001",
        ENDPOINT_CSV,
        "'Relapse'",
    ),
    "gender not M/F": (
        _edit_csv(CLINICAL_CSV, "CHUP-002,1,1,2,F", "CHUP-002,1,1,2,X"),
        "CHUP-002",
        CLINICAL_CSV,
        "Gender",
    ),
    "unreadable CT": (_garbage("imagesTr/CHUP-002__CT.nii.gz"), "CHUP-002", "CHUP-002__CT.nii.gz", "unreadable"),
    "truncated PET": (_truncate("imagesTr/CHUM-001__PT.nii.gz"), "CHUM-001", "CHUM-001__PT.nii.gz", "unreadable"),
    "label value 3": (_label_value_3, "CHUP-002", "CHUP-002.nii.gz", "[3]"),
    "label off the CT grid": (_label_off_grid, "CHUM-001", "CHUM-001.nii.gz", "origin"),
    "PET away from the tumour": (
        _pet_moved,
        "CHUM-001",
        "CHUM-001__PT.nii.gz",
        "PET field of view covers 0.0 % of the tumour",
    ),
    "NaN and inf in the PET": (
        _pet_nan,
        "MDA-105",
        "MDA-105__PT.nii.gz",
        "PET holds 2 non-finite voxel(s) (1 NaN, 1 inf)",
    ),
    "CenterID not an integer": (
        _edit_csv(CLINICAL_CSV, "CHUP-002,1,1,2,F", "CHUP-002,1,1,2.5,F"),
        "CHUP-002",
        CLINICAL_CSV,
        "'CenterID': value '2.5' is not an integer",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_case_and_file_and_writes_nothing(name, root: Path, tmp_path: Path):
    mutate, case_id, file_name, text = BAD_INPUTS[name]
    mutate(root)
    out = tmp_path / "out" / "data_manifest.csv"
    with pytest.raises(HecktorFormatError) as info:
        build_manifest(root, out, progress=False)
    message = str(info.value)
    assert case_id in message and file_name in message and text in message, message
    assert any(e.case_id == case_id for e in info.value.errors)
    assert not out.exists() and not manifest_sidecar_path(out).exists()
    assert not default_error_report(out).exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))


@pytest.mark.parametrize(
    "content, text",
    [
        (HEADER.replace(",Surgery", "").encode() + b"\r\nCHUM-001,1,1,1,M,63,82.5,1,NaN,0,0,1\r\n", "'Surgery'"),
        (b"PatientID,Task 1\r\n\xff\xfeCHUM\r\n", "UTF-8"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03binary", "not a CSV"),
        (b"", "not a readable CSV"),
    ],
)
def test_unreadable_or_incomplete_clinical_csv(content: bytes, text: str, root: Path, tmp_path: Path):
    (root / CLINICAL_CSV).write_bytes(content)
    out = tmp_path / "m.csv"
    for continue_on_error in (False, True):  # a broken CSV cannot be skipped
        with pytest.raises(HecktorFormatError) as info:
            build_manifest(root, out, continue_on_error=continue_on_error, progress=False)
        assert text in str(info.value) and CLINICAL_CSV in str(info.value)
        assert not out.exists()


def test_endpoint_csv_missing_column_named(root: Path, tmp_path: Path):
    _write_csv(root / ENDPOINT_CSV, "PatientID,Relapse,RFS_days", ["CHUM-001,1,412"])
    with pytest.raises(HecktorFormatError, match=r"'RFS'.*") as info:
        build_manifest(root, tmp_path / "m.csv", progress=False)
    assert ENDPOINT_CSV in str(info.value)


def test_continue_on_error_skips_bad_cases_and_writes_report(root: Path, tmp_path: Path):
    (root / "imagesTr" / "CHUM-001__CT.nii.gz").unlink()
    _edit_csv(ENDPOINT_CSV, "CHUP-002,0,1803", "CHUP-002,0,-5")(root)
    _append_csv(CLINICAL_CSV, "HMR-009,1,1,7,M,50,70,0,0,0,1,0,1")(root)  # no images at all
    out = tmp_path / "m.csv"
    m = build_manifest(root, out, continue_on_error=True, progress=False)
    assert list(m["case_id"]) == ["MDA-105"]
    assert list(read_manifest(out).index) == ["MDA-105"]
    report = pd.read_csv(default_error_report(out))
    assert list(report.columns) == ["case_id", "file", "error"]
    assert set(report["case_id"]) == {"CHUM-001", "CHUP-002", "HMR-009"}
    row = report[report.case_id == "CHUM-001"].iloc[0]
    assert row.file.endswith("CHUM-001__CT.nii.gz") and "not found" in row.error
    assert report[report.case_id == "CHUP-002"].iloc[0].file.endswith(ENDPOINT_CSV)
    assert read_json(manifest_sidecar_path(out))["n_skipped_cases"] == 3
    # An explicit report path, and a clean run still writes a (header-only) report.
    custom = tmp_path / "reports" / "errs.csv"
    build_manifest(
        make_root(tmp_path / "clean"), tmp_path / "m2.csv", continue_on_error=True, error_report=custom, progress=False
    )
    assert custom.read_text().strip() == "case_id,file,error"


def test_real_sts_case_goes_through_reader(sts_root: Path, tmp_path: Path):
    root = tmp_path / "sts"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for rel in ("imagesTr/STS-001__CT.nii.gz", "imagesTr/STS-001__PT.nii.gz", "labelsTr/STS-001.nii.gz"):
        os.symlink(sts_root / rel, root / rel)
    _write_csv(root / CLINICAL_CSV, HEADER, ["STS-001,1,1,3,F,58,NaN,NaN,NaN,NaN,NaN,NaN,1"])
    _write_csv(root / ENDPOINT_CSV, "PatientID,Relapse,RFS", ["STS-001,1,640"])
    m = build_manifest(root, tmp_path / "m.csv", progress=False)
    row = read_manifest(tmp_path / "m.csv").loc["STS-001"]
    assert (row.has_gtvp, row.has_gtvn, row.relapse, row.rfs_days) == (1, 0, 1, 640)
    assert row.ct_sha256 == sha256_file(sts_root / "imagesTr" / "STS-001__CT.nii.gz")
    assert Path(row.pet_path).resolve() == (sts_root / "imagesTr" / "STS-001__PT.nii.gz").resolve()
    assert len(m) == 1


def test_cli_summary_and_clean_error(root: Path, tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "m.csv"
    ok = runner.invoke(build_manifest_cli, [str(root), "--out", str(out), "--workers", "1"])
    assert ok.exit_code == 0, ok.output
    assert "3 cases (2 with endpoint), 1 events, 3 centres" in ok.output and str(out) in ok.output
    (root / "labelsTr" / "CHUM-001.nii.gz").unlink()
    bad = runner.invoke(build_manifest_cli, [str(root), "--out", str(tmp_path / "n.csv")])
    assert bad.exit_code == 1
    assert "CHUM-001" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "n.csv").exists()
    skip = runner.invoke(
        build_manifest_cli, [str(root), "--out", str(tmp_path / "k.csv"), "--continue-on-error", "--no-checksums"]
    )
    assert skip.exit_code == 3 and "2 cases" in skip.output and "k.errors.csv" in skip.output
    assert "refused (1):" in skip.output and "CHUM-001" in skip.output
    helptext = runner.invoke(build_manifest_cli, ["--help"]).output
    for opt in ("--out", "--no-checksums", "--continue-on-error", "--error-report", "--workers"):
        assert opt in helptext


def test_harmless_inconsistencies_warn_but_pass(root: Path, tmp_path: Path, caplog):
    # A Task 2 case without endpoint row, and images with no clinical row.
    _edit_csv(ENDPOINT_CSV, "CHUP-002,0,1803\r\n", "")(root)
    _write_case(root, "HGJ-050")
    with caplog.at_level(logging.WARNING, logger="pipeline.hecktor"):
        m = build_manifest(root, tmp_path / "m.csv", progress=False)
    assert list(m["case_id"]) == ["CHUM-001", "CHUP-002", "MDA-105"]
    assert m.set_index("case_id").loc["CHUP-002", "has_endpoint"] == 0
    assert "Task 2 case(s) have no endpoint row: CHUP-002" in caplog.text
    assert "HGJ-050" in caplog.text


def test_pet_coverage_names_both_files_the_check_and_its_limit(root: Path, tmp_path: Path):
    _pet_moved(root)
    with pytest.raises(HecktorFormatError) as info:
        build_manifest(root, tmp_path / "m.csv", progress=False)
    message = str(info.value)
    for text in (
        "case CHUM-001",
        "CHUM-001__PT.nii.gz",
        "labelsTr/CHUM-001.nii.gz",
        "tumour coverage check",
        "below the 95 % of --min-tumour-coverage",
        "centres within x [3, 4] y [2, 5] z [2, 4] mm",
        "PET box x [0, 10] y [-3, 7] z [299, 308] mm",
    ):
        assert text in message, message
    # --continue-on-error lists it with the reason; a limit of 0 accepts it.
    m = build_manifest(root, tmp_path / "k.csv", continue_on_error=True, progress=False)
    assert "CHUM-001" not in set(m["case_id"])
    report = pd.read_csv(default_error_report(tmp_path / "k.csv"))
    row = report[report.case_id == "CHUM-001"].iloc[0]
    assert row.file.endswith("CHUM-001__PT.nii.gz") and "covers 0.0 % of the tumour" in row.error
    m = build_manifest(root, tmp_path / "z.csv", min_tumour_coverage=0.0, progress=False)
    assert "CHUM-001" in set(m["case_id"])
    assert read_json(manifest_sidecar_path(tmp_path / "z.csv"))["params"]["min_tumour_coverage"] == 0.0
    # A PET holding half the tumour (voxel centres x = 3 and 4 mm; PET edge now at 3.75 mm).
    half = make_root(tmp_path / "half")
    _pet_moved(half, shift=(-6.5, 0.0, 0.0))
    with pytest.raises(HecktorFormatError, match=r"covers 50\.0 % of the tumour"):
        build_manifest(half, tmp_path / "h.csv", progress=False)
    assert len(build_manifest(half, tmp_path / "h.csv", min_tumour_coverage=0.5, progress=False)) == 3


def test_any_integer_center_id_is_a_centre_with_one_warning(tmp_path: Path, caplog):
    clinical = [
        row.replace("CHUM-001,1,1,1,", "CHUM-001,1,1,9,")
        .replace("CHUP-002,1,1,2,", "CHUP-002,1,1,9,")
        .replace("MDA-105,1,0,5,", "MDA-105,1,0,12,")
        for row in CLINICAL_ROWS
    ]
    root = make_root(tmp_path / "r", clinical=clinical)
    with caplog.at_level(logging.WARNING, logger="pipeline.hecktor"):
        m = build_manifest(root, tmp_path / "m.csv", progress=False).set_index("case_id")
    assert m.loc["CHUM-001", "center_id"] == 9 and m.loc["CHUM-001", "center"] == "C9"
    assert m.loc["MDA-105", "center"] == "C12"
    warnings = [r for r in caplog.records if "CenterID" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "9 (2 case(s), named C9), 12 (1 case(s), named C12)" in warnings[0].getMessage()
    # Leave-one-centre-out takes the new centres as folds.
    folds = leave_one_centre_out(m.index, m["center"])
    assert folds.attrs["centres"] == {0: "C12", 1: "C9"}


def test_existing_manifest_is_kept_unless_overwrite(root: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "m.csv"
    build_manifest(root, out, progress=False)
    before = out.read_bytes(), manifest_sidecar_path(out).read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_manifest(root, out, progress=False)
    runner = CliRunner()
    res = runner.invoke(build_manifest_cli, [str(root), "--out", str(out)])
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: {out} exists; pass --overwrite") and "--out" in res.stderr
    assert (out.read_bytes(), manifest_sidecar_path(out).read_bytes()) == before
    res = runner.invoke(build_manifest_cli, [str(root), "--out", str(out), "--overwrite", "--workers", "1"])
    assert res.exit_code == 0, res.output
    # make-demo-cohort refuses before generating anything (the committed demo manifest case).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_manifest.csv").write_text("committed\n")
    res = runner.invoke(make_demo_cohort_cli, ["--n-cases", "2", "--spacing-scale", "8"])
    assert res.exit_code == 1 and "--overwrite" in res.stderr and "--manifest" in res.stderr
    assert not (tmp_path / "data").exists()
    assert (tmp_path / "data_manifest.csv").read_text() == "committed\n"


@pytest.mark.parametrize("command", [build_manifest_cli, make_demo_cohort_cli])
def test_short_help_option(command):
    res = CliRunner().invoke(command, ["-h"])
    assert res.exit_code == 0 and "--overwrite" in res.output


def test_manifest_missing_a_column_says_where_the_schema_is_and_what_writes_one(tmp_path: Path):
    table = pd.DataFrame([{c: "1" for c in MANIFEST_COLUMNS}]).drop(columns=["rfs_days", "center"])
    table.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError) as err:
        read_manifest(tmp_path / "m.csv")
    msg = str(err.value)
    assert f"{tmp_path / 'm.csv'}: not a manifest, missing columns ['center', 'rfs_days']" in msg
    assert "pipeline.manifest.MANIFEST_COLUMNS" in msg and "`build-manifest" in msg and "`make-demo-cohort`" in msg
    # The places named exist: the page and its section (a heading of it) and both commands.
    page, section = re.search(r'MANIFEST_COLUMNS \(([^,]+), section "([^"]+)"', msg).groups()
    repo = Path(__file__).resolve().parents[1]
    assert re.search(rf"^#+ {re.escape(section)}$", (repo / page).read_text(), re.M), (page, section)
    scripts = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "build-manifest =" in scripts and "make-demo-cohort =" in scripts
