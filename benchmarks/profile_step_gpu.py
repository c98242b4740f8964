"""Where the paper-size training step's GPU time goes, before anything is changed.

On one synthetic batch at the paper's size ([B, 2, 48, 80, 80], paper widths, 13 clinical
covariates), times the floor of a step (forward + loss + backward + Adam, as
``bench_cell.floor_per_step``) under each setting that could matter, then traces a few steps
with torch.profiler: kernels per step, the GPU's busy time against the wall time (a step that
is mostly idle GPU is bound by launches, not arithmetic), and the ops that take the most GPU
time. Prints "no CUDA" and exits 0 without a GPU.

Usage::

    python benchmarks/profile_step_gpu.py [--steps 10]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cell import floor_per_step  # noqa: E402

from models.deepmts import DeepMTS, DeepMTSConfig  # noqa: E402
from models.losses import deepmts_loss  # noqa: E402
from pipeline.runtime import deterministic_kernels  # noqa: E402
from pipeline.train import TrainConfig  # noqa: E402

SIZE = (48, 80, 80)


def make_batch(batch: int, device: torch.device, channels_last: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 1, *SIZE)
    mask[:, :, 16:32, 27:53, 27:53] = 1
    image = torch.randn(batch, 2, *SIZE, generator=g).to(device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    return {
        "image": image,
        "mask": mask.to(device),
        "clinical": torch.randn(batch, 13, generator=g).to(device),
        "time": torch.arange(1.0, batch + 1.0, device=device) * 100,
        "event": torch.ones(batch, dtype=torch.bool, device=device),
    }


def make_model(device: torch.device, channels_last: bool) -> DeepMTS:
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig(n_clinical=13)).to(device)
    return model.to(memory_format=torch.channels_last_3d) if channels_last else model


def floor(
    device: torch.device,
    steps: int,
    *,
    batch: int = 8,
    deterministic: bool = True,
    benchmark: bool = False,
    channels_last: bool = False,
) -> float:
    torch.backends.cudnn.benchmark = benchmark
    model = make_model(device, channels_last)
    ctx = deterministic_kernels() if deterministic else contextlib.nullcontext()
    with ctx:
        return floor_per_step(model, TrainConfig(), make_batch(batch, device, channels_last), steps, device)


def settings_table(device: torch.device, steps: int) -> None:
    print("| setting | floor s/step | ms per case |\n| --- | ---: | ---: |")
    rows = [
        ("deterministic (as training runs), contiguous, batch 8", {}),
        ("not deterministic, autotuner off", {"deterministic": False}),
        ("not deterministic, autotuner on", {"deterministic": False, "benchmark": True}),
        ("deterministic, channels-last 3D", {"channels_last": True}),
        ("deterministic, batch 16", {"batch": 16}),
        ("deterministic, batch 32", {"batch": 32}),
    ]
    for name, kw in rows:
        sec = floor(device, steps, **kw)
        print(f"| {name} | {sec:.4f} | {sec / kw.get('batch', 8) * 1000:.1f} |", flush=True)
    torch.backends.cudnn.benchmark = False


def trace(device: torch.device, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    model = make_model(device, False)
    batch = make_batch(8, device, False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        out = model(batch["image"], batch["clinical"])
        loss, _ = deepmts_loss(out, batch["mask"], batch["time"], batch["event"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with deterministic_kernels():
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels)
    wall_us = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
    print(
        f"\ntrace of {steps} steps: {len(kernels) / steps:.0f} GPU kernels per step, GPU busy "
        f"{busy_us / steps / 1000:.1f} ms of {wall_us / steps / 1000:.1f} ms wall per step "
        f"({100 * busy_us / wall_us:.0f} %)"
    )
    print(events.table(sort_by="device_time_total", row_limit=15, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: nothing to profile")
        return
    device = torch.device("cuda")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"{torch.cuda.get_device_name(0)}"
    )
    settings_table(device, args.steps)
    trace(device, 5)


if __name__ == "__main__":
    main()
