"""Seconds per DeepMTS+DAFT training step at the paper's size, on CPU.

One step = forward + Dice/Cox loss + backward + Adam step + EMA update (decay 0.999), as in
the training protocol: batch 8 (half events), input [8, 2, 48, 80, 80] (D, H, W; 80 x 80 x 48
in x, y, z), paper widths, CT+PET FM embeddings projected to 256. Also times an evaluation
forward at batch 16 and projects the wall time of the paper's protocol (5 folds x 100 epochs
x 50 steps, plus one validation pass per epoch). Peak memory is the process's peak RSS.

Usage::

    python benchmarks/bench_train_step.py [--steps 3] [--threads 2] [--out benchmarks/train_step.md]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.deepmts import DeepMTS, DeepMTSConfig
from models.losses import deepmts_loss
from pipeline.artefacts import atomic_path, code_version, params_hash, utc_now

N_CLINICAL = 13  # pipeline.clinical encoding: age, weight, gender, 5 binaries, 5 performance-status one-hot
FM_DIMS = {"ct": 512, "pet": 768}
PROTOCOL = {"folds": 5, "epochs": 100, "steps_per_epoch": 50, "n_cases": 488, "eval_batch": 16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(batch: int, size: tuple[int, int, int], device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Random PET/CT, a cubic tumour mask, half events (as the event-balanced sampler gives)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 2, *size, generator=g)
    mask = torch.zeros(batch, 1, *size)
    d, h, w = size
    mask[:, :, d // 3: 2 * d // 3, h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 1.0
    return {
        "image": image.to(device),
        "mask": mask.to(device),
        "clinical": torch.randn(batch, N_CLINICAL, generator=g).to(device),
        "fm": {k: torch.randn(batch, v, generator=g).to(device) for k, v in FM_DIMS.items()},
        "time": torch.arange(1, batch + 1, dtype=torch.float32).mul(100).to(device),
        "event": (torch.arange(batch) % 2 == 0).to(device),
    }


def run_benchmark(device: torch.device, steps: int, warmup: int = 1, batch: int = 8,
                  config: DeepMTSConfig | None = None) -> dict[str, Any]:
    """Time training steps and an evaluation forward on ``device``.

    Returns:
        Dict with per-step seconds (list), mean/min step seconds, eval-forward seconds per
        batch of ``PROTOCOL["eval_batch"]``, projected protocol hours and the config.
    """
    torch.manual_seed(42)
    cfg = config or DeepMTSConfig(n_clinical=N_CLINICAL, fm_dims=FM_DIMS, fm_proj=256)
    model = DeepMTS(cfg).to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    opt = torch.optim.Adam(model.param_groups(), lr=1e-3)
    data = synthetic_batch(batch, cfg.input_size, device)

    cpu_times: list[float] = []

    def step() -> float:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(data["image"], data["clinical"], data["fm"])
        loss, _ = deepmts_loss(out, data["mask"], data["time"], data["event"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        _sync(device)
        cpu_times.append(time.process_time() - c0)
        return time.perf_counter() - t0

    model.train()
    for _ in range(warmup):
        step()
    times = [step() for _ in range(steps)]
    cpu_step_s = sum(cpu_times[warmup:]) / steps

    eval_data = synthetic_batch(PROTOCOL["eval_batch"], cfg.input_size, device, seed=1)
    ema.module.eval()
    eval_times = []
    with torch.inference_mode():
        for i in range(max(2, warmup + 1)):
            _sync(device)
            t0 = time.perf_counter()
            ema.module(eval_data["image"], eval_data["clinical"], eval_data["fm"])
            _sync(device)
            if i >= warmup:
                eval_times.append(time.perf_counter() - t0)

    step_s = sum(times) / len(times)
    eval_s = sum(eval_times) / len(eval_times)
    val_batches = math.ceil(math.ceil(PROTOCOL["n_cases"] / PROTOCOL["folds"]) / PROTOCOL["eval_batch"])
    per_fold_s = PROTOCOL["epochs"] * (PROTOCOL["steps_per_epoch"] * step_s + val_batches * eval_s)
    return {
        "device": str(device),
        "batch": batch,
        "input_size_dhw": list(cfg.input_size),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": times,
        "step_mean_s": step_s,
        "step_min_s": min(times),
        "steps_per_s": 1.0 / step_s,
        "step_cpu_s": cpu_step_s,
        "eval_forward_batch16_s": eval_s,
        "val_batches_per_epoch": val_batches,
        "projected_protocol_h": PROTOCOL["folds"] * per_fold_s / 3600.0,
        "config": cfg.to_dict(),
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def render_markdown(res: dict[str, Any], command: str, extra: dict[str, Any]) -> str:
    """Markdown report with the measurement and its provenance."""
    prov = {
        "code_version": code_version(),
        "params_hash": params_hash({"config": res["config"], "batch": res["batch"], "protocol": PROTOCOL}),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date_utc": utc_now(),
    } | extra
    lines = [
        "# Training-step benchmark (CPU)",
        "",
        f"Command: `{command}`",
        "",
        "One step = forward + loss (1 - Dice + 2 Cox) + backward + Adam + EMA update; batch "
        f"{res['batch']}, input [B, 2, {', '.join(map(str, res['input_size_dhw']))}] (D, H, W), paper "
        f"widths, DAFT on, CT+PET FM projected to 256; {res['n_parameters']:,} parameters.",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| seconds per training step (mean) | {res['step_mean_s']:.2f} |",
        f"| seconds per training step (min) | {res['step_min_s']:.2f} |",
        f"| CPU time per training step, all threads (s) | {res['step_cpu_s']:.2f} |",
        f"| steps measured | {len(res['step_seconds'])} (+1 warm-up) |",
        f"| eval forward, batch 16 (s) | {res['eval_forward_batch16_s']:.2f} |",
        f"| peak RSS (MiB) | {res['peak_rss_mib']:.0f} |",
        "| projected protocol wall time, 5 folds x 100 epochs x 50 steps + "
        f"{res['val_batches_per_epoch']} val batches/epoch (h) | {res['projected_protocol_h']:.1f} |",
        "",
        "Wall times depend on other load on the machine (1-minute load average below); the CPU "
        "time per step is the steadier figure. The projection uses the mean wall time.",
        "",
        "Provenance:",
        "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in prov.items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("train_step.md"),
                        help="Markdown report (written atomically); '-' to skip")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run_benchmark(torch.device("cpu"), steps=args.steps)
    res["peak_rss_mib"] = peak_rss_mib()
    print(f"CPU, {args.threads} threads: {res['step_mean_s']:.2f} s/step (min {res['step_min_s']:.2f}, "
          f"CPU time {res['step_cpu_s']:.2f} s), "
          f"eval batch 16 {res['eval_forward_batch16_s']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
          f"projected protocol {res['projected_protocol_h']:.1f} h")
    if str(args.out) != "-":
        command = "python benchmarks/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        extra = {"threads": args.threads, "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
        with atomic_path(args.out) as tmp:
            tmp.write_text(render_markdown(res, command.strip(), extra))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
