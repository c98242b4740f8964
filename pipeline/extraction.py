"""Stage one: frozen foundation-model embeddings, computed once per case into the embeddings store.

``run_extraction`` runs the frozen encoders of an embedding set (:mod:`pipeline.embedding_sets`:
CT-FM 512-d, PET-FM 768-d) over every case of a complete preprocessed cache
(:class:`pipeline.cache.PreprocessedCache`) and writes ``embeddings/<set>.h5`` through
:func:`pipeline.embeddings.write_embedding_file` (the schema is documented there). What an
encoder reads, how it pools, where its weights are and which code builds it all come from its
:class:`pipeline.embedding_sets.Encoder` entry.

Crash safety and resume. Every case's embedding is first written as a shard,
``<shard_dir>/<store>/<case_id>-<fingerprint>.npy`` (float32, shape ``[dim]``), through
:func:`pipeline.artefacts.atomic_path`, so a shard under its final name is always complete.
``<store>`` is named after the encoder, its architecture, weights sha256 (or
``random-init-seed<k>``) and a hash of the whole encoder provenance (config, pooling, input
key, precision); its ``provenance.json`` records that provenance in full. The final ``.h5``
is assembled from shards into a temporary sibling and renamed into place, so a killed run
never leaves a partial file under the final name. A rerun skips every case whose shard exists
and removes temporary files that a killed run left behind (each store and output is held
under an exclusive ``flock`` while a run writes, so a concurrent run is refused instead of
having its temporary files deleted; the lock files exist only while held, and a failed run
removes the stores and folders it made that hold no shard). ``ctpet`` reuses the shards of
earlier ``ct`` and ``pet`` runs with the same provenance: no encoder ever runs twice on the
same case and inputs.

Input size. An encoder whose cubic input fixes its token grid (the PET-FM ViT: its entry's
``cube_input``) is sized to the cache's input by :func:`fitted_encoder_config` (128^3 in the
paper: the published architecture, no override; the demo's 64^3 gives ``img_size`` 64 with
a 4^3 window), so extraction needs no ``--encoder-config`` for any preprocessing.

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm.auto import tqdm

from pipeline.artefacts import (
    ProvenanceError,
    atomic_path,
    canonical_json,
    missing_path_message,
    params_hash,
    read_json,
    sha256_file,
    write_json_atomic,
)
from pipeline.cache import COHORT_FILE, PreprocessedCache
from pipeline.embedding_sets import ENCODERS, Encoder, embedding_set, encoder, resolve
from pipeline.embeddings import (
    RANDOM_INIT,
    SCHEMA_VERSION,
    warn_random_init,
    write_embedding_file,
)
from pipeline.numerics import numerics_mode, numerics_record
from pipeline.runtime import check_threads, compute_threads, usable_cpus

# torch, and the models that import it, are imported in the functions that run the
# encoders (through the registry's references): the CLIs' --help does not load torch.

SHARD_DIR_NAME = ".shards"
_TMP_SUFFIX = ".tmp"  # what pipeline.artefacts.atomic_path appends to its temporary files
_RANGE_TOL = 1e-4  # cached FM inputs are min-max scaled to [0, 1]; allow rounding only
#: The encoders' arithmetic: fp32, or bf16 autocast (CUDA's default).
PRECISIONS = ("fp32", "bf16-autocast")


class WeightsNotFoundError(FileNotFoundError):
    """Foundation-model weights were not passed and are not at the default location."""


class ExtractionLockedError(RuntimeError):
    """Another run holds the lock of the same output or shard store."""


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@dataclass
class EncoderReport:
    """What one encoder's pass did."""

    computed: int = 0
    reused: int = 0
    store: Path | None = None


@dataclass
class ExtractionResult:
    """Outcome of :func:`run_extraction`.

    Attributes:
        path: the final ``.h5``.
        embedding_set: the set extracted (``ct``, ``pet``, ``ctpet``).
        per_encoder: encoder (``"ct"``/``"pet"``) -> counts of cases computed now and reused shards.
        up_to_date: True when the existing file already matched and nothing was done.
        seconds: wall time.
    """

    path: Path
    embedding_set: str
    per_encoder: dict[str, EncoderReport] = field(default_factory=dict)
    up_to_date: bool = False
    seconds: float = 0.0

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.per_encoder.values())

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.per_encoder.values())

    def summary(self) -> str:
        """One line: cases computed / reused per encoder, path, seconds."""
        if self.up_to_date:
            return f"{self.path}: already complete and up to date, nothing computed ({self.seconds:.1f} s)"
        parts = ", ".join(f"{e}: {r.computed} computed, {r.reused} reused" for e, r in self.per_encoder.items())
        return f"{parts} -> {self.path} ({self.seconds:.1f} s)"


