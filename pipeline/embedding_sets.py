"""The one registry of embedding sets: which frozen-encoder embeddings a model may read.

An embedding set (``ct``, ``pet``, ``ctpet``) names the embedding datasets it reads from an
embeddings file (:mod:`pipeline.embeddings`: one dataset per encoder, ``/ct`` and ``/pet``), the
native size of each, and how the report shows it (label, colour). The CLIs' choices, the study's
configurations, the report's labels and figures, prediction's extraction and the embedding
writer all ask this module, so adding an embedding set is one entry here (plus, for a new
dataset, its encoder in :mod:`pipeline.embeddings`).

This module imports nothing of the project, so anything may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class EmbeddingSet:
    """One embedding set.

    Attributes:
        name: the set's key, used in configuration names (``ct-d64``) and on the command line.
        datasets: embedding datasets of the file it reads, in order (``("ct", "pet")``).
        label: display label, as in the paper's figures (``"CT+PET"``).
        colour: matplotlib colour of the set in the report's figures.
    """

    name: str
    datasets: tuple[str, ...]
    label: str
    colour: str

    @property
    def dims(self) -> dict[str, int]:
        """Native embedding size of each dataset (:data:`DATASET_DIMS`)."""
        return {d: DATASET_DIMS[d] for d in self.datasets}


#: Native size of each embedding dataset: the width of its encoder's pooled output.
DATASET_DIMS: dict[str, int] = {"ct": 512, "pet": 768}
#: The encoder behind each embedding dataset, for help texts.
DATASET_ENCODERS: dict[str, str] = {"ct": "CT-FM", "pet": "PET-FM"}

EMBEDDING_SETS: dict[str, EmbeddingSet] = {s.name: s for s in (
    EmbeddingSet("ct", ("ct",), "CT", "tab:blue"),
    EmbeddingSet("pet", ("pet",), "PET", "tab:red"),
    EmbeddingSet("ctpet", ("ct", "pet"), "CT+PET", "tab:green"),
)}
#: Set names in registry order (the order of tables, figures and ``--modality`` choices).
SET_NAMES: tuple[str, ...] = tuple(EMBEDDING_SETS)


def embedding_set(name: str) -> EmbeddingSet:
    """The registered set called ``name``.

    Raises:
        ValueError: no such set (the message lists the registered ones).
    """
    try:
        return EMBEDDING_SETS[name]
    except KeyError:
        raise ValueError(f"unknown embedding set {name!r}; choose from {list(SET_NAMES)}") from None


def set_of_datasets(datasets: Iterable[str]) -> str:
    """The name of the set that reads exactly ``datasets`` (any order): ``["pet", "ct"]`` -> ``ctpet``.

    Raises:
        ValueError: no registered set reads that combination.
    """
    wanted = sorted(datasets)
    for s in EMBEDDING_SETS.values():
        if sorted(s.datasets) == wanted:
            return s.name
    raise ValueError(f"no embedding set reads the datasets {wanted}; registered: "
                     + ", ".join(f"{s.name} = {list(s.datasets)}" for s in EMBEDDING_SETS.values()))


def set_help() -> str:
    """``ct = CT-FM (512-d), pet = PET-FM (768-d), ctpet = CT-FM + PET-FM`` for ``--help`` texts."""
    def one(s: EmbeddingSet) -> str:
        encoders = " + ".join(DATASET_ENCODERS.get(d, d) for d in s.datasets)
        sizes = ", ".join(f"{DATASET_DIMS[d]}-d" for d in s.datasets)
        return f"{s.name} = {encoders} ({sizes})"
    return ", ".join(one(s) for s in EMBEDDING_SETS.values())
