"""Helpers shared by several test modules: one home, imported as ``helpers`` (pytest puts
``tests/`` on ``sys.path``, as for any test module). A helper that one module alone uses stays
in that module; helpers that benchmarks use as well live in ``pipeline/`` (a benchmark does
not import from ``tests/``).
"""

from __future__ import annotations

import json
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from pipeline import study_spec
from pipeline.artefacts import params_hash, write_json_atomic
from pipeline.cache import GridGeometry, PreprocessedCache, write_case, write_cohort_record
from pipeline.embedding_sets import embedding_set
from pipeline.layout import PEER_FILE
from pipeline.manifest import MANIFEST_COLUMNS, write_manifest
from pipeline.preprocess import PreprocessParams
from pipeline.splits import leave_one_centre_out, make_folds, save_folds

F = TypeVar("F", bound=Callable)


# --- the `slow` marker's guard -----------------------------------------------------------------


def expensive(fixture_function: F) -> F:
    """Declare a fixture expensive (it builds a cohort and cache, trains, or runs a study or
    subprocesses): every test that uses it, directly or through another fixture, must carry
    the ``slow`` marker, or collection fails (``tests/conftest.py``). Put it under
    ``@pytest.fixture``::

        @pytest.fixture(scope="module")
        @expensive
        def inputs(tmp_path_factory): ...

    The mark travels with the function, so renaming the fixture keeps it.
    """
    fixture_function.expensive_fixture = True
    return fixture_function


def is_expensive(function: Callable) -> bool:
    """Whether :func:`expensive` marked this fixture function."""
    return getattr(function, "expensive_fixture", False) is True


# --- tiny encoders and a cache of foundation-model inputs ------------------------------------


#: Random-init encoders small enough for a test, on the FM inputs of :func:`make_cache` and
#: :func:`make_study_inputs` (CT 8 x 32 x 32, PET 32^3): 64-d CT-FM and PET-FM embeddings.
TINY_ENCODERS = {
    "ct": {"init_filters": 4},
    "pet": {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "window_size": 6,
        "global_attn_indexes": [1],
    },
}
#: Narrower still (one block per stage, a 16-channel PET neck), for the 32^3 / 32 x 32 x 16 FM
#: inputs of the ``tiny_study`` cache (tests/conftest.py).
NARROW_ENCODERS = {
    "ct": {"init_filters": 2, "blocks_down": [1, 1, 1, 1, 1]},
    "pet": {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "window_size": 6,
        "global_attn_indexes": [1],
        "out_chans": 16,
    },
}

CACHE_CT_SHAPE = (8, 32, 32)  # [D, H, W]
CACHE_PET_SHAPE = (32, 32, 32)
CACHE_CASES = ["CHUM-001", "CHUP-002", "MDA-003", "HGJ-004", "CHUV-005"]


