"""Time the ridge-Cox and elastic-net Cox heads on a radiomics-sized feature table.

Builds a synthetic table of the real radiomics table's shape (488 cases x 428 correlated
features from 20 latent factors; the log-hazard depends on two of the factors, ~20 % events),
makes 5 stratified folds and fits both heads of :func:`pipeline.peers.run_head` on them with
their penalty chosen by inner CV on each training fold (ridge: 9 penalties; elastic net:
scikit-survival Coxnet, l1_ratio 0.1, 30 penalties; 3 inner folds each). Prints the wall
time, the mean C-index over folds and the chosen penalties of each head.

``--reference`` also runs the ridge head with scikit-survival's ``CoxPHSurvivalAnalysis``
(the implementation the Newton solver replaced; several minutes) and prints how far its
C-indices are from the Newton solver's.

Usage::

    python benchmarks/bench_peers.py                   # both heads, ~10-20 s on 2 cores
    python benchmarks/bench_peers.py --reference   # + the scikit-survival ridge, minutes
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import argparse
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import cox, peers
from pipeline.metrics import c_index
from pipeline.splits import make_folds


def synthetic_table(n: int, p: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Correlated features ``[n, p]`` (20 latent factors + noise) and survival with a planted signal."""
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(n, 20))
    x = factors @ rng.normal(size=(20, p)) + rng.normal(scale=1.0, size=(n, p))
    x = x * rng.lognormal(sigma=1.0, size=p) + rng.normal(scale=5.0, size=p)  # feature scales differ
    log_hazard = 0.6 * factors[:, 0] - 0.4 * factors[:, 1]
    t_event = rng.exponential(6000.0 * np.exp(-log_hazard))
    t_cens = rng.uniform(300.0, 2500.0, size=n)
    ids = pd.Index([f"SYN-{i:04d}" for i in range(n)], name="case_id")
    table = pd.DataFrame(x, index=ids, columns=[f"f{j:03d}" for j in range(p)])
    survival = pd.DataFrame(
        {"time": np.maximum(np.round(np.minimum(t_event, t_cens)), 1.0), "event": (t_event <= t_cens).astype(int)},
        index=ids,
    )
    return table, survival


def run(model: str, table: pd.DataFrame, survival: pd.DataFrame, folds: pd.DataFrame) -> dict:
    cfg = peers.HeadConfig(model=model, with_clinical=False)
    t0 = time.perf_counter()
    res = peers.run_head(survival, folds, blocks={"radiomics": table}, config=cfg)
    seconds = time.perf_counter() - t0
    per_fold = [
        c_index(g.time.to_numpy(), g.event.to_numpy(), g.risk.to_numpy())
        for _, g in res.oof.sort_values("fold").groupby("fold")
    ]
    return {"seconds": seconds, "c_index": per_fold, "alpha": [r["alpha"] for r in res.per_fold]}


class _SksurvRidge:
    """The ridge fits as before the Newton solver: one CoxPHSurvivalAnalysis per penalty."""

    def __call__(self, x, time, event, alphas):
        from sksurv.linear_model import CoxPHSurvivalAnalysis

        out = []
        for a in alphas:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = CoxPHSurvivalAnalysis(alpha=a, ties="breslow").fit(x, cox.surv_target(time, event))
            out.append(cox.RidgeCox(m.coef_, float(a), -1, True))
        return out


def fmt(name: str, r: dict) -> str:
    cs = ", ".join(f"{c:.4f}" for c in r["c_index"])
    alphas = ", ".join(f"{a:g}" for a in r["alpha"])
    return f"| {name} | {r['seconds']:.1f} | {np.mean(r['c_index']):.4f} | {cs} | {alphas} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=488)
    parser.add_argument("--features", type=int, default=428)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also time the ridge head on scikit-survival's CoxPHSurvivalAnalysis (minutes)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the printed report here")
    args = parser.parse_args()

    table, survival = synthetic_table(args.cases, args.features, args.seed)
    folds = make_folds(
        list(table.index), survival["time"].to_numpy(), survival["event"].to_numpy(), n_splits=args.folds, seed=42
    )
    results = {
        "coxnet (elastic net)": run("coxnet", table, survival, folds),
        "ridge (Newton)": run("ridge", table, survival, folds),
    }
    if args.reference:
        newton = cox.ridge_cox_path
        cox.ridge_cox_path = _SksurvRidge()
        try:
            results["ridge (sksurv CoxPHSurvivalAnalysis)"] = run("ridge", table, survival, folds)
        finally:
            cox.ridge_cox_path = newton

    lines = [
        f"Synthetic table {args.cases} cases x {args.features} features, "
        f"{int(survival['event'].sum())} events, {args.folds} folds (seed {args.seed}); "
        f"penalty by 3-fold inner CV on each training fold.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} "
        f"at the end, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}.",
        "",
        "| head | wall s | mean C-index | C-index per fold | chosen penalty per fold |",
        "| --- | ---: | ---: | --- | --- |",
        *(fmt(name, r) for name, r in results.items()),
        "",
    ]
    ridge, coxnet = results["ridge (Newton)"], results["coxnet (elastic net)"]
    lines.append(f"ridge / elastic-net wall time: {ridge['seconds'] / coxnet['seconds']:.2f}x")
    ref = results.get("ridge (sksurv CoxPHSurvivalAnalysis)")
    if ref is not None:
        diff = np.max(np.abs(np.asarray(ref["c_index"]) - np.asarray(ridge["c_index"])))
        lines.append(
            f"Newton vs sksurv ridge: {ref['seconds'] / ridge['seconds']:.0f}x faster, "
            f"largest per-fold C-index difference {diff:.2e}, same penalties: "
            f"{ref['alpha'] == ridge['alpha']}"
        )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
