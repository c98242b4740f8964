"""The demo preset: the same pipeline at small sizes, sized for a few minutes on 2 CPU cores.

One home for every setting ``run-study --demo`` (``make demo``) changes from the paper's, so
that the stage commands run by hand on the demo's outputs (``train-survival --preset demo``,
``extract-embeddings`` on the demo cache) use exactly the demo's values.

The paper's settings stay the defaults of every command; nothing here applies unless the
demo preset is asked for (or detected from a cache made with :data:`DEMO_PREPROCESS_SIZES`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artefacts import read_json
from pipeline.demo_cohort import ensure_demo_cohort, oracle_c_index
from pipeline.embedding_sets import embedding_set, full_set, weights_by_encoder
from pipeline.extraction import run_extraction
from pipeline.hecktor import manifest_sidecar_path
from pipeline.preprocess import PreprocessParams, preprocess_cohort

if TYPE_CHECKING:  # annotations only: the CLIs import this module, which needs no study
    from pipeline.study_spec import StudySpec

#: Preprocessing sizes, SimpleITK (x, y, z) order: survival CNN, CT-FM and PET-FM inputs.
#: The survival crop (80 x 80 x 48 mm, the paper's) at 24^3 voxels: 3.3 x 3.3 x 2 mm, the
#: smallest grid the 4-level U-Net and the 3-block DenseNet both take; a step costs ~0.55x
#: that of 32 x 32 x 24 (benchmarks/bench_cell.py).
DEMO_SURVIVAL_SIZE_XYZ = (24, 24, 24)
DEMO_CTFM_SIZE_XYZ = (64, 64, 16)
DEMO_PETFM_SIZE_XYZ = (64, 64, 64)

#: TrainConfig overrides of the demo (see :class:`pipeline.train.TrainConfig`): 6 epochs of
#: 15 steps (90 Adam steps of batch 8) at a learning rate of 1e-2 with one warm-up epoch and
#: no decay, an EMA over the last ~10 steps, and selection from epoch 3 on (the 15-case inner
#: split cannot tell apart epochs whose segmentation has not yet learnt; see docs/study.md,
#: "The demo preset", for the measurements behind each value). A cell takes ~16-19 s on one
#: core beside a second worker (docs/benchmarks.md).
DEMO_TRAIN: dict[str, Any] = {
    "epochs": 6,
    "steps_per_epoch": 15,
    "batch_size": 8,
    "eval_batch_size": 16,
    "lr": 1e-2,
    "warmup_epochs": 1,
    "lr_step_epochs": 6,
    "patience": 6,
    "ema_decay": 0.9,
    "select_from_epoch": 3,
    # The paper's shifts are +-10 voxels of 1 mm; +-3 voxels keep them at +-10 mm on the
    # demo's 3.3 mm grid (+-10 voxels would move the tumour by a third of the crop).
    "augment": {"max_shift_vox": 3},
    # The narrow 4-level network of models.deepmts.PRESETS["demo"].
    "model": {"preset": "demo"},
}

#: Analyses beyond the paper in the demo: repeats and LOCO for the peers and heads, the CNN
#: grid on repeat 0 only; a 10-penalty path for the heads.
DEMO_REPEATS = 3
DEMO_HEAD: dict[str, Any] = {"n_alphas": 10}

#: Training seeds of the demo's baseline (:attr:`pipeline.study_spec.StudySpec.seeds`): every demo
#: report states its own training noise (the seed SD of the baseline's 5-fold mean).
DEMO_SEEDS = 3


def demo_preprocess_params() -> PreprocessParams:
    """The demo's preprocessing parameters (paper values except the three input sizes)."""
    return PreprocessParams(
        survival_size_xyz=DEMO_SURVIVAL_SIZE_XYZ, ctfm_size_xyz=DEMO_CTFM_SIZE_XYZ, petfm_size_xyz=DEMO_PETFM_SIZE_XYZ
    )


def demo_train_options() -> dict[str, Any]:
    """A fresh copy of :data:`DEMO_TRAIN` (callers may modify it)."""
    return copy.deepcopy(DEMO_TRAIN)


def demo_study_options() -> dict[str, Any]:
    """The :class:`pipeline.study_spec.StudySpec` fields the demo sets (a fresh copy): its training
    options, :data:`DEMO_REPEATS` CV repeats and LOCO for the peers and heads, the CNN grid
    on repeat 0 only, :data:`DEMO_HEAD`, and :data:`DEMO_SEEDS` seeds of the baseline."""
    return {
        "train": demo_train_options(),
        "repeats": DEMO_REPEATS,
        "loco": True,
        "cnn_extra_splits": False,
        "head": copy.deepcopy(DEMO_HEAD),
        "seeds": DEMO_SEEDS,
        "seed_configs": ("baseline",),
    }


def describes_demo_cohort(manifest: str | os.PathLike) -> bool:
    """Whether the manifest's provenance record says it was made by ``make-demo-cohort``."""
    sidecar = manifest_sidecar_path(manifest)
    return sidecar.is_file() and bool(read_json(sidecar).get("demo_cohort"))