def make_cache(root: Path, case_ids=CACHE_CASES, *, params=None, seed=0, bump=()) -> PreprocessedCache:
    """A preprocessed cache of FM inputs only (no survival inputs), random in [0, 1]: CT
    :data:`CACHE_CT_SHAPE`, PET :data:`CACHE_PET_SHAPE`. ``params`` make its parameters hash;
    cases in ``bump`` get other source hashes (their inputs changed)."""
    params = params or {"spacing": 1.0, "variant": "a"}
    ph = params_hash(params)
    rng = np.random.default_rng(seed)
    geom = GridGeometry((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (32, 32, 8))
    for i, cid in enumerate(case_ids):
        src = {"ct": f"ct{i}", "pet": f"pet{i}", "label": f"lab{i}"}
        if cid in bump:
            src["ct"] += "-changed"
        write_case(
            root,
            cid,
            {
                "ctfm/ct": rng.random(CACHE_CT_SHAPE, dtype=np.float32),
                "petfm/pet": rng.random(CACHE_PET_SHAPE, dtype=np.float32),
            },
            {"ctfm": geom, "petfm": geom},
            {"params_hash": ph, "source_sha256": src},
        )
    write_cohort_record(
        root,
        {
            "params": params,
            "params_hash": ph,
            "crop_size_vox_xyz": [64, 64, 32],
            "case_ids": list(case_ids),
        },
    )
    return PreprocessedCache(root)


# --- a tiny study's inputs: manifest, cache, embeddings ---------------------------------------


STUDY_N_CASES = 20
STUDY_SURVIVAL_DHW = (16, 16, 16)
# Same code as the paper's network, at widths a test can train in a second.
TINY_TRAIN = {
    "epochs": 2,
    "steps_per_epoch": 2,
    "batch_size": 4,
    "eval_batch_size": 8,
    "warmup_epochs": 1,
    "patience": 2,
    "ema_decay": 0.5,
    "device": "cpu",
    "model": {
        "seg_filters": [2, 4, 4],
        "seg_encoder_convs": [1, 1, 1],
        "seg_decoder_convs": [1, 1],
        "tap_filters": [1, 2, 2],
        "dense_stem_filters": 4,
        "dense_blocks": [1, 1],
        "growth": 4,
        "bottleneck_filters": 4,
        "transition_filters": [4, 4],
        "head_units": 4,
    },
}


def make_study_inputs(
    root: Path, n_cases: int = STUDY_N_CASES, seed: int = 0, censor_centre: str | None = None
) -> dict[str, Path]:
    """A tiny but real cohort: manifest, preprocessed cache and random-init ctpet embeddings.

    Tumour size drives the hazard so the survival signal is learnable; arrays are [D, H, W].
    ``censor_centre``: every case of that centre is censored (a LOCO fold without events).
    """
    from pipeline.embeddings import RandomInitWarning
    from pipeline.extraction import run_extraction

    rng = np.random.default_rng(seed)
    params = PreprocessParams(
        survival_size_xyz=STUDY_SURVIVAL_DHW[::-1], ctfm_size_xyz=(32, 32, 8), petfm_size_xyz=(32, 32, 32)
    )
    ph = params.hash()
    centres = ["CHUM", "CHUP", "MDA", "HGJ"]
    rows, ids = [], []
    geom = GridGeometry((0.0, 0.0, 0.0), (1.0, 1.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), STUDY_SURVIVAL_DHW[::-1])
    zz, yy, xx = np.meshgrid(*[np.arange(s) - s / 2 for s in STUDY_SURVIVAL_DHW], indexing="ij")
    for i in range(n_cases):
        centre = centres[i % len(centres)]
        cid = f"{centre}-{i:03d}"
        ids.append(cid)
        radius = rng.uniform(2.0, 6.0)
        hazard = np.exp(0.8 * (radius - 4.0))
        t_event, t_cens = rng.exponential(800 / hazard), rng.uniform(200, 2000)
        mask = (np.sqrt(zz**2 + yy**2 + xx**2) < radius).astype(np.uint8)
        pet = (mask * rng.uniform(4, 12) + rng.random(STUDY_SURVIVAL_DHW)).astype(np.float32)
        ct = (mask * 60.0 + rng.normal(0, 20, STUDY_SURVIVAL_DHW)).astype(np.float32)
        write_case(
            root / "cache",
            cid,
            {
                "survival/pet": pet,
                "survival/ct": ct,
                "survival/mask": mask,
                "ctfm/ct": rng.random((8, 32, 32), dtype=np.float32),
                "petfm/pet": rng.random((32, 32, 32), dtype=np.float32),
            },
            {"survival": geom, "ctfm": geom, "petfm": geom},
            {"params_hash": ph, "source_sha256": {"ct": f"c{i}", "pet": f"p{i}", "label": f"l{i}"}},
        )
        rows.append(
            {
                "case_id": cid,
                "center_id": centres.index(centre) + 1,
                "center": centre,
                "ct_path": f"imagesTr/{cid}__CT.nii.gz",
                "pet_path": f"imagesTr/{cid}__PT.nii.gz",
                "label_path": f"labelsTr/{cid}.nii.gz",
                "ct_sha256": "",
                "pet_sha256": "",
                "label_sha256": "",
                "task1": 1,
                "task2": 1,
                "has_endpoint": 1,
                "relapse": int(t_event < t_cens and centre != censor_centre),
                "rfs_days": float(round(min(t_event, t_cens)) + 1),
                "gender": "M" if i % 3 else "F",
                "age": float(50 + i),
                "weight": float(70 + i % 7),
                "tobacco": i % 2,
                "alcohol": (i + 1) % 2,
                "performance_status": i % 3,
                "hpv_status": (i // 2) % 2,
                "surgery": i % 2,
                "chemotherapy": (i + 1) % 2,
                "has_gtvp": 1,
                "has_gtvn": 0,
            }
        )
    write_cohort_record(
        root / "cache",
        {"params": params.as_dict(), "params_hash": ph, "crop_size_vox_xyz": [40, 40, 16], "case_ids": ids},
    )
    df = pd.DataFrame(rows)
    assert list(df.columns) == list(MANIFEST_COLUMNS)
    write_manifest(df, root / "manifest.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        run_extraction(
            root / "cache",
            "ctpet",
            root / "ctpet.h5",
            random_init=True,
            encoder_kwargs=TINY_ENCODERS,
            device="cpu",
            progress=False,
        )
    return {"manifest": root / "manifest.csv", "cache": root / "cache", "embeddings": root / "ctpet.h5"}


def make_spec(inputs: dict[str, Path], study_dir: Path, configs=None, **kw) -> study_spec.StudySpec:
    """A study of :func:`make_study_inputs` with :data:`TINY_TRAIN` (all 13 configurations
    unless ``configs`` names some); ``kw`` go to :meth:`StudySpec.create`."""
    names = tuple(configs) if configs else tuple(c.name for c in study_spec.configurations())
    return study_spec.StudySpec.create(
        inputs["manifest"],
        inputs["cache"],
        inputs["embeddings"],
        study_dir,
        train=json.loads(json.dumps(TINY_TRAIN)),
        configs=names,
        **kw,
    )


# --- a finished study made by hand (tests of the report and of its page in a browser) --------


FAKE_STUDY_CONFIGS = ("baseline", "ct-d64", "ct-d128", "pet-d256", "ctpet-dorig")


def _fake_manifest(root: Path, n_cases: int, seed: int) -> pd.DataFrame:
    """Cases with a latent true risk ``z`` driving exponential relapse times; 3 centres."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n_cases)
    t_event, t_cens = rng.exponential(700 * np.exp(-z)), rng.uniform(300, 1500, size=n_cases)
    rows = []
    for i in range(n_cases):
        centre = ("CHUM", "CHUP", "MDA")[i % 3]
        cid = f"{centre}-{i:03d}"
        rows.append(
            {c: "" for c in MANIFEST_COLUMNS}
            | {
                "case_id": cid,
                "center_id": i % 3 + 1,
                "center": centre,
                "task1": 1,
                "task2": 1,
                "has_endpoint": 1,
                "relapse": int(t_event[i] < t_cens[i]),
                "rfs_days": float(round(min(t_event[i], t_cens[i])) + 1),
                "gender": "M",
                "age": 60.0,
                "weight": 70.0,
                "tobacco": 0,
                "alcohol": 0,
                "performance_status": 0,
                "hpv_status": 1,
                "surgery": 0,
                "chemotherapy": 1,
                "has_gtvp": 1,
                "has_gtvn": 0,
                "ct_path": f"imagesTr/{cid}__CT.nii.gz",
                "pet_path": f"imagesTr/{cid}__PT.nii.gz",
                "label_path": f"labelsTr/{cid}.nii.gz",
            }
        )
    df = pd.DataFrame(rows)[list(MANIFEST_COLUMNS)]
    write_manifest(df, root / "manifest.csv")
    return df.assign(z=z)


def _risk(z: np.ndarray, name: str, strength: float) -> np.ndarray:
    """A model's risk: ``strength * z`` + noise seeded by the model name (same name, same risk)."""
    return strength * z + np.random.default_rng(zlib.crc32(name.encode())).normal(size=z.shape[0])


def _fold_frames(cases: pd.DataFrame, folds: pd.DataFrame, k: int, risk: np.ndarray):
    pos = {c: i for i, c in enumerate(cases["case_id"])}
    out = []
    for held in (True, False):
        ids = folds.loc[(folds["fold"] == k) == held, "case_id"].tolist()
        idx = [pos[c] for c in ids]
        out.append(
            pd.DataFrame(
                {
                    "case_id": ids,
                    "risk": risk[idx],
                    "time": cases["rfs_days"].to_numpy()[idx],
                    "event": cases["relapse"].to_numpy()[idx],
                }
            )
        )
    return out


def _write_cell(folder: Path, cases, folds, k: int, name: str, *, epochs: int, new_format: bool) -> None:
    """One finished CNN cell: oof.csv, train_risk_<proto>.csv, curves.csv, done.json, cell.json."""
    from pipeline.metrics import fold_metrics

    folder.mkdir(parents=True, exist_ok=True)
    protos, oof = {}, []
    for proto, strength in (("paper", 1.0), ("inner", 0.8)):
        held, train = _fold_frames(cases, folds, k, _risk(cases["z"].to_numpy(), f"{name}/{proto}", strength))
        oof.append(held.assign(fold=k, protocol=proto))
        train.to_csv(folder / f"train_risk_{proto}.csv", index=False)
        m = fold_metrics(held.assign(fold=k), train_survival={k: (train["time"], train["event"])}).iloc[0]
        protos[proto] = {
            "selected_epoch": epochs - 1 if proto == "inner" else 1,
            "selection_c_index": 0.7,
            "c_index": m["c_index"],
            "auc_1y": None if pd.isna(m["auroc"]) else m["auroc"],
            "auc_1y_undefined_reason": m["auroc_reason"],
        } | ({"val_dice": 0.5} if new_format else {})
    pd.concat(oof)[["case_id", "fold", "protocol", "risk", "time", "event"]].to_csv(folder / "oof.csv", index=False)
    ep = np.arange(epochs)
    curves = {
        "epoch": ep,
        "lr_factor": 1.0,
        "dice": 0.9 - 0.1 * ep,
        "cox": 2.0 - 0.2 * ep,
        "total": 0.0,
        "loss": 0.0,
        "val_c_index_outer": 0.55 + 0.02 * ep,
        "val_c_index_inner": 0.5 + 0.03 * ep,
        "seconds": 1.0,
    }
    if new_format:
        curves |= {"train_c_index": 0.6 + 0.05 * ep, "val_dice_outer": 0.2 + 0.1 * ep}
    pd.DataFrame(curves).to_csv(folder / "curves.csv", index=False)
    start = {"train_c_index": 0.5, "val_c_index_inner": 0.5, "val_c_index_outer": 0.5, "val_dice_outer": 0.05}
    write_json_atomic(
        folder / "done.json",
        {"fold": k, "epochs_run": epochs, "protocols": protos} | ({"start": start} if new_format else {}),
    )
    write_json_atomic(folder / "cell.json", {"seconds": 10.0 + k})


def _write_peer(spec, peer, split: str, cases, folds, *, n_components: int | None) -> None:
    """One finished peer run: oof_predictions.csv, train_risk.csv, summary.json, peer.json."""
    from pipeline.metrics import fold_metrics

    out = spec.peer_dir(peer, split)
    out.mkdir(parents=True, exist_ok=True)
    # Heads whose PCA is capped share one fit: the same risks, hence identical metrics.
    name = f"{peer.group}-capped" if n_components and peer.proj and peer.proj > n_components else peer.name
    risk = _risk(cases["z"].to_numpy(), f"{name}/{split}", 0.6)
    oof, train, fits = [], [], []
    for k in sorted(folds["fold"].unique()):
        held, tr = _fold_frames(cases, folds, k, risk)
        oof.append(held.assign(fold=k, protocol="fit"))
        train.append(tr.assign(fold=k, protocol="fit"))
        fit = {"fold": int(k), "n_train": len(tr), "inner_c_index": 0.6 + 0.01 * (peer.proj or 0) / 64}
        if peer.kind == "embeddings" and peer.proj is not None:
            fit |= {
                f"{m}_pca_components": min(peer.proj, len(tr) - 1) for m in embedding_set(peer.embedding_set).encoders
            }
        fits.append(fit)
    oof = pd.concat(oof)
    oof.to_csv(out / "oof_predictions.csv", index=False)
    pd.concat(train).to_csv(out / "train_risk.csv", index=False)
    tr = pd.concat(train)
    surv = {k: (g["time"], g["event"]) for k, g in tr.groupby("fold")}
    per_fold = json.loads(fold_metrics(oof, train_survival=surv).to_json(orient="records"))
    write_json_atomic(out / "summary.json", {"per_fold": per_fold, "fit": fits})
    write_json_atomic(out / PEER_FILE, {"peer": peer.name, "split": split, "key": "k", "seconds": 3.0})


def make_fake_study(
    root: Path,
    *,
    configs=FAKE_STUDY_CONFIGS,
    n_cases: int = 60,
    n_folds: int = 3,
    repeats: int = 2,
    loco: bool = True,
    pending=(),
    old_format=(),
    epochs: int = 4,
    synthetic: bool = True,
    random_init: bool = True,
    seeds: int = 1,
    seed_configs=None,
) -> study_spec.StudySpec:
    """A finished study folder written by hand: done.json / curves.csv / oof.csv of every cell and
    the peers' files, without training (seconds).

    CNN on ``cv0`` only, peers (clinical, radiomics, one head per FM configuration) on
    every split; heads whose d exceeds the training size are capped and identical.
    ``pending``: cell keys left unfinished; ``old_format``: cell keys written without the
    new curve columns and ``start`` record; ``seeds``, ``seed_configs``: training seeds (a
    seed's risks carry noise of its own, so the seeds differ).
    """
    cases = _fake_manifest(root, n_cases, seed=3)
    spec = study_spec.StudySpec.create(
        root / "manifest.csv",
        root / "cache",
        root / "ctpet.h5",
        root / "study",
        n_folds=n_folds,
        configs=tuple(configs),
        repeats=repeats,
        loco=loco,
        cnn_extra_splits=False,
        train={"epochs": epochs},
        seeds=seeds,
        seed_configs=seed_configs,
    )
    all_folds = {}
    for split in spec.splits():
        r = study_spec.split_repeat(split)
        f = (
            make_folds(cases["case_id"], cases["rfs_days"], cases["relapse"], n_splits=n_folds, seed=42 + r)
            if r is not None
            else leave_one_centre_out(cases["case_id"], cases["center"])
        )
        save_folds(f, spec.folds_path_of(split))
        all_folds[split] = f
    for cell in study_spec.grid(spec):
        if cell.key not in pending:
            _write_cell(
                study_spec.cell_dir(spec, cell),
                cases,
                all_folds[cell.split],
                cell.fold,
                cell.config.name + (f"#seed{cell.seed}" if cell.seed else ""),
                epochs=epochs,
                new_format=cell.key not in old_format,
            )
    n_train = min(int((all_folds["cv0"]["fold"] != k).sum()) for k in range(n_folds))
    for split in spec.splits():
        for peer in spec.peer_list():
            _write_peer(spec, peer, split, cases, all_folds[split], n_components=n_train - 1)
    emb = {
        "path": str(root / "ctpet.h5"),
        "sha256": "0" * 64,
        "attrs": {},
        "modalities": {},
        "random_init": random_init,
        "random_init_modalities": ["ct", "pet"] if random_init else [],
    }
    write_json_atomic(
        spec.root / study_spec.STUDY_FILE,
        {
            "spec": spec.to_dict(),
            "spec_hash": spec.hash,
            "code_version": "test",
            "cohort": {
                "n_cases": n_cases,
                "n_events": int(cases["relapse"].sum()),
                "n_centres": 3,
                "case_set_sha256": "x",
                "survival_input_size_dhw": [8, 8, 8],
            },
            "folds_hash": "f",
            "cache_params_hash": "c",
            "embeddings": emb,
            "info": {
                "synthetic": synthetic,
                "data_source": "hand-made test study",
                "oracle_c_index": 0.7777,
                "settings": "test",
            },
        },
    )
    return spec


# --- processes (tests of the pool and of a killed study) -------------------------------------


def pool_workers(pid: int) -> list[int]:
    """Pids of the pool workers of ``pid`` (spawned interpreters), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running or sleeping (a zombie, dead and waiting to be reaped, is not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(condition, seconds: float) -> bool:
    """Whether ``condition()`` came true within ``seconds`` (polled every 0.1 s)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()
