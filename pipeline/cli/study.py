"""``run-study``: the whole study in one command (cohort -> cache -> embeddings -> grid -> report)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from pipeline.artefacts import ProvenanceError, read_json
from pipeline.cli.options import encoder_weights_options, train_scalar_options, train_scalars, weights_lookup_help
from pipeline.demo import demo_study_options, prepare_inputs
from pipeline.embedding_sets import full_set
from pipeline.pool import format_progress
from pipeline.study_spec import StudySpec, cell_status, configurations, format_status, load_study, peer_status

#: The TrainConfig fields run-study sets from options (for every configuration).
STUDY_TRAIN_SCALARS = (
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "eval_batch_size",
    "gpu_eval_batch_size",
    "train_c_every",
    "lr",
    "ema_decay",
    "patience",
    "inner_val_fraction",
    "seed",
    "split_seed",
    "threads",
    "precision",
    "step_mode",
)


def _default_embeddings() -> str:
    """The embeddings of the set reading every encoder, where ``extract-embeddings`` writes them."""
    return f"embeddings/{full_set()}.h5"


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100})
@click.option(
    "--demo",
    is_flag=True,
    help="Reduced end-to-end study on the synthetic demo cohort (regenerated from the committed "
    "data_manifest.csv when absent), random-init encoders unless weights are given; CNN on "
    "repeat 0, peers and heads on 3 repeats + LOCO; a few minutes on 2 CPU cores (measured: "
    "docs/benchmarks.md).",
)
@click.option(
    "--manifest",
    default="data_manifest.csv",
    type=click.Path(dir_okay=False),
    help="Case manifest (`build-manifest`); with --demo, the committed demo manifest.",
)
@click.option(
    "--cache",
    "cache_root",
    default=None,
    type=click.Path(file_okay=False),
    help="Preprocessed cache; made (or completed) when needed [default: cache/preprocessed, the demo's too].",
)
@click.option(
    "--embeddings",
    default=None,
    type=click.Path(dir_okay=False),
    help=f"Embeddings HDF5 of the set reading every encoder ({full_set()}); extracted when needed "
    f"[default: {_default_embeddings()}, the demo's too].",
)
@encoder_weights_options(weights_lookup_help)
@click.option(
    "--random-init",
    is_flag=True,
    help="Randomly initialised encoders instead of weights (implied by --demo without weights). "
    "Stated loudly in the output and the report.",
)
@click.option(
    "--out",
    "study_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Study folder (cells, folds, provenance) [default: runs/study, demo: runs/demo_study].",
)
@click.option(
    "--report-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Report folder [default: reports/study, demo: reports/demo].",
)
@click.option(
    "--configs", default=None, help="Comma list of configurations to run (default: all 13), e.g. 'baseline,ctpet-d256'."
)
@click.option("--n-folds", default=5, type=click.IntRange(min=2), help="Outer CV folds (shared by all configurations).")
@click.option("--folds-seed", default=42, type=int, help="Seed of the shared folds (repeat r uses seed + r).")
@click.option(
    "--repeats",
    default=None,
    type=click.IntRange(min=1),
    help="Repeated CV: R x n-folds, each repeat its own shared folds file and cells [default 1, demo 3].",
)
@click.option(
    "--loco/--no-loco",
    default=None,
    help="Add leave-one-centre-out (one fold per centre, its own cells) [default off, demo on].",
)
@click.option(
    "--cnn-splits",
    type=click.Choice(["all", "first"]),
    default=None,
    help="Train the CNN grid on every split (all) or only on repeat 0 (first; peers and heads "
    "still run on every split) [default all, demo first].",
)
@click.option(
    "--seeds",
    default=None,
    type=click.IntRange(min=1),
    help="Training seeds per configuration on the first split (cv0): seed s trains with --seed + s on "
    "the same folds and inner split, so the spread is training noise alone; s >= 1 in "
    "<out>/seeds/<s>/ [default 1, demo 3].",
)
@click.option(
    "--seed-configs",
    default=None,
    help="Comma list of the configurations trained with every --seeds seed, e.g. 'baseline' "
    "[default: all configurations of the study; demo: baseline].",
)
@click.option(
    "--peers",
    "peer_families",
    default=None,
    help="Comma list of classical peers fitted on the same folds: clinical, radiomics, heads "
    "(one embedding head per FM configuration), or 'none' [default: all three].",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "submitit"]),
    default="local",
    help="local = process pool on this machine; submitit = one array job (Slurm, or --cluster local).",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=1),
    help="Local pool size (cells, then peers); each worker is pinned round-robin to one GPU when "
    "GPUs are present [default: GPUs x --cells-per-gpu with GPUs; else 1, demo 2].",
)
@click.option(
    "--cells-per-gpu",
    default=None,
    type=click.IntRange(min=1),
    help="Local executor with GPUs: cells each GPU trains side by side, one group per GPU [default 4, "
    "fewer where a GPU's free memory holds fewer 8 GiB cells].",
)
@click.option(
    "--cluster",
    type=click.Choice(["auto", "slurm", "local", "debug"]),
    default="auto",
    help="submitit cluster: auto = Slurm when sbatch exists.",
)
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time", "time_min", default=120, type=click.IntRange(min=1), help="Slurm time limit per cell, minutes.")
@click.option("--gpus-per-node", default=1, type=click.IntRange(min=0), help="GPUs per cell (Slurm).")
@click.option("--mem", "mem_gb", default=32, type=click.IntRange(min=1), help="Memory per cell, GB (Slurm).")
@click.option("--cpus", default=4, type=click.IntRange(min=1), help="CPU cores per cell (Slurm).")
@click.option("--array-parallelism", default=65, type=click.IntRange(min=1), help="Most array tasks at once (Slurm).")
@click.option(
    "--no-wait",
    is_flag=True,
    help="submitit: return after submission; rerun the same command later to build the report.",
)
@click.option(
    "--train-config",
    "train_config_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="JSON of TrainConfig options for every configuration (replaces the paper/demo defaults).",
)
@train_scalar_options(STUDY_TRAIN_SCALARS)
@click.option("--model-config", default=None, help="JSON of DeepMTSConfig overrides (e.g. narrow widths).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help=(
        "Device for the embedding extraction and the training (default: the training "
        "config's, auto). The encoders' precision follows it: fp32 on cpu, bf16 autocast on cuda."
    ),
)
@click.option(
    "--prep-workers", default=2, type=click.IntRange(min=1), help="Processes for cohort generation and preprocessing."
)
@click.option("--dry-run", is_flag=True, help="List the cells and which are done; run nothing.")
@click.option("--report-only", is_flag=True, help="Rebuild the report from the finished cells; train nothing.")
def run_study(
    demo,
    manifest,
    cache_root,
    embeddings,
    random_init,
    study_dir,
    report_dir,
    configs,
    n_folds,
    folds_seed,
    repeats,
    loco,
    cnn_splits,
    seeds,
    seed_configs,
    peer_families,
    executor,
    workers,
    cells_per_gpu,
    cluster,
    partition,
    time_min,
    gpus_per_node,
    mem_gb,
    cpus,
    array_parallelism,
    no_wait,
    train_config_file,
    model_config,
    device,
    prep_workers,
    dry_run,
    report_only,
    **options,
):
    """Run the projection ablation (baseline + {CT, PET, CT+PET} x d in {64, 128, 256, orig},
    5 folds = 65 cells) with classical peers on the same folds, and write the report (Table 1,
    Figures 2-7, both selection protocols, repeated-CV intervals, paired comparisons, LOCO,
    IBS / calibration / Kaplan-Meier).

    Every cell and peer run is resumable: rerunning skips finished ones. Examples:

    \b
      run-study --demo                                   # needs a few minutes: the whole demo (= make demo)
      run-study ... --repeats 3 --loco                   # 3 x 5-fold CV + leave-one-centre-out
      run-study ... --seeds 3 --seed-configs baseline    # training noise: the baseline with 3 seeds
      run-study --manifest hecktor.csv --ct-weights ct.safetensors --pet-weights pet.pth  # needs HECKTOR data, weights
      run-study ... --executor submitit --partition gpu --time 90 --gpus-per-node 1
      run-study --out runs/study --dry-run               # which cells are done
      run-study --out runs/study --report-only           # needs a study folder: report from what is finished
    """
    t_start = time.perf_counter()
    overrides = {k: v for k, v in options.items() if k in STUDY_TRAIN_SCALARS}
    weights = {k: v for k, v in options.items() if k not in STUDY_TRAIN_SCALARS}  # --<encoder>-weights
    extra = _study_extra(demo, repeats, loco, cnn_splits, peer_families, seeds, seed_configs)
    study_dir = Path(study_dir or ("runs/demo_study" if demo else "runs/study"))
    report_dir = Path(report_dir or ("reports/demo" if demo else "reports/study"))
    try:
        spec_options = (
            demo,
            manifest,
            cache_root,
            embeddings,
            study_dir,
            configs,
            n_folds,
            folds_seed,
            train_config_file,
            model_config,
            device,
            overrides,
            extra,
        )  # for _build_spec
        if dry_run or report_only:
            if (study_dir / "study.json").is_file():
                spec, _ = load_study(study_dir)
            else:
                spec = _build_spec(*spec_options)
            if dry_run:
                click.echo(format_status(cell_status(spec), peer_status(spec)))
                return
            _report(study_dir, report_dir, t_start, demo)
            return

        slurm = _slurm_options(partition, time_min, gpus_per_node, mem_gb, cpus, array_parallelism)
        from pipeline.study import study_gpus  # local: torch, as in _slurm_options

        spec = _build_spec(*spec_options)
        if workers is None and not study_gpus(spec):  # with GPUs, run_local sizes the pool per GPU
            workers = 2 if demo else 1
        info = prepare_inputs(
            spec, demo=demo, random_init=random_init, workers=prep_workers, say=_say, device=device or "auto", **weights
        )
        outcome = _run_grid(spec, info, executor, (workers, cells_per_gpu), cluster, no_wait, slurm)
        _report(study_dir, report_dir, t_start, demo and outcome.ok)
        if not outcome.ok:
            click.secho(f"resume with: {resume_command()}", fg="red", err=True)
            sys.exit(1)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ProvenanceError) as exc:
        _exit_with_error(exc, demo)


def _study_extra(demo, repeats, loco, cnn_splits, peer_families, seeds, seed_configs) -> dict[str, Any]:
    """The :class:`StudySpec` settings beyond the paths, folds and training: the options as
    given, else the demo preset's (with ``demo``), else the full study's defaults."""
    preset = demo_study_options() if demo else {}
    return {
        "repeats": repeats or preset.get("repeats", 1),
        "loco": loco if loco is not None else preset.get("loco", False),
        "cnn_extra_splits": cnn_splits == "all" if cnn_splits else preset.get("cnn_extra_splits", True),
        "peers": tuple(p for p in (_csv(peer_families) or ["clinical", "radiomics", "heads"]) if p != "none"),
        "head": preset.get("head", {}),
        "seeds": seeds or preset.get("seeds", 1),
        "seed_configs": _seed_configs(seed_configs, preset.get("seed_configs")),
    }


def _slurm_options(partition, time_min, gpus_per_node, mem_gb, cpus, array_parallelism):
    """The resources of each Slurm array task, from the ``--partition`` ... ``--array-parallelism`` options."""
    # local: pipeline.study (torch, submitit, the peers) is slow to import; --help and --dry-run stay fast
    from pipeline.study import SlurmOptions

    return SlurmOptions(
        partition=partition,
        time_min=time_min,
        gpus_per_node=gpus_per_node,
        mem_gb=mem_gb,
        cpus_per_task=cpus,
        array_parallelism=array_parallelism,
    )


def _exit_with_error(exc: Exception, demo: bool) -> NoReturn:
    """Print ``exc`` as ``error: ...`` (a KeyError's bare message; for the demo's outputs from
    another version, how to remove them) in red on stderr, and exit with status 1."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    if demo and isinstance(exc, ProvenanceError):  # the demo's own outputs, from another version
        msg = f"{msg}\nThe demo's outputs were made with other settings or code: `make clean-demo` removes them."
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(1)


