"""Command-line options that several commands take: one definition each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from pipeline.demo import demo_train_options
from pipeline.embedding_sets import ENCODERS, Encoder
from pipeline.preprocess import MIN_TUMOUR_COVERAGE

#: TrainConfig fields that an option ``--<field with dashes>`` sets one to one: type, help.
TRAIN_SCALARS: dict[str, tuple[type, str]] = {
    "epochs": (int, "Maximum epochs [paper: 100]."),
    "steps_per_epoch": (int, "Steps per epoch [paper: 50]."),
    "batch_size": (int, "Training batch, half events [paper: 8]."),
    "eval_batch_size": (int, "Evaluation batch on the CPU [paper: 16]."),
    "gpu_eval_batch_size": (int, "Evaluation batch on CUDA, where larger batches cost less per case [64]."),
    "train_c_every": (
        int,
        "Score the fit rows (the curves' training C-index, a diagnostic) every N epochs and "
        "at the last; selection, risks and metrics do not depend on it [5].",
    ),
    "lr": (float, "Adam learning rate [paper: 1e-3]."),
    "warmup_epochs": (int, "Linear warm-up epochs [paper: 5]."),
    "lr_step_epochs": (int, "Decay the learning rate every N epochs [paper: 25]."),
    "lr_gamma": (float, "Step-decay factor [paper: 0.3]."),
    "ema_decay": (float, "EMA decay of weights used for evaluation [paper: 0.999]."),
    "wd_classifier": (float, "Weight decay of the risk head [paper: 0.1]."),
    "wd_densenet": (float, "Weight decay of the survival DenseNet [paper: 1e-4]."),
    "patience": (int, "Early-stopping patience on validation C-index [paper: 40]."),
    "cox_weight": (float, "L = L_dice + w * L_cox [paper: 2]."),
    "seed": (
        int,
        "Seed of the training randomness: initialisation, dropout, batch order, augmentation "
        "[paper: 42]; also of the inner selection split unless --split-seed is given.",
    ),
    "split_seed": (
        int,
        "Seed of the inner selection split [default: --seed, as before the two were "
        "separate]; fix it to vary --seed over the same inner split.",
    ),
    "inner_val_fraction": (
        float,
        "Share of each training fold held out for unbiased model selection [0.2]; 0 = paper protocol only.",
    ),
    "threads": (
        int,
        "CPU threads of each training process (torch, OpenMP, BLAS) [1], whatever "
        "OMP_NUM_THREADS says. Numbers depend on it (sums in another order), so it is one "
        "of the run's settings; run folds and cells side by side for speed instead.",
    ),
    "precision": (
        str,
        "Training arithmetic: fp32 or bf16-autocast (forward pass under bfloat16 autocast, "
        "losses in fp32; CUDA only: refused on CPU, where it gave non-finite losses at random) [fp32].",
    ),
    "step_mode": (
        str,
        "How a training step runs: eager, graph (captured once in a CUDA graph and replayed; on the "
        "CPU the same code without capture, the eager step's bits) or auto (graph on CUDA in fp32, "
        "else eager) [auto].",
    ),
    "select_from_epoch": (
        int,
        "First epoch (0-based) model selection may choose [paper: 0; demo preset: "
        f"{demo_train_options().get('select_from_epoch', 0)}].",
    ),
}


def train_scalar_options(names: Sequence[str] = tuple(TRAIN_SCALARS)) -> Callable[[Any], Any]:
    """Decorator adding ``--<name>`` for each of these :data:`TRAIN_SCALARS` fields, in this
    order; an option not given is ``None``."""

    def add(command: Any) -> Any:
        for name in reversed(names):
            kind, text = TRAIN_SCALARS[name]
            command = click.option(
                f"--{name.replace('_', '-')}", name, type=kind, default=None, show_default=False, help=text
            )(command)
        return command

    return add


def train_scalars(values: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields given on the command line (options left at ``None`` dropped)."""
    return {name: TRAIN_SCALARS[name][0](value) for name, value in values.items() if value is not None}


def weights_lookup_help(entry: Encoder) -> str:
    """Help of an encoder's ``--<encoder>-weights`` where the weights are looked for when it is
    not given (``extract-embeddings``, ``run-study``)."""
    return (
        f"{entry.label} {entry.hub_filename} (Hugging Face {entry.hub_repo}). Else ${entry.weights_env}, else "
        f"{entry.default_weights}, else the Hub's cache, else downloaded from the Hub (sha256 checked) "
        "where the network allows."
    )


def encoder_weights_options(help_text: Callable[[Encoder], str], *, must_exist: bool = False) -> Callable[[Any], Any]:
    """Decorator adding ``--<encoder>-weights PATH`` for each registered encoder, in registry
    order (``--ct-weights``, ``--pet-weights``); the command receives them as
    ``<encoder>_weights`` (:func:`pipeline.embedding_sets.weights_by_encoder` maps them)."""

    def add(command: Any) -> Any:
        for entry in reversed(list(ENCODERS.values())):
            command = click.option(
                entry.weights_option,
                f"{entry.name}_weights",
                default=None,
                type=click.Path(exists=must_exist, dir_okay=False),
                help=help_text(entry),
            )(command)
        return command

    return add


#: The PET field of view's least share of the tumour (``build-manifest``, ``preprocess``).
min_tumour_coverage_option = click.option(
    "--min-tumour-coverage",
    type=click.FloatRange(0.0, 1.0),
    default=MIN_TUMOUR_COVERAGE,
    show_default=True,
    help="Least share (0-1) of a case's tumour label voxels inside its PET field of view; a case "
    "below (e.g. a PET placed elsewhere by its header) is refused.",
)


#: Exit status of a command run with ``--continue-on-error`` that wrote the cases it could and
#: refused others (listed): 0 means every case is in, 1 that nothing was written.
PARTIAL_EXIT = 3


def continue_on_error_option(what: str) -> Callable[[Any], Any]:
    """``--continue-on-error``, one meaning for ``import-dicom`` and ``build-manifest``."""
    return click.option(
        "--continue-on-error",
        is_flag=True,
        help=f"Write every {what} that passes, leave the others out and end with a table of them and why; "
        f"exit status {PARTIAL_EXIT} when any was left out (0: all in; 1: nothing written). Without it, "
        f"any refused {what} stops the command, nothing is written, and every refused {what} is named.",
    )


def refused_table(rows: Sequence[tuple[str, str]], what: str) -> str:
    """The console table of refused cases: one line each, ``what`` and reason."""
    width = max([len(what)] + [len(str(r[0])) for r in rows])
    lines = [f"refused ({len(rows)}):", f"  {what:<{width}}  reason"]
    lines += [f"  {str(name):<{width}}  {' '.join(str(reason).split())}" for name, reason in rows]
    return "\n".join(lines)
