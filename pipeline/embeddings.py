"""Stage one: frozen foundation-model embeddings, computed once per case and cached in HDF5.

``extract_embeddings`` runs the frozen CT-FM (512-d) and/or PET-FM (768-d) encoder over every
case of a complete preprocessed cache (:class:`pipeline.cache.PreprocessedCache`) and writes
``embeddings/<modality>.h5``. Stage two reads that file only through :func:`load_embeddings`
/ :func:`read_embeddings`, which refuse embeddings made from another preprocessing.

HDF5 schema (``SCHEMA_VERSION`` 1; readable with plain h5py, no custom types)::

    /case_ids        (N,) variable-length UTF-8 str   row order of every other dataset
    /fingerprints    (N,) variable-length UTF-8 str   per-case cache fingerprint, same rows
    /ct              (N, 512) float32                 CT-FM embeddings   (modality ct, ctpet)
    /pet             (N, 768) float32                 PET-FM embeddings  (modality pet, ctpet)

File attributes: ``schema_version``, ``modality`` (``ct`` | ``pet`` | ``ctpet``, or an
imported table's name), ``modalities`` (JSON list of the embedding datasets),
``params_hash`` and ``crop_size_vox_xyz`` of the preprocessed cache, ``cache_path``,
``cache_bound`` (bool; False only for a feature table imported without a cache: empty
fingerprints, and the cache checks of :func:`read_embeddings` do not apply),
``code_version``, ``created`` (UTC ISO 8601), ``random_init`` (bool). Files from
:func:`pipeline.peers.import_feature_table` add ``source = "feature_table"``. Every file is
written by :func:`write_embedding_file`, the one writer of this schema.

Attributes of each embedding dataset (``/ct``, ``/pet``): ``encoder`` (``CT_FM_NAME`` /
``PET_FM_NAME``), ``weights_sha256`` (hex, or ``"random-init"``), ``random_init_seed`` (-1
unless random-init), ``weights_path`` (informational), ``encoder_config`` (JSON of the
constructor overrides, ``{}`` for the published architecture), ``embedding_dim``,
``pooling`` (``gap_last_feature_map`` for CT-FM: global average pool of the last of five
SegResEncoder maps; ``mean_tokens_pre_neck`` for PET-FM: mean of the 8^3 ViT tokens before
the neck), ``input_key`` (``ctfm/ct`` / ``petfm/pet`` in the cache), ``input_shape``
(``[D, H, W]`` of the cached input; the encoder sees ``[B, 1, D, H, W]``, D = slice axis),
``dtype`` (``float32``, the stored type), ``precision`` (``fp32`` on CPU,
``bf16-autocast`` on CUDA), ``provenance`` (canonical JSON of all of these) and
``provenance_hash``.

Crash safety and resume. Every case's embedding is first written as a shard,
``<shard_dir>/<store>/<case_id>-<fingerprint>.npy`` (float32, shape ``[dim]``), through
:func:`pipeline.artefacts.atomic_path`, so a shard under its final name is always complete.
``<store>`` is named after modality, encoder, weights sha256 (or ``random-init-seed<k>``) and
a hash of the whole encoder provenance (config, pooling, input key, precision); its
``provenance.json`` records that provenance in full. The final ``.h5`` is assembled from
shards into a temporary sibling and renamed into place, so a killed run never leaves a
partial file under the final name. A rerun skips every case whose shard exists and removes
temporary files that a killed run left behind (each store and output is held under an
exclusive ``flock`` while a run writes, so a concurrent run is refused instead of having its
temporary files deleted; the lock files exist only while held, and a failed run removes the
stores and folders it made that hold no shard). ``ctpet`` reuses the shards of earlier
``ct`` and ``pet`` runs with the same provenance: no encoder ever runs twice on the same case
and inputs.

PET-FM input size. The PET-FM is a ViT on a cubic input whose size fixes its token grid;
:func:`pet_encoder_config` takes that size from the cache's PET-FM inputs (128^3 in the
paper: the published architecture, no override; the demo's 64^3 gives ``img_size`` 64 with a
4^3 window), so extraction needs no ``--encoder-config`` for any preprocessing.

Batches are formed from the cases still missing, in cache order, and a short last batch is
padded by repeating its own cases, so every forward pass has exactly ``batch_size`` rows.
Frozen encoders in eval mode treat rows independently, but some CPU kernels choose another
algorithm for a single row; constant batch shapes make a resumed run write embeddings
bit-identical to an uninterrupted one on a deterministic device (CPU). Finished cases are
never recomputed.

An existing output with other provenance (weights, encoder config, precision or
preprocessing ``params_hash``) is never mixed into: the run is refused with a message naming
both sides, unless ``overwrite=True`` replaces it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pipeline.artefacts import (
    plain_value,
    ProvenanceError,
    atomic_path,
    canonical_json,
    code_version,
    missing_path_message,
    params_hash,
    read_json,
    sha256_file,
    utc_now,
    write_json_atomic,
)
from pipeline.cache import COHORT_FILE, CTFM_CT, PETFM_PET, PreprocessedCache
from pipeline.embedding_sets import EMBEDDING_SETS
from pipeline.numerics import numerics_mode, numerics_record
from pipeline.runtime import check_threads, compute_threads, usable_cpus

# torch, and models.checkpoints which imports it, are imported in the functions that run
# the encoders: reading an embeddings file (reports, studies, peers, the CLIs' --help)
# does not load torch.

SCHEMA_VERSION = 1
#: Embedding set name -> datasets it reads (:mod:`pipeline.embedding_sets`, the one registry).
MODALITIES: dict[str, tuple[str, ...]] = {name: s.datasets for name, s in EMBEDDING_SETS.items()}
INPUT_KEYS: dict[str, str] = {"ct": CTFM_CT, "pet": PETFM_PET}
POOLING: dict[str, str] = {"ct": "gap_last_feature_map", "pet": "mean_tokens_pre_neck"}
WEIGHTS_ENV: dict[str, str] = {"ct": "HNFM_CT_FM_WEIGHTS", "pet": "HNFM_PET_FM_WEIGHTS"}
#: Where the weights are looked for when neither an argument nor the env var names them.
DEFAULT_WEIGHTS: dict[str, Path] = {
    "ct": Path("~/.cache/hnfm/ct_fm/model.safetensors"),
    "pet": Path("~/.cache/hnfm/pet_fm/seganypet_v1.pth"),
}
#: PETFMEncoder's published (SAM-Med3D vit_b_ori) input edge, patch edge and window edge.
PET_FM_PUBLISHED: dict[str, int] = {"img_size": 128, "patch_size": 16, "window_size": 14}
RANDOM_INIT = "random-init"
#: ``source`` file attribute of feature tables imported by :func:`pipeline.peers.import_feature_table`.
FEATURE_TABLE_SOURCE = "feature_table"
SHARD_DIR_NAME = ".shards"
_TMP_SUFFIX = ".tmp"  # what pipeline.artefacts.atomic_path appends to its temporary files
_RANGE_TOL = 1e-4  # cached FM inputs are min-max scaled to [0, 1]; allow rounding only


class RandomInitWarning(UserWarning):
    """Embeddings were computed with randomly initialised encoders (demo only)."""


class WeightsNotFoundError(FileNotFoundError):
    """Foundation-model weights were not passed and are not at the default location."""


class MissingCasesError(ValueError):
    """The embedding file lacks cases a consumer needs; ``missing`` lists them."""

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


class ExtractionLockedError(RuntimeError):
    """Another run holds the lock of the same output or shard store."""


def training_fill(train: np.ndarray) -> np.ndarray:
    """Per-feature fill value of missing entries: the mean of the training rows.

    The one missing-value policy for embeddings and imported features, called by the CNN's
    :func:`pipeline.train.fit_fm_stats` and the Cox heads' :mod:`pipeline.peers` alike: a
    training-fold mean is what z-scoring with training statistics maps to 0, so a missing
    value carries no signal. A column missing in every training row is filled with 0.

    Args:
        train: ``[N, F]`` training rows (NaN = missing).

    Returns:
        float64 ``[F]``.
    """
    train = np.asarray(train, dtype=np.float64)
    if not np.isnan(train).any():
        return train.mean(axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for all-NaN columns
        return np.nan_to_num(np.nanmean(train, axis=0))


#: A feature whose training SD is at most this is constant: it is scaled by 1, not its SD.
SD_FLOOR = 1e-8


def training_scale(filled: np.ndarray) -> np.ndarray:
    """Per-feature SD of filled training rows ``[N, F]``, 1 where at most :data:`SD_FLOOR`."""
    sd = np.asarray(filled).std(axis=0)
    return np.where(sd > SD_FLOOR, sd, 1.0)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@dataclass
class ModalityReport:
    """What one modality's pass did."""

    computed: int = 0
    reused: int = 0
    store: Path | None = None


