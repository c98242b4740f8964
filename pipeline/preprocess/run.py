"""The cohort run: both passes over the manifest in a worker pool, and the cohort record."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipeline.artefacts import code_version, sha256_file, utc_now
from pipeline.cache import (
    COHORT_FILE,
    PreprocessedCache,
    case_file,
    case_fingerprint,
    write_case,
    write_cohort_record,
)
from pipeline.manifest import read_manifest
from pipeline.pool import Job, JobFailed, JobPool
from pipeline.preprocess.case import preprocess_case
from pipeline.preprocess.checks import (
    MIN_CROP_COVERAGE,
    MIN_TUMOUR_COVERAGE,
    InputCheckError,
    check_file_finite,
    check_share,
    is_nifti,
)
from pipeline.preprocess.locate import TumourLocation, locate_tumour
from pipeline.preprocess.params import BACKENDS, SURVIVAL_CHANNELS, CaseError, PreprocessParams

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- cohort


def _read(path: str, case_id: str, role: str) -> sitk.Image:
    if not Path(path).is_file():
        raise CaseError(f"case {case_id!r}: {role} file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise CaseError(f"case {case_id!r}: cannot read {role} file {path}: {first}") from None


def _read_direction(path: str, case_id: str) -> tuple[float, ...]:
    if not Path(path).is_file():
        raise CaseError(f"case {case_id!r}: CT file not found: {path}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CaseError(f"case {case_id!r}: cannot read the header of CT file {path}") from None
    return tuple(reader.GetDirection())


def _locate_task(task: dict[str, Any]) -> tuple[str, TumourLocation]:
    cid = task["case_id"]
    params = PreprocessParams.from_dict(task["params"])
    try:
        direction = _read_direction(task["ct_path"], cid)
        label = _read(task["label_path"], cid, "label")
        return cid, locate_tumour(label, direction, params, case_id=cid, label_path=task["label_path"])
    except CaseError:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised naming the case and its file
        raise CaseError(f"case {cid!r} (label {task['label_path']}): {type(exc).__name__}: {exc}") from None


def _process_task(task: dict[str, Any]) -> dict[str, Any]:
    """Pass 2 for one case (runs in a worker process): hash, skip or preprocess + write."""
    cid = task["case_id"]
    t0 = time.perf_counter()
    try:
        sha = {}
        for role in ("ct", "pet", "label"):
            sha[role] = task[f"{role}_sha256"] or sha256_file(task[f"{role}_path"])
        fingerprint = case_fingerprint(task["params_hash"], sha)
        path = case_file(task["cache_root"], cid)
        if path.is_file() and _done_and_checked(path, fingerprint, task):
            return {"case_id": cid, "status": "skipped", "seconds": 0.0}
        params = PreprocessParams.from_dict(task["params"])
        ct = _read(task["ct_path"], cid, "CT")
        pet = _read(task["pet_path"], cid, "PET")
        label = _read(task["label_path"], cid, "label")
        for role in ("CT", "PET"):
            image_path = task[f"{role.lower()}_path"]
            if is_nifti(image_path):  # other formats: checked on the read image
                check_file_finite(image_path, role)
        result = preprocess_case(
            ct,
            pet,
            label,
            params,
            case_id=cid,
            label_path=task["label_path"],
            backend=task["backend"],
            device=task["device"],
            min_tumour_coverage=task["min_tumour_coverage"],
            min_crop_coverage=task["min_crop_coverage"],
        )
        attrs = dict(result.attrs)
        attrs.update(params_hash=task["params_hash"], source_sha256=sha, code_version=task["code_version"])
        write_case(task["cache_root"], cid, result.arrays, result.geometry, attrs)
        return {
            "case_id": cid,
            "status": "done",
            "seconds": time.perf_counter() - t0,
            "fits": bool(result.attrs["tumour_fits_crop"]),
            "needed": result.location.crop_size_vox_xyz,
        }
    except CaseError:
        raise
    except InputCheckError as exc:
        raise CaseError(
            f"case {cid!r}: {exc} (CT {task['ct_path']}, PET {task['pet_path']}, label "
            f"{task['label_path']}); remove the case from --manifest to go on without it"
        ) from None
    except FileNotFoundError as exc:
        raise CaseError(f"case {cid!r}: file not found: {exc.filename}") from None
    except Exception as exc:  # noqa: BLE001 - re-raised naming the case and its files
        raise CaseError(
            f"case {cid!r} (CT {task['ct_path']}, PET {task['pet_path']}, label "
            f"{task['label_path']}): {type(exc).__name__}: {exc}"
        ) from None


def _done_and_checked(path: Path, fingerprint: str, task: dict[str, Any]) -> bool:
    """Whether a case file holds this fingerprint and passed today's input checks (a file
    written before the checks existed, or under laxer limits, is redone)."""
    limits = {
        "pet_tumour_coverage": task["min_tumour_coverage"],
        "ct_crop_coverage": task["min_crop_coverage"],
        "pet_crop_coverage": task["min_crop_coverage"],
    }
    with contextlib.suppress(OSError, KeyError):
        with h5py.File(path, "r") as h5:
            return str(h5.attrs["fingerprint"]) == fingerprint and all(
                float(h5.attrs[k]) >= v for k, v in limits.items()
            )
    return False


def _init_worker(threads: int) -> None:
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(max(1, threads))
    with contextlib.suppress(ImportError):
        import torch  # local: bound torch's threads too where it is installed (torch backend)

        torch.set_num_threads(max(1, threads))


def _threads(workers: int) -> int:
    """CPU threads per case: the cores shared by the workers."""
    return max(1, (os.cpu_count() or 1) // workers)


def _case_pool(workers: int, n_tasks: int) -> JobPool:
    """The pool of both passes (worker start-up paid once); one worker = in this process."""
    workers = max(1, min(int(workers), n_tasks))
    return JobPool(workers, in_process=workers == 1, initializer=_init_worker, initargs=(_threads(workers),))


@contextlib.contextmanager
def _sitk_threads(n: int) -> Iterator[None]:
    prev = sitk.ProcessObject_GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(prev)


def _case_error(failed: JobFailed) -> CaseError:
    """The error to raise for a failed case: its own :class:`CaseError` (naming case and
    files), or one naming the case when the worker died or something else went wrong."""
    if isinstance(failed.original, CaseError):
        return failed.original
    hint = "; finished cases are kept, rerun to resume, or use fewer workers" if failed.worker_died else ""
    return CaseError(f"case {failed.key!r}: {failed.error}{hint}")


def _run_cases(pool: JobPool, fn, tasks: list[dict[str, Any]], desc: str, progress: bool):
    """Yield ``fn(task)`` for every task, in completion order.

    The first failure cancels the cases not yet started and is raised (:func:`_case_error`);
    cases already written stay (each is complete and fingerprinted).
    """
    jobs = [Job(t["case_id"], fn, (t,)) for t in tasks]
    with _sitk_threads(_threads(pool.workers)) if pool.in_process else contextlib.nullcontext():
        for done in pool.run(jobs, bar=desc if progress else None, unit="case"):
            if not done.ok:
                raise _case_error(done.failed)
            yield done.value


def _tasks_from_manifest(manifest: pd.DataFrame) -> list[dict[str, Any]]:
    return [
        {
            "case_id": str(row.case_id),
            "ct_path": row.ct_path,
            "pet_path": row.pet_path,
            "label_path": row.label_path,
            "ct_sha256": row.ct_sha256 or "",
            "pet_sha256": row.pet_sha256 or "",
            "label_sha256": row.label_sha256 or "",
        }
        for row in manifest.itertuples(index=False)
    ]


def locate_cohort(
    manifest_df: pd.DataFrame,
    params: PreprocessParams,
    workers: int = 2,
    *,
    progress: bool = True,
    _pool: JobPool | None = None,
) -> dict[str, TumourLocation]:
    """Pass 1: :func:`locate_tumour` for every case of a manifest (reads labels only).

    Args:
        manifest_df: manifest from :func:`pipeline.manifest.read_manifest` (absolute paths).
        params: preprocessing parameters.
        workers: worker processes.
        progress: show a tqdm bar.

    Returns:
        case id -> :class:`TumourLocation`, in manifest order.

    Raises:
        CaseError: naming the first case that fails (empty mask, unreadable file...).
    """
    tasks = _tasks_from_manifest(manifest_df)
    pdict = params.as_dict()
    for t in tasks:
        t["params"] = pdict
    own = _case_pool(workers, len(tasks)) if _pool is None else contextlib.nullcontext(_pool)
    with own as pool:
        found = dict(_run_cases(pool, _locate_task, tasks, "locate tumours", progress))
    return {t["case_id"]: found[t["case_id"]] for t in tasks}


def compute_crop_size(
    manifest_df: pd.DataFrame,
    params: PreprocessParams,
    workers: int = 2,
    *,
    progress: bool = True,
    _pool: JobPool | None = None,
) -> tuple[int, int, int]:
    """Pass 1: the global crop G (x, y, z voxels at ``spacing_mm_xyz``, each even).

    G is the per-axis maximum over the manifest's cases of
    :attr:`TumourLocation.crop_size_vox_xyz`.

    Raises:
        ValueError: for an empty manifest; :class:`CaseError` naming a failing case.
    """
    if len(manifest_df) == 0:
        raise ValueError("compute_crop_size: the manifest has no case")
    locs = locate_cohort(manifest_df, params, workers, progress=progress, _pool=_pool)
    sizes = np.asarray([loc.crop_size_vox_xyz for loc in locs.values()])
    return tuple(int(v) for v in sizes.max(axis=0))


@dataclass
class PreprocessReport:
    """Outcome of :func:`run_preprocessing`."""

    cache: PreprocessedCache
    processed: list[str]
    skipped: list[str]
    crop_size_vox_xyz: tuple[int, int, int]
    crop_size_source: str
    exceeding_crop: list[str]
    seconds: float


def run_preprocessing(
    manifest_path: str | os.PathLike,
    cache_root: str | os.PathLike,
    params: PreprocessParams | None = None,
    *,
    reference_cache: str | os.PathLike | None = None,
    workers: int = 2,
    backend: str = "sitk",
    device: str = "cpu",
    case_ids: Sequence[str] | None = None,
    progress: bool = True,
    min_tumour_coverage: float = MIN_TUMOUR_COVERAGE,
    min_crop_coverage: float = MIN_CROP_COVERAGE,
) -> PreprocessReport:
    """Preprocess every case of a manifest into the cache at ``cache_root``.

    Args:
        manifest_path: the manifest CSV. Empty sha256 columns are filled by hashing files.
        cache_root: output folder (``cohort.json`` + ``cases/<ID>.h5``).
        params: parameters (default :class:`PreprocessParams`). With ``crop_size_vox_xyz``
            unset, G is measured on this manifest (pass 1).
        reference_cache: an existing cache whose G and parameters are reused (new patients
            are cropped with the training cohort's G, never a recomputed one). ``params``,
            if given, must then equal the reference's.
        workers: worker processes for both passes (1 = in this process).
        backend: ``"sitk"`` or ``"torch"`` resampling.
        device: torch device for ``backend="torch"``.
        case_ids: only these cases of the manifest.
        progress: show tqdm bars.
        min_tumour_coverage: least share of each case's tumour voxels inside its PET field
            of view (default :data:`MIN_TUMOUR_COVERAGE`).
        min_crop_coverage: least share of each case's crop inside its CT field of view, and
            inside its PET's (default :data:`MIN_CROP_COVERAGE`).

    Returns:
        A :class:`PreprocessReport`: the complete cache, the cases processed and skipped,
        G and where it came from, the cases whose tumour exceeds G, the time taken.

    Raises:
        CaseError: naming the failing case and its files (for a failed input check: which
            check, the figure, the limit's option); ``cohort.json`` is then not written.
        ValueError: bad arguments, or parameters that contradict ``reference_cache``.
    """
    t0 = time.perf_counter()
    limits = _run_limits(backend, device, workers, min_tumour_coverage, min_crop_coverage)
    manifest_path, cache_root = Path(manifest_path), Path(cache_root)
    manifest = _selected_cases(manifest_path, case_ids)
    with _case_pool(workers, len(manifest)) as pool:
        if reference_cache is not None:
            params, source = _reference_params(reference_cache, cache_root, params)
        else:
            params, source = _cohort_params(manifest, params, workers, progress, pool)
        # The cache is incomplete from now until every case is written.
        with contextlib.suppress(FileNotFoundError):
            (cache_root / COHORT_FILE).unlink()
        tasks = _tasks_from_manifest(manifest)
        pdict, phash, version = params.as_dict(), params.hash(), code_version()
        for t in tasks:
            t.update(
                params=pdict,
                params_hash=phash,
                cache_root=str(cache_root),
                backend=backend,
                device=str(device),
                code_version=version,
                **limits,
            )
        processed, skipped, exceeding = _write_cases(pool, tasks, params, progress)
    exceeding += _skipped_exceeding(cache_root, skipped)
    write_cohort_record(
        cache_root,
        _cohort_record(
            params, source, manifest_path, version, [t["case_id"] for t in tasks], backend, exceeding, limits
        ),
    )
    return PreprocessReport(
        cache=PreprocessedCache(cache_root),
        processed=processed,
        skipped=skipped,
        crop_size_vox_xyz=params.crop_size_vox_xyz,
        crop_size_source=source,
        exceeding_crop=sorted(exceeding),
        seconds=time.perf_counter() - t0,
    )


def _run_limits(
    backend: str, device: str, workers: int, min_tumour_coverage: float, min_crop_coverage: float
) -> dict[str, float]:
    """Check the run's arguments; return the input checks' limits."""
    limits = {
        "min_tumour_coverage": check_share(min_tumour_coverage, "min_tumour_coverage"),
        "min_crop_coverage": check_share(min_crop_coverage, "min_crop_coverage"),
    }
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "sitk" and str(device) != "cpu":
        raise ValueError(f"device {device!r} needs backend 'torch' (SimpleITK runs on the CPU)")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return limits


def _selected_cases(manifest_path: Path, case_ids: Sequence[str] | None) -> pd.DataFrame:
    """The manifest's rows to preprocess (all, or ``case_ids``); never empty."""
    manifest = read_manifest(manifest_path)
    if case_ids is not None:
        missing = [c for c in case_ids if c not in manifest.index]
        if missing:
            raise ValueError(f"{manifest_path}: case ids not in the manifest: {missing}")
        manifest = manifest.loc[list(case_ids)]
    if len(manifest) == 0:
        raise ValueError(f"{manifest_path}: no case to preprocess")
    return manifest


def _reference_params(
    reference_cache: str | os.PathLike, cache_root: Path, params: PreprocessParams | None
) -> tuple[PreprocessParams, str]:
    """A reference cache's parameters (G included) and its path, refusing other ``params``."""
    if Path(reference_cache).resolve() == cache_root.resolve():
        raise ValueError(
            f"reference cache {reference_cache} is the output folder; write new "
            "cases to another folder (the reference must stay as it was trained on)"
        )
    ref = PreprocessedCache(reference_cache)
    ref_params = PreprocessParams.from_dict(ref.params)
    if ref_params.crop_size_vox_xyz is None:
        raise ValueError(f"reference cache {reference_cache} records no crop size G")
    if params is not None:
        mine = replace(params, crop_size_vox_xyz=ref_params.crop_size_vox_xyz).as_dict()
        diff = sorted(k for k, v in ref_params.as_dict().items() if mine[k] != v)
        if diff:
            raise ValueError(
                f"parameters {diff} differ from reference cache {reference_cache}; "
                "a new case must be preprocessed exactly like the training cohort"
            )
    return ref_params, str(Path(reference_cache).resolve())


def _cohort_params(
    manifest: pd.DataFrame, params: PreprocessParams | None, workers: int, progress: bool, pool: JobPool
) -> tuple[PreprocessParams, str]:
    """``params`` (default :class:`PreprocessParams`) with G given or measured (pass 1)."""
    params = params or PreprocessParams()
    if params.crop_size_vox_xyz is not None:
        return params, "given"
    g = compute_crop_size(manifest, params, workers, progress=progress, _pool=pool)
    return replace(params, crop_size_vox_xyz=g), "cohort"


def _write_cases(
    pool: JobPool, tasks: list[dict[str, Any]], params: PreprocessParams, progress: bool
) -> tuple[list[str], list[str], list[str]]:
    """Pass 2: the cases processed, skipped (already done) and processed exceeding G."""
    processed, skipped, exceeding = [], [], []
    for res in _run_cases(pool, _process_task, tasks, "preprocess", progress):
        (processed if res["status"] == "done" else skipped).append(res["case_id"])
        if res["status"] == "done" and not res["fits"]:
            exceeding.append(res["case_id"])
            log.warning(
                "case %s: tumour needs a crop of %s voxels, larger than G = %s; its tumour is cut at the crop border",
                res["case_id"],
                res["needed"],
                params.crop_size_vox_xyz,
            )
    return processed, skipped, exceeding


def _skipped_exceeding(cache_root: Path, skipped: list[str]) -> list[str]:
    """Cases skipped now may have exceeded the crop in an earlier run: read it back."""
    exceeding = []
    for cid in skipped:
        with h5py.File(case_file(cache_root, cid), "r") as h5:
            if not bool(h5.attrs.get("tumour_fits_crop", True)):
                exceeding.append(cid)
    return exceeding


def _cohort_record(
    params: PreprocessParams,
    source: str,
    manifest_path: Path,
    version: str,
    ids: list[str],
    backend: str,
    exceeding: list[str],
    limits: dict[str, float],
) -> dict[str, Any]:
    """The content of ``cohort.json`` (:func:`pipeline.cache.write_cohort_record`)."""
    return {
        "params": params.as_dict(),
        "params_hash": params.hash(),
        "crop_size_vox_xyz": list(params.crop_size_vox_xyz),
        "spacing_mm_xyz": list(params.spacing_mm_xyz),
        "crop_size_source": source,
        "manifest": str(manifest_path.resolve()),
        "manifest_sha256": sha256_file(manifest_path),
        "code_version": version,
        "created": utc_now(),
        "case_ids": ids,
        "backend": backend,
        "cases_exceeding_crop": sorted(exceeding),
        "survival_channels": list(SURVIVAL_CHANNELS),
        # Accept/refuse limits, not part of params: they never change a written array.
        "input_checks": limits,
    }


def preprocess_cohort(*args: Any, **kwargs: Any) -> PreprocessedCache:
    """:func:`run_preprocessing` (same arguments), returning only the complete cache."""
    return run_preprocessing(*args, **kwargs).cache
