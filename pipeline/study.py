"""Running the projection-ablation study (:mod:`pipeline.study_spec` describes it).

Each (configuration, fold) cell is independent and resumable: :func:`run_cell` calls
:func:`pipeline.train.train_fold`, which writes ``<study>/runs/<config>/fold_<k>/`` and its
completion marker ``done.json`` last. A killed worker or a pre-empted cluster job loses
only its own cell; rerunning the study skips every cell that has a marker. A cell is
claimed before it trains (:func:`claim_cell`), so two runs on one folder never train it
twice. The classical peers (:func:`run_peers`) run on every split before the cells.

Executors: a local process pool (:func:`run_pool` on :class:`pipeline.pool.JobPool`, shared
by cells and peers: ``workers`` processes, each pinned round-robin to one GPU through
``CUDA_VISIBLE_DEVICES`` when GPUs are present, failures named per job, progress per result)
and submitit (Slurm, or submitit's
local executor), which submits the pending cells as one array job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import submitit
import torch

from pipeline.artefacts import (
    ProvenanceError,
    code_version,
    params_hash,
    read_json,
    sha256_file,
    utc_now,
    write_json_atomic,
)
from pipeline.cache import PreprocessedCache
from pipeline.dataset import load_cohort
from pipeline.embedding_sets import embedding_set
from pipeline.embeddings import RANDOM_INIT, RandomInitWarning, read_embeddings
from pipeline.layout import PeerRunLayout, RunLayout, folds_hash
from pipeline.peers import HeadConfig, fit_peer_run
from pipeline.pool import Job, JobPool, pinned_worker
from pipeline.runtime import DEFAULT_THREADS
from pipeline.splits import (
    case_set_sha256,
    get_folds,
    leave_one_centre_out,
    load_folds,
    make_folds,
    save_folds,
)
from pipeline.study_spec import (
    FIRST_SPLIT,
    STUDY_FILE,
    Cell,
    Configuration,
    Peer,
    StudySpec,
    cell_done,
    cell_layout,
    grid,
    split_repeat,
)
from pipeline.train import TrainConfig, run_provenance, start_run, train_fold

# A pool worker pins its GPU before torch is loaded there: the worker initialiser
# (pipeline.pool.pinned_worker) lives outside this module, which imports torch, and runs
# before the worker unpickles its first job (and so imports this module).


def train_config(
    spec: StudySpec, config: Configuration, input_size: Sequence[int] | None = None, seed: int = 0
) -> TrainConfig:
    """The :class:`pipeline.train.TrainConfig` of one configuration of a study.

    Args:
        spec: the study; its ``train`` options are shared by every configuration.
        config: the grid row; sets ``proj``.
        input_size: ``(D, H, W)`` of the cached survival volumes; written into the
            model overrides when they do not set it, so reduced-size caches work.
        seed: seed index; s >= 1 trains with ``seed + s`` and keeps the inner split of
            seed 0 (``split_seed`` = the study's), s = 0 is the study's config unchanged.
    """
    options = json.loads(json.dumps(spec.train))  # deep copy of plain values
    if input_size is not None:
        options.setdefault("model", {}).setdefault("input_size", [int(s) for s in input_size])
    options["proj"] = config.proj
    if seed:
        base = int(options.get("seed", TrainConfig.seed))
        if options.get("split_seed") is None:
            options["split_seed"] = base
        options["seed"] = base + int(seed)
    return TrainConfig.from_dict(options)


def peer_head_config(peer: Peer, overrides: dict[str, Any] | None = None) -> HeadConfig:
    """The :class:`pipeline.peers.HeadConfig` of a peer: ridge for clinical / radiomics
    (radiomics without clinical covariates), coxnet + clinical with ``proj`` for heads, where
    ``overrides`` (the study's ``head``) set the other fields."""
    if peer.kind == "clinical":
        return HeadConfig(model="ridge", with_clinical=True)
    if peer.kind == "radiomics":
        return HeadConfig(model="ridge", with_clinical=False)
    return HeadConfig(**({"model": "coxnet", "with_clinical": True} | dict(overrides or {}) | {"proj": peer.proj}))


# --- cohort loading, cached per process -------------------------------------------------

_BASE_COHORTS: dict[tuple[str, str], Any] = {}
_EMBEDDINGS: dict[tuple[str, str, str, tuple[str, ...]], tuple[dict, dict]] = {}


def load_study_cohort(spec: StudySpec, encoders: Sequence[str] = ()):
    """The :class:`pipeline.dataset.SurvivalCohort` of a configuration, cached per process.

    One copy of the volumes per process is shared by every configuration; the embedding
    rows of each combination of encoders are read once per process through
    :func:`pipeline.dataset.load_cohort` (which checks them against the cache).
    """
    key = (spec.manifest, spec.cache_root)
    if key not in _BASE_COHORTS:
        _BASE_COHORTS[key] = load_cohort(spec.manifest, spec.cache_root)
    base = _BASE_COHORTS[key]
    if not encoders:
        return base
    if spec.embeddings is None:
        raise ValueError(f"encoders {tuple(encoders)} requested but the study has no embeddings file")
    ekey = (spec.embeddings, spec.cache_root, spec.manifest, tuple(encoders))
    if ekey not in _EMBEDDINGS:
        full = load_cohort(spec.manifest, spec.cache_root, spec.embeddings, tuple(encoders))
        if full.case_ids != base.case_ids:
            raise ValueError(f"{spec.manifest}: case order changed while loading {tuple(encoders)} embeddings")
        _EMBEDDINGS[ekey] = (full.embeddings, full.embedding_attrs)
    emb, attrs = _EMBEDDINGS[ekey]
    # Share the base volumes: one copy of the images per process, whatever the grid row.
    return dataclasses.replace(base, embeddings=emb, embedding_attrs=attrs)


def clear_cohort_cache() -> None:
    """Forget the cohorts cached by :func:`load_study_cohort` (tests, long-lived workers)."""
    _BASE_COHORTS.clear()
    _EMBEDDINGS.clear()


def _cache_params_hash(spec: StudySpec) -> str:
    return PreprocessedCache(spec.cache_root).params_hash


def _config_provenance(
    spec: StudySpec, cohort, config: Configuration, folds: pd.DataFrame, seed: int = 0
) -> tuple[Any, dict]:
    cfg = train_config(spec, config, tuple(cohort.images.shape[2:]), seed)
    prov = run_provenance(cohort, cfg, folds_hash(folds), _cache_params_hash(spec))
    return cfg, prov | {"study": spec.hash, "configuration": config.name} | ({"seed_index": seed} if seed else {})


# --- claims: one trainer per cell --------------------------------------------------------

#: Folder of the cells' claim files, under the study folder (outside the run folders).
CLAIMS_DIR = ".claims"


def claim_path(spec: StudySpec, cell: Cell) -> Path:
    """``<study>/.claims/<cell key>.lock``; its ``.log`` sibling keeps the claim history."""
    return spec.root / CLAIMS_DIR / f"{cell.key}.lock"


def _claimant() -> dict[str, Any]:
    """Who claims: host, pid and, in a Slurm task, the job and array task ids."""
    who: dict[str, Any] = {"host": platform.node(), "pid": os.getpid()}
    if os.environ.get("SLURM_JOB_ID"):
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        who["slurm_job"] = f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]
    return who


def describe_claimant(who: dict[str, Any] | None) -> str:
    """``"host:pid (Slurm job 12_3)"`` of a claim record; ``"another process"`` without one."""
    if not who:
        return "another process"
    text = f"{who.get('host', '?')}:{who.get('pid', '?')}"
    return text + (f" (Slurm job {who['slurm_job']})" if who.get("slurm_job") else "")


def _log_claim(path: Path, event: str, who: dict[str, Any], **extra: Any) -> None:
    with open(path.with_suffix(".log"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": event, "time": utc_now(), **who, **extra}) + "\n")


@contextlib.contextmanager
def claim_cell(spec: StudySpec, cell: Cell) -> Iterator[dict[str, Any]]:
    """Hold the cell's claim for the block: an exclusive ``flock`` on its claim file.

    The kernel drops the lock when its holder's process ends, however it ends (SIGKILL, a
    cancelled or requeued Slurm task, a dead node's NFS lease), so a dead owner never holds
    a cell for good and no stale lock needs breaking by hand. While the claim is held by
    another process, this one prints who holds it (host, pid, Slurm job, as the holder wrote
    in the file) and waits. Each claim, wait and release is appended to ``<key>.log``.

    Yields:
        ``{"waited_for": holder description or None, "waited_s": seconds waited}``.
    """
    import fcntl  # local: POSIX only, like the clusters this serves

    path = claim_path(spec, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    who = _claimant()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited_for, t0 = None, time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
            except (ValueError, UnicodeDecodeError):
                holder = None
            waited_for = describe_claimant(holder)
            print(
                f"cell {cell.key} is being trained by {waited_for}; waiting for it to finish or end",
                file=sys.stderr,
                flush=True,
            )
            _log_claim(path, "waiting", who, holder=holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(who | {"since": utc_now()}).encode(), 0)
        _log_claim(path, "claimed", who)
        try:
            yield {"waited_for": waited_for, "waited_s": time.monotonic() - t0}
        finally:
            _log_claim(path, "released", who)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


# --- the unit of work ---------------------------------------------------------------------


def run_cell(spec: StudySpec, cell: Cell, progress: bool = False) -> dict[str, Any]:
    """Train one configuration on one fold; self-contained and picklable (a job function).

    Loads the cohort from the spec's paths (cached per process), checks the configuration
    folder's provenance (``run.json``) and calls :func:`pipeline.train.train_fold`, whose
    ``done.json`` is the completion marker. Also writes ``cell.json`` (wall time, host,
    device) beside it. A finished cell returns its record without training.

    Args:
        spec: the study.
        cell: the configuration and fold.
        progress: show the epoch progress bar.

    Returns:
        ``{"cell": key, "skipped": bool, "seconds": float, "record": done.json content}``.

    Raises:
        ProvenanceError: the configuration folder was made with other settings or folds.
        FileNotFoundError: :func:`prepare_study` has not written the folds file yet.

    A cell is claimed before it trains (:func:`claim_cell`): when another process, of this
    study or of another on the same folder, holds it, this one says so on stderr, waits,
    and then skips the cell that the other finished (the result names whom it waited for).
    """
    layout = cell_layout(spec, cell)
    if layout.is_done(cell.fold):
        return {"cell": cell.key, "skipped": True, "seconds": 0.0, "record": read_json(layout.done(cell.fold))}
    with claim_cell(spec, cell) as claim:
        if layout.is_done(cell.fold):  # the owner we waited for finished it
            return {
                "cell": cell.key,
                "skipped": True,
                "seconds": 0.0,
                "record": read_json(layout.done(cell.fold)),
                "waited_for": claim["waited_for"],
                "waited_s": claim["waited_s"],
            }
        res = _train_cell(spec, cell, layout, progress)
    return res | ({"waited_for": claim["waited_for"], "waited_s": claim["waited_s"]} if claim["waited_for"] else {})


def _train_cell(spec: StudySpec, cell: Cell, layout: RunLayout, progress: bool) -> dict[str, Any]:
    """:func:`run_cell`'s training, under the cell's claim."""
    t0 = time.perf_counter()
    cohort = load_study_cohort(spec, cell.config.encoders)
    folds = load_folds(spec.folds_path_of(cell.split), expected_case_ids=cohort.case_ids)
    cfg, prov = _config_provenance(spec, cohort, cell.config, folds, cell.seed)
    start_run(layout.root, prov)
    t_train = time.perf_counter()
    record = train_fold(cohort, folds, cell.fold, cfg, layout.root, progress=progress)
    t_end = time.perf_counter()
    info = {
        "cell": cell.key,
        "seconds": t_end - t0,
        "train_seconds": t_end - t_train,
        "load_seconds": t_train - t0,
        "epochs_run": record.get("epochs_run"),
        "host": platform.node(),
        "pid": os.getpid(),
        "torch_threads": record["environment"]["threads"],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu",
        "finished": utc_now(),
        "code_version": code_version(),
    }
    write_json_atomic(layout.cell(cell.fold), info)
    return {"cell": cell.key, "skipped": False, "seconds": info["seconds"], "record": record}


# --- set-up, shared by every executor --------------------------------------------------


def split_folds(spec: StudySpec, split: str, cohort) -> pd.DataFrame:
    """Load the shared folds file of a split, or create it once.

    ``cv<r>``: stratified K-fold with seed ``folds_seed + r`` (repeat ``r`` of
    :func:`pipeline.splits.repeated_folds`); ``loco``: one fold per centre.

    Raises:
        pipeline.artefacts.ProvenanceError: the file was made for another case set.
        ValueError: the file holds another number of folds / other centres.
    """
    path = spec.folds_path_of(split)
    repeat = split_repeat(split)
    if repeat is not None:
        if repeat == 0:
            return get_folds(path, cohort, n_folds=spec.n_folds, seed=spec.folds_seed)
        if path.is_file():
            folds = load_folds(path, expected_case_ids=cohort.case_ids)
            if folds.attrs["params"].get("seed") != spec.folds_seed + repeat or folds["fold"].nunique() != spec.n_folds:
                raise ValueError(
                    f"{path}: made with {folds.attrs['params']}, expected {spec.n_folds} folds "
                    f"with seed {spec.folds_seed + repeat}"
                )
            return folds
        folds = make_folds(
            cohort.case_ids, cohort.time, cohort.event, n_splits=spec.n_folds, seed=spec.folds_seed + repeat
        )
        folds.attrs["params"] = folds.attrs["params"] | {"repeat": repeat}
    else:
        fresh = leave_one_centre_out(cohort.case_ids, cohort.centre)
        if path.is_file():
            folds = load_folds(path, expected_case_ids=cohort.case_ids)
            if folds_hash(folds) != folds_hash(fresh):
                raise ValueError(f"{path}: the centres of the cohort changed since the LOCO folds were made")
            return folds
        folds = fresh
    save_folds(folds, path)
    return folds


def prepare_study(spec: StudySpec, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create (or check) the study folder before any cell runs.

    Loads the cohort with every encoder the grid uses (so a missing or mismatched
    embedding row fails here, once, not in 52 jobs), creates or reuses the shared folds of
    every split (:func:`split_folds`), writes ``run.json`` of every configuration on every
    CNN split and seed, and writes ``study.json``: the spec, the
    cohort summary (cases, events, case-set hash), the cache's params hash, the embedding
    file's sha256 and attributes (random-init or real weights), the code version and
    ``info`` (free-form: data source, settings label, oracle C-index, ...).

    Raises:
        ProvenanceError: the folder holds a study made with other settings.

    Returns:
        The ``study.json`` record.
    """
    root = spec.root
    path = root / STUDY_FILE
    if path.is_file():
        old = read_json(path)
        if old.get("spec_hash") != spec.hash:
            raise ProvenanceError(
                f"{path}: the study folder was made with other settings (spec hash {old.get('spec_hash')!r}, "
                f"this invocation {spec.hash!r}); use another study folder"
            )
    all_encoders = tuple(sorted({e for c in spec.configurations() for e in c.encoders}))
    cohort = load_study_cohort(spec, all_encoders) if all_encoders else load_study_cohort(spec)
    all_folds = {split: split_folds(spec, split, cohort) for split in spec.splits()}
    folds = all_folds[FIRST_SPLIT]
    for split in spec.cnn_splits():
        for config in spec.configurations():
            sub = load_study_cohort(spec, config.encoders)
            for seed in spec.seed_indices(config, split):
                _, prov = _config_provenance(spec, sub, config, all_folds[split], seed)
                start_run(spec.run_dir(config, split, seed), prov)

    emb_record = None
    if spec.embeddings is not None:
        emb_record = embeddings_provenance(spec.embeddings)
    record = {
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "created": read_json(path)["created"] if path.is_file() else utc_now(),
        "updated": utc_now(),
        "code_version": code_version(),
        "cohort": {
            "n_cases": len(cohort),
            "n_events": int(cohort.event.sum()),
            "case_set_sha256": case_set_sha256(cohort.case_ids),
            "n_centres": int(pd.Series(cohort.centre).nunique()),
            "survival_input_size_dhw": [int(s) for s in cohort.images.shape[2:]],
        },
        "folds_hash": folds_hash(folds),
        "splits": {
            split: {
                "folds_hash": folds_hash(f),
                "n_folds": int(f["fold"].nunique()),
                "folds_file": str(spec.folds_path_of(split).relative_to(root)),
                "params": f.attrs.get("params", {}),
                "cnn": split in spec.cnn_splits(),
            }
            for split, f in all_folds.items()
        },
        "cache_params_hash": _cache_params_hash(spec),
        "embeddings": emb_record,
        "info": info or {},
    }
    write_json_atomic(path, record)
    return record


def _peer_key(spec: StudySpec, peer: Peer, split: str, embeddings_sha256: str | None) -> str:
    return params_hash(
        {
            "peer": peer.name,
            "config": peer_head_config(peer, spec.head).to_dict(),
            "folds_sha256": sha256_file(spec.folds_path_of(split)),
            "manifest_sha256": sha256_file(spec.manifest),
            "cache_params_hash": _cache_params_hash(spec) if peer.kind != "clinical" else None,
            "embeddings_sha256": embeddings_sha256 if peer.kind == "embeddings" else None,
        }
    )


def run_peer(spec: StudySpec, peer: Peer, split: str, *, embeddings_sha256: str | None = None) -> dict[str, Any]:
    """Fit one peer on one split's shared folds (:func:`pipeline.peers.fit_peer_run`).

    Writes ``<split root>/peers/<peer>/``: ``oof_predictions.csv`` (the CNN's OOF columns,
    ``protocol = "fit"``), ``train_risk.csv`` (each fold's training linear predictor),
    ``summary.json`` and, last, the marker ``peer.json`` holding the key of its inputs
    (peer settings, folds / manifest sha256, cache params hash, embeddings sha256). A
    marker with the same key is skipped; a different key (e.g. changed head settings)
    refits, since peers take seconds and are deterministic.

    Returns:
        ``{"peer", "split", "skipped", "seconds", "summary"}``.
    """
    if peer.kind == "embeddings" and embeddings_sha256 is None:
        embeddings_sha256 = sha256_file(spec.embeddings)
    layout = PeerRunLayout(spec.peer_dir(peer, split))
    key = _peer_key(spec, peer, split, embeddings_sha256)
    marker = layout.marker
    if marker.is_file() and read_json(marker).get("key") == key:
        return {
            "peer": peer.name,
            "split": split,
            "skipped": True,
            "seconds": 0.0,
            "summary": read_json(layout.summary),
        }
    t0 = time.perf_counter()
    summary = fit_peer_run(
        peer.kind,
        manifest_path=spec.manifest,
        folds_path=spec.folds_path_of(split),
        out_dir=layout.root,
        cache_root=spec.cache_root,
        features_path=spec.embeddings if peer.kind == "embeddings" else None,
        datasets=list(embedding_set(peer.embedding_set).encoders) if peer.embedding_set else None,
        config=peer_head_config(peer, spec.head),
    )
    seconds = time.perf_counter() - t0
    write_json_atomic(
        marker,
        {
            "peer": peer.name,
            "label": peer.label,
            "split": split,
            "key": key,
            "seconds": seconds,
            "finished": utc_now(),
            "code_version": code_version(),
        },
    )
    return {"peer": peer.name, "split": split, "skipped": False, "seconds": seconds, "summary": summary}


def run_peers(
    spec: StudySpec,
    *,
    workers: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    shown: set[tuple] | None = None,
) -> StudyOutcome:
    """Fit every peer on every split; failures are reported, the others continue.

    With ``workers > 1`` the peer runs go to :func:`run_pool` (fresh spawned processes, one
    torch/BLAS thread each); otherwise they run in this process. Keys of the outcome are
    ``<split>/<peer>``; ``on_result`` also sees the runs skipped as up to date (without
    ``progress``); ``shown`` as in :func:`run_pool`.
    """
    t0 = time.perf_counter()
    peers = spec.peer_list()
    emb_sha = sha256_file(spec.embeddings) if any(p.kind == "embeddings" for p in peers) else None
    todo, skipped = [], []
    for split in spec.splits():
        for peer in peers:
            marker = PeerRunLayout(spec.peer_dir(peer, split)).marker
            fresh = marker.is_file() and read_json(marker).get("key") == _peer_key(spec, peer, split, emb_sha)
            (skipped if fresh else todo).append((peer, split))
    for peer, split in skipped:
        if on_result is not None:
            on_result(
                {"key": f"{split}/{peer.name}", "peer": peer.name, "split": split, "skipped": True, "seconds": 0.0}
            )
    jobs = [
        Job(f"{s}/{p.name}", run_peer, (spec, p, s), {"embeddings_sha256": emb_sha}, {"peer": p.name, "split": s})
        for p, s in todo
    ]
    outcome = run_pool(jobs, workers, in_process=workers == 1 or len(jobs) < 2, on_result=on_result, shown=shown)
    outcome.skipped = [f"{s}/{p.name}" for p, s in skipped] + outcome.skipped
    outcome.seconds = time.perf_counter() - t0
    return outcome


def embeddings_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Path, sha256, file attributes and per-dataset encoder records of an embedding file.

    ``random_init`` is True when any dataset was made with a randomly initialised encoder.
    (The keys ``modalities`` and ``random_init_modalities`` name the datasets: study.json
    files hold them under these names.)
    """
    with quiet_random_init():  # the caller states random-init loudly itself
        loaded = read_embeddings(path)
    random = sorted(d for d, a in loaded.dataset_attrs.items() if a.get("weights_sha256") == RANDOM_INIT)
    return {
        "path": str(path),
        "sha256": loaded.sha256,
        "attrs": loaded.attrs,
        "modalities": {d: dict(a) for d, a in loaded.dataset_attrs.items()},
        "random_init": bool(random),
        "random_init_modalities": random,
    }


# --- executors ----------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else all CUDA devices."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no usable CUDA runtime means no GPU
        return []


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Silence copies of :class:`pipeline.embeddings.RandomInitWarning` in this block.

    Every embeddings read of a random-init file warns; a study states it once, loudly
    (:func:`announce_random_init`), and reads the file once per process and configuration.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RandomInitWarning)
        yield


def announce_random_init(spec: StudySpec) -> bool:
    """Warn once (warning + stderr line) when the study's embeddings are random-init.

    Returns:
        Whether the study uses embeddings and they are random-init.
    """
    uses = any(c.embedding_set for c in spec.configurations())
    if not uses or spec.embeddings is None or not Path(spec.embeddings).is_file():
        return False
    prov = embeddings_provenance(spec.embeddings)
    if prov["random_init"]:
        msg = (
            f"{spec.embeddings}: {', '.join(prov['random_init_modalities'])} embeddings come from RANDOMLY "
            "INITIALISED encoders; every FM row of this study tests the pipeline, not the foundation models "
            "(stated once per run)"
        )
        warnings.warn(msg, RandomInitWarning, stacklevel=2)
        print(f"WARNING: {msg}", file=sys.stderr)
    return bool(prov["random_init"])


#: Cells one GPU trains side by side unless ``--cells-per-gpu`` says otherwise: at the paper's
#: batch of 8 a cell keeps an H200 busy about half of each step, and four folds sharing it gave
#: 1.6x the throughput of one (``benchmarks/gpu.md``).
DEFAULT_CELLS_PER_GPU = 4
#: GPU memory a paper-size cell is taken to need when choosing how many share a GPU: an upper
#: estimate until ``benchmarks/gpu_check.sh`` measures a cell's peak (it prints it).
CELL_GPU_MEMORY_GIB = 8.0


def gpu_free_memory_gib(gpus: Sequence[str]) -> list[float] | None:
    """Free memory of each GPU in GiB, from ``nvidia-smi`` (this process starts no CUDA
    context: the workers do); None when it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    free = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        if mib.strip().isdigit():
            free[index.strip()] = int(mib) / 1024
    return [free[g] for g in gpus] if all(g in free for g in gpus) else None


def cells_per_gpu(gpus: Sequence[str], requested: int | None = None, free_gib: Sequence[float] | None = None) -> int:
    """How many cells each GPU trains side by side.

    Args:
        gpus: the GPU ids cells are pinned to.
        requested: ``--cells-per-gpu``; None = :data:`DEFAULT_CELLS_PER_GPU`, fewer when the
            GPU with the least free memory holds fewer :data:`CELL_GPU_MEMORY_GIB` cells (at
            least 1).
        free_gib: free memory per GPU; default :func:`gpu_free_memory_gib` (unknown = no cap).

    Raises:
        ValueError: ``requested`` below 1.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"cells per GPU must be >= 1, got {requested}")
        return int(requested)
    if not gpus:
        return 1
    free = gpu_free_memory_gib(gpus) if free_gib is None else list(free_gib)
    if not free:
        return DEFAULT_CELLS_PER_GPU
    return max(1, min(DEFAULT_CELLS_PER_GPU, int(0.9 * min(free) // CELL_GPU_MEMORY_GIB)))


def study_gpus(spec: StudySpec) -> list[str]:
    """The GPUs the study's cells train on here: none when its training device is the CPU, else
    :func:`visible_gpus`."""
    return [] if spec.train.get("device") == "cpu" else visible_gpus()


def device_slots(gpus: Sequence[str], workers: int) -> list[str | None]:
    """The GPU each of ``workers`` pool workers is pinned to: round-robin over ``gpus``, so the
    first workers spread over the GPUs and each GPU gets ``workers / len(gpus)`` of them (one
    group of side-by-side cells per GPU); all None without GPUs."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(workers)]


@dataclass
class StudyOutcome:
    """What an executor did. ``failed`` maps cell key -> error message."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    job_ids: list[str] = field(default_factory=list)
    #: Cells whose cluster task ended without a result (cancelled, requeued away, killed).
    cancelled: list[str] = field(default_factory=list)
    #: Cell key -> log file of its cluster task, for the failed and cancelled ones.
    logs: dict[str, str] = field(default_factory=dict)
    #: Cell key -> the process whose claim on the cell this run waited for (:func:`claim_cell`).
    waited: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def add(self, key: str, res: dict[str, Any]) -> None:
        """File one job result under ran, skipped or failed."""
        if res.get("waited_for"):
            self.waited[key] = res["waited_for"]
        if "error" in res:
            self.failed[key] = res["error"]
        elif res.get("skipped"):
            self.skipped.append(key)
        else:
            self.ran.append(key)


def run_pool(
    jobs: Sequence[Job],
    workers: int = 1,
    *,
    gpus: Sequence[str] = (),
    threads: int = 1,
    in_process: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    shown: set[tuple] | None = None,
) -> StudyOutcome:
    """Run study jobs (cells, peers) on :class:`pipeline.pool.JobPool`, collected in a :class:`StudyOutcome`.

    Worker i is pinned to GPU ``gpus[i % len(gpus)]`` through ``CUDA_VISIBLE_DEVICES``
    (set before CUDA starts: hence spawn), uses ``threads`` torch threads and ignores
    copies of the random-init warning. A job's other warnings and warning-level log
    records are shown here, each distinct one once (not once per job and worker). A job
    that raises is reported under its key and the others continue; a worker that dies
    (killed, out of memory) fails the jobs it took, each named.

    Args:
        jobs: the work.
        workers: pool size.
        gpus: GPU ids to pin workers to; empty = no pinning.
        threads: torch intra-op threads per worker.
        in_process: run the jobs one by one in this process instead (no pool).
        on_result: called in this process with each result as it finishes; the result has
            ``key`` and ``progress`` (:func:`pipeline.pool.progress_of` over these jobs); a
            failed job's has ``error`` and ``traceback`` (:meth:`pipeline.pool.Job.failure`).
        shown: warnings and log records already shown in this run (see
            :func:`pipeline.pool.show_notices`); pass one set to several calls to show each
            once in all.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    outcome = StudyOutcome()
    t0 = time.perf_counter()
    if not jobs:
        return outcome
    slots = None
    if not in_process:
        slots = mp.get_context("spawn").Queue()  # one GPU id per worker, taken as it starts
        for slot in device_slots(gpus, workers):
            slots.put(slot)
    pool = JobPool(
        workers, in_process=in_process, initializer=pinned_worker, initargs=(slots, threads, (RandomInitWarning,))
    )
    with pool, quiet_random_init() if in_process else contextlib.nullcontext():
        for done in pool.run(jobs, shown=shown):
            job = done.job
            res = done.value | {"key": job.key} if done.ok else job.failure(done.failed.error, done.failed.trace)
            outcome.add(job.key, res)
            res["progress"] = done.progress
            if on_result is not None:
                on_result(res)
    outcome.seconds = time.perf_counter() - t0
    return outcome


def run_local(
    spec: StudySpec,
    cells: Sequence[Cell],
    workers: int | None = None,
    *,
    gpus: Sequence[str] | None = None,
    per_gpu: int | None = None,
    threads_per_worker: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    shown: set[tuple] | None = None,
) -> StudyOutcome:
    """Run cells in a pool of fresh (spawned) worker processes (:func:`run_pool`).

    With GPUs (and a study not set to train on the CPU), each GPU trains ``per_gpu`` cells side
    by side (:func:`cells_per_gpu`), one group per GPU: ``workers`` defaults to
    ``len(gpus) x per_gpu`` and worker i is pinned to GPU ``gpus[i % len(gpus)]`` through
    ``CUDA_VISIBLE_DEVICES`` (:func:`device_slots`). A cell's numbers do not depend on which
    worker or neighbour it has (``tests/test_study.py``). Torch CPU threads per worker default
    to 1 outside training; a cell trains on its configuration's ``threads``
    (:mod:`pipeline.runtime`). A failing cell is reported in the outcome and the others continue.

    Args:
        spec: the study (already prepared by :func:`prepare_study`).
        cells: the cells to run; finished ones are skipped inside :func:`run_cell`.
        workers: pool size; default ``len(gpus) x per_gpu`` with GPUs, else 1.
        gpus: GPU ids; default :func:`visible_gpus` (none when the study trains on the CPU).
        per_gpu: cells side by side on each GPU (``--cells-per-gpu``); default
            :func:`cells_per_gpu`'s choice.
        threads_per_worker: torch intra-op threads per worker.
        on_result: called in the parent with each cell's result as it finishes (with
            ``progress``, see :func:`run_pool`).
        shown: warnings already shown in this run (:func:`run_pool`).
    """
    gpus = study_gpus(spec) if gpus is None else list(gpus)
    if workers is None:
        workers = len(gpus) * cells_per_gpu(gpus, per_gpu) if gpus else 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    threads = threads_per_worker or DEFAULT_THREADS
    jobs = [Job(cell.key, run_cell, (spec, cell), ident={"cell": cell.key}) for cell in cells]
    return run_pool(jobs, workers, gpus=gpus, threads=threads, on_result=on_result, shown=shown)


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of each array task (submitit parameter names in brackets).

    Attributes:
        partition: Slurm partition [slurm_partition]; ``None`` = cluster default.
        time_min: wall-time limit per cell in minutes [timeout_min].
        gpus_per_node: GPUs per task [gpus_per_node].
        mem_gb: memory per task [mem_gb].
        cpus_per_task: CPU cores per task [cpus_per_task].
        array_parallelism: most tasks running at once [slurm_array_parallelism].
        extra: further submitit parameters (e.g. ``{"slurm_account": "..."}``).
    """

    partition: str | None = None
    time_min: int = 120
    gpus_per_node: int = 1
    mem_gb: int = 32
    cpus_per_task: int = 4
    array_parallelism: int = 65
    extra: dict[str, Any] = field(default_factory=dict)

    def parameters(self, cluster: str | None) -> dict[str, Any]:
        """``update_parameters`` arguments for ``AutoExecutor(cluster=cluster)``."""
        params: dict[str, Any] = {"timeout_min": int(self.time_min), "gpus_per_node": int(self.gpus_per_node)}
        if cluster != "local":
            params.update(
                mem_gb=int(self.mem_gb),
                cpus_per_task=int(self.cpus_per_task),
                slurm_array_parallelism=int(self.array_parallelism),
            )
            if self.partition:
                params["slurm_partition"] = self.partition
        params.update(self.extra)
        return params


def _refuse_local_gpu_cells(options: SlurmOptions) -> None:
    """Refuse GPU cells on submitit's local cluster: it starts every task at once (no
    array-parallelism cap) and pins GPUs through ``CUDA_AVAILABLE_DEVICES``, which CUDA does
    not read, so every cell would land on GPU 0 together. The local pool pins one cell per GPU
    through ``CUDA_VISIBLE_DEVICES``."""
    gpus = visible_gpus()
    if int(options.gpus_per_node) > 0 and gpus:
        raise ValueError(
            f"submitit's local cluster cannot place GPU cells (gpus_per_node={options.gpus_per_node}, "
            f"GPUs {gpus}): it runs every cell at once on GPU 0. Use the local pool "
            f"(`run-study --executor local --workers {len(gpus)}`: one cell per GPU), or "
            "--gpus-per-node 0 to run the local cluster's cells on the CPU"
        )


def run_submitit(
    spec: StudySpec,
    cells: Sequence[Cell],
    *,
    cluster: str | None = None,
    options: SlurmOptions = SlurmOptions(),
    wait: bool = True,
    log_dir: str | os.PathLike | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> StudyOutcome:
    """Submit the cells as one submitit array job (``executor.map_array``).

    On Slurm the wait follows the tasks with ``squeue`` and ``scontrol``, not ``sacct``
    (:func:`wait_slurm_tasks`): a cluster without accounting is common, and a cancelled task
    is then noticed within a minute instead of being polled for good.

    Args:
        spec: the study (prepared).
        cells: cells to submit (pass only pending ones; finished cells would no-op).
        cluster: ``None`` (auto: Slurm when ``sbatch`` exists), ``"slurm"``, ``"local"``
            (submitit's local executor, one subprocess per cell) or ``"debug"`` (in-process).
        options: resources per task.
        wait: block until every task finishes and collect results; otherwise return the
            job ids right after submission (rerun the study later to build the report).
        log_dir: submitit folder; default ``<study>/submitit``.
        on_result: Slurm only: called with each task's result as it is collected (a failed or
            cancelled one has ``error`` and ``log``).
    """
    if cluster == "local":
        _refuse_local_gpu_cells(options)
    folder = Path(log_dir) if log_dir else spec.root / "submitit"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    if executor.cluster == "local":
        _refuse_local_gpu_cells(options)
    executor.update_parameters(name="hnfm-study", **options.parameters(executor.cluster))
    outcome = StudyOutcome()
    if not cells:
        return outcome
    t0 = time.perf_counter()
    jobs = executor.map_array(run_cell, [spec] * len(cells), list(cells))
    outcome.job_ids = [j.job_id for j in jobs]
    if wait and executor.cluster == "slurm":
        wait_slurm_tasks(cells, jobs, outcome, on_result=on_result)
    elif wait:
        for cell, job in zip(cells, jobs):
            try:
                outcome.add(cell.key, job.result())
            except Exception as exc:  # noqa: BLE001 - one failed task must not hide the others
                outcome.failed[cell.key] = (
                    f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                )
    outcome.seconds = time.perf_counter() - t0
    return outcome


#: Seconds between two looks at the Slurm queue (HNFM_SLURM_POLL_S overrides).
SLURM_POLL_S = 10.0
#: Slurm states of a task that is still queued or running (it may yet write its result).
_SLURM_LIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STAGE_OUT",
        "SIGNALING",
        "STOPPED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)


def _slurm_queue(array_ids: set[str]) -> dict[str, str] | None:
    """``{"<array>_<task>": state}`` of the queued tasks of these array jobs (``squeue -r``);
    None when squeue fails (the controller is unreachable: nothing can be concluded)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "-j", ",".join(sorted(array_ids)), "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses ids it no longer knows ("Invalid job id specified"): all have left.
        return {} if "Invalid job id" in out.stderr else None
    return dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())


def _slurm_task_state(task_id: str) -> str | None:
    """``scontrol show job``'s JobState of one task (kept for MinJobAge after it ends); None
    when the controller no longer knows it."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", task_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in out.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def wait_slurm_tasks(
    cells: Sequence[Cell],
    jobs: Sequence[Any],
    outcome: StudyOutcome,
    *,
    poll_s: float | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Collect the array's results as they come, without ``sacct``.

    A task's result is its submitit result file. A task that is no longer queued or running
    (``squeue``; ``scontrol`` for the state of one that left) and has written no result, on
    two looks in a row, ended without one: it is filed under ``failed`` and ``cancelled``
    with its state and its log, and the others are still awaited. A task that failed (an
    error in the cell) is filed under ``failed`` with its error's last line and its log.
    """
    poll = float(os.environ.get("HNFM_SLURM_POLL_S", poll_s or SLURM_POLL_S))
    pending = {i: (cell, job) for i, (cell, job) in enumerate(zip(cells, jobs))}
    gone: dict[int, int] = {}
    total, t0 = len(pending), time.perf_counter()

    def file(i: int, res: dict[str, Any]) -> None:
        cell, job = pending.pop(i)
        outcome.add(cell.key, res)
        if "error" in res:
            outcome.logs[cell.key] = res["log"]
        if on_result is not None:
            on_result(
                res
                | {
                    "progress": {
                        "done": total - len(pending),
                        "total": total,
                        "elapsed_s": time.perf_counter() - t0,
                        "remaining_s": None,
                    }
                }
            )

    while pending:
        for i, (cell, job) in list(pending.items()):
            if job.paths.result_pickle.exists():
                res = _slurm_result(cell, job)
                # A task cancelled while it trains may write a result of its own (the signal's
                # error) before it ends: still a cancelled cell, named as such.
                if "error" in res and (_slurm_task_state(str(job.job_id)) or "").startswith("CANCELLED"):
                    outcome.cancelled.append(cell.key)
                file(i, res)
        if not pending:
            break
        queue = _slurm_queue({str(job.job_id).split("_")[0] for _, job in pending.values()})
        for i, (cell, job) in list(pending.items()):
            if queue is None or str(job.job_id) in queue:
                gone.pop(i, None)
                continue
            state = _slurm_task_state(str(job.job_id))
            if state in _SLURM_LIVE:
                gone.pop(i, None)
                continue
            gone[i] = gone.get(i, 0) + 1
            if gone[i] >= 2 and not job.paths.result_pickle.exists():
                outcome.cancelled.append(cell.key)
                file(
                    i,
                    {
                        "cell": cell.key,
                        "key": cell.key,
                        "log": str(job.paths.stderr),
                        "error": f"Slurm task {job.job_id} ended without a result "
                        f"({state or 'no longer known to Slurm'}; cancelled or killed?)",
                    },
                )
        if pending:
            time.sleep(poll)


def _slurm_result(cell: Cell, job: Any) -> dict[str, Any]:
    """The result of a task that wrote its result file; a failure names its log."""
    try:
        return dict(job.result()) | {"key": cell.key}
    except Exception as exc:  # noqa: BLE001 - one failed task must not hide the others
        # submitit's FailedJobError: "... with trace:\n----\n<traceback>\n----\n<log paths>";
        # the traceback's last line is the cell's own error.
        text = str(exc)
        parts = [p for p in text.split("-" * 22) if p.strip()]
        trace = parts[1] if len(parts) >= 3 else text
        lines = [ln.strip("-").strip() for ln in trace.strip().splitlines() if ln.strip("-").strip()]
        return {
            "cell": cell.key,
            "key": cell.key,
            "log": str(job.paths.stderr),
            "traceback": trace.strip(),
            "error": lines[-1] if lines else type(exc).__name__,
        }


def run_study(
    spec: StudySpec,
    *,
    executor: str = "local",
    workers: int | None = None,
    cells_per_gpu: int | None = None,
    slurm: SlurmOptions = SlurmOptions(),
    cluster: str | None = None,
    wait: bool = True,
    info: dict[str, Any] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_peer: Callable[[dict[str, Any]], None] | None = None,
    peer_workers: int | None = None,
    announce: bool = True,
) -> StudyOutcome:
    """Prepare the study folder, fit the peers on every split, then run every pending cell.

    Peers run first: they take seconds, and the report can then put them beside whatever
    CNN cells are finished. Failed peers appear in ``outcome.failed`` under
    ``peers:<split>/<peer>``. Random-init embeddings are stated once at the start
    (:func:`announce_random_init`); every later read, here and in the workers, is silent,
    and every other warning of the peers and cells is shown once in the run.

    Args:
        spec: the study.
        executor: ``"local"`` (process pool) or ``"submitit"`` (array job).
        workers: local pool size; default :func:`run_local`'s (``len(gpus) x cells_per_gpu``
            with GPUs, else 1).
        cells_per_gpu: local executor with GPUs: cells each GPU trains side by side; default
            :func:`cells_per_gpu`'s choice.
        slurm: resources per array task (submitit).
        cluster: submitit cluster (``None`` auto, ``"slurm"``, ``"local"``, ``"debug"``).
        wait: submitit only: wait for the array to finish.
        info: free-form record stored in ``study.json`` (data source, settings, ...).
        on_result: callback per finished cell (with ``progress``): local pool and Slurm.
        on_peer: callback per fitted (or skipped) peer.
        peer_workers: processes fitting peers; default ``workers`` (local executor) or 1.
        announce: state random-init embeddings here; False when the caller already did.
    """
    if executor not in ("local", "submitit"):
        raise ValueError(f"executor must be 'local' or 'submitit', got {executor!r}")
    if announce:
        announce_random_init(spec)
    shown: set[tuple] = set()  # each warning once in the whole run, peers and cells together
    with quiet_random_init():
        prepare_study(spec, info)
        peers = run_peers(
            spec, workers=peer_workers or (workers or 1 if executor == "local" else 1), on_result=on_peer, shown=shown
        )
        pending = [c for c in grid(spec) if not cell_done(spec, c)]
        done = [c.key for c in grid(spec) if cell_done(spec, c)]
        if executor == "local":
            outcome = (
                run_local(spec, pending, workers, per_gpu=cells_per_gpu, on_result=on_result, shown=shown)
                if pending
                else StudyOutcome()
            )
        else:
            outcome = run_submitit(spec, pending, cluster=cluster, options=slurm, wait=wait, on_result=on_result)
    outcome.skipped = done + outcome.skipped
    outcome.failed.update({f"peers:{k}": v for k, v in peers.failed.items()})
    return outcome
