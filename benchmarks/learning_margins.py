"""The learning tests' margins on cohorts of other seeds: how far each test is from failing.

Runs ``tests/test_learning.py``'s two measurements (image only, planted embedding), each with
its negative control, on a 60-case cohort generated with each seed, and prints every figure
beside the threshold the test asserts. Seed 3 is the tests' own cohort.

Usage::

    python benchmarks/learning_margins.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_learning import image_only_margins, make_cohort60, planted_margins  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in the tests
    print(
        "| seed | image: C | control C | C margin (> 0.15) | rho (> 0.4) | planted: C | noise C "
        "| C margin (> 0.1) | rho (> 0.5) | rho margin (> 0.3) | seconds |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for seed in args.seeds:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"margins{seed}_") as tmp:
            base = Path(tmp)
            cohort = make_cohort60(base / "cohort", seed)
            (base / "image").mkdir()
            (base / "planted").mkdir()
            im = image_only_margins(cohort, base / "image")
            pl = planted_margins(cohort, base / "planted")
        print(
            f"| {seed} | {im['c']:.3f} | {im['c_control']:.3f} | {im['c'] - im['c_control']:.3f} | "
            f"{im['rho']:.3f} | {pl['c']:.3f} | {pl['c_control']:.3f} | {pl['c'] - pl['c_control']:.3f} | "
            f"{pl['rho']:.3f} | {pl['rho'] - pl['rho_control']:.3f} | {time.perf_counter() - t0:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