@dataclass(frozen=True)
class _EncoderSpec:
    """Everything that determines one encoder's embeddings besides the input case.

    ``encoder`` is the registry's name (``ct``), ``architecture`` the model's
    (``ct_fm_segresencoder``); the provenance records them under the schema's keys
    ``modality`` and ``encoder``.
    """

    encoder: str
    architecture: str
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
        entry = ENCODERS[self.encoder]
        return {
            "compute": compute_identity(self.compute),
            "modality": self.encoder,
            "encoder": self.architecture,
            "weights_sha256": self.weights_sha256,
            "random_init_seed": self.random_init_seed,
            "encoder_config": self.encoder_config,
            "pooling": entry.pooling,
            "input_key": entry.input_key,
            "precision": self.precision,
        }

    def describe(self) -> str:
        if self.weights_sha256 == RANDOM_INIT:
            w = f"random-init seed {self.random_init_seed}"
        else:
            w = f"weights sha256 {self.weights_sha256[:12]}"
        cfg = f", config {canonical_json(self.encoder_config)}" if self.encoder_config else ""
        return f"{self.architecture} ({w}{cfg}, {self.precision})"

    def store_name(self) -> str:
        w = (
            f"random-init-seed{self.random_init_seed}"
            if self.weights_sha256 == RANDOM_INIT
            else self.weights_sha256[:12]
        )
        return f"{self.encoder}-{self.architecture}-{w}-{self.precision}-{params_hash(self.provenance())[:8]}"


def resolve_weights(name: str, weights: str | os.PathLike | None) -> Path:
    """Find the weights file of encoder ``name``, in this order: the argument, its environment
    variable, its default path, the Hugging Face Hub's cache, and where the network allows a
    download with the Hub's client (:mod:`pipeline.hub_weights`: the sha256 checked against the
    Hub's record). Where each is: the encoder's registry entry.

    A path given (argument or env var) must exist: it is never replaced by another file.
    Random-init encoders are never a fallback (``random_init=True`` does not call this).

    Args:
        name: the encoder (``"ct"``, ``"pet"``).
        weights: explicit path or None.

    Returns:
        An existing file.

    Raises:
        WeightsNotFoundError: naming where the public weights live (repository, file,
            revision) and every way to pass them; offline, where to put the file.
    """
    entry = encoder(name)
    env = entry.weights_env
    if weights is not None:
        path, how = Path(weights).expanduser(), entry.weights_option
    elif os.environ.get(env):
        path, how = Path(os.environ[env]).expanduser(), f"${env}"
    else:
        path, how = Path(entry.default_weights).expanduser(), "the default location"
    if path.is_file():
        return path
    if how != "the default location":
        raise WeightsNotFoundError(_weights_advice(entry, path, how))
    from pipeline import hub_weights  # local: huggingface_hub loads only when the weights are looked for

    try:
        return hub_weights.fetch_weights(name)
    except hub_weights.HubWeightsError as exc:
        raise WeightsNotFoundError(
            f"{_weights_advice(entry, path, how)} From the Hub: {exc}. {hub_weights.offline_advice(name)}"
        ) from None


def _weights_advice(entry: Encoder, path: Path, how: str) -> str:
    # resolve: imports the encoder's model module (torch); only on this error path.
    return (
        f"{entry.label} weights not found at {path} (from {how}). Download the public weights: "
        f"{resolve(entry.weights_source)}; then pass {entry.weights_option} PATH, or set "
        f"{entry.weights_env}=PATH, or put the file at {entry.default_weights}. To test the "
        "pipeline without weights, as `run-study --demo` does, add --random-init (random "
        "encoders: recorded in the file, warned about on every read, meaningless for results)."
    )


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
    """Instantiate the frozen encoder of ``spec`` in eval mode (lazily: only when needed), with
    the builder or loader its registry entry names (they import torch)."""
    entry = ENCODERS[spec.encoder]
    if spec.weights_sha256 == RANDOM_INIT:
        out = resolve(entry.random_builder)(spec.random_init_seed, **spec.encoder_config)
        model = out[0] if isinstance(out, tuple) else out
    else:
        model, sha = resolve(entry.loader)(spec.weights_path, **spec.encoder_config)
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


