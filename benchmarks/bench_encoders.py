"""Throughput and memory of the frozen CT-FM / PET-FM encoders, on the CPU or on CUDA.

For each encoder (PET-FM with both windowed-attention paths) and batch size, measures:

* cases/s of one batched fp32 forward of ``B`` cases under ``torch.inference_mode``;
* cases/s of the naive baseline: ``B`` separate fp32 single-case forwards;
* peak memory above the pre-call baseline: on the CPU the resident memory, sampled every
  2 ms from ``/proc/self/statm`` by a background thread (``getrusage`` maxrss is a lifetime
  peak and tracemalloc does not see torch's CPU allocator, so neither can isolate one call);
  on CUDA ``torch.cuda.max_memory_allocated`` above the resident weights;
* at full size, the max abs difference between the fast and the literal PET-FM path.

``--device cpu`` (the default) runs on ``--threads`` torch threads. ``--device cuda`` runs on
the current CUDA device in fp32 with TF32 off (the times bracketed by
``torch.cuda.synchronize``) and is refused, before any work, where
``torch.cuda.is_available()`` is false.

Models carry deterministic random weights (:func:`models.checkpoints.random_ct_fm` /
``random_pet_fm``); speed does not depend on weight values. Inputs: CT-FM
``[B, 1, 48, 128, 128]``, PET-FM ``[B, 1, 128, 128, 128]`` (D = slice axis first).

The results replace the block between the ``bench:begin``/``bench:end`` markers (CPU) or
the ``bench:cuda:begin``/``bench:cuda:end`` markers (CUDA) of ``benchmarks/encoders.md``
(written atomically); the rest of that file is kept.

Usage::

    python benchmarks/bench_encoders.py                 # CPU; batches 1, 2, 4; literal at 1
    python benchmarks/bench_encoders.py --threads 2 --literal-batches 1 2
    python benchmarks/bench_encoders.py --device cuda --batches 1 2 4 8 --repeats 3
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.checkpoints import random_ct_fm, random_pet_fm
from pipeline.artefacts import atomic_path, code_version, utc_now

#: The block of ``benchmarks/encoders.md`` each device's latest run replaces.
MARKERS = {
    "cpu": ("<!-- bench:begin -->", "<!-- bench:end -->"),
    "cuda": ("<!-- bench:cuda:begin -->", "<!-- bench:cuda:end -->"),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: peak RSS above the entry level, sampled by a background thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak_delta = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_delta = max(self.peak_delta, _rss_bytes() - self._base)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._base = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_delta = max(self.peak_delta, _rss_bytes() - self._base)


class PeakCUDA:
    """Context manager: peak CUDA memory allocated above the entry level."""

    def __enter__(self) -> PeakCUDA:
        torch.cuda.synchronize()
        self._base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.peak_delta = 0
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize()
        self.peak_delta = torch.cuda.max_memory_allocated() - self._base


def _timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, int]:
    """Best wall time over ``repeats`` calls and the peak memory delta (models are warmed up once)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    best = float("inf")
    with torch.inference_mode(), PeakCUDA() if cuda else PeakRSS() as mem:
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - start)
    return best, mem.peak_delta


