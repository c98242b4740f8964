"""CUDA throughput and memory of the frozen encoders, bf16 autocast vs an fp32 per-case loop.

For CT-FM (``[B, 1, 48, 128, 128]``) and PET-FM fast / literal (``[B, 1, 128, 128, 128]``),
with deterministic random weights, prints per batch size:

* cases/s of one batched forward under ``torch.autocast("cuda", dtype=torch.bfloat16)``;
* cases/s of the naive baseline: ``B`` separate fp32 single-case forwards;
* peak ``torch.cuda.max_memory_allocated`` above the resident weights for each;
* max abs difference of the bf16 embeddings from the fp32 ones (bf16 has ~3 significant
  digits, so expect ~1e-2 relative), and at batch 1 PET-FM fast vs literal in fp32.

Times use ``torch.cuda.synchronize`` around the timed region, best of ``--repeats`` after a
warm-up. Prints a clear message and exits 0 when CUDA is absent.

Usage::

    python benchmarks/bench_encoders_gpu.py --batches 1 2 4 8 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch


def _measure(fn: Callable[[], torch.Tensor], repeats: int, base_bytes: int) -> tuple[float, float, torch.Tensor]:
    """Best seconds per call, peak allocated MiB above ``base_bytes``, last output."""
    out = fn()  # warm-up (cuDNN autotune, allocator growth)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    return best, peak, out


def _bench(name: str, model: torch.nn.Module, shape: tuple[int, ...], batches: list[int], repeats: int) -> None:
    device = torch.device("cuda")
    base = torch.cuda.memory_allocated()
    for batch in batches:
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device)

        def bf16_batched() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x).float()

        def fp32_loop() -> torch.Tensor:
            return torch.cat([model(x[i:i + 1]) for i in range(batch)])

        with torch.inference_mode():
            t_bf16, mem_bf16, emb_bf16 = _measure(bf16_batched, repeats, base)
            t_loop, mem_loop, emb_fp32 = _measure(fp32_loop, repeats, base)
        diff = (emb_bf16 - emb_fp32).abs().max().item()
        scale = emb_fp32.abs().max().item()
        print(f"{name:>15} B={batch:<2}: bf16 batched {batch / t_bf16:8.2f} cases/s (peak +{mem_bf16:7.0f} MiB) | "
              f"fp32 per-case loop {batch / t_loop:8.2f} cases/s (peak +{mem_loop:7.0f} MiB) | "
              f"speed-up {t_loop / t_bf16:5.1f}x | bf16 vs fp32 max abs diff {diff:.2e} (max |emb| {scale:.2f})",
              flush=True)
        del x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--literal-batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_encoders_gpu: CUDA is not available on this machine; nothing to measure "
              "(run it on a CUDA host; the CPU benchmark is benchmarks/bench_encoders.py).")
        return 0
    # "fp32" means fp32: without this, matmuls and convolutions may run in TF32 on Ampere+.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    from models.checkpoints import random_ct_fm, random_pet_fm

    torch.backends.cudnn.benchmark = True
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    ct = random_ct_fm(0).cuda()
    _bench("CT-FM", ct, (1, 48, 128, 128), args.batches, args.repeats)
    del ct
    torch.cuda.empty_cache()

    pet = random_pet_fm(0).cuda()
    _bench("PET-FM fast", pet, (1, 128, 128, 128), args.batches, args.repeats)
    pet.set_fast_windowed(False)
    _bench("PET-FM literal", pet, (1, 128, 128, 128), args.literal_batches, args.repeats)

    x = torch.rand(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(99)).cuda()
    with torch.inference_mode():
        literal = pet(x)
        pet.set_fast_windowed(True)
        fast = pet(x)
    print(f"PET-FM fast vs literal (fp32, CUDA, 1 case): max abs diff {(fast - literal).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
