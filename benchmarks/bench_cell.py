"""Where a training cell's time goes: each part against the floor of its optimisation steps.

The floor of a step is forward + loss + backward + Adam on one fixed batch, nothing else (no
augmentation, no EMA, no evaluation, no data indexing). A cell (one configuration x one fold)
adds batch preparation and augmentation, the EMA update, one evaluation pass per epoch (plus
one before training), set-up and outputs. The aim is a cell within 1.3x its steps' floor.

* ``--size demo``: a real fold of the demo preset (pipeline.demo) on a preprocessed demo cache,
  run through the same parts :func:`pipeline.train.train_fold` is made of, each timed.
* ``--size paper``: the paper's network and input size on a synthetic batch (a full-size fold
  takes hours on CPU): the floor, a full step (augmentation + EMA) and an evaluation pass per
  case, projected onto the paper's protocol (100 epochs x 50 steps, 93-case folds).

Usage::

    python benchmarks/bench_cell.py --size demo [--cache cache/preprocessed] [--threads 1] [--device auto]
    python benchmarks/bench_cell.py --size paper --steps 2 --threads 2
    python benchmarks/bench_cell.py --size paper-fold --device cuda --epochs 2 --steps 20   # on a GPU
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.deepmts import DeepMTS, DeepMTSConfig
from models.losses import deepmts_loss
from pipeline.artefacts import read_json
from pipeline.dataset import AugmentConfig, augment_batch, load_cohort
from pipeline.demo import demo_train_options
from pipeline.layout import RunLayout
from pipeline.splits import get_folds
from pipeline.train import (
    PartTimes,
    TrainConfig,
    make_optimiser,
    model_to_layout,
    setup_fold,
    to_model_layout,
    train_fold,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_per_step(model: DeepMTS, cfg: TrainConfig, batch: dict, steps: int, device: torch.device) -> float:
    """Seconds of forward + loss + backward + Adam on one fixed batch (median of ``steps``),
    with the optimiser training uses (:func:`pipeline.train.make_optimiser`)."""
    opt = make_optimiser(model, cfg)
    model.train()
    times = []
    for i in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        out = model(batch["image"], batch["clinical"], batch.get("fm"))
        loss, _ = deepmts_loss(out, batch["mask"], batch["time"], batch["event"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def fold_floor(state, cohort, cfg: TrainConfig, steps: int) -> float:
    """The floor of a fold's steps: the same network, in the same layout, on one fixed,
    already augmented batch of its training rows."""
    idx = torch.as_tensor(state.data.fit[: cfg.batch_size])
    img, msk = augment_batch(cohort.images[idx], cohort.masks[idx], cfg.augment, torch.Generator())
    batch = {
        "image": to_model_layout(img, state.device),
        "mask": msk.to(state.device),
        "clinical": state.data.clinical[idx].to(state.device),
        "time": torch.as_tensor(cohort.time[idx.numpy()], device=state.device),
        "event": torch.ones(len(idx), dtype=torch.bool, device=state.device),
    }
    return floor_per_step(state.model, cfg, batch, steps, state.device)


def bench_demo(cache: str, manifest: str, fold: int, device: str) -> dict[str, float]:
    t_start = time.perf_counter()
    cohort = load_cohort(manifest, cache)
    t_load = time.perf_counter() - t_start
    cfg = TrainConfig(**(demo_train_options() | {"device": device}))
    work = Path(tempfile.mkdtemp(prefix="bench_cell_"))
    try:
        folds = get_folds(work / "folds.json", cohort)
        # A study worker pays its first set-up (lazy imports, kernel set-up) once, not per cell;
        # this set-up's fresh network also serves the floor below.
        t0 = time.perf_counter()
        state = setup_fold(cohort, folds, fold, cfg)
        t_warm = time.perf_counter() - t0
        times = PartTimes()
        train_fold(cohort, folds, fold, cfg, work / "run", progress=False, times=times)
        floor = fold_floor(state, cohort, cfg, 10)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steps = cfg.epochs * cfg.steps_per_epoch
    return {"load_cohort_s": t_load, "warm_up_s": t_warm, "n_steps": steps, "floor_step_s": floor, **times.seconds}


def _report_demo(res: dict) -> None:
    steps, floor = res.pop("n_steps"), res.pop("floor_step_s")
    load, warm = res.pop("load_cohort_s"), res.pop("warm_up_s")
    total = sum(res.values())
    print(f"demo cell: {steps} steps, floor {floor:.3f} s/step -> steps' floor {steps * floor:.1f} s")
    print("| part | seconds | x steps' floor |\n| --- | ---: | ---: |")
    for name, sec in res.items():
        print(f"| {name} | {sec:.2f} | {sec / (steps * floor):.2f} |")
    print(f"| **whole cell** | **{total:.2f}** | **{total / (steps * floor):.2f}** |")
    print(
        f"(once per worker process: cohort load {load:.2f} s, first set-up {warm:.2f} s; "
        f"optimisation step incl. augmentation and EMA: {res['steps'] / steps:.3f} s)"
    )


def bench_paper(steps: int, device: torch.device) -> None:
    size = (48, 80, 80)
    g = torch.Generator().manual_seed(0)
    cfg = DeepMTSConfig(n_clinical=13)
    model = model_to_layout(DeepMTS(cfg), device)
    mask = torch.zeros(8, 1, *size)
    mask[:, :, 16:32, 27:53, 27:53] = 1
    batch = {
        "image": to_model_layout(torch.randn(8, 2, *size, generator=g), device),
        "mask": mask.to(device),
        "clinical": torch.randn(8, 13, generator=g).to(device),
        "time": torch.arange(1.0, 9.0, device=device) * 100,
        "event": torch.ones(8, dtype=torch.bool, device=device),
    }
    floor = floor_per_step(model, TrainConfig(), batch, steps, device)  # the paper's settings
    aug = AugmentConfig()
    t0 = time.perf_counter()
    for _ in range(steps):
        augment_batch(batch["image"].cpu(), batch["mask"].cpu(), aug, g)
    aug_s = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.inference_mode():
        model(batch["image"][:2], batch["clinical"][:2])
        _sync(device)
        t0 = time.perf_counter()
        model(batch["image"], batch["clinical"])
        _sync(device)
        eval_case = (time.perf_counter() - t0) / 8
    epochs, spe, cases = 100, 50, 93
    steps_total = epochs * spe
    cell = steps_total * (floor + aug_s) + (epochs + 1) * cases * eval_case
    print(
        f"paper size on {device}: floor {floor:.2f} s/step, augmentation {aug_s:.3f} s/batch, "
        f"evaluation {eval_case:.3f} s/case"
    )
    print(
        f"projected paper cell (100 x 50 steps, 101 evaluations of 93 cases): {cell / 3600:.2f} h "
        f"= {cell / (steps_total * floor):.2f} x its steps' floor"
    )


PAPER_DHW = (48, 80, 80)  # the paper's survival input, [D, H, W]
PAPER_EPOCHS, PAPER_STEPS, PAPER_CASES, GRID_CELLS = 100, 50, 488, 65


def paper_size_cohort(cache: str, manifest: str, n_cases: int | None):
    """The demo cohort's cases (their clinical rows, outcomes and tumours) resampled to the
    paper's survival input, ``[N, 2, 48, 80, 80]``: a real fold at the paper's size."""
    cohort = load_cohort(manifest, cache)
    keep = slice(None, n_cases)
    images = F.interpolate(cohort.images[keep], size=PAPER_DHW, mode="trilinear", align_corners=False)
    masks = (F.interpolate(cohort.masks[keep], size=PAPER_DHW, mode="trilinear", align_corners=False) > 0.5).float()
    return dataclasses.replace(
        cohort,
        case_ids=cohort.case_ids[keep],
        images=images,
        masks=masks,
        time=cohort.time[keep],
        event=cohort.event[keep],
        centre=cohort.centre[keep],
    )


def bench_paper_fold(args: argparse.Namespace, device: str) -> None:
    """``train_fold`` itself at the paper's size and settings, each part timed by its PartTimes;
    a short schedule is projected onto the paper's protocol and the 65-cell grid, a full one
    (``--epochs 100 --steps 50``) is the measured paper cell."""
    cohort = paper_size_cohort(args.cache, args.manifest, args.cases)
    cfg = TrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        warmup_epochs=min(5, args.epochs),
        device=device,
        precision=args.precision,
        threads=args.threads,
        step_mode=args.step_mode,
        patience=PAPER_EPOCHS,
    )
    work = Path(tempfile.mkdtemp(prefix="bench_paper_fold_"))
    try:
        folds = get_folds(work / "folds.json", cohort)
        state = setup_fold(cohort, folds, 0, cfg)  # a worker's one-off set-up and the floor's network
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, t0 = PartTimes(), time.perf_counter()
        train_fold(cohort, folds, 0, cfg, work / "run", progress=False, times=times)
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        floor = fold_floor(state, cohort, cfg, 5)
        done = read_json(RunLayout(work / "run").done(0))  # as the fold ran
        curves = (RunLayout(work / "run").curves(0)).read_text()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env, ex = done["environment"], done["execution"]
    print(
        f"device {env['device']} ({env['gpu'] or env['cpu']}), CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"precision {env['precision']}, TF32 matmul {env['tf32_matmul']} / cuDNN {env['tf32_cudnn']}, "
        f"deterministic {env['deterministic']}; step mode {ex['step_mode']} (CUDA graph: {ex['cuda_graph']}), "
        f"evaluation batch {ex['eval_batch_size']}, train C every {ex['train_c_every']} epochs"
    )
    n_steps, passes = done["epochs_run"] * cfg.steps_per_epoch, done["epochs_run"] + 1
    step_s, eval_pass_s = times.seconds["steps"] / n_steps, times.seconds["evaluation"] / passes
    other = sum(v for k, v in times.seconds.items() if k not in ("steps", "evaluation"))
    print(
        f"measured: {n_steps} steps at {step_s:.3f} s (floor {floor:.3f} s, {step_s / floor:.2f}x), evaluation "
        f"{eval_pass_s:.2f} s/pass over {passes} passes of {len(cohort)} cases "
        f"({times.seconds['evaluation'] / wall:.0%} of the fold), other {other:.1f} s; "
        f"wall {wall:.1f} s, peak GPU memory {peak:.1f} GiB"
    )
    if done["epochs_run"] == PAPER_EPOCHS and cfg.steps_per_epoch == PAPER_STEPS:
        print(
            f"MEASURED paper-length cell ({PAPER_EPOCHS} x {PAPER_STEPS} steps, {len(cohort)} cases): "
            f"{wall / 60:.2f} min\n--- curves.csv ---\n{curves}--- end curves ---"
        )
    per_case = PAPER_CASES / len(cohort)  # an evaluation pass covers the fold's rows
    cell = PAPER_EPOCHS * PAPER_STEPS * step_s + (PAPER_EPOCHS + 1) * eval_pass_s * per_case + other
    print(
        f"projected paper cell ({PAPER_EPOCHS} x {PAPER_STEPS} steps, {PAPER_EPOCHS + 1} evaluations of "
        f"{PAPER_CASES} cases): {cell / 60:.1f} min = "
        f"{cell / (PAPER_EPOCHS * PAPER_STEPS * floor):.2f} x its steps' floor"
    )
    for gpus in (1, 8):
        print(
            f"65-cell grid on {gpus} GPU(s), one cell per GPU at a time: "
            f"{math.ceil(GRID_CELLS / gpus) * cell / 3600:.2f} h (projection)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size",
        choices=["demo", "paper", "paper-fold"],
        default="demo",
        help="paper-fold: train_fold itself at the paper's size (demo cases resampled)",
    )
    ap.add_argument("--cases", type=int, default=None, help="paper-fold: first N demo cases (default all)")
    ap.add_argument("--epochs", type=int, default=2, help="paper-fold: epochs timed")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast"], help="paper-fold")
    ap.add_argument(
        "--step-mode",
        default="auto",
        choices=["auto", "eager", "graph"],
        help="paper-fold: TrainConfig.step_mode (auto = a CUDA graph on CUDA in fp32)",
    )
    ap.add_argument("--cache", default="cache/preprocessed", help="demo-size preprocessed cache")
    ap.add_argument("--manifest", default="data_manifest.csv")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument(
        "--steps", type=int, default=3, help="paper: steps timed for the floor; paper-fold: steps per epoch"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo runs 1 per worker)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), device {device}, load average {os.getloadavg()[0]:.2f}"
    )
    if args.size == "demo":
        _report_demo(bench_demo(args.cache, args.manifest, args.fold, device))
    elif args.size == "paper-fold":
        bench_paper_fold(args, device)
    else:
        bench_paper(args.steps, torch.device(device))


if __name__ == "__main__":
    main()