def _bench(
    name: str, model: torch.nn.Module, shape: tuple[int, ...], batches: list[int], repeats: int, device: torch.device
) -> list[dict]:
    rows = []
    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection
        model(torch.rand(1, *shape).to(device))
    for batch in batches:
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device)
        t_batch, mem_batch = _timed(lambda x=x: model(x), repeats, device)
        t_loop, mem_loop = _timed(lambda x=x, n=batch: [model(x[i : i + 1]) for i in range(n)], repeats, device)
        rows.append(
            dict(
                encoder=name,
                batch=batch,
                batched=batch / t_batch,
                loop=batch / t_loop,
                mem_batch=mem_batch / 2**20,
                mem_loop=mem_loop / 2**20,
            )
        )
        print(
            f"{name:>22} B={batch}: batched {batch / t_batch:6.3f} cases/s, per-case loop "
            f"{batch / t_loop:6.3f} cases/s, peak +{mem_batch / 2**20:7.0f} MiB",
            flush=True,
        )
    return rows


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The device to measure on; ``cuda`` is refused, naming why, where CUDA is absent."""
    if name == "cuda":
        if not torch.cuda.is_available():
            parser.error(
                "--device cuda: CUDA is not available on this machine "
                "(torch.cuda.is_available() is false); run it on a CUDA host, or measure "
                "the CPU with --device cpu (the default)"
            )
        # "fp32" means fp32: without this, matmuls and convolutions may run in TF32 on Ampere+.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def _machine(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, fp32 with TF32 off"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, {threads} torch threads; "
        f"load average at end {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
        "(shared machine: absolute numbers are noisy)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the encoders run (default cpu; cuda is refused without CUDA)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--literal-batches", type=int, nargs="+", default=[1], help="batch sizes for the slow literal PET-FM path"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("encoders.md"))
    args = parser.parse_args()
    device = _device(parser, args.device)
    torch.set_num_threads(args.threads)

    ct = random_ct_fm(0).to(device)
    rows = _bench("CT-FM", ct, (1, 48, 128, 128), args.batches, args.repeats, device)
    del ct
    if device.type == "cuda":
        torch.cuda.empty_cache()
    pet = random_pet_fm(0).to(device)
    rows += _bench("PET-FM fast", pet, (1, 128, 128, 128), args.batches, args.repeats, device)
    pet.set_fast_windowed(False)
    rows += _bench("PET-FM literal", pet, (1, 128, 128, 128), args.literal_batches, 1, device)

    x = torch.rand(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(99)).to(device)
    with torch.inference_mode():
        literal = pet(x)
        pet.set_fast_windowed(True)
        fast = pet(x)
    diff = (fast - literal).abs().max().item()
    scale = literal.abs().max().item()
    print(f"PET-FM fast vs literal, full size: max abs diff {diff:.2e} (embedding max |x| {scale:.2f})")

    fast_1 = next(r for r in rows if r["encoder"] == "PET-FM fast" and r["batch"] == 1)
    lit_1 = next((r for r in rows if r["encoder"] == "PET-FM literal" and r["batch"] == 1), None)
    begin, end = MARKERS[device.type]
    cuda = device.type == "cuda"
    memory = "peak +CUDA memory" if cuda else "peak +RSS"
    device_option = "--device cuda " if cuda else ""
    lines = [
        begin,
        f"## {'CUDA' if cuda else 'CPU'} benchmark (latest run)",
        "",
        f"- command: `python benchmarks/bench_encoders.py {device_option}--threads {args.threads} --batches "
        f"{' '.join(map(str, args.batches))} --literal-batches {' '.join(map(str, args.literal_batches))} "
        f"--repeats {args.repeats}`",
        f"- when: {utc_now()}; code {code_version()}; torch {torch.__version__}; {_machine(device, args.threads)}",
        "- fp32, `torch.inference_mode`, random weights; best of the repeats after one single-case warm-up per model.",
        (
            "- memory = `torch.cuda.max_memory_allocated` above the level before the call."
            if cuda
            else "- memory = peak RSS above the level before the call, sampled every 2 ms from /proc/self/statm."
        ),
        "",
        f"| encoder | batch | batched cases/s | per-case loop cases/s | batched / loop | {memory} batched (MiB) "
        f"| {memory} loop (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['batch']} | {r['batched']:.3f} | {r['loop']:.3f} | "
            f"{r['batched'] / r['loop']:.2f} | {r['mem_batch']:.0f} | {r['mem_loop']:.0f} |"
        )
    lines += [
        "",
        f"- PET-FM fast vs literal at full size (1 case): max abs diff {diff:.2e} "
        f"on embeddings of max |x| {scale:.2f}.",
    ]
    if lit_1 is not None:
        lines.append(f"- PET-FM fast / literal speed at batch 1: {fast_1['batched'] / lit_1['batched']:.1f}x.")
    lines.append(end)
    block = "\n".join(lines)

    old = args.out.read_text() if args.out.is_file() else "# Encoder benchmarks\n\n" + begin + "\n" + end + "\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with atomic_path(args.out) as tmp:
        tmp.write_text(new)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