@dataclass
class ExtractionResult:
    """Outcome of :func:`run_extraction`.

    Attributes:
        path: the final ``.h5``.
        modality: ``ct``, ``pet`` or ``ctpet``.
        per_modality: ``"ct"``/``"pet"`` -> counts of cases computed now and reused shards.
        up_to_date: True when the existing file already matched and nothing was done.
        seconds: wall time.
    """

    path: Path
    modality: str
    per_modality: dict[str, ModalityReport] = field(default_factory=dict)
    up_to_date: bool = False
    seconds: float = 0.0

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.per_modality.values())

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.per_modality.values())

    def summary(self) -> str:
        """One line: cases computed / reused per modality, path, seconds."""
        if self.up_to_date:
            return f"{self.path}: already complete and up to date, nothing computed ({self.seconds:.1f} s)"
        parts = ", ".join(
            f"{m}: {r.computed} computed, {r.reused} reused" for m, r in self.per_modality.items()
        )
        return f"{parts} -> {self.path} ({self.seconds:.1f} s)"


@dataclass(frozen=True)
class _EncoderSpec:
    """Everything that determines one modality's embeddings besides the input case."""

    modality: str
    encoder: str
    weights_sha256: str
    random_init_seed: int
    weights_path: str
    encoder_config: dict[str, Any]
    precision: str
    compute: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """The fields that decide the numbers (``weights_path`` is only informational).

        ``compute`` is the device and, on CPU, the numerics mode (:mod:`pipeline.numerics`)
        and, under native numerics only, the thread count: there the count moved the last
        bits on some CPUs (the PET-FM on a 16-core x86 host: ~1e-7 between one and two
        threads), so rows computed on other counts are never mixed into one file or store.
        Under portable numerics both encoders give the same bytes on any count (1 to 16
        threads, ``tests/test_runtime.py``), so the count is recorded in the file's
        ``environment`` but decides nothing."""
        return {
            "compute": compute_identity(self.compute),
            "modality": self.modality,
            "encoder": self.encoder,
            "weights_sha256": self.weights_sha256,
            "random_init_seed": self.random_init_seed,
            "encoder_config": self.encoder_config,
            "pooling": POOLING[self.modality],
            "input_key": INPUT_KEYS[self.modality],
            "precision": self.precision,
        }

    def describe(self) -> str:
        if self.weights_sha256 == RANDOM_INIT:
            w = f"random-init seed {self.random_init_seed}"
        else:
            w = f"weights sha256 {self.weights_sha256[:12]}"
        cfg = f", config {canonical_json(self.encoder_config)}" if self.encoder_config else ""
        return f"{self.encoder} ({w}{cfg}, {self.precision})"

    def store_name(self) -> str:
        w = (
            f"random-init-seed{self.random_init_seed}"
            if self.weights_sha256 == RANDOM_INIT
            else self.weights_sha256[:12]
        )
        return f"{self.modality}-{self.encoder}-{w}-{self.precision}-{params_hash(self.provenance())[:8]}"


def resolve_weights(modality: str, weights: str | os.PathLike | None) -> Path:
    """Find the weights file of ``modality``, in this order: the argument, the env var, the
    default path, the Hugging Face Hub's cache, and where the network allows a download with
    the Hub's client (:mod:`pipeline.hub_weights`: the sha256 checked against the Hub's record).

    A path given (argument or env var) must exist: it is never replaced by another file.
    Random-init encoders are never a fallback (``random_init=True`` does not call this).

    Args:
        modality: ``"ct"`` or ``"pet"``.
        weights: explicit path or None.

    Returns:
        An existing file.

    Raises:
        WeightsNotFoundError: naming where the public weights live (repository, file,
            revision) and every way to pass them; offline, where to put the file.
    """
    env = WEIGHTS_ENV[modality]
    if weights is not None:
        path, how = Path(weights).expanduser(), f"--{modality}-weights"
    elif os.environ.get(env):
        path, how = Path(os.environ[env]).expanduser(), f"${env}"
    else:
        path, how = DEFAULT_WEIGHTS[modality].expanduser(), "the default location"
    if path.is_file():
        return path
    if how != "the default location":
        raise WeightsNotFoundError(_weights_advice(modality, path, how))
    from pipeline import hub_weights  # local: huggingface_hub loads only when the weights are looked for

    try:
        return hub_weights.fetch_weights(modality)
    except hub_weights.HubWeightsError as exc:
        raise WeightsNotFoundError(f"{_weights_advice(modality, path, how)} From the Hub: {exc}. "
                                   f"{hub_weights.offline_advice(modality, DEFAULT_WEIGHTS[modality], env)}") from None


def _weights_advice(modality: str, path: Path, how: str) -> str:
    from models import checkpoints  # local: torch (see the note on imports); only this error path

    name = "CT-FM" if modality == "ct" else "PET-FM"
    source = checkpoints.CT_FM_WEIGHTS if modality == "ct" else checkpoints.PET_FM_WEIGHTS
    return (
        f"{name} weights not found at {path} (from {how}). Download the public weights: "
        f"{source}; then pass --{modality}-weights PATH, or set {WEIGHTS_ENV[modality]}=PATH, or "
        f"put the file at {DEFAULT_WEIGHTS[modality]}. To test the pipeline without weights, "
        "as `run-study --demo` does, add --random-init (random encoders: recorded in the file, "
        "warned about on every read, meaningless for results)."
    )