def _seed_configs(option: str | None, preset: Any) -> tuple[str, ...] | None:
    """``--seed-configs``: the given names, else the preset's, else None (every configuration)."""
    names = _csv(option) if option else preset
    return None if names is None else tuple(names)


def _build_spec(
    demo,
    manifest,
    cache_root,
    embeddings,
    study_dir,
    configs,
    n_folds,
    folds_seed,
    train_config_file,
    model_config,
    device,
    overrides,
    extra,
):
    train = demo_study_options()["train"] if demo else {}
    if train_config_file:
        train = json.loads(Path(train_config_file).read_text())
    train.update(train_scalars(overrides))
    if model_config:
        train["model"] = json.loads(model_config)
    if device:
        train["device"] = device
    names = tuple(_csv(configs) or [c.name for c in configurations()])
    # The demo writes where the stage commands look by default, so they run on its outputs as typed.
    cache_root = cache_root or "cache/preprocessed"
    embeddings = embeddings or _default_embeddings()
    needs_fm = any(n != "baseline" for n in names)
    return StudySpec.create(
        manifest,
        cache_root,
        embeddings if needs_fm else None,
        study_dir,
        n_folds=n_folds,
        folds_seed=folds_seed,
        train=train,
        configs=names,
        **extra,
    )


def _step(msg: str) -> float:
    _say("step", msg)
    return time.perf_counter()


