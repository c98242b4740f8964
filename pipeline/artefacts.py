"""Provenance and crash-safe writing shared by every artefact the pipeline makes.

Every stage boundary is a file. Each file records what produced it (inputs, parameters,
weights and code version) so that a consumer can compare what it expects with what it
finds, and refuse a mismatch with a message naming both sides (:class:`ProvenanceError`).
Files are written to a temporary sibling and renamed into place, so a crash never leaves a
partial artefact under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from models.digest import sha256_file  # noqa: F401 - the pipeline's modules take it from here

PACKAGE_NAME = "hnfm-survival"


class ProvenanceError(ValueError):
    """An artefact was made from other inputs or parameters than the consumer expects."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal content gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 16 characters) of a parameter mapping in canonical JSON."""
    return hashlib.sha256(canonical_json(params).encode()).hexdigest()[:16]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def code_version() -> str:
    """Package version, plus the git commit (and ``-dirty``) when run from a checkout."""
    try:
        version = metadata.version(PACKAGE_NAME)
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            return f"{version}+g{commit}{'-dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def plain_value(value: Any) -> Any:
    """HDF5 attribute value (numpy array or scalar, bytes) as a plain Python value."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_match(what: str, expected: Any, found: Any, *, artefact: str | os.PathLike) -> None:
    """Raise :class:`ProvenanceError` naming both sides when ``expected != found``.

    Args:
        what: the property compared, e.g. ``"preprocessing params_hash"``.
        expected: what the consumer needs.
        found: what the artefact records.
        artefact: path of the artefact, named in the message.
    """
    if expected != found:
        raise ProvenanceError(
            f"{artefact}: {what} mismatch: expected {expected!r}, found {found!r}. "
            "The artefact was made from other inputs or settings; regenerate it or point "
            "to the matching one."
        )


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    On any exception the temporary file is removed and ``final`` is left untouched, so a
    reader never sees a half-written artefact under its final name. The rename is atomic
    on POSIX file systems because both paths share a directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the artefact the mode an ordinary write would.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_current_umask())
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def replace_folder(work: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished folder ``work`` to ``final``, replacing any old one only once the new
    one is in place (the old one is moved aside, then removed)."""
    work, final = Path(work), Path(final)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "previous")
        os.replace(work, final)
        shutil.rmtree(old)
    else:
        os.replace(work, final)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


#: Most entries :func:`missing_path_message` lists.
NEARBY_LIMIT = 12


def missing_path_message(path: str | os.PathLike, what: str, pattern: str) -> str:
    """Message for a path that does not exist, listing what exists nearby.

    Looks in the nearest existing folder above ``path`` for entries matching ``pattern``
    (a glob relative to that folder, e.g. ``"*.h5"``, ``"*.csv"``, or ``"*/cohort.json"``
    where a fixed last part names the folders that hold such a file).

    Args:
        path: the path given (absent).
        what: what it should be, e.g. ``"embedding file"``.
        pattern: what counts as one nearby.

    Returns:
        e.g. ``"cache/ct.h55: no such embedding file (path does not exist); *.h5 in cache/:
        ct.h5, pet.h5"``.
    """
    path = Path(path)
    where = path.parent
    while not where.is_dir() and where != where.parent:
        where = where.parent
    shown_where = "." if str(where) in ("", ".") else str(where)
    last = Path(pattern).name
    marker = not any(ch in last for ch in "*?[")  # a fixed name: list the folders holding it
    found = sorted(str((m.parent if marker else m).relative_to(where)) for m in where.glob(pattern))
    head = f"{path}: no such {what} (path does not exist)"
    if where != path.parent:
        head += f"; neither does {path.parent}"
    kind = f"folders holding {last}" if marker else pattern
    if not found:
        return f"{head}; no {kind} in {shown_where}/"
    more = f" (and {len(found) - NEARBY_LIMIT} more)" if len(found) > NEARBY_LIMIT else ""
    return f"{head}; {kind} in {shown_where}/: {', '.join(found[:NEARBY_LIMIT])}{more}"
