"""Stage one: extraction into the embeddings store (schema, alignment, provenance, reuse),
the store's loader, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import warnings
import weakref
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import CACHE_CASES, CACHE_CT_SHAPE, TINY_ENCODERS, make_cache

from pipeline import embeddings as emb
from pipeline import extraction as ext
from pipeline.artefacts import ProvenanceError, sha256_file
from pipeline.cache import PreprocessedCache, write_cohort_record
from pipeline.cli.embed import extract_embeddings as cli
from pipeline.embedding_sets import ENCODERS


def run(cache, set_name, out, **kw):
    kw.setdefault("random_init", True)
    kw.setdefault("encoder_kwargs", TINY_ENCODERS)
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", emb.RandomInitWarning)
        return ext.run_extraction(cache.root if hasattr(cache, "root") else cache, set_name, out, **kw)


class ForwardCounter:
    """Counts batch rows through each encoder class via a global forward hook."""

    def __init__(self):
        from models.ct_fm import CTFMEncoder
        from models.pet_fm import PETFMEncoder

        self.classes = {"ct": CTFMEncoder, "pet": PETFMEncoder}
        self.counts = {"ct": 0, "pet": 0}

    def _hook(self, module, args, output):
        for m, cls in self.classes.items():
            if type(module) is cls:
                self.counts[m] += int(args[0].shape[0])

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "cache")


def test_schema_and_alignment_readable_with_plain_h5py_and_pandas(cache, tmp_path):
    out = tmp_path / "emb" / "ct.h5"
    res = run(cache, "ct", out, batch_size=2)
    assert res.path == out and res.per_encoder["ct"].computed == len(CACHE_CASES)

    with h5py.File(out, "r") as h5:
        ids = list(h5["case_ids"].asstr()[()])
        fps = list(h5["fingerprints"].asstr()[()])
        ct = h5["ct"][()]
        a = dict(h5["ct"].attrs)
        fa = dict(h5.attrs)
        assert "pet" not in h5
    assert ids == cache.case_ids
    assert fps == [cache.case_fingerprint(c) for c in ids]
    assert ct.dtype == np.float32 and ct.shape == (len(CACHE_CASES), 64)  # 16 * init_filters
    assert fa["schema_version"] == emb.SCHEMA_VERSION and fa["modality"] == "ct"
    assert fa["params_hash"] == cache.params_hash
    assert list(fa["crop_size_vox_xyz"]) == [64, 64, 32]
    assert fa["code_version"] and fa["created"] and bool(fa["random_init"])
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert a["weights_sha256"] == "random-init" and a["random_init_seed"] == 0
    assert a["pooling"] == "gap_last_feature_map" and a["input_key"] == "ctfm/ct"
    assert list(a["input_shape"]) == list(CACHE_CT_SHAPE) and a["embedding_dim"] == 64
    assert a["precision"] == "fp32" and json.loads(a["encoder_config"]) == TINY_ENCODERS["ct"]

    # Each row is the encoder's output on that very case (rows follow case_ids).
    from models.checkpoints import random_ct_fm

    model = random_ct_fm(0, **TINY_ENCODERS["ct"]).eval()
    for i, cid in enumerate(ids):
        x = torch.from_numpy(cache.read(cid, ("ctfm/ct",))["ctfm/ct"])[None, None]
        with torch.inference_mode():
            ref = model(x).numpy()[0]
        np.testing.assert_allclose(ct[i], ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ct[0], ct[1])

    # The plain pandas recipe (README.md, embeddings/README.md) gives the loader's frame.
    with h5py.File(out, "r") as h5:
        df = pd.DataFrame(h5["ct"][:], index=h5["case_ids"].asstr()[:])
    with pytest.warns(emb.RandomInitWarning):
        loaded = emb.load_embeddings(out, cache=cache)
    assert list(loaded.columns) == [f"ct_{j:03d}" for j in range(64)]
    assert loaded.index.name == "case_id"
    np.testing.assert_array_equal(loaded.to_numpy(), df.to_numpy())
    assert list(loaded.index) == list(df.index)
    assert loaded.attrs["sha256"] == sha256_file(out)


def test_ctpet_reuses_shards_and_no_encoder_runs_twice(cache, tmp_path):
    out_dir = tmp_path / "emb"
    # 5 cases in batches of 2: the last batch is padded to 2 rows, so 6 rows per encoder.
    with ForwardCounter() as fc:
        run(cache, "ct", out_dir / "ct.h5", batch_size=2)
    assert fc.counts == {"ct": 6, "pet": 0}
    with ForwardCounter() as fc:
        res = run(cache, "ctpet", out_dir / "ctpet.h5", batch_size=2)
    assert fc.counts == {"ct": 0, "pet": 6}
    assert res.per_encoder["ct"].reused == len(CACHE_CASES) and res.per_encoder["pet"].computed == len(CACHE_CASES)
    with ForwardCounter() as fc:
        res = run(cache, "pet", out_dir / "pet.h5")
    assert fc.counts == {"ct": 0, "pet": 0} and res.computed == 0

    with h5py.File(out_dir / "ct.h5") as a, h5py.File(out_dir / "ctpet.h5") as b, h5py.File(out_dir / "pet.h5") as c:
        np.testing.assert_array_equal(a["ct"][()], b["ct"][()])
        np.testing.assert_array_equal(c["pet"][()], b["pet"][()])
        assert b["pet"].shape == (len(CACHE_CASES), 64)
        assert b["pet"].attrs["pooling"] == "mean_tokens_pre_neck"
        assert list(b["case_ids"].asstr()[()]) == cache.case_ids
    with pytest.warns(emb.RandomInitWarning):
        df = emb.load_embeddings(out_dir / "ctpet.h5", datasets=["pet", "ct"])
    assert df.shape == (len(CACHE_CASES), 128)
    assert df.columns[0] == "pet_000" and df.columns[-1] == "ct_063"


@pytest.mark.filterwarnings("ignore::pipeline.embeddings.RandomInitWarning")
def test_rerun_on_complete_file_does_nothing(cache, tmp_path):
    out = tmp_path / "emb" / "ct.h5"
    run(cache, "ct", out)
    before = (out.read_bytes(), out.stat().st_mtime_ns)
    with ForwardCounter() as fc:
        res = run(cache, "ct", out)
    assert res.up_to_date and res.computed == 0 and fc.counts["ct"] == 0
    assert "up to date" in res.summary()
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before

    r = CliRunner().invoke(
        cli,
        [
            "--modality",
            "ct",
            "--cache",
            str(cache.root),
            "--out",
            str(out),
            "--random-init",
            "--device",
            "cpu",
            "--no-progress",
            "--encoder-config",
            json.dumps(TINY_ENCODERS),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "up to date" in r.output and "nothing computed" in r.output


def test_added_case_computes_only_that_case(tmp_path):
    out = tmp_path / "emb" / "ct.h5"
    run(make_cache(tmp_path / "c1", CACHE_CASES[:3]), "ct", out)
    with h5py.File(out) as h5:
        old = h5["ct"][()]
    bigger = make_cache(tmp_path / "c1", CACHE_CASES)  # same seed: first three cases identical
    with ForwardCounter() as fc:
        res = run(bigger, "ct", out)
    assert res.per_encoder["ct"].reused == 3 and res.per_encoder["ct"].computed == 2
    assert fc.counts["ct"] == 2  # one batch [3, 4]; cases 0-2 never rerun
    with h5py.File(out) as h5:
        assert list(h5["case_ids"].asstr()[()]) == CACHE_CASES
        np.testing.assert_array_equal(h5["ct"][:3], old)


def test_other_provenance_is_refused_not_mixed(cache, tmp_path):
    out = tmp_path / "emb" / "ct.h5"
    run(cache, "ct", out, seed=0)
    original = out.read_bytes()
    with pytest.raises(ProvenanceError) as err:
        run(cache, "ct", out, seed=1)
    msg = str(err.value)
    assert "ct random_init_seed: file 0, this run 1" in msg and "--overwrite" in msg
    assert "weights_sha256" not in msg  # only what differs is named
    assert out.read_bytes() == original

    # Same cache root re-preprocessed with other parameters: refused, both hashes named.
    other = make_cache(tmp_path / "cache", params={"spacing": 2.0, "variant": "a"})
    with pytest.raises(ProvenanceError) as err:
        run(other, "ct", out)
    assert cache.params_hash in str(err.value) and other.params_hash in str(err.value)
    assert out.read_bytes() == original

    res = run(other, "ct", out, seed=1, overwrite=True)
    assert res.per_encoder["ct"].computed == len(CACHE_CASES)
    with h5py.File(out) as h5:
        assert h5.attrs["params_hash"] == other.params_hash
        assert h5["ct"].attrs["random_init_seed"] == 1
    # Each provenance has its own shard store; nothing was shared between them.
    stores = sorted(p.name for p in (out.parent / ".shards").iterdir() if p.is_dir())
    assert len(stores) == 2 and any("seed0" in s for s in stores) and any("seed1" in s for s in stores)


def test_thread_count_decides_nothing_under_portable_numerics_and_is_recorded(cache, tmp_path):
    """Under portable numerics (the default) the encoders give the same bytes on any thread
    count, so a rerun on another count is up to date and reuses every row; the count and the
    numerics in force are recorded in the file's environment."""
    out = tmp_path / "emb" / "ct.h5"
    run(cache, "ct", out, threads=1)
    with h5py.File(out) as h5:
        assert json.loads(h5["ct"].attrs["compute"]) == {"device": "cpu", "numerics": "portable"}
        assert json.loads(h5["ct"].attrs["provenance"])["compute"] == {"device": "cpu", "numerics": "portable"}
        env = json.loads(h5.attrs["environment"])
    assert env["threads"] == 1 and env["numerics"] == "portable" and env["numerics_in_force"] is True
    assert env["cpu_capability"] == "AVX2" and env["pins"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    original = out.read_bytes()
    res = run(cache, "ct", out, threads=2)
    assert res.up_to_date and out.read_bytes() == original


def test_thread_count_is_provenance_under_native_numerics(cache, tmp_path, monkeypatch):
    """Under native numerics the thread count moved the last bits on some CPUs (the PET-FM on a
    16-core x86 host), so it is part of the provenance: refused on a rerun with another count,
    computed in its own shard store when asked with --overwrite."""
    monkeypatch.setenv("HNFM_NUMERICS", "native")
    out = tmp_path / "emb" / "ct.h5"
    run(cache, "ct", out, threads=1)
    with h5py.File(out) as h5:
        assert json.loads(h5["ct"].attrs["compute"]) == {"device": "cpu", "numerics": "native", "threads": 1}
    original = out.read_bytes()
    with pytest.raises(ProvenanceError, match="compute") as err:
        run(cache, "ct", out, threads=2)
    assert "--overwrite" in str(err.value) and out.read_bytes() == original
    res = run(cache, "ct", out, threads=2, overwrite=True)
    assert res.per_encoder["ct"].computed == len(CACHE_CASES)  # nothing reused from the 1-thread store
    with h5py.File(out) as h5:
        assert json.loads(h5["ct"].attrs["compute"]) == {"device": "cpu", "numerics": "native", "threads": 2}
    default = ext.compute_record(torch.device("cpu"), None)
    assert default == {"device": "cpu", "numerics": "native", "threads": len(os.sched_getaffinity(0))}
    assert ext.compute_record(torch.device("cuda"), 4) == {"device": "cuda"}


def test_loader_refuses_other_preprocessing_and_lists_missing_cases(cache, tmp_path):
    out = tmp_path / "emb" / "ct.h5"
    run(cache, "ct", out)
    warnings.simplefilter("ignore", emb.RandomInitWarning)

    other = make_cache(tmp_path / "other", params={"spacing": 2.0, "variant": "b"})
    with pytest.raises(ProvenanceError) as err:
        emb.load_embeddings(out, cache=other)
    msg = str(err.value)
    assert cache.params_hash in msg and other.params_hash in msg
    # The message names the cache the file was made from and the parameters that differ.
    assert f"made from the preprocessed cache {cache.root.resolve()}" in msg
    assert "spacing: 1.0 there, 2.0 here; variant: 'a' there, 'b' here" in msg

    # Same params, but one case's source changed: its fingerprint no longer matches.
    bumped = make_cache(tmp_path / "bumped", bump=("MDA-003",))
    with pytest.raises(ProvenanceError) as err:
        emb.load_embeddings(out, cache=bumped)
    msg = str(err.value)
    assert "MDA-003" in msg and "CHUM-001" not in msg
    assert cache.case_fingerprint("MDA-003") in msg and bumped.case_fingerprint("MDA-003") in msg
    # ... which a stage two that never uses that case does not care about.
    ok = emb.load_embeddings(out, cache=bumped, case_ids=["HGJ-004", "CHUM-001"])
    assert list(ok.index) == ["HGJ-004", "CHUM-001"]
    full = emb.load_embeddings(out)
    np.testing.assert_array_equal(ok.loc["HGJ-004"].to_numpy(), full.iloc[3].to_numpy())

    with pytest.raises(emb.MissingCasesError) as err:
        emb.load_embeddings(out, cache=cache, case_ids=["CHUM-001", "CHUS-010", "HMR-011"])
    assert err.value.missing == ["CHUS-010", "HMR-011"] and "CHUS-010" in str(err.value)
    with pytest.raises(ProvenanceError, match="pet"):
        emb.load_embeddings(out, datasets=["pet"])

    # The same folder preprocessed again: said so.
    shutil.rmtree(cache.root)
    again = make_cache(cache.root, params={"spacing": 3.0, "variant": "a"})
    with pytest.raises(ProvenanceError, match="the cache was preprocessed again since the file was made"):
        emb.load_embeddings(out, cache=again)
    # The recorded cache gone: the crop sizes are compared instead of the parameters.
    moved = cache.root.with_name("moved")
    cache.root.rename(moved)
    smaller = make_cache(tmp_path / "smaller", params={"spacing": 2.0, "variant": "a"})
    smaller.cohort["crop_size_vox_xyz"] = [48, 48, 32]
    with pytest.raises(ProvenanceError) as err:
        emb.load_embeddings(out, cache=smaller)
    assert "is gone or unreadable: parameters not compared" in str(err.value)
    assert "crop size G [64, 64, 32] there, [48, 48, 32] here" in str(err.value)


def test_random_init_warns_on_every_read(cache, tmp_path, capsys):
    out = tmp_path / "emb" / "ct.h5"
    run(cache, "ct", out)
    capsys.readouterr()
    for _ in range(2):
        with pytest.warns(emb.RandomInitWarning, match="randomly initialised"):
            s = emb.read_embeddings(out)
        assert "WARNING" in capsys.readouterr().err
    assert s.matrix("ct").shape == (len(CACHE_CASES), 64)


def test_missing_weights_error_says_where_to_get_them(cache, tmp_path, monkeypatch):
    monkeypatch.delenv("HNFM_CT_FM_WEIGHTS", raising=False)
    monkeypatch.delenv("HNFM_PET_FM_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ext.WeightsNotFoundError) as err:
        ext.run_extraction(cache.root, "ct", tmp_path / "ct.h5", device="cpu", progress=False)
    msg = str(err.value)
    for needle in (
        "project-lighter/ct_fm_feature_extractor",
        "model.safetensors",
        "--ct-weights",
        "HNFM_CT_FM_WEIGHTS",
        "~/.cache/hnfm/ct_fm/model.safetensors",
        "--random-init",
    ):
        assert needle in msg, needle

    monkeypatch.setenv("HNFM_PET_FM_WEIGHTS", str(tmp_path / "nope.pth"))
    r = CliRunner().invoke(
        cli, ["--modality", "pet", "--cache", str(cache.root), "--out", str(tmp_path / "pet.h5"), "--device", "cpu"]
    )
    assert r.exit_code == 1
    assert "seganypet_v1.pth" in r.output and "nope.pth" in r.output and "HNFM_PET_FM_WEIGHTS" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "pet.h5").exists()


def test_checkpoint_file_sha256_recorded_and_loaded(cache, tmp_path):
    from safetensors.torch import save_file

    from models.checkpoints import load_ct_fm, random_ct_fm

    model = random_ct_fm(7, **TINY_ENCODERS["ct"])
    ckpt = tmp_path / "w" / "model.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / "emb" / "ct.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", emb.RandomInitWarning)  # must not warn
        res = ext.run_extraction(
            cache.root,
            "ct",
            out,
            weights={"ct": ckpt},
            device="cpu",
            encoder_kwargs={"ct": TINY_ENCODERS["ct"]},
            progress=False,
        )
        s = emb.read_embeddings(out, cache=cache)
    assert res.per_encoder["ct"].computed == len(CACHE_CASES)
    a = s.dataset_attrs["ct"]
    assert a["weights_sha256"] == sha256_file(ckpt) and a["random_init_seed"] == -1
    assert a["weights_path"] == str(ckpt.resolve()) and not s.attrs["random_init"]
    assert sha256_file(ckpt)[:12] in res.per_encoder["ct"].store.name

    loaded, sha = load_ct_fm(ckpt, **TINY_ENCODERS["ct"])
    x = torch.from_numpy(cache.read(CACHE_CASES[2], ("ctfm/ct",))["ctfm/ct"])[None, None]
    with torch.inference_mode():
        ref = loaded.eval()(x).numpy()[0]
    np.testing.assert_allclose(s.matrix("ct")[2], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::pipeline.embeddings.RandomInitWarning")
def test_cli_runs_and_prints_one_line_summary(cache, tmp_path):
    out = tmp_path / "emb" / "pet.h5"
    args = [
        "--modality",
        "pet",
        "--cache",
        str(cache.root),
        "--out",
        str(out),
        "--random-init",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--no-progress",
        "--encoder-config",
        json.dumps({"pet": TINY_ENCODERS["pet"]}),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    last = r.stdout.strip().splitlines()[-1]
    assert f"pet: {len(CACHE_CASES)} computed, 0 reused" in last and str(out) in last and " s)" in last
    with h5py.File(out) as h5:
        assert h5["pet"].attrs["random_init_seed"] == 3

    help_text = CliRunner().invoke(cli, ["--help"]).output
    for opt in (
        "--modality",
        "--cache",
        "--out",
        "--ct-weights",
        "--pet-weights",
        "--random-init",
        "--seed",
        "--device",
        "--batch-size",
        "--overwrite",
        "--shard-dir",
        "--no-progress",
        "--encoder-config",
    ):
        assert opt in help_text, opt

    bad = CliRunner().invoke(cli, args[:-1] + ["{not json"])
    assert bad.exit_code != 0 and "not valid JSON" in bad.output


def test_bad_cached_input_names_case_and_file(tmp_path):
    cache = make_cache(tmp_path / "cache", CACHE_CASES[:2])
    with h5py.File(cache.path("CHUP-002"), "r+") as h5:
        h5["ctfm/ct"][0, 0, 0] = 1500.0  # HU left unscaled
    with pytest.raises(ValueError) as err:
        run(cache, "ct", tmp_path / "ct.h5")
    msg = str(err.value)
    assert "CHUP-002" in msg and str(cache.path("CHUP-002")) in msg and "ctfm/ct" in msg
    assert not (tmp_path / "ct.h5").exists()


def test_concurrent_run_on_same_output_is_refused(cache, tmp_path):
    out = tmp_path / "emb" / "ct.h5"
    with ext._exclusive_lock(out.parent / f".{out.name}.lock"):
        with pytest.raises(ext.ExtractionLockedError, match="another extract-embeddings run"):
            run(cache, "ct", out)
    run(cache, "ct", out)  # released: works
    assert out.is_file()


def test_foreign_file_at_output_is_refused_unless_overwrite(cache, tmp_path):
    out = tmp_path / "ct.h5"
    out.write_text("someone's notes")
    with pytest.raises(ProvenanceError, match="not an embedding file"):
        run(cache, "ct", out)
    assert out.read_text() == "someone's notes"
    run(cache, "ct", out, overwrite=True)
    with h5py.File(out) as h5:
        assert h5["ct"].shape == (len(CACHE_CASES), 64)


def test_cuda_oom_halves_the_batch():
    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def forward(self, x):
            self.sizes.append(x.shape[0])
            if x.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return x.flatten(1)[:, :3] * 2

    m = Flaky()
    x = np.arange(3 * 8, dtype=np.float32).reshape(3, 1, 2, 2, 2)
    out = ext._forward_halving(m, x, torch.device("cpu"), "fp32")
    np.testing.assert_array_equal(out, x.reshape(3, -1)[:, :3] * 2)
    assert m.sizes == [3, 1, 2, 1, 1]


def test_oom_retry_releases_the_failed_batch_before_retrying():
    """A real encoder runs out of memory above 2 cases: the retry gives the full-batch result,
    and when it starts, the failed batch's input and activations are no longer referenced."""
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten()
    ).eval()

    class OutOfMemoryAbove(torch.nn.Module):
        def __init__(self, inner, k):
            super().__init__()
            self.inner, self.k, self.sizes, self.failed = inner, k, [], []

        def forward(self, x):
            # Each call first checks that the tensors of every earlier failed batch are freed.
            self.sizes.append((x.shape[0], [ref() is None for ref in self.failed]))
            h = self.inner[0](x)
            if x.shape[0] > self.k:
                self.failed += [weakref.ref(x), weakref.ref(h)]
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected above the cap)")
            return self.inner[1:](h)

    x = np.random.default_rng(0).normal(size=(5, 1, 6, 6, 6)).astype(np.float32)
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(x)).numpy()
    wrapped = OutOfMemoryAbove(encoder, k=2)
    out = ext._forward_halving(wrapped, x, torch.device("cpu"), "fp32")
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    assert [n for n, _ in wrapped.sizes] == [5, 2, 3, 1, 2]
    # Every call after a failure saw the failed batches' tensors already released.
    assert all(all(freed) for _, freed in wrapped.sizes)
    assert len(wrapped.failed) == 4


