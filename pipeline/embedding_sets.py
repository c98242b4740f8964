"""The one registry of encoders and embedding sets: what a model may read besides the images.

The words, as in ``docs/glossary.md``:

* image **channel** (``pet``, ``ct``): the survival network's two input volumes
  (:data:`pipeline.preprocess.SURVIVAL_CHANNELS`).
* **encoder** (CT-FM 512-d, PET-FM 768-d): a frozen foundation model. One encoder reads one
  channel's preprocessed input (its :attr:`Encoder.input_key` in the cache) and writes one
  dataset of an embeddings file, named after it (``/ct``, ``/pet``).
* **embedding set** (``ct``, ``pet``, ``ctpet``): which encoders' embeddings a run reads, in
  this order; configurations are named after it (``ctpet-d256``), ``--modality`` names it.
* report **group**: a row of the report's tables: ``baseline``, an embedding set (the CNN with
  that set), ``clinical``, ``radiomics``, or an embedding head ``head-<set>``
  (:func:`head_group`).

Everything an encoder or a set needs lives here: the CLIs' choices and help, the extraction
(input, pooling, weights, the code that builds the encoder), the study's configurations, the
report's labels, colours and group names, and prediction ask this module, so adding a set is
one :class:`EmbeddingSet` entry and adding an encoder one :class:`Encoder` entry (plus its
code in :mod:`models` and its input in the preprocessing).

This module imports nothing of the project, so anything may import it: the code that runs an
encoder is named as ``"module:attribute"`` text and imported only when an encoder is built
(:func:`resolve`), so reading the registry loads no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Encoder:
    """One frozen encoder and the embedding dataset it writes.

    Attributes:
        name: the encoder's key: its dataset in an embeddings file (``/ct``), its
            ``--<name>-weights`` option and its key in ``--encoder-config``.
        label: display name (``"CT-FM"``).
        dim: native embedding size, the width of the pooled output.
        channel: the image channel whose preprocessed input it reads.
        input_key: that input's dataset in the preprocessed cache (``"ctfm/ct"``).
        size_param: the preprocessing parameter that sizes that input (``"ctfm_size_xyz"``).
        pooling: how the embedding is pooled from the encoder's output (recorded per dataset).
        weights_env: environment variable naming a weights file.
        default_weights: where the weights are looked for when neither the option nor the
            environment variable names them.
        hub_repo, hub_filename: the public weights on the Hugging Face Hub.
        revision_env: environment variable pinning the Hub revision.
        loader: ``module:function`` ``(path, **config) -> (model, sha256)`` building the
            encoder from its weights, strictly.
        random_builder: ``module:function`` ``(seed, **config) -> model`` of a randomly
            initialised encoder (demo and tests).
        architecture: ``module:constant`` naming the architecture (the ``encoder`` attribute
            of its dataset).
        weights_source: ``module:constant`` saying where the public weights are (messages).
        cube_input: for an encoder taking a cube whose edge fixes its token grid (a ViT):
            its published ``img_size``, ``patch_size`` and ``window_size``; the extraction
            sizes the encoder to the cache's input from them
            (:func:`pipeline.extraction.fitted_encoder_config`). Empty: any input size.
    """

    name: str
    label: str
    dim: int
    channel: str
    input_key: str
    size_param: str
    pooling: str
    weights_env: str
    default_weights: str
    hub_repo: str
    hub_filename: str
    revision_env: str
    loader: str
    random_builder: str
    architecture: str
    weights_source: str
    cube_input: Mapping[str, int] = field(default_factory=dict)

    @property
    def weights_option(self) -> str:
        """``--ct-weights``: the command line's option naming this encoder's weights."""
        return f"--{self.name}-weights"


@dataclass(frozen=True)
class EmbeddingSet:
    """One embedding set.

    Attributes:
        name: the set's key, used in configuration names (``ct-d64``) and on the command line.
        encoders: the encoders whose embeddings it reads, in order (``("ct", "pet")``).
        label: display label, as in the paper's figures (``"CT+PET"``).
        colour: matplotlib colour of the set in the report's figures.
        paper_table1: the seed paper's best row of this set in its Table 1, for side-by-side
            reading: ``(d, (C-index mean, SD), (1-year AUROC mean, SD))``; None for a set the
            paper did not report.
    """

    name: str
    encoders: tuple[str, ...]
    label: str
    colour: str
    paper_table1: tuple[str, tuple[float, float], tuple[float, float]] | None = None

    @property
    def dims(self) -> dict[str, int]:
        """Native embedding size of each encoder of the set."""
        return {e: ENCODERS[e].dim for e in self.encoders}


ENCODERS: dict[str, Encoder] = {
    e.name: e
    for e in (
        Encoder(
            "ct",
            "CT-FM",
            512,
            channel="ct",
            input_key="ctfm/ct",
            size_param="ctfm_size_xyz",
            pooling="gap_last_feature_map",
            weights_env="HNFM_CT_FM_WEIGHTS",
            default_weights="~/.cache/hnfm/ct_fm/model.safetensors",
            hub_repo="project-lighter/ct_fm_feature_extractor",
            hub_filename="model.safetensors",
            revision_env="HNFM_CT_FM_REVISION",
            loader="models.checkpoints:load_ct_fm",
            random_builder="models.checkpoints:random_ct_fm",
            architecture="models.checkpoints:CT_FM_NAME",
            weights_source="models.checkpoints:CT_FM_WEIGHTS",
        ),
        Encoder(
            "pet",
            "PET-FM",
            768,
            channel="pet",
            input_key="petfm/pet",
            size_param="petfm_size_xyz",
            pooling="mean_tokens_pre_neck",
            weights_env="HNFM_PET_FM_WEIGHTS",
            default_weights="~/.cache/hnfm/pet_fm/seganypet_v1.pth",
            hub_repo="YichiZhang98/SegAnyPET",
            hub_filename="seganypet_v1.pth",
            revision_env="HNFM_PET_FM_REVISION",
            loader="models.checkpoints:load_pet_fm",
            random_builder="models.checkpoints:random_pet_fm",
            architecture="models.checkpoints:PET_FM_NAME",
            weights_source="models.checkpoints:PET_FM_WEIGHTS",
            # PETFMEncoder's published (SAM-Med3D vit_b_ori) input edge, patch edge and window edge.
            cube_input={"img_size": 128, "patch_size": 16, "window_size": 14},
        ),
    )
}

EMBEDDING_SETS: dict[str, EmbeddingSet] = {
    s.name: s
    for s in (
        EmbeddingSet("ct", ("ct",), "CT", "tab:blue", ("orig", (0.715, 0.075), (0.710, 0.083))),
        EmbeddingSet("pet", ("pet",), "PET", "tab:red", ("128", (0.736, 0.060), (0.712, 0.100))),
        EmbeddingSet("ctpet", ("ct", "pet"), "CT+PET", "tab:green", ("256", (0.743, 0.067), (0.744, 0.094))),
    )
}

#: Prefix of an embedding head's report group (:func:`head_group`).
HEAD_PREFIX = "head-"


def encoder_names() -> tuple[str, ...]:
    """Encoder names in registry order (the order of an embeddings file's datasets)."""
    return tuple(ENCODERS)


def encoder(name: str) -> Encoder:
    """The registered encoder called ``name``.

    Raises:
        ValueError: no such encoder (the message lists the registered ones).
    """
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; choose from {list(ENCODERS)}") from None


def set_names() -> tuple[str, ...]:
    """Set names in registry order (the order of tables, figures and ``--modality`` choices)."""
    return tuple(EMBEDDING_SETS)


def embedding_set(name: str) -> EmbeddingSet:
    """The registered set called ``name``: the one check of a set name.

    Raises:
        ValueError: no such set (the message lists the registered ones).
    """
    try:
        return EMBEDDING_SETS[name]
    except KeyError:
        raise ValueError(f"unknown embedding set {name!r}; choose from {list(EMBEDDING_SETS)}") from None


def set_of_encoders(encoders: Iterable[str]) -> str:
    """The name of the first set that reads exactly ``encoders`` (any order): ``["pet", "ct"]`` -> ``ctpet``.

    Raises:
        ValueError: no registered set reads that combination.
    """
    wanted = sorted(encoders)
    for s in EMBEDDING_SETS.values():
        if sorted(s.encoders) == wanted:
            return s.name
    raise ValueError(
        f"no embedding set reads the encoders {wanted}; registered: "
        + ", ".join(f"{s.name} = {list(s.encoders)}" for s in EMBEDDING_SETS.values())
    )


def full_set() -> str:
    """The set that reads every encoder: what a study extracts once for all its configurations."""
    return set_of_encoders(ENCODERS)


def head_group(set_name: str) -> str:
    """The report group of the embedding heads on a set: ``ctpet`` -> ``head-ctpet``."""
    return f"{HEAD_PREFIX}{set_name}"


def set_of_group(group: str) -> str | None:
    """The embedding set a report group shows (``ct`` and ``head-ct`` -> ``ct``), else None."""
    name = group[len(HEAD_PREFIX) :] if group.startswith(HEAD_PREFIX) else group
    return name if name in EMBEDDING_SETS else None


def set_help() -> str:
    """``ct = CT-FM (512-d), pet = PET-FM (768-d), ctpet = CT-FM + PET-FM`` for ``--help`` texts."""

    def one(s: EmbeddingSet) -> str:
        labels = " + ".join(ENCODERS[e].label for e in s.encoders)
        sizes = ", ".join(f"{ENCODERS[e].dim}-d" for e in s.encoders)
        return f"{s.name} = {labels} ({sizes})"

    return ", ".join(one(s) for s in EMBEDDING_SETS.values())


def weights_by_encoder(options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"ct_weights": a, "pet_weights": b}`` (the ``--<encoder>-weights`` options' values,
    as click passes them) -> ``{"ct": a, "pet": b}``.

    Raises:
        TypeError: a key that is no encoder's ``<name>_weights``.
    """
    params = {f"{name}_weights": name for name in ENCODERS}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise TypeError(f"unexpected arguments {unknown}; the encoders' weights are {sorted(params)}")
    return {params[k]: v for k, v in options.items()}


def resolve(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference of an :class:`Encoder` names (imported now)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)
