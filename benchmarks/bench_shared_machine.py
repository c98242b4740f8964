"""Speed as the user meets it: alone, beside a busy neighbour, and two jobs side by side.

Runs each workload as a user types it, in a default shell (this script sets no thread
variable; the commands choose their own threads), and prints wall times and ratios:

* a demo fold: ``train-survival --fold 0`` on the demo cache (``make demo`` leaves it);
* the ridge head: :func:`pipeline.peers.run_head` on a 488 x 428 table
  (``benchmarks/bench_peers.py``'s synthetic radiomics-sized table), in its own process;
* CT embeddings: ``extract-embeddings --modality ct --random-init`` on the demo cache (100
  cases, on the usable CPUs, its default);

each (a) alone, (b) beside one CPU-bound process (``python3 -c "while True: pass"``), and for
the fold (c) two of them side by side. Aims (2 cores): (b) and (c) at most 1.3x (a) for the
fold and the head; the extraction uses both cores alone, so beside a busy process it can at
best keep one (2x).

Usage::

    make demo                                   # once: the demo cache and embeddings
    python benchmarks/bench_shared_machine.py   # ~2 min on 2 cores
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RIDGE = (
    "import sys; sys.path.insert(0, 'benchmarks'); import bench_peers as b; from pipeline.splits import make_folds; "
    "t, s = b.synthetic_table(488, 428, 0); "
    "f = make_folds(list(t.index), s['time'].to_numpy(), s['event'].to_numpy(), n_splits=5, seed=42); "
    "b.run('ridge', t, s, f)"
)


def fold_command(out: Path) -> list[str]:
    return [str(BIN / "train-survival"), "--fold", "0", "--out", str(out), "--quiet"]


def extract_command(out: Path) -> list[str]:
    return [str(BIN / "extract-embeddings"), "--modality", "ct", "--random-init", "--out", str(out / "ct.h5")]


def ridge_command(_: Path) -> list[str]:
    return [sys.executable, "-c", RIDGE]


def timed(commands: list[list[str]]) -> float:
    """Wall seconds until every command (started together) has finished; each must succeed."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(c, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    for p, c in zip(procs, commands):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(c)} failed:\n{err}")
    return time.perf_counter() - t0


def beside_busy(command: list[str]) -> float:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return timed([command])
    finally:
        busy.kill()
        busy.wait()


def measure(name: str, make, work: Path, pair: bool) -> list[str]:
    alone = timed([make(work / f"{name}-a")])
    busy = beside_busy(make(work / f"{name}-b"))
    rows = [
        f"| {name} | alone | {alone:.1f} | 1.00x |",
        f"| {name} | beside one CPU-bound process | {busy:.1f} | {busy / alone:.2f}x |",
    ]
    if pair:
        two = timed([make(work / f"{name}-c1"), make(work / f"{name}-c2")])
        rows.append(f"| {name} | two side by side (both finished) | {two:.1f} | {two / alone:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-fold", action="store_true", help="only the ridge head (no demo cache needed)")
    args = parser.parse_args()
    if not args.skip_fold and not (REPO / "cache/preprocessed/cohort.json").is_file():
        raise SystemExit("no demo cache at cache/preprocessed: run `make demo` first (or pass --skip-fold)")
    rows = ["| workload | condition | wall s | vs alone |", "| --- | --- | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_fold:
            timed([fold_command(work / "warm")])  # first run pays one-off file-cache warm-up
            rows += measure("demo fold (train-survival --fold 0)", fold_command, work, pair=True)
        rows += measure("ridge head, 488 x 428", ridge_command, work, pair=False)
        if not args.skip_fold:
            rows += measure("CT embeddings (extract-embeddings --modality ct)", extract_command, work, pair=False)
    print(
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average before {os.getloadavg()[0]:.1f}"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