def _load_inputs(cache: PreprocessedCache, name: str, case_ids: Sequence[str]) -> np.ndarray:
    """Read encoder ``name``'s inputs of ``case_ids`` as ``[B, 1, D, H, W]`` float32 (D = slice axis)."""
    key = ENCODERS[name].input_key
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


def _forward_halving(model: Any, x: np.ndarray, device: Any, precision: str) -> np.ndarray:
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
        [_forward_halving(model, x[:half], device, precision), _forward_halving(model, x[half:], device, precision)]
    )


def _embed_encoder(
    cache: PreprocessedCache,
    spec: _EncoderSpec,
    store: Path,
    case_ids: list[str],
    fingerprints: list[str],
    *,
    device: Any,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, EncoderReport]:
    """Fill ``store`` with one shard per case, then return ``[N, dim]`` in ``case_ids`` order."""
    report = EncoderReport(store=store)
    paths = [_shard_path(store, c, f) for c, f in zip(case_ids, fingerprints)]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    report.reused = len(case_ids) - len(missing)
    if missing:
        if spec.weights_sha256 == RANDOM_INIT:
            warn_random_init(
                f"{spec.encoder}: computing embeddings with a randomly initialised {spec.architecture} "
                f"(seed {spec.random_init_seed}); fine for a demo, meaningless for results"
            )
        model = _build_encoder(spec).to(device)
        bar = tqdm(
            total=len(missing),
            unit="case",
            desc=f"{spec.encoder} {spec.architecture}",
            disable=not progress,
            file=sys.stderr,
        )
        with bar:
            for start in range(0, len(missing), batch_size):
                idx = missing[start : start + batch_size]
                # Pad a short batch by repeating its cases so that every forward pass has
                # batch_size rows whatever was done before: some CPU kernels pick another
                # algorithm for a single row, which changes the last bits.
                x = _load_inputs(cache, spec.encoder, [case_ids[i] for i in idx])
                x = x[[k % len(idx) for k in range(batch_size)]]
                out = _forward_halving(model, x, device, spec.precision)
                if out.ndim != 2 or out.shape[0] != batch_size:
                    raise ValueError(
                        f"{spec.architecture} returned shape {list(out.shape)} for a batch of {batch_size}"
                    )
                for row, i in enumerate(idx):
                    vec = np.ascontiguousarray(out[row], dtype=np.float32)
                    if not np.all(np.isfinite(vec)):
                        raise ValueError(
                            f"{spec.architecture} gave a non-finite embedding for case {case_ids[i]!r} "
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
    name: str,
    *,
    weights: str | os.PathLike | None,
    random_init: bool,
    seed: int,
    encoder_config: dict[str, Any],
    precision: str,
    compute: dict[str, Any] | None = None,
) -> _EncoderSpec:
    """The spec of encoder ``name``: random-init, or its weights found (:func:`resolve_weights`)."""
    architecture = resolve(encoder(name).architecture)
    compute = dict(compute or {})
    if random_init:
        return _EncoderSpec(name, architecture, RANDOM_INIT, int(seed), "", dict(encoder_config), precision, compute)
    path = resolve_weights(name, weights)
    return _EncoderSpec(
        # The folder resolved, not the file: a Hub cache's snapshot link keeps its commit in the path.
        name,
        architecture,
        sha256_file(path),
        -1,
        str(path.parent.resolve() / path.name),
        dict(encoder_config),
        precision,
        compute,
    )


def _make_specs(
    names: Sequence[str],
    *,
    weights: Mapping[str, Any],
    random_init: bool,
    seed: int,
    encoder_kwargs: dict[str, dict[str, Any]],
    precision: str,
    compute: dict[str, Any],
) -> dict[str, _EncoderSpec]:
    """One spec per encoder; missing weights of every encoder are reported together."""
    specs, missing = {}, []
    for name in names:
        try:
            specs[name] = _make_spec(
                name,
                weights=weights.get(name),
                random_init=random_init,
                seed=seed,
                encoder_config=encoder_kwargs.get(name, {}),
                precision=precision,
                compute=compute,
            )
        except WeightsNotFoundError as exc:
            missing.append(str(exc))
    if missing:
        raise WeightsNotFoundError(" ".join(missing))
    return specs


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
            "--demo`, which writes the demo's cache to cache/preprocessed"
        )
    raise FileNotFoundError(
        f"{root}: no preprocessed cache (no {COHORT_FILE}). Make one with "
        f"`preprocess --manifest data_manifest.csv --out {root}`, or run `run-study --demo`, "
        "which writes the demo's cache to cache/preprocessed; or pass --cache PATH"
    )


