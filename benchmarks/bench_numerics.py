"""What portable numerics cost: the same workloads with ``HNFM_NUMERICS=native`` (each library
picks its kernels for this CPU) and ``portable`` (the AVX2 pins of :mod:`pipeline.numerics`).

Each workload runs as a user runs it, a command in its own process, alternating the modes
``--repeats`` times; the table gives the median wall time of each mode and their ratio:

* demo fold: ``train-survival --fold 0`` on the demo cache (the demo's preset, one thread);
* paper step: ``bench_cell.py --size paper``'s floor, the paper's network at 48 x 80 x 80,
  batch 8 (seconds per step, as that script prints them);
* demo embeddings: ``extract-embeddings --modality ctpet --random-init`` on the demo cache,
  at the default threads (the usable CPUs).

Needs the demo cache (``make demo``, or steps 1-2 of docs/pipeline.md, Stages by hand). Usage::

    python benchmarks/bench_numerics.py [--repeats 3] [--skip paper]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODES = ("native", "portable")


def _run(cmd: list[str], mode: str) -> tuple[float, str]:
    env = {**os.environ, "HNFM_NUMERICS": mode}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} ({mode}) failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return seconds, res.stdout + res.stderr


def demo_fold(mode: str, work: Path) -> float:
    out = work / f"fold-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    seconds, _ = _run(
        [str(BIN / "train-survival"), "--fold", "0", "--out", str(out), "--folds", str(work / "folds.json"), "--quiet"],
        mode,
    )
    return seconds


def paper_step(mode: str, work: Path) -> float:
    _, text = _run([sys.executable, "benchmarks/bench_cell.py", "--size", "paper", "--steps", "2"], mode)
    found = re.search(r"floor ([0-9.]+) s/step", text)
    if not found:
        raise SystemExit(f"no floor in bench_cell.py's output:\n{text}")
    return float(found.group(1))


def demo_embeddings(mode: str, work: Path) -> float:
    out = work / f"emb-{mode}.h5"
    shutil.rmtree(work / ".shards", ignore_errors=True)
    out.unlink(missing_ok=True)
    seconds, _ = _run(
        [str(BIN / "extract-embeddings"), "--modality", "ctpet", "--random-init", "--out", str(out), "--no-progress"],
        mode,
    )
    return seconds


WORKLOADS = {"demo fold (s)": demo_fold, "paper step (s/step)": paper_step, "demo embeddings (s)": demo_embeddings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode and workload (alternating)")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["fold", "paper", "embeddings"], help="workloads to leave out"
    )
    args = ap.parse_args()
    skip = {"fold": "demo fold (s)", "paper": "paper step (s/step)", "embeddings": "demo embeddings (s)"}
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; median of {args.repeats} runs per mode")
    print("| workload | native | portable | portable / native |")
    print("| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="bench_numerics_") as tmp:
        for name, fn in WORKLOADS.items():
            if name in {skip[s] for s in args.skip}:
                continue
            times: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.repeats):
                for mode in MODES:
                    times[mode].append(fn(mode, Path(tmp)))
            med = {m: statistics.median(v) for m, v in times.items()}
            print(
                f"| {name} | {med['native']:.2f} | {med['portable']:.2f} | {med['portable'] / med['native']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