def _done(t0: float) -> None:
    _say("line", f"({time.perf_counter() - t0:.0f} s)")


def _say(kind: str, text: str) -> None:
    """Print a message of :func:`pipeline.demo.prepare_inputs`."""
    if kind == "step":
        click.secho(f"==> {text}", bold=True)
    elif kind == "warning":
        click.secho(f"WARNING: {text}", fg="red", bold=True, err=True)
    else:
        click.echo(f"    {text}")


def _run_grid(spec, info, executor, pool, cluster, no_wait, slurm):
    """Peers, then the CNN grid; one progress line per finished cell, peers in quarters.
    ``pool`` = ``(workers, cells_per_gpu)``; workers None = one group of cells per GPU."""
    from pipeline.study import DEFAULT_CELLS_PER_GPU, run_study  # local: as in run_study

    workers, per_gpu = pool
    per_gpu_text = per_gpu or f"up to {DEFAULT_CELLS_PER_GPU}"

    status = cell_status(spec)
    n_total, n_before = len(status), int(status["done"].sum())
    t0 = _step(
        f"peers: {len(spec.peer_list())} on {len(spec.splits())} split(s) ({', '.join(spec.splits())}), "
        f"then grid: {n_total} CNN cells ({n_before} already done) via {executor}"
        + (
            (f", {workers} worker(s)" if workers else f", {per_gpu_text} cell(s) per GPU")
            if executor == "local"
            else ""
        )
    )

    def peer(res):
        if "error" in res:
            click.secho(f"    peer {res['key']}: FAILED {res['error']}", fg="red", err=True)
        p = res.get("progress")
        if p and (p["done"] == p["total"] or p["done"] % max(1, p["total"] // 4) == 0):
            click.echo(f"    peer runs {format_progress(p)}")

    def report(res):
        p = res["progress"]
        head = f"    [{n_before + p['done']}/{n_total}] {res['cell']:<22}"
        if "error" in res:
            click.secho(f"{head} FAILED {res['error']}", fg="red", err=True)
            return
        parts = " ".join(f"{k}: C={_f(r.get('c_index'))}" for k, r in res["record"]["protocols"].items())
        click.echo(f"{head} {res['seconds']:6.1f} s  {parts}  ({format_progress(p)})")

    # announce=False: prepare_inputs stated random-init embeddings once, before extraction.
    outcome = run_study(
        spec,
        executor=executor,
        workers=workers,
        cells_per_gpu=per_gpu,
        slurm=slurm,
        cluster=None if cluster == "auto" else cluster,
        wait=not no_wait,
        info=info,
        on_result=report,
        on_peer=peer,
        announce=False,
    )
    if outcome.job_ids:
        click.echo(f"    submitted array job {outcome.job_ids[0].split('_')[0]} ({len(outcome.job_ids)} tasks)")
    for key, err in outcome.failed.items():
        if executor != "local" and key.startswith("peers:"):
            click.secho(f"    {key}: FAILED {err}", fg="red", err=True)
    for key, holder in outcome.waited.items():
        click.echo(f"    {key}: waited for {holder}, which held it")
    if outcome.cancelled:
        click.secho(
            f"    cancelled (their Slurm tasks ended without a result): {', '.join(outcome.cancelled)}",
            fg="red",
            err=True,
        )
    for key, log in outcome.logs.items():
        click.secho(f"    {key}: log {log}", err=True)
    click.echo(f"    ran {len(outcome.ran)}, skipped {len(outcome.skipped)}, failed {len(outcome.failed)}")
    _done(t0)
    if outcome.failed:
        click.secho(
            f"{len(outcome.failed)} cell(s) failed; the report shows them as pending. Rerun to retry.",
            fg="red",
            err=True,
        )
    return outcome


def resume_command() -> str:
    """The command line of this run, to type again: it skips what is done and runs the rest."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _f(x) -> str:
    return "undef" if x is None else f"{x:.3f}"


def _report(study_dir: Path, report_dir: Path, t_start: float, check: bool = False) -> None:
    """Write the report, then print its headline numbers, the demo's comparison with its
    committed reference (``check``: a finished demo, :mod:`pipeline.demo_check`) and, last,
    the report's path."""
    # local: the report modules load the study's and matplotlib's; --help stays fast
    from pipeline.demo_check import check_demo
    from pipeline.report import write_report
    from pipeline.report.render import headline_text

    t0 = _step(f"report into {report_dir}")
    path = write_report(study_dir, report_dir)
    _done(t0)
    click.echo(headline_text(read_json(path.parent / "results.json")))
    if check:
        click.echo(check_demo(study_dir, report_dir))
    click.echo(f"total {time.perf_counter() - t_start:.0f} s")
    click.echo(f"report: {path}")


if __name__ == "__main__":  # python -m pipeline.cli.study
    run_study()
