"""The encoders' public weights from the Hugging Face Hub, through the Hub's own client.

:func:`pipeline.extraction.resolve_weights` looks for a weights file in this order: the
option (``--ct-weights``/``--pet-weights``), the environment variable, the default path
(``~/.cache/hnfm/...``), the Hub's cache, and last, where the network allows, a download
(:func:`fetch_weights`). Each encoder's repository, file and variables are in its entry of
:data:`pipeline.embedding_sets.ENCODERS`. The first three are the user's files; the last two are
``huggingface_hub``'s (``hf_hub_download``: its cache, its resumable downloads, its
``HF_ENDPOINT``/``HF_HUB_OFFLINE``/``HF_HUB_CACHE`` settings, its proxy and token handling).

Revision: the project pins none (it cannot know the weights repositories' commits here), so
the Hub resolves ``main`` and the commit it resolved is what the file is downloaded at and
what is recorded (the Hub cache's snapshot folder, in the embeddings' ``weights_path``).
``HNFM_CT_FM_REVISION``/``HNFM_PET_FM_REVISION`` pin one.

Content: ``hf_hub_download`` checks a download's size, not its content. For a file the Hub
stores in LFS, its metadata carry the file's sha256 (the ``X-Linked-Etag``/``ETag`` of the
resolve URL); the downloaded file's sha256 is checked against it, and a file that differs is
removed from the cache (snapshot link and blob) before the error is raised. The sha256 of the
file used is recorded in the embeddings' provenance as for any weights file, so a later file
that differs from the one a study recorded is refused as before.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artefacts import sha256_file
from pipeline.embedding_sets import encoder


@dataclass(frozen=True)
class HubFile:
    """A weights file on the Hub: repository, file name, and the pinned revision (None: the
    Hub's ``main``, resolved to a commit at download and recorded)."""

    repo_id: str
    filename: str
    revision: str | None = None


_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubWeightsError(RuntimeError):
    """The weights could not be taken from the Hub (offline, unreachable, or a bad download)."""


def hub_file(name: str) -> HubFile:
    """Encoder ``name``'s weights on the Hub (its registry entry), with the revision its
    environment variable pins (a commit hash, a tag or a branch), if set."""
    entry = encoder(name)
    return HubFile(entry.hub_repo, entry.hub_filename, os.environ.get(entry.revision_env) or None)


def describe(f: HubFile) -> str:
    """``"project-lighter/ct_fm_feature_extractor, file model.safetensors, revision main"``."""
    return f"{f.repo_id}, file {f.filename}, revision {f.revision or 'main'}"


def cached_weights(name: str) -> Path | None:
    """The file in the Hub's cache at the pinned revision (or the cached ``main``), if there."""
    from huggingface_hub import try_to_load_from_cache

    f = hub_file(name)
    found = try_to_load_from_cache(f.repo_id, f.filename, revision=f.revision or "main")
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def fetch_weights(name: str, *, say=None) -> Path:
    """Encoder ``name``'s weights from the Hub's cache, else downloaded with ``hf_hub_download``.

    Args:
        name: the encoder (``"ct"``, ``"pet"``).
        say: called with one line when a download happens (default: stderr).

    Returns:
        The file's path in the Hub's cache (its snapshot folder names the commit).

    Raises:
        HubWeightsError: offline (``HF_HUB_OFFLINE``) or unreachable, naming the repository,
            the file and the revision; or a download whose sha256 is not the Hub's record of
            the file (the file is then removed from the cache).
    """
    cached = cached_weights(name)
    if cached is not None:
        return cached
    import huggingface_hub as hub

    f = hub_file(name)
    if hub.constants.HF_HUB_OFFLINE:
        raise HubWeightsError(
            f"{describe(f)}: not in the Hub's cache ({hub.constants.HF_HUB_CACHE}), and "
            "HF_HUB_OFFLINE is set, so it is not downloaded"
        )
    try:
        meta = hub.get_hf_file_metadata(hub.hf_hub_url(f.repo_id, f.filename, revision=f.revision or "main"))
    except Exception as exc:  # noqa: BLE001 - network, DNS, HTTP: all mean "not from the Hub now"
        raise HubWeightsError(
            f"{describe(f)}: the Hub at {hub.constants.ENDPOINT} could not be reached or "
            f"refused ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    revision = meta.commit_hash or f.revision or "main"
    (say or _stderr)(
        f"downloading {f.repo_id}/{f.filename} at revision {revision} from {hub.constants.ENDPOINT} "
        f"({_size(meta.size)}) into the Hub's cache {hub.constants.HF_HUB_CACHE}"
    )
    try:
        # At the name asked for (main, or the pin), so that the cache maps it to the commit.
        path = Path(hub.hf_hub_download(f.repo_id, f.filename, revision=f.revision or "main"))
    except Exception as exc:  # noqa: BLE001 - an interrupted or refused download: the cache keeps the part
        raise HubWeightsError(
            f"{describe(f)} at {revision}: the download failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); run the command again to resume it"
        ) from exc
    # The client names the blob by the ETag of the very request it downloaded with.
    blob = path.resolve().name
    check_download(f, path.parent.name, path, blob if _SHA256.fullmatch(blob) else meta.etag)
    return path


def check_download(f: HubFile, revision: str, path: Path, etag: str | None) -> str:
    """The file's sha256, checked against the Hub's record where it has one (an LFS file's
    ETag is its sha256); a file that differs is removed from the cache, then refused."""
    got = sha256_file(path)
    expected = (etag or "").strip('"').lower()
    if _SHA256.fullmatch(expected) and got != expected:
        evict(path)
        raise HubWeightsError(
            f"{describe(f)} at {revision}: the downloaded file's sha256 is {got}, the Hub's "
            f"record of it is {expected}; the file was removed from the cache (a corrupted "
            "download or store): run the command again to download it again"
        )
    return got


def evict(path: Path) -> None:
    """Remove a cached file: its snapshot link and the blob it points to."""
    blob = path.resolve()
    for p in {path, blob}:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def offline_advice(name: str) -> str:
    """Where to put encoder ``name``'s file by hand, and how to fetch it where the network allows."""
    f, entry = hub_file(name), encoder(name)
    return (
        f"Put {f.filename} of {f.repo_id} (revision {f.revision or 'main'}) at {entry.default_weights} or set "
        f"{entry.weights_env}=PATH; "
        "or, where the network allows, run again without HF_HUB_OFFLINE to download it into the Hub's "
        f"cache, or fetch it with `hf download {f.repo_id} {f.filename}"
        f"{' --revision ' + f.revision if f.revision else ''}`."
    )


def _size(n: Any) -> str:
    return f"{int(n) / 1e6:.1f} MB" if n else "size unknown"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