PRECISIONS = ("fp32", "bf16-autocast")


def _resolve_device(device: str, precision: str | None = None) -> tuple[Any, str]:
    """The torch device and the encoders' precision: ``precision`` when given (a run's recorded
    precision, so new patients are embedded as the run's cohort was), else bf16 autocast on CUDA
    and fp32 on CPU."""
    import torch  # local: see the note on imports

    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {list(PRECISIONS)}")

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA device")
    if precision is None:
        precision = "bf16-autocast" if device.startswith("cuda") else "fp32"
    return torch.device(device), precision


def _build_encoder(spec: _EncoderSpec) -> Any:
    """Instantiate the frozen encoder of ``spec`` in eval mode (lazily: only when needed)."""
    from models import checkpoints  # local: torch (see the note on imports)

    if spec.weights_sha256 == RANDOM_INIT:
        make = checkpoints.random_ct_fm if spec.modality == "ct" else checkpoints.random_pet_fm
        out = make(spec.random_init_seed, **spec.encoder_config)
        model = out[0] if isinstance(out, tuple) else out
    else:
        load = checkpoints.load_ct_fm if spec.modality == "ct" else checkpoints.load_pet_fm
        model, sha = load(spec.weights_path, **spec.encoder_config)
        if sha != spec.weights_sha256:
            raise ProvenanceError(
                f"{spec.weights_path}: weights changed during the run: sha256 {spec.weights_sha256} "
                f"when the run started, {sha} when loaded"
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``, a file that exists only while it is held.

    The kernel releases the lock when the holder dies, even on kill -9 (the empty file then
    stays until the next run on the same path removes it). The holder unlinks the file
    before releasing it; a run that opened the file just before that would lock an orphaned
    inode, so the lock counts only when ``path`` still names the locked file.
    """
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a failed run's clean-up: retry
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ExtractionLockedError(
                    f"{path}: another extract-embeddings run is writing here; wait for it to end"
                ) from exc
            raise
        if _names_same_file(path, fd):
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _names_same_file(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


def _remove_stale_temps(folder: Path, prefix: str = ".") -> int:
    """Delete temporary files a killed run left (``atomic_path`` names: ``.<name>.*.tmp``)."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(prefix) and p.name.endswith(_TMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
    return n


def _shard_path(store: Path, case_id: str, fingerprint: str) -> Path:
    return store / f"{case_id}-{fingerprint}.npy"


def _save_array(handle: Any, arr: np.ndarray) -> None:
    np.save(handle, arr, allow_pickle=False)


def _write_shard(path: Path, vec: np.ndarray) -> None:
    # Open the temporary path ourselves: np.save on a name would append another ".npy".
    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as handle:
            _save_array(handle, vec)
            handle.flush()
            os.fsync(handle.fileno())


def _read_shard(path: Path, dim: int | None) -> np.ndarray:
    vec = np.load(path, allow_pickle=False)
    if vec.dtype != np.float32 or vec.ndim != 1 or (dim is not None and vec.shape[0] != dim):
        raise ValueError(
            f"{path}: shard holds {vec.dtype} {list(vec.shape)}, expected float32 "
            f"[{dim if dim is not None else 'dim'}]; delete it to recompute that case"
        )
    return vec


def _prepare_store(store: Path, spec: _EncoderSpec) -> None:
    """Record (or check) the provenance of a shard store whose lock this run holds."""
    ignore = store.parent / ".gitignore"
    if not ignore.exists():  # generated artefacts: keep them out of version control
        with atomic_path(ignore) as tmp:
            tmp.write_text("*\n")
    record = store / "provenance.json"
    if record.is_file():
        found = read_json(record)
        if found != json.loads(canonical_json(spec.provenance())):
            raise ProvenanceError(
                f"{record}: shard store records provenance {canonical_json(found)}, this run "
                f"needs {canonical_json(spec.provenance())}; the store name collides, move it away"
            )
    else:
        write_json_atomic(record, spec.provenance())


def _forget_store_if_unused(store: Path):
    """ExitStack callback: when the run fails, drop a store's record if it holds no shard
    (run while the store's lock is still held, so no other run is writing there)."""

    def callback(exc_type, exc, tb) -> bool:
        if exc_type is not None and next(store.glob("*.npy"), None) is None:
            (store / "provenance.json").unlink(missing_ok=True)
        return False

    return callback


def _new_dirs(*folders: Path) -> list[Path]:
    """The folders among ``folders`` and their parents that do not exist yet, deepest first."""
    out: list[Path] = []
    for folder in folders:
        for d in (folder, *folder.parents):
            if d.exists():
                break
            if d not in out:
                out.append(d)
    return sorted(out, key=lambda d: len(d.parts), reverse=True)


def _remove_empty_dirs(folders: Sequence[Path]) -> None:
    """Remove each folder that is empty (or holds only the shard root's ``.gitignore``)."""
    for d in folders:
        if not d.is_dir():
            continue
        if [p.name for p in d.iterdir()] == [".gitignore"] and d.name == SHARD_DIR_NAME:
            (d / ".gitignore").unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: a shard or another run's files
            d.rmdir()


def _load_inputs(
    cache: PreprocessedCache, modality: str, case_ids: Sequence[str]
) -> np.ndarray:
    """Read the FM inputs of ``case_ids`` as ``[B, 1, D, H, W]`` float32 (D = slice axis)."""
    key = INPUT_KEYS[modality]
    arrs = []
    for cid in case_ids:
        arr = cache.read(cid, (key,))[key]
        where = f"{cache.path(cid)}: case {cid!r} dataset {key!r}"
        if arr.ndim != 3:
            raise ValueError(f"{where}: expected [D, H, W], found shape {list(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{where}: holds non-finite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"{where}: values span [{lo:.4g}, {hi:.4g}], expected [0, 1]")
        arrs.append(arr.astype(np.float32, copy=False))
    return np.stack(arrs)[:, None]


def _forward(model: Any, x: np.ndarray, device: Any, precision: str) -> np.ndarray:
    """Run ``model`` on ``x`` [B, 1, D, H, W]; return float32 [B, dim]."""
    import torch  # local: see the note on imports

    with torch.inference_mode():
        t = torch.from_numpy(x).to(device)
        if precision == "bf16-autocast":
            with torch.autocast(device_type=t.device.type, dtype=torch.bfloat16):
                out = model(t)
        else:
            out = model(t)
        return out.float().cpu().numpy()


def _forward_halving(
    model: Any, x: np.ndarray, device: Any, precision: str
) -> np.ndarray:
    """:func:`_forward`, halving the batch on CUDA out-of-memory (down to one case).

    The retry runs after the ``except`` block has been left: inside it the exception's
    traceback still holds the failed forward's frames and their tensors, so the cache could
    not release them. ``x`` is the host array; the device copy of the failed batch lives only
    in :func:`_forward`'s frame, dropped with the traceback.
    """
    import torch  # local: see the note on imports

    try:
        return _forward(model, x, device, precision)
    except torch.cuda.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
    # Out of the except block: the exception and its traceback (the failed batch's tensors) are gone.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    print(
        f"out of memory on a batch of {x.shape[0]}; retrying as {half} + {x.shape[0] - half}",
        file=sys.stderr,
    )
    return np.concatenate(
        [_forward_halving(model, x[:half], device, precision),
         _forward_halving(model, x[half:], device, precision)]
    )


def _embed_modality(
    cache: PreprocessedCache,
    spec: _EncoderSpec,
    store: Path,
    case_ids: list[str],
    fingerprints: list[str],
    *,
    device: Any,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, ModalityReport]:
    """Fill ``store`` with one shard per case, then return ``[N, dim]`` in ``case_ids`` order."""
    report = ModalityReport(store=store)
    paths = [_shard_path(store, c, f) for c, f in zip(case_ids, fingerprints)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    report.reused = len(case_ids) - len(missing)
    if missing:
        if spec.weights_sha256 == RANDOM_INIT:
            _warn_random(
                f"{spec.modality}: computing embeddings with a randomly initialised {spec.encoder} "
                f"(seed {spec.random_init_seed}); fine for a demo, meaningless for results"
            )
        model = _build_encoder(spec).to(device)
        bar = tqdm(
            total=len(missing), unit="case", desc=f"{spec.modality} {spec.encoder}",
            disable=not progress, file=sys.stderr,
        )
        with bar:
            for start in range(0, len(missing), batch_size):
                idx = missing[start : start + batch_size]
                # Pad a short batch by repeating its cases so that every forward pass has
                # batch_size rows whatever was done before: some CPU kernels pick another
                # algorithm for a single row, which changes the last bits.
                x = _load_inputs(cache, spec.modality, [case_ids[i] for i in idx])
                x = x[[k % len(idx) for k in range(batch_size)]]
                out = _forward_halving(model, x, device, spec.precision)
                if out.ndim != 2 or out.shape[0] != batch_size:
                    raise ValueError(
                        f"{spec.encoder} returned shape {list(out.shape)} for a batch of {batch_size}"
                    )
                for row, i in enumerate(idx):
                    vec = np.ascontiguousarray(out[row], dtype=np.float32)
                    if not np.all(np.isfinite(vec)):
                        raise ValueError(
                            f"{spec.encoder} gave a non-finite embedding for case {case_ids[i]!r} "
                            f"({cache.path(case_ids[i])})"
                        )
                    _write_shard(paths[i], vec)
                    report.computed += 1
                    bar.update(1)
    vecs = [_read_shard(p, None) for p in paths]
    dims = {v.shape[0] for v in vecs}
    if len(dims) > 1:
        raise ValueError(f"{store}: shards disagree on the embedding dimension {sorted(dims)}")
    return np.stack(vecs) if vecs else np.zeros((0, 0), np.float32), report


def _make_spec(
    modality: str,
    *,
    weights: str | os.PathLike | None,
    random_init: bool,
    seed: int,
    encoder_config: dict[str, Any],
    precision: str,
    compute: dict[str, Any] | None = None,
) -> _EncoderSpec:
    from models import checkpoints  # local: torch (see the note on imports)

    name = checkpoints.CT_FM_NAME if modality == "ct" else checkpoints.PET_FM_NAME
    compute = dict(compute or {})
    if random_init:
        return _EncoderSpec(modality, name, RANDOM_INIT, int(seed), "", dict(encoder_config), precision, compute)
    path = resolve_weights(modality, weights)
    return _EncoderSpec(
        # The folder resolved, not the file: a Hub cache's snapshot link keeps its commit in the path.
        modality, name, sha256_file(path), -1, str(path.parent.resolve() / path.name), dict(encoder_config),
        precision, compute,
    )


def _make_specs(
    mods: Sequence[str], *, weights: dict[str, Any], random_init: bool, seed: int,
    encoder_kwargs: dict[str, dict[str, Any]], precision: str, compute: dict[str, Any],
) -> dict[str, _EncoderSpec]:
    """One spec per modality; missing weights of every modality are reported together."""
    specs, missing = {}, []
    for m in mods:
        try:
            specs[m] = _make_spec(m, weights=weights[m], random_init=random_init, seed=seed,
                                  encoder_config=encoder_kwargs.get(m, {}), precision=precision,
                                  compute=compute)
        except WeightsNotFoundError as exc:
            missing.append(str(exc))
    if missing:
        raise WeightsNotFoundError(" ".join(missing))
    return specs


def _other_preprocessing_message(path: Path, attrs: dict[str, Any], cache: PreprocessedCache) -> str:
    """Why an embedding file does not fit ``cache``: the cache it was made from (its
    ``cache_path`` attribute) and, where that cache's ``cohort.json`` is still there, the
    preprocessing parameters that differ; else the crop sizes both record."""
    made_from = str(attrs.get("cache_path") or "") or "(not recorded)"
    head = (f"{path}: made from the preprocessed cache {made_from} (params_hash "
            f"{attrs['params_hash']!r}), but the cache {cache.root} has {cache.params_hash!r}")
    fix = f"re-run `extract-embeddings --cache {cache.root}`, or pass the cache the file was made from"
    if attrs.get("cache_path") and Path(made_from) == cache.root.resolve():
        return f"{head}: the cache was preprocessed again since the file was made; {fix}"
    try:
        theirs = PreprocessedCache(made_from).params if attrs.get("cache_path") else None
    except (FileNotFoundError, ProvenanceError, ValueError, KeyError):
        theirs = None
    if theirs is not None and theirs != cache.params:
        keys = sorted(set(theirs) | set(cache.params), key=str)
        diff = [f"{k}: {theirs.get(k)!r} there, {cache.params.get(k)!r} here"
                for k in keys if theirs.get(k) != cache.params.get(k)]
        return f"{head}; differing preprocessing parameters: {'; '.join(diff)}; {fix}"
    crop = plain_value(attrs.get("crop_size_vox_xyz"))
    if crop is not None and list(crop) != list(cache.crop_size_vox_xyz):
        head += f"; crop size G {list(crop)} there, {list(cache.crop_size_vox_xyz)} here (x, y, z voxels)"
    gone = "" if theirs is not None or not attrs.get("cache_path") else \
        f" ({made_from} is gone or unreadable: parameters not compared)"
    return f"{head}{gone}; {fix}"


def open_cache(root: str | os.PathLike) -> PreprocessedCache:
    """Open the preprocessed cache at ``root``, saying how to make one when there is none.

    Raises:
        FileNotFoundError: no ``cohort.json`` at ``root``, naming the command that writes it.
    """
    root = Path(root)
    if (root / COHORT_FILE).is_file():
        return PreprocessedCache(root)
    if (root / "cases").is_dir():
        raise FileNotFoundError(
            f"{root}: preprocessing has not finished (cases/ but no {COHORT_FILE}); rerun the "
            f"same `preprocess ... --out {root}` command to finish it"
        )
    if not root.exists():
        raise FileNotFoundError(
            missing_path_message(root, "preprocessed cache", f"*/{COHORT_FILE}")
            + "; to make one: `preprocess --manifest data_manifest.csv --out PATH`, or `run-study "
            "--demo`, which writes the demo's cache to cache/preprocessed")
    raise FileNotFoundError(
        f"{root}: no preprocessed cache (no {COHORT_FILE}). Make one with "
        f"`preprocess --manifest data_manifest.csv --out {root}`, or run `run-study --demo`, "
        "which writes the demo's cache to cache/preprocessed; or pass --cache PATH"
    )


def pet_input_size(cache: PreprocessedCache) -> tuple[int, int, int]:
    """``[D, H, W]`` of the cache's PET-FM inputs (``petfm/pet``).

    From the cache's preprocessing parameters (``petfm_size_xyz``), else from its first case.
    """
    size_xyz = cache.params.get("petfm_size_xyz")
    if size_xyz is not None:
        return tuple(int(v) for v in reversed(size_xyz))
    if not cache.case_ids:
        raise ValueError(f"{cache.root}: the cache holds no case; cannot size the PET-FM input")
    return _input_shape(cache, cache.case_ids[0], INPUT_KEYS["pet"])


def pet_encoder_config(cache: PreprocessedCache, requested: dict[str, Any] | None = None) -> dict[str, Any]:
    """PET-FM constructor overrides that fit the cache's PET-FM input size.

    The published architecture takes 128^3 (no override). Another cubic size ``s`` gives
    ``img_size = s`` and, unless requested, the largest window that divides the token grid
    ``s / patch_size`` and does not exceed the published 14 (the demo's 64^3: window 4).

    Args:
        cache: the preprocessed cache.
        requested: the caller's overrides (``--encoder-config``'s ``"pet"``); they win,
            except an ``img_size`` the cache contradicts.

    Returns:
        The overrides to build the encoder with (``{}`` = published architecture).

    Raises:
        ValueError: the cached PET-FM input is not cubic, or ``requested["img_size"]``
            differs from it (naming both and the option).
    """
    out = dict(requested or {})
    shape = pet_input_size(cache)
    if len(set(shape)) != 1:
        raise ValueError(
            f"{cache.root}: PET-FM inputs are {list(shape)} [D, H, W]; the PET-FM takes a cube: "
            "preprocess with a cubic PET-FM size"
        )
    size = shape[0]
    if "img_size" in out and int(out["img_size"]) != size:
        raise ValueError(
            f"--encoder-config sets the PET-FM img_size {out['img_size']}, but the cache "
            f"{cache.root} holds {size}^3 PET-FM inputs; drop img_size from --encoder-config "
            f"(it is taken from the cache) or preprocess at {out['img_size']}^3"
        )
    if size != PET_FM_PUBLISHED["img_size"]:
        out.setdefault("img_size", size)
        grid = size // int(out.get("patch_size", PET_FM_PUBLISHED["patch_size"]))
        if "window_size" not in out and grid >= 1:
            out["window_size"] = max(w for w in range(1, min(grid, PET_FM_PUBLISHED["window_size"]) + 1)
                                     if grid % w == 0)
    return out


def _existing_state(path: Path) -> dict[str, Any] | None:
    """What an existing output records, or None when there is none."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as h5:
            return {
                "schema_version": int(h5.attrs["schema_version"]),
                "modality": str(h5.attrs["modality"]),
                "params_hash": str(h5.attrs["params_hash"]),
                "case_ids": list(h5["case_ids"].asstr()[()]),
                "fingerprints": list(h5["fingerprints"].asstr()[()]),
                "provenance": {
                    m: json.loads(h5[m].attrs["provenance"]) for m in ("ct", "pet") if m in h5
                },
            }
    except (OSError, KeyError, ValueError) as exc:
        raise ProvenanceError(
            f"{path}: exists but is not an embedding file of this tool ({exc}); "
            "choose another --out or pass --overwrite"
        ) from exc


def run_extraction(
    cache_root: str | os.PathLike,
    modality: str,
    out_path: str | os.PathLike | None = None,
    *,
    ct_weights: str | os.PathLike | None = None,
    pet_weights: str | os.PathLike | None = None,
    random_init: bool = False,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 2,
    encoder_kwargs: dict[str, dict[str, Any]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    shard_dir: str | os.PathLike | None = None,
    precision: str | None = None,
    threads: int | None = None,
) -> ExtractionResult:
    """Compute (or reuse) embeddings of every cached case and write the ``.h5``; see module doc.

    Args:
        cache_root: complete preprocessed cache (``cohort.json`` + ``cases/``).
        modality: ``"ct"``, ``"pet"`` or ``"ctpet"``.
        out_path: output file; default ``embeddings/<modality>.h5`` (relative to the CWD).
        ct_weights: CT-FM ``model.safetensors``; else ``$HNFM_CT_FM_WEIGHTS``, else
            ``~/.cache/hnfm/ct_fm/model.safetensors``.
        pet_weights: PET-FM ``seganypet_v1.pth``; else ``$HNFM_PET_FM_WEIGHTS``, else
            ``~/.cache/hnfm/pet_fm/seganypet_v1.pth``.
        random_init: use randomly initialised encoders (demo only; recorded in the file).
        seed: seed of the random initialisation.
        device: ``"auto"`` (CUDA with bf16 autocast when present, else CPU fp32), ``"cpu"``,
            ``"cuda"``.
        batch_size: cases per forward pass (halved automatically on CUDA out-of-memory).
        encoder_kwargs: constructor overrides per modality, e.g. ``{"ct": {"init_filters": 4}}``
            (tests and demos use tiny encoders this way); recorded in the file.
        progress: show a tqdm bar (cases/s) on stderr.
        overwrite: replace an existing output made with other provenance.
        shard_dir: shard store root; default ``<out folder>/.shards``.
        precision: ``"fp32"`` or ``"bf16-autocast"`` (part of the provenance); default bf16
            autocast on CUDA, fp32 on CPU. Prediction passes the training run's precision.
        threads: CPU threads of the encoders on CPU; default the CPUs this process may use
            (:func:`pipeline.runtime.usable_cpus`, whatever ``OMP_NUM_THREADS`` says). Part
            of the provenance with the device (see :meth:`_EncoderSpec.provenance`).

    Returns:
        :class:`ExtractionResult`.

    Raises:
        ValueError: bad modality, batch size, device or cached input (naming case and file).
        WeightsNotFoundError: weights missing, with where to get them.
        ProvenanceError: the existing output was made with other provenance.
        ExtractionLockedError: another run is writing the same output or store.
    """
    t0 = time.perf_counter()
    encoder_kwargs = _check_extraction_args(modality, batch_size, encoder_kwargs)
    out = Path(out_path) if out_path is not None else Path("embeddings") / f"{modality}.h5"
    shard_root = Path(shard_dir) if shard_dir is not None else out.parent / SHARD_DIR_NAME
    cache = open_cache(cache_root)
    torch_device, precision = _resolve_device(device, precision)
    mods = MODALITIES[modality]
    if "pet" in mods:
        encoder_kwargs["pet"] = pet_encoder_config(cache, encoder_kwargs.get("pet", {}))
    specs = _make_specs(mods, weights={"ct": ct_weights, "pet": pet_weights},
                        random_init=random_init, seed=seed, encoder_kwargs=encoder_kwargs,
                        precision=precision, compute=compute_record(torch_device, threads))
    case_ids = cache.case_ids
    fingerprints = [cache.case_fingerprint(c) for c in case_ids]
    expected_prov = {m: json.loads(canonical_json(s.provenance())) for m, s in specs.items()}

    result = ExtractionResult(path=out, modality=modality)
    made = _new_dirs(out.parent, shard_root)
    stores = [shard_root / specs[m].store_name() for m in mods]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_exclusive_lock(out.parent / f".{out.name}.lock"))
            if _up_to_date(out, modality, cache, case_ids, fingerprints, expected_prov, overwrite):
                result.up_to_date = True
                result.per_modality = {m: ModalityReport(reused=len(case_ids)) for m in mods}
                result.seconds = time.perf_counter() - t0
                return result
            _remove_stale_temps(out.parent, prefix=f".{out.name}.")
            matrices: dict[str, np.ndarray] = {}
            for m, store in zip(mods, stores):
                stack.enter_context(_exclusive_lock(store / ".lock"))
                stack.push(_forget_store_if_unused(store))
                _prepare_store(store, specs[m])
                _remove_stale_temps(store)
                with _encoder_threads(specs[m]):
                    matrices[m], result.per_modality[m] = _embed_modality(
                        cache, specs[m], store, case_ids, fingerprints,
                        device=torch_device, batch_size=int(batch_size), progress=progress,
                    )
            _write_h5(out, cache, modality, specs, matrices, case_ids, fingerprints)
    except BaseException:
        _remove_empty_dirs([*stores, shard_root, *made])
        raise
    result.seconds = time.perf_counter() - t0
    return result


def compute_record(device: Any, threads: int | None) -> dict[str, Any]:
    """Where the encoders compute: ``{"device": "cpu", "numerics": mode, "threads": n}``
    (``threads`` checked, default :func:`pipeline.runtime.usable_cpus`; ``mode`` from
    :func:`pipeline.numerics.numerics_mode`) or ``{"device": "cuda"}`` (CPU threads and
    pins do not touch a GPU's kernels)."""
    if device.type != "cpu":
        return {"device": device.type}
    return {"device": "cpu", "numerics": numerics_mode(),
            "threads": check_threads(threads) if threads is not None else usable_cpus()}


def compute_identity(compute: dict[str, Any]) -> dict[str, Any]:
    """The part of :func:`compute_record` that decides the embeddings' bits: all of it,
    except the thread count under portable numerics."""
    if compute.get("numerics") == "portable":
        return {k: v for k, v in compute.items() if k != "threads"}
    return dict(compute)


def _encoder_threads(spec: _EncoderSpec) -> contextlib.AbstractContextManager:
    """The CPU threads ``spec`` records (:func:`pipeline.runtime.compute_threads`); on a GPU
    the threads are left as they are."""
    threads = spec.compute.get("threads")
    return compute_threads(threads) if threads is not None else contextlib.nullcontext()


def _check_extraction_args(modality: str, batch_size: int,
                           encoder_kwargs: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """:func:`run_extraction`'s checked arguments: a copy of ``encoder_kwargs`` (``{}`` for None)."""
    if modality not in MODALITIES:
        raise ValueError(f"modality {modality!r}: expected one of {sorted(MODALITIES)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size {batch_size!r}: expected >= 1")
    encoder_kwargs = dict(encoder_kwargs or {})
    unknown = sorted(set(encoder_kwargs) - {"ct", "pet"})
    if unknown:
        raise ValueError(f"encoder_kwargs keys {unknown}: expected 'ct' and/or 'pet'")
    return encoder_kwargs


def _up_to_date(
    out: Path, modality: str, cache: PreprocessedCache, case_ids: list[str],
    fingerprints: list[str], expected_prov: dict[str, Any], overwrite: bool,
) -> bool:
    """True when ``out`` already holds exactly these cases with this provenance.

    Raises:
        ProvenanceError: ``out`` exists with other provenance (or is no embedding file) and
            ``overwrite`` is False.
    """
    try:
        existing = _existing_state(out)
    except ProvenanceError:
        if not overwrite:
            raise
        return False  # not ours, and the caller asked to replace it
    if existing is None:
        return False
    mismatch = _provenance_mismatch(existing, modality, cache.params_hash, expected_prov)
    if mismatch and not overwrite:
        raise ProvenanceError(
            f"{out}: exists with other provenance; refusing to mix. {mismatch} "
            "Write elsewhere with --out, or replace it with --overwrite."
        )
    return (not mismatch and existing["case_ids"] == case_ids
            and existing["fingerprints"] == fingerprints)


def extract_embeddings(*args: Any, **kwargs: Any) -> Path:
    """:func:`run_extraction` (same arguments), returning only the output path."""
    return run_extraction(*args, **kwargs).path


def _provenance_mismatch(
    existing: dict[str, Any], modality: str, params_hash_: str, expected: dict[str, Any]
) -> str:
    """Describe how an existing file differs in provenance ("" when it does not)."""
    diffs = []
    if existing["schema_version"] != SCHEMA_VERSION:
        diffs.append(f"schema_version: file {existing['schema_version']}, this code {SCHEMA_VERSION}")
    if existing["modality"] != modality:
        diffs.append(f"modality: file {existing['modality']!r}, this run {modality!r}")
    if existing["params_hash"] != params_hash_:
        diffs.append(
            f"preprocessing params_hash: file {existing['params_hash']!r}, cache {params_hash_!r}"
        )
    for m, prov in expected.items():
        found = existing["provenance"].get(m)
        if found is None:
            diffs.append(f"{m} encoder: file has none, this run {canonical_json(prov)}")
            continue
        for key in sorted(set(prov) | set(found)):
            if found.get(key) != prov.get(key):
                diffs.append(
                    f"{m} {key}: file {canonical_json(found.get(key))}, "
                    f"this run {canonical_json(prov.get(key))}"
                )
    return "; ".join(diffs) + ("." if diffs else "")


def _write_h5(
    out: Path,
    cache: PreprocessedCache,
    modality: str,
    specs: dict[str, _EncoderSpec],
    matrices: dict[str, np.ndarray],
    case_ids: list[str],
    fingerprints: list[str],
) -> None:
    datasets = {}
    for m, spec in specs.items():
        shape = _input_shape(cache, case_ids[0], INPUT_KEYS[m]) if case_ids else ()
        # HDF5 attributes hold no dicts: those (encoder_config, compute) are stored as JSON.
        attrs = {k: canonical_json(v) if isinstance(v, dict) else v for k, v in spec.provenance().items()}
        attrs.update(weights_path=spec.weights_path, input_shape=np.asarray(shape, dtype=np.int64))
        datasets[m] = (matrices[m], attrs, spec.provenance())
    compute = next(iter(specs.values())).compute if specs else {}
    write_embedding_file(
        out, modality=modality, case_ids=case_ids, datasets=datasets, cache=cache,
        fingerprints=fingerprints,
        random_init=any(s.weights_sha256 == RANDOM_INIT for s in specs.values()),
        file_attrs={"environment": canonical_json(_environment(compute))},
    )


def _environment(compute: dict[str, Any]) -> dict[str, Any]:
    """What the file's rows were computed on, for the record (decides nothing by itself):
    the device, the CPU thread count and :func:`pipeline.numerics.numerics_record`."""
    return {**compute, **numerics_record()}


def write_embedding_file(
    out: str | os.PathLike,
    *,
    modality: str,
    case_ids: Sequence[str],
    datasets: dict[str, tuple[np.ndarray, dict[str, Any], dict[str, Any]]],
    cache: PreprocessedCache | None,
    fingerprints: Sequence[str] | None = None,
    random_init: bool = False,
    file_attrs: dict[str, Any] | None = None,
) -> None:
    """Write an embedding file (schema :data:`SCHEMA_VERSION`) atomically: the one writer.

    Args:
        out: destination ``.h5``.
        modality: the file's ``modality`` attribute (``ct``/``pet``/``ctpet`` or an imported
            table's name).
        case_ids: row order, N cases.
        datasets: name -> (float ``[N, dim]`` matrix, dataset attributes as HDF5-ready
            values, provenance dict). The writer adds ``embedding_dim``, ``dtype``,
            ``provenance`` (canonical JSON) and ``provenance_hash``.
        cache: the preprocessed cache the rows belong to: its ``params_hash``, crop size and
            path are recorded; ``None`` writes an unbound file (``cache_bound`` False, empty
            fingerprints).
        fingerprints: per-case cache fingerprints in row order; default: read from
            ``cache`` (``""`` for a case it lacks).
        random_init: any dataset comes from randomly initialised encoders.
        file_attrs: further file attributes (e.g. ``source``).
    """
    case_ids = list(case_ids)
    if fingerprints is None:
        have = set(cache.case_ids) if cache is not None else set()
        fingerprints = [cache.case_fingerprint(c) if c in have else "" for c in case_ids]
    if len(fingerprints) != len(case_ids):
        raise ValueError(f"{out}: {len(fingerprints)} fingerprints for {len(case_ids)} cases")
    str_dt = h5py.string_dtype(encoding="utf-8")
    with atomic_path(out, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["schema_version"] = SCHEMA_VERSION
            h5.attrs["modality"] = modality
            h5.attrs["modalities"] = json.dumps(list(datasets))
            h5.attrs["params_hash"] = cache.params_hash if cache is not None else ""
            h5.attrs["crop_size_vox_xyz"] = np.asarray(
                cache.crop_size_vox_xyz if cache is not None else (), dtype=np.int64)
            h5.attrs["cache_path"] = str(cache.root.resolve()) if cache is not None else ""
            h5.attrs["cache_bound"] = cache is not None
            h5.attrs["code_version"] = code_version()
            h5.attrs["created"] = utc_now()
            h5.attrs["random_init"] = bool(random_init)
            for k, v in (file_attrs or {}).items():
                h5.attrs[k] = v
            h5.create_dataset("case_ids", data=np.asarray(case_ids, dtype=object), dtype=str_dt)
            h5.create_dataset("fingerprints", data=np.asarray(list(fingerprints), dtype=object), dtype=str_dt)
            for name, (mat, attrs, prov) in datasets.items():
                mat = np.asarray(mat).astype(np.float32, copy=False)
                if mat.ndim != 2 or mat.shape[0] != len(case_ids):
                    raise ValueError(
                        f"{out}: dataset {name!r} has shape {list(mat.shape)}, expected [{len(case_ids)}, dim]"
                    )
                ds = h5.create_dataset(name, data=mat)
                for k, v in attrs.items():
                    ds.attrs[k] = v
                ds.attrs["embedding_dim"] = int(mat.shape[1])
                ds.attrs["dtype"] = "float32"
                ds.attrs["provenance"] = canonical_json(prov)
                ds.attrs["provenance_hash"] = params_hash(prov)


def embedding_dims(path: str | os.PathLike) -> dict[str, int]:
    """Columns of each embedding dataset of a file, e.g. ``{"ct": 512, "pet": 768}``."""
    with h5py.File(path, "r") as h5:
        listed = h5.attrs.get("modalities")
        names = json.loads(listed) if isinstance(listed, str) else ["ct", "pet"]
        return {m: int(h5[m].shape[1]) for m in names if m in h5}


def random_init_modalities(path: str | os.PathLike) -> list[str]:
    """Datasets of a file made with randomly initialised encoders (read without warning)."""
    with h5py.File(path, "r") as h5:
        return [m for m in embedding_dims(path)
                if plain_value(h5[m].attrs.get("weights_sha256", "")) == RANDOM_INIT]


def _input_shape(cache: PreprocessedCache, case_id: str, key: str) -> tuple[int, ...]:
    with h5py.File(cache.path(case_id), "r") as h5:
        return tuple(int(v) for v in h5[key].shape)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _warn_random(message: str) -> None:
    # Loud on stderr as well, unless the caller filtered the warning (a study states it once).
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn(message, RandomInitWarning, stacklevel=3)
    for w in shown:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if shown:
        print(f"WARNING: {message}", file=sys.stderr)


@dataclass
class EmbeddingSet:
    """Embeddings of one file, rows aligned with ``case_ids``.

    Attributes:
        path: the ``.h5`` read.
        case_ids: row order.
        fingerprints: per-case cache fingerprints, same order.
        matrices: ``"ct"`` -> float32 [N, 512], ``"pet"`` -> float32 [N, 768].
        attrs: file attributes (plain Python values).
        modality_attrs: per modality, the dataset attributes (encoder, weights, pooling ...).
        sha256: SHA-256 of the file, for downstream provenance records.
    """

    path: Path
    case_ids: list[str]
    fingerprints: list[str]
    matrices: dict[str, np.ndarray]
    attrs: dict[str, Any]
    modality_attrs: dict[str, dict[str, Any]]
    sha256: str

    @property
    def modalities(self) -> list[str]:
        return list(self.matrices)

    def matrix(self, modality: str) -> np.ndarray:
        """float32 ``[N, dim]`` of one modality, rows in :attr:`case_ids` order."""
        if modality not in self.matrices:
            raise KeyError(f"{self.path}: no {modality!r} embeddings (has {self.modalities})")
        return self.matrices[modality]

    def frame(self) -> pd.DataFrame:
        """DataFrame indexed by ``case_id`` with columns ``ct_000 ..`` then ``pet_000 ..``."""
        blocks = [
            pd.DataFrame(
                mat, index=pd.Index(self.case_ids, name="case_id"),
                columns=[f"{m}_{j:03d}" for j in range(mat.shape[1])],
            )
            for m, mat in self.matrices.items()
        ]
        df = pd.concat(blocks, axis=1) if blocks else pd.DataFrame(index=self.case_ids)
        df.attrs = {
            "path": str(self.path), "sha256": self.sha256, **self.attrs,
            "modality_attrs": self.modality_attrs, "feature_modalities": self.modalities,
        }
        return df


def read_embeddings(
    path: str | os.PathLike,
    *,
    cache: PreprocessedCache | str | os.PathLike | None = None,
    case_ids: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
) -> EmbeddingSet:
    """Read an embedding file, checking it against the preprocessed cache when given.

    Args:
        path: ``.h5`` written by :func:`extract_embeddings`.
        cache: the preprocessed cache stage two uses (object or root); when given, the file's
            ``params_hash`` and the fingerprints of the returned cases must match it (not
            checked for a feature table imported without a cache: ``cache_bound`` False).
        case_ids: rows to return, in this order (e.g. the stage-two manifest's cases);
            default: every case in file order.
        modalities: subset of the file's modalities (``"ct"``, ``"pet"``, or an imported
            feature table's name); default: all in the file.

    Returns:
        :class:`EmbeddingSet`. Files made with random-init encoders warn
        (:class:`RandomInitWarning` and stderr) on every read.

    Raises:
        FileNotFoundError: no such file.
        ProvenanceError: schema, params_hash or per-case fingerprints disagree with ``cache``
            (both sides named), or the file holds no such modality.
        MissingCasesError: ``case_ids`` lists cases the file lacks (all of them named).
    """
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise FileNotFoundError(f"{path}: not an embedding file (a folder)")
        raise FileNotFoundError(missing_path_message(path, "embedding file", "*.h5"))
    attrs, file_ids, file_fps, mods, mats, mattrs = _read_embedding_file(path, modalities)
    wanted, rows = _select_rows(path, attrs, file_ids, case_ids)

    # A table imported without a cache has no fingerprints to check (attribute cache_bound).
    if cache is not None and bool(attrs.get("cache_bound", True)):
        cache = cache if isinstance(cache, PreprocessedCache) else PreprocessedCache(cache)
        if attrs["params_hash"] != cache.params_hash:
            raise ProvenanceError(_other_preprocessing_message(path, attrs, cache))
        in_cache = set(cache.case_ids)
        not_cached = [c for c in wanted if c not in in_cache]
        if not_cached:
            raise ProvenanceError(
                f"{path}: has embeddings for cases {not_cached} that the cache {cache.root} lacks"
            )
        bad = [
            f"{c} (file {file_fps[r]}, cache {fp})"
            for c, r in zip(wanted, rows)
            if (fp := cache.case_fingerprint(c)) != file_fps[r]
        ]
        if bad:
            raise ProvenanceError(
                f"{path}: per-case fingerprints differ from the cache {cache.root} for "
                f"{len(bad)} case(s): {', '.join(bad)}; re-run `extract-embeddings`"
            )

    random = [m for m in mods if mattrs[m].get("weights_sha256") == RANDOM_INIT]
    if random:
        seeds = {m: mattrs[m].get("random_init_seed") for m in random}
        _warn_random(
            f"{path}: {random} embeddings come from randomly initialised encoders "
            f"(seeds {seeds}); fine for a demo, meaningless for results"
        )
    return EmbeddingSet(
        path=path,
        case_ids=wanted,
        fingerprints=[file_fps[r] for r in rows],
        matrices={m: np.ascontiguousarray(mats[m][rows]) for m in mods},
        attrs=attrs,
        modality_attrs=mattrs,
        sha256=sha256_file(path),
    )


def _read_embedding_file(path: Path, modalities: Sequence[str] | None) -> tuple[
        dict[str, Any], list[str], list[str], list[str], dict[str, np.ndarray],
        dict[str, dict[str, Any]]]:
    """File attributes, case ids, fingerprints, modalities read, their matrices and attributes."""
    with h5py.File(path, "r") as h5:
        found = int(h5.attrs.get("schema_version", -1))
        if found != SCHEMA_VERSION:
            raise ProvenanceError(
                f"{path}: embedding schema_version {found}, this code reads {SCHEMA_VERSION}; "
                "re-run `extract-embeddings`"
            )
        attrs = {k: plain_value(v) for k, v in h5.attrs.items()}
        file_ids = list(h5["case_ids"].asstr()[()])
        file_fps = list(h5["fingerprints"].asstr()[()])
        # Extracted files hold ct/pet; imported feature tables hold their own named modality.
        listed = json.loads(attrs.get("modalities", "[]")) if isinstance(attrs.get("modalities"), str) else []
        present = [m for m in (listed or ["ct", "pet"]) if m in h5]
        mods = list(modalities) if modalities is not None else present
        absent = [m for m in mods if m not in present]
        if absent:
            raise ProvenanceError(f"{path}: holds {present} embeddings, {absent} requested")
        mats = {m: h5[m][()] for m in mods}
        mattrs = {m: {k: plain_value(v) for k, v in h5[m].attrs.items()} for m in mods}
    return attrs, file_ids, file_fps, mods, mats, mattrs


def _select_rows(path: Path, attrs: dict[str, Any], file_ids: list[str],
                 case_ids: Sequence[str] | None) -> tuple[list[str], list[int]]:
    """The cases to return (``case_ids``, default every case in file order) and their rows."""
    if case_ids is None:
        return file_ids, list(range(len(file_ids)))
    wanted = list(case_ids)
    pos = {c: i for i, c in enumerate(file_ids)}
    missing = [c for c in wanted if c not in pos]
    if missing:
        if attrs.get("source") == FEATURE_TABLE_SOURCE:
            fix = ("import a table with rows for them: `import-features TABLE.csv --out "
                   f"{path}` (NaN where a feature is unknown)")
        else:
            fix = "re-run `extract-embeddings` on a cache holding them"
        raise MissingCasesError(
            f"{path}: lacks rows for {len(missing)} needed case(s): {missing}; {fix}", missing)
    return wanted, [pos[c] for c in wanted]


def load_embeddings(
    path: str | os.PathLike,
    *,
    cache: PreprocessedCache | str | os.PathLike | None = None,
    case_ids: Sequence[str] | None = None,
    modalities: Sequence[str] | None = None,
) -> pd.DataFrame:
    """:func:`read_embeddings` as a DataFrame indexed by case id (``ct_000..``, ``pet_000..``).

    Provenance (file attributes, per-modality attributes, path, sha256) is in ``df.attrs``.
    """
    return read_embeddings(path, cache=cache, case_ids=case_ids, modalities=modalities).frame()