# ----------------------------------------------------------------------------- PET-FM size


def _cache_with_pet_size(root: Path, size_xyz) -> PreprocessedCache:
    write_cohort_record(
        root,
        {
            "params": {"petfm_size_xyz": list(size_xyz)},
            "params_hash": "p" * 16,
            "crop_size_vox_xyz": [64, 64, 32],
            "case_ids": [],
        },
    )
    return PreprocessedCache(root)


def test_encoder_config_follows_the_cache(tmp_path):
    import inspect

    from models.pet_fm import PETFMEncoder
    from pipeline.demo import DEMO_PETFM_SIZE_XYZ

    def fitted(cache, requested=None):
        return ext.fitted_encoder_config(cache, "pet", requested)

    defaults = inspect.signature(PETFMEncoder).parameters
    published = ENCODERS["pet"].cube_input
    assert dict(published) == {k: defaults[k].default for k in published}
    demo = _cache_with_pet_size(tmp_path / "demo", DEMO_PETFM_SIZE_XYZ)
    assert fitted(demo) == {"img_size": 64, "window_size": 4}  # the demo's 4^3 token grid and windows
    assert fitted(_cache_with_pet_size(tmp_path / "paper", (128, 128, 128))) == {}
    big = fitted(_cache_with_pet_size(tmp_path / "big", (256, 256, 256)))
    assert big == {"img_size": 256, "window_size": 8}  # 16 tokens per axis: largest divisor <= 14
    assert fitted(demo, {"depth": 2, "window_size": 2}) == {"depth": 2, "window_size": 2, "img_size": 64}
    with pytest.raises(ValueError, match=r"img_size 128.*64\^3.*--encoder-config"):
        fitted(demo, {"img_size": 128})
    with pytest.raises(ValueError, match=r"\[32, 64, 64\].*cube"):
        fitted(_cache_with_pet_size(tmp_path / "flat", (64, 64, 32)))
    # An encoder that takes any input size gets what was asked for.
    assert ext.fitted_encoder_config(demo, "ct", {"init_filters": 4}) == {"init_filters": 4}


