"""Training-step throughput of DeepMTS+DAFT on CUDA, and the projected protocol wall time.

Same step as ``bench_train_step.py`` (forward + loss + backward + Adam + EMA; batch 8,
[8, 2, 48, 80, 80], paper widths, CT+PET FM projected to 256). Prints steps/s, the peak GPU
memory and the projected wall time of 5 folds x 100 epochs x 50 steps plus one validation
pass per epoch. Exits 0 with a message when CUDA is not available.

Usage::

    python benchmarks/bench_train_step_gpu.py [--steps 20] [--warmup 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import run_benchmark  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured warm-up steps (cuDNN autotune)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA is not available on this machine: GPU benchmark skipped (nothing measured).")
        return 0
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    res = run_benchmark(device, steps=args.steps, warmup=args.warmup)
    res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["gpu"] = torch.cuda.get_device_name(device)
    print(f"{res['gpu']}: {res['steps_per_s']:.2f} steps/s ({res['step_mean_s'] * 1e3:.0f} ms/step, "
          f"min {res['step_min_s'] * 1e3:.0f} ms), eval batch 16 {res['eval_forward_batch16_s'] * 1e3:.0f} ms, "
          f"peak GPU memory {res['peak_gpu_mem_gib']:.2f} GiB")
    print(f"projected protocol (5 folds x 100 epochs x 50 steps + {res['val_batches_per_epoch']} val "
          f"batches/epoch): {res['projected_protocol_h']:.2f} h")
    if args.json is not None:
        res.pop("config")
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
