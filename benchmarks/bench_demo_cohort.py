"""Time synthetic-cohort generation and manifest building.

Prints wall time and CPU time (this process plus its worker processes, from
``resource.getrusage``) for :func:`pipeline.demo_cohort.generate_demo_cohort` and for
:func:`pipeline.hecktor.build_manifest` on the result. CPU time is the figure to compare on
a shared machine: wall time there depends on what else runs.

Usage::

    python benchmarks/bench_demo_cohort.py                      # 100 cases, 2 workers
    python benchmarks/bench_demo_cohort.py --n-cases 8 --workers 1 --spacing-scale 2
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spacing-scale", type=float, default=1.0)
    args = parser.parse_args()

    from pipeline.demo_cohort import generate_demo_cohort, oracle_c_index
    from pipeline.hecktor import build_manifest

    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu()
        root = generate_demo_cohort(
            Path(tmp) / "cohort",
            n_cases=args.n_cases,
            seed=args.seed,
            workers=args.workers,
            spacing_scale=args.spacing_scale,
        )
        t1, c1 = time.perf_counter(), _cpu()
        manifest = build_manifest(root, Path(tmp) / "m.csv", workers=args.workers, progress=False)
        t2, c2 = time.perf_counter(), _cpu()
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(
            f"cpus={os.cpu_count()} load1={os.getloadavg()[0]:.1f} n={args.n_cases} "
            f"workers={args.workers} spacing_scale={args.spacing_scale:g}"
        )
        print(
            f"generate: wall {t1 - t0:.1f} s, cpu {c1 - c0:.1f} s "
            f"({(c1 - c0) / args.n_cases:.2f} cpu-s/case), {size / 2**20:.0f} MiB"
        )
        print(f"build_manifest (sha256 + label scan): wall {t2 - t1:.1f} s, cpu {c2 - c1:.1f} s")
        print(
            f"events {int(manifest['relapse'].fillna(0).sum())}/{int(manifest['has_endpoint'].sum())}, "
            f"oracle C-index {oracle_c_index(root):.3f}"
        )


if __name__ == "__main__":
    main()
