"""File digests, shared by the weight loaders here and the pipeline's provenance records.

Kept apart from :mod:`models.checkpoints` (which imports torch) so that
:mod:`pipeline.artefacts` can use it without loading the networks: ``models`` depends on
nothing in ``pipeline``.
"""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