@pytest.mark.filterwarnings("ignore::pipeline.embeddings.RandomInitWarning")
def test_cli_pet_takes_its_input_size_from_the_cache(cache, tmp_path):
    """No --encoder-config: the published ViT-B at the cache's 32^3 (a 2^3 token grid)."""
    out = tmp_path / "emb" / "pet.h5"
    base = [
        "--modality",
        "pet",
        "--cache",
        str(cache.root),
        "--random-init",
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "1",
    ]
    r = CliRunner().invoke(cli, base + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as h5:
        assert json.loads(h5["pet"].attrs["encoder_config"]) == {"img_size": 32, "window_size": 2}
        assert h5["pet"].shape == (len(CACHE_CASES), 768)
    r = CliRunner().invoke(
        cli, base + ["--out", str(tmp_path / "x.h5"), "--encoder-config", json.dumps({"pet": {"img_size": 128}})]
    )
    assert r.exit_code == 1
    assert "error: --encoder-config sets the PET-FM img_size 128" in r.output and "32^3" in r.output


# ----------------------------------------------------------------------------- failures


def test_missing_cache_names_the_commands_that_make_one(tmp_path):
    out = tmp_path / "new" / "ct.h5"
    r = CliRunner().invoke(
        cli,
        [
            "--modality",
            "ct",
            "--cache",
            str(tmp_path / "nowhere"),
            "--random-init",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 1 and r.output.count("error: ") == 1
    assert "preprocess --manifest data_manifest.csv --out" in r.output and "run-study --demo" in r.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "half" / "cases").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["--modality", "ct", "--cache", str(tmp_path / "half"), "--random-init"])
    assert r.exit_code == 1 and "preprocessing has not finished" in r.output


def _leftovers(root: Path) -> list[str]:
    """Lock files, and shard stores or folders holding no shard."""
    bad = [str(p) for p in root.rglob("*.lock")]
    bad += [str(p) for p in root.rglob("*") if p.is_dir() and not any(p.rglob("*.npy")) and not any(p.rglob("*.h5"))]
    return bad


def test_failed_runs_leave_no_lock_files_or_empty_stores(tmp_path):
    cache = make_cache(tmp_path / "cache", CACHE_CASES[:2])
    with h5py.File(cache.path("CHUP-002"), "r+") as h5:
        h5["ctfm/ct"][0, 0, 0] = 1500.0  # fails after the stores are made, before any shard
    work = tmp_path / "work"
    with pytest.raises(ValueError, match="CHUP-002"):
        run(cache, "ctpet", work / "emb" / "ctpet.h5", batch_size=2)
    assert not work.exists(), _leftovers(tmp_path)

    # Refused for other provenance: the existing file and its shards stay, nothing else.
    good = make_cache(tmp_path / "good", CACHE_CASES[:2])
    out = work / "emb" / "ct.h5"
    run(good, "ct", out)
    assert _leftovers(work) == []
    with pytest.raises(ProvenanceError):
        run(good, "ct", out, seed=1)
    assert _leftovers(work) == []
    stores = [p.name for p in (out.parent / ext.SHARD_DIR_NAME).iterdir() if p.is_dir()]
    assert len(stores) == 1 and "seed0" in stores[0]


def test_missing_weights_of_both_encoders_are_named_together(cache, tmp_path, monkeypatch):
    for env in (e.weights_env for e in ENCODERS.values()):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(
        cli,
        [
            "--modality",
            "ctpet",
            "--cache",
            str(cache.root),
            "--out",
            str(tmp_path / "e" / "ctpet.h5"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 1 and r.output.startswith("error: ")
    for needle in (
        "CT-FM weights not found",
        "PET-FM weights not found",
        "https://huggingface.co/project-lighter/ct_fm_feature_extractor",
        "https://huggingface.co/YichiZhang98/SegAnyPET",
        "--ct-weights",
        "--pet-weights",
        "HNFM_CT_FM_WEIGHTS",
        "HNFM_PET_FM_WEIGHTS",
        "--random-init",
        "run-study --demo",
    ):
        assert needle in r.output, needle
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- README


def _python_blocks(markdown: str) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.filterwarnings("ignore::pipeline.embeddings.RandomInitWarning")
def test_readme_python_examples_run_and_agree(tmp_path, monkeypatch):
    from pipeline.manifest import MANIFEST_COLUMNS, write_manifest

    blocks = _python_blocks((Path(__file__).resolve().parent.parent / "embeddings" / "README.md").read_text())
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    cache = make_cache(Path("cache/preprocessed"))
    run(cache, "ctpet", Path("embeddings/ctpet.h5"))
    manifest = pd.DataFrame({c: "" for c in MANIFEST_COLUMNS}, index=range(len(CACHE_CASES)))
    manifest["case_id"] = CACHE_CASES[::-1]  # not the file's order: the loader must follow it
    manifest["has_endpoint"] = [1, 1, 0, 1, 1]
    for col in ("ct_path", "pet_path", "label_path"):
        manifest[col] = [f"imagesTr/{c}_{col}.nii.gz" for c in manifest["case_id"]]
    write_manifest(manifest, "data_manifest.csv")
    spaces = []
    for k, code in enumerate(blocks):
        ns: dict = {}
        exec(compile(code, f"<embeddings/README.md python block {k}>", "exec"), ns)
        spaces.append(ns)
    ct, table, loaded = spaces[0]["ct"], spaces[1]["table"], spaces[2]["df"]
    ref = emb.load_embeddings("embeddings/ctpet.h5")
    assert list(loaded.index) == [c for c in CACHE_CASES[::-1] if c != CACHE_CASES[2]]
    assert list(loaded.columns) == list(ref.columns) == list(table.columns)
    assert list(ct.columns) == [c for c in ref.columns if c.startswith("ct_")] and ct.index.name == "case_id"
    joined = loaded.join(table, rsuffix="_plain")
    np.testing.assert_array_equal(
        joined[ref.columns].to_numpy(), joined[[f"{c}_plain" for c in ref.columns]].to_numpy()
    )
    csv = pd.read_csv("embeddings_ctpet.csv", index_col="case_id")
    assert list(csv.columns) == list(ref.columns)
    np.testing.assert_allclose(csv.loc[ref.index].to_numpy(), ref.to_numpy(), rtol=1e-6)