def prepare_demo_cohort(manifest: str | os.PathLike, workers: int = 2) -> dict[str, Any]:
    """Data description of a study's manifest, regenerating a demo cohort's files when absent.

    The demo's settings apply to any manifest: a generated cohort gets its files checked (and
    regenerated) and its oracle C-index; any other manifest is described as real data.

    Returns:
        ``{"synthetic": bool, "data_source": str}`` plus ``oracle_c_index`` for a demo cohort.
    """
    if not describes_demo_cohort(manifest):
        return _real_data(manifest)
    ensure_demo_cohort(manifest, workers=workers)
    side = read_json(manifest_sidecar_path(manifest))
    root = (Path(manifest).resolve().parent / side["source_root"]).resolve()
    return {
        "synthetic": True,
        "data_source": f"synthetic demo cohort at {root} (manifest {manifest})",
        "oracle_c_index": oracle_c_index(root),
    }


def _embed_study(
    spec: StudySpec,
    weights: dict[str, Any],
    *,
    random_init: bool,
    demo: bool,
    progress: bool,
    device: str,
    step: Callable[[str], Any],
    say: Callable[[str, str], None],
) -> None:
    """The study's embeddings: the set reading every encoder, into ``spec.embeddings``."""
    set_name = full_set()
    random = random_init or (demo and not all(weights.get(e) for e in embedding_set(set_name).encoders))
    if random:
        say(
            "warning",
            "embeddings from RANDOMLY INITIALISED encoders (no FM weights given): the FM rows "
            "of this study test the pipeline and say nothing about CT-FM/PET-FM.",
        )
    kind = "RANDOM-INIT" if random else "pretrained"
    with step(f"{set_name} embeddings into {spec.embeddings} ({kind} encoders)"):
        res = run_extraction(
            spec.cache_root,
            set_name,
            spec.embeddings,
            weights=None if random else weights,
            random_init=random,
            progress=progress,
            device=device,
        )
        say("line", res.summary())


def _real_data(manifest: str | os.PathLike) -> dict[str, Any]:
    return {"synthetic": False, "data_source": f"manifest {Path(manifest).resolve()}"}


def study_settings_text(train: dict[str, Any], demo: bool) -> str:
    """How a study's training settings are described in ``study.json`` and the report."""
    if not train:
        return "paper (TrainConfig defaults)"
    return ("reduced demo settings" if demo else "custom") + ": " + json.dumps(train, sort_keys=True)


def prepare_inputs(
    spec: StudySpec,
    *,
    demo: bool = False,
    random_init: bool = False,
    workers: int = 2,
    progress: bool = True,
    say: Callable[[str, str], None] | None = None,
    device: str = "auto",
    **weights_options: str | os.PathLike | None,
) -> dict[str, Any]:
    """A study's inputs, each made only when missing or incomplete: the data (a demo
    cohort's files regenerated when absent), the preprocessed cache, and the embeddings of
    the set reading every encoder (``ctpet``) when the grid uses them. ``run-study`` is this,
    then the grid and the report.

    Args:
        spec: the study (its manifest, cache and embeddings paths; ``pipeline.study_spec.StudySpec``).
        demo: the demo's preprocessing sizes (:func:`demo_preprocess_params`; the published
            encoders, the PET-FM sized to the demo's 64^3 input by the extraction: a 4^3
            token grid with 4^3 windows, native embedding sizes so "orig" means what it means
            in the paper); random-init encoders unless every encoder's weights are given.
        random_init: randomly initialised encoders (implied by ``demo`` without all weights).
        workers: processes for cohort generation and preprocessing.
        progress: tqdm bars.
        device: where the encoders run (``run-study --device``); its precision (fp32 on CPU,
            bf16 autocast on CUDA) is part of the embeddings' provenance, so an fp32 file
            made on a CPU is reused on a GPU host with ``cpu``.
        say: receives ``(kind, text)`` as the steps go: ``"step"`` (a step starts),
            ``"line"`` (a result of a step, its duration) and ``"warning"`` (random-init
            embeddings, stated before they are made). Default: nothing is said.
        weights_options: the encoders' weights, as the ``--<encoder>-weights`` options give
            them (``ct_weights``, ``pet_weights``; :func:`pipeline.extraction.run_extraction`).

    Returns:
        The ``info`` record of ``study.json``: ``settings``, ``synthetic``, ``data_source``
        (+ ``oracle_c_index`` for a demo cohort).
    """
    say = say or (lambda kind, text: None)

    @contextlib.contextmanager
    def step(text: str) -> Iterator[None]:
        say("step", text)
        t0 = time.perf_counter()
        yield
        say("line", f"({time.perf_counter() - t0:.0f} s)")

    info: dict[str, Any] = {"settings": study_settings_text(spec.train, demo)}
    if demo:
        with step(f"data from {spec.manifest} (a demo cohort's files are generated when absent)"):
            info.update(prepare_demo_cohort(spec.manifest, workers=workers))
    else:
        info.update(_real_data(spec.manifest))

    params = demo_preprocess_params() if demo else PreprocessParams()
    with step(f"preprocess into {spec.cache_root} (finished cases are kept)"):
        preprocess_cohort(spec.manifest, spec.cache_root, params, workers=workers, progress=progress)

    if spec.embeddings is not None:
        _embed_study(
            spec,
            weights_by_encoder(weights_options),
            random_init=random_init,
            demo=demo,
            progress=progress,
            device=device,
            step=step,
            say=say,
        )
    return info