def encoder_input_size(cache: PreprocessedCache, name: str) -> tuple[int, int, int]:
    """``[D, H, W]`` of the cache's inputs of encoder ``name`` (its ``input_key``).

    From the cache's preprocessing parameters (the entry's ``size_param``), else from its first case.
    """
    entry = encoder(name)
    size_xyz = cache.params.get(entry.size_param)
    if size_xyz is not None:
        return tuple(int(v) for v in reversed(size_xyz))
    if not cache.case_ids:
        raise ValueError(f"{cache.root}: the cache holds no case; cannot size the {entry.label} input")
    return _input_shape(cache, cache.case_ids[0], entry.input_key)


def fitted_encoder_config(
    cache: PreprocessedCache, name: str, requested: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Constructor overrides of encoder ``name`` that fit the cache's input size.

    An encoder that takes any input size gets ``requested`` as it is. One whose cubic input
    fixes its token grid (its entry's ``cube_input``: the PET-FM ViT) takes its published edge
    (128^3) with no override; another cubic size ``s`` gives ``img_size = s`` and, unless
    requested, the largest window that divides the token grid ``s / patch_size`` and does not
    exceed the published window (14; the demo's 64^3: window 4).

    Args:
        cache: the preprocessed cache.
        name: the encoder.
        requested: the caller's overrides (``--encoder-config``'s entry of the encoder); they
            win, except an ``img_size`` the cache contradicts.

    Returns:
        The overrides to build the encoder with (``{}`` = published architecture).

    Raises:
        ValueError: the cached input is not cubic, or ``requested["img_size"]`` differs from
            it (naming both and the option).
    """
    out = dict(requested or {})
    entry = encoder(name)
    published = entry.cube_input
    if not published:
        return out
    shape = encoder_input_size(cache, name)
    if len(set(shape)) != 1:
        raise ValueError(
            f"{cache.root}: {entry.label} inputs are {list(shape)} [D, H, W]; the {entry.label} takes a "
            f"cube: preprocess with a cubic {entry.label} size"
        )
    size = shape[0]
    if "img_size" in out and int(out["img_size"]) != size:
        raise ValueError(
            f"--encoder-config sets the {entry.label} img_size {out['img_size']}, but the cache "
            f"{cache.root} holds {size}^3 {entry.label} inputs; drop img_size from --encoder-config "
            f"(it is taken from the cache) or preprocess at {out['img_size']}^3"
        )
    if size != published["img_size"]:
        out.setdefault("img_size", size)
        grid = size // int(out.get("patch_size", published["patch_size"]))
        if "window_size" not in out and grid >= 1:
            out["window_size"] = max(w for w in range(1, min(grid, published["window_size"]) + 1) if grid % w == 0)
    return out


def _existing_state(path: Path) -> dict[str, Any] | None:
    """What an existing output records, or None when there is none."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as h5:
            return {
                "schema_version": int(h5.attrs["schema_version"]),
                "set_name": str(h5.attrs["modality"]),
                "params_hash": str(h5.attrs["params_hash"]),
                "case_ids": list(h5["case_ids"].asstr()[()]),
                "fingerprints": list(h5["fingerprints"].asstr()[()]),
                "provenance": {name: json.loads(h5[name].attrs["provenance"]) for name in ENCODERS if name in h5},
            }
    except (OSError, KeyError, ValueError) as exc:
        raise ProvenanceError(
            f"{path}: exists but is not an embedding file of this tool ({exc}); "
            "choose another --out or pass --overwrite"
        ) from exc


def run_extraction(
    cache_root: str | os.PathLike,
    set_name: str,
    out_path: str | os.PathLike | None = None,
    *,
    weights: Mapping[str, str | os.PathLike | None] | None = None,
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
        set_name: the embedding set (``"ct"``, ``"pet"``, ``"ctpet"``): its encoders run.
        out_path: output file; default ``embeddings/<set_name>.h5`` (relative to the CWD).
        weights: encoder -> weights file (CT-FM ``model.safetensors``, PET-FM
            ``seganypet_v1.pth``); an encoder left out is found by :func:`resolve_weights`.
        random_init: use randomly initialised encoders (demo only; recorded in the file).
        seed: seed of the random initialisation.
        device: ``"auto"`` (CUDA with bf16 autocast when present, else CPU fp32), ``"cpu"``,
            ``"cuda"``.
        batch_size: cases per forward pass (halved automatically on CUDA out-of-memory).
        encoder_kwargs: constructor overrides per encoder, e.g. ``{"ct": {"init_filters": 4}}``
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
        ValueError: bad embedding set, batch size, device or cached input (naming case and file).
        WeightsNotFoundError: weights missing, with where to get them.
        ProvenanceError: the existing output was made with other provenance.
        ExtractionLockedError: another run is writing the same output or store.
    """
    t0 = time.perf_counter()
    names, encoder_kwargs = _check_extraction_args(set_name, batch_size, encoder_kwargs)
    out = Path(out_path) if out_path is not None else Path("embeddings") / f"{set_name}.h5"
    shard_root = Path(shard_dir) if shard_dir is not None else out.parent / SHARD_DIR_NAME
    cache = open_cache(cache_root)
    torch_device, precision = _resolve_device(device, precision)
    encoder_kwargs = {e: fitted_encoder_config(cache, e, encoder_kwargs.get(e)) for e in names}
    specs = _make_specs(
        names,
        weights=weights or {},
        random_init=random_init,
        seed=seed,
        encoder_kwargs=encoder_kwargs,
        precision=precision,
        compute=compute_record(torch_device, threads),
    )
    case_ids = cache.case_ids
    fingerprints = [cache.case_fingerprint(c) for c in case_ids]
    expected_prov = {e: json.loads(canonical_json(s.provenance())) for e, s in specs.items()}

    result = ExtractionResult(path=out, embedding_set=set_name)
    made = _new_dirs(out.parent, shard_root)
    stores = [shard_root / specs[e].store_name() for e in names]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_exclusive_lock(out.parent / f".{out.name}.lock"))
            if _up_to_date(out, set_name, cache, case_ids, fingerprints, expected_prov, overwrite):
                result.up_to_date = True
                result.per_encoder = {e: EncoderReport(reused=len(case_ids)) for e in names}
                result.seconds = time.perf_counter() - t0
                return result
            _remove_stale_temps(out.parent, prefix=f".{out.name}.")
            matrices: dict[str, np.ndarray] = {}
            for e, store in zip(names, stores):
                matrices[e], result.per_encoder[e] = _embed_through_store(
                    stack, cache, specs[e], store, case_ids, fingerprints, torch_device, int(batch_size), progress
                )
            _write_h5(out, cache, set_name, specs, matrices, case_ids, fingerprints)
    except BaseException:
        _remove_empty_dirs([*stores, shard_root, *made])
        raise
    result.seconds = time.perf_counter() - t0
    return result


def _embed_through_store(
    stack: contextlib.ExitStack,
    cache: PreprocessedCache,
    spec: _EncoderSpec,
    store: Path,
    case_ids: list[str],
    fingerprints: list[str],
    device: Any,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, EncoderReport]:
    """One encoder of :func:`run_extraction`: lock its shard store (held until ``stack``
    closes, the store forgotten on failure when unused), prepare it, clear stale
    temporaries, then :func:`_embed_encoder` under the spec's CPU threads."""
    stack.enter_context(_exclusive_lock(store / ".lock"))
    stack.push(_forget_store_if_unused(store))
    _prepare_store(store, spec)
    _remove_stale_temps(store)
    with _encoder_threads(spec):
        return _embed_encoder(
            cache, spec, store, case_ids, fingerprints, device=device, batch_size=batch_size, progress=progress
        )


def compute_record(device: Any, threads: int | None) -> dict[str, Any]:
    """Where the encoders compute: ``{"device": "cpu", "numerics": mode, "threads": n}``
    (``threads`` checked, default :func:`pipeline.runtime.usable_cpus`; ``mode`` from
    :func:`pipeline.numerics.numerics_mode`) or ``{"device": "cuda"}`` (CPU threads and
    pins do not touch a GPU's kernels)."""
    if device.type != "cpu":
        return {"device": device.type}
    return {
        "device": "cpu",
        "numerics": numerics_mode(),
        "threads": check_threads(threads) if threads is not None else usable_cpus(),
    }


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


def _check_extraction_args(
    set_name: str, batch_size: int, encoder_kwargs: dict[str, dict[str, Any]] | None
) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """:func:`run_extraction`'s checked arguments: the set's encoders and a copy of
    ``encoder_kwargs`` (``{}`` for None)."""
    names = embedding_set(set_name).encoders
    if int(batch_size) < 1:
        raise ValueError(f"batch_size {batch_size!r}: expected >= 1")
    encoder_kwargs = dict(encoder_kwargs or {})
    unknown = sorted(set(encoder_kwargs) - set(ENCODERS))
    if unknown:
        raise ValueError(f"encoder_kwargs keys {unknown}: expected encoders among {list(ENCODERS)}")
    return names, encoder_kwargs


def _up_to_date(
    out: Path,
    set_name: str,
    cache: PreprocessedCache,
    case_ids: list[str],
    fingerprints: list[str],
    expected_prov: dict[str, Any],
    overwrite: bool,
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
    mismatch = _provenance_mismatch(existing, set_name, cache.params_hash, expected_prov)
    if mismatch and not overwrite:
        raise ProvenanceError(
            f"{out}: exists with other provenance; refusing to mix. {mismatch} "
            "Write elsewhere with --out, or replace it with --overwrite."
        )
    return not mismatch and existing["case_ids"] == case_ids and existing["fingerprints"] == fingerprints


def extract_embeddings(*args: Any, **kwargs: Any) -> Path:
    """:func:`run_extraction` (same arguments), returning only the output path."""
    return run_extraction(*args, **kwargs).path


def _provenance_mismatch(existing: dict[str, Any], set_name: str, params_hash_: str, expected: dict[str, Any]) -> str:
    """Describe how an existing file differs in provenance ("" when it does not)."""
    diffs = []
    if existing["schema_version"] != SCHEMA_VERSION:
        diffs.append(f"schema_version: file {existing['schema_version']}, this code {SCHEMA_VERSION}")
    if existing["set_name"] != set_name:
        diffs.append(f"embedding set: file {existing['set_name']!r}, this run {set_name!r}")
    if existing["params_hash"] != params_hash_:
        diffs.append(f"preprocessing params_hash: file {existing['params_hash']!r}, cache {params_hash_!r}")
    for name, prov in expected.items():
        found = existing["provenance"].get(name)
        if found is None:
            diffs.append(f"{name} encoder: file has none, this run {canonical_json(prov)}")
            continue
        for key in sorted(set(prov) | set(found)):
            if found.get(key) != prov.get(key):
                diffs.append(
                    f"{name} {key}: file {canonical_json(found.get(key))}, this run {canonical_json(prov.get(key))}"
                )
    return "; ".join(diffs) + ("." if diffs else "")


def _write_h5(
    out: Path,
    cache: PreprocessedCache,
    set_name: str,
    specs: dict[str, _EncoderSpec],
    matrices: dict[str, np.ndarray],
    case_ids: list[str],
    fingerprints: list[str],
) -> None:
    datasets = {}
    for name, spec in specs.items():
        shape = _input_shape(cache, case_ids[0], ENCODERS[name].input_key) if case_ids else ()
        # HDF5 attributes hold no dicts: those (encoder_config, compute) are stored as JSON.
        attrs = {k: canonical_json(v) if isinstance(v, dict) else v for k, v in spec.provenance().items()}
        attrs.update(weights_path=spec.weights_path, input_shape=np.asarray(shape, dtype=np.int64))
        datasets[name] = (matrices[name], attrs, spec.provenance())
    compute = next(iter(specs.values())).compute if specs else {}
    write_embedding_file(
        out,
        name=set_name,
        case_ids=case_ids,
        datasets=datasets,
        cache=cache,
        fingerprints=fingerprints,
        random_init=any(s.weights_sha256 == RANDOM_INIT for s in specs.values()),
        file_attrs={"environment": canonical_json(_environment(compute))},
    )


def _environment(compute: dict[str, Any]) -> dict[str, Any]:
    """What the file's rows were computed on, for the record (decides nothing by itself):
    the device, the CPU thread count and :func:`pipeline.numerics.numerics_record`."""
    return {**compute, **numerics_record()}


def _input_shape(cache: PreprocessedCache, case_id: str, key: str) -> tuple[int, ...]:
    with h5py.File(cache.path(case_id), "r") as h5:
        return tuple(int(v) for v in h5[key].shape)
