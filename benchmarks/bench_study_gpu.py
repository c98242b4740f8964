"""Projected wall time of the full 65-cell study at the paper's settings on CUDA GPUs.

Times a few DeepMTS+DAFT training steps (batch 8, [8, 2, 48, 80, 80], paper widths, CT+PET
FM projected to 256, EMA) and an evaluation forward (batch 16) on one GPU, through
``bench_train_step.run_benchmark``; then projects one cell (one configuration x one fold):
100 epochs x 50 steps plus, every epoch, the outer validation fold (~98 of 488 cases) and
the inner selection split (20 % of the training fold, ~78 cases) at batch 16. This is an
upper bound: early stopping (patience 40) can end a cell sooner. The grid is 13
configurations x 5 folds = 65 independent cells; with G GPUs and one cell per GPU at a time
it takes ceil(65 / G) cell times. Exits 0 with a message when CUDA is not available.

Usage::

    python benchmarks/bench_study_gpu.py [--steps 20] [--warmup 5] [--cases 488]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import run_benchmark  # noqa: E402

N_CELLS = 65
EPOCHS, STEPS, EVAL_BATCH, FOLDS, INNER = 100, 50, 16, 5, 0.2


def project(step_s: float, eval_batch_s: float, n_cases: int) -> dict[str, float]:
    """Seconds per cell and hours for the grid on 1 and 8 GPUs from measured step times."""
    outer = math.ceil(n_cases / FOLDS)
    inner = math.ceil((n_cases - outer) * INNER)
    val_batches = math.ceil(outer / EVAL_BATCH) + math.ceil(inner / EVAL_BATCH)
    cell_s = EPOCHS * (STEPS * step_s + val_batches * eval_batch_s)
    return {
        "val_batches_per_epoch": val_batches,
        "cell_s": cell_s,
        "grid_1gpu_h": N_CELLS * cell_s / 3600,
        "grid_8gpu_h": math.ceil(N_CELLS / 8) * cell_s / 3600,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured training steps")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured warm-up steps (cuDNN autotune)")
    parser.add_argument("--cases", type=int, default=488, help="cases with an endpoint (HECKTOR 2022: 488)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available on this machine: study GPU benchmark skipped (nothing measured).")
        return 0
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    res = run_benchmark(device, steps=args.steps, warmup=args.warmup)
    proj = project(res["step_mean_s"], res["eval_forward_batch16_s"], args.cases)
    gpu = torch.cuda.get_device_name(device)
    print(f"{gpu}: {res['step_mean_s'] * 1e3:.0f} ms/training step (batch 8), "
          f"{res['eval_forward_batch16_s'] * 1e3:.0f} ms/eval batch of 16")
    print(f"one cell (100 epochs x 50 steps + {proj['val_batches_per_epoch']} val batches/epoch, "
          f"no early stop): {proj['cell_s'] / 60:.1f} min")
    print(f"full grid, {N_CELLS} cells: {proj['grid_1gpu_h']:.1f} h on 1 GPU, "
          f"{proj['grid_8gpu_h']:.1f} h on 8 GPUs ({math.ceil(N_CELLS / 8)} waves of one cell per GPU)")
    if args.json is not None:
        res.pop("config", None)
        args.json.write_text(json.dumps(res | proj | {"gpu": gpu}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
