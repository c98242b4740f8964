"""kill -9 a real extract-embeddings process, rerun, and get the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import TINY_ENCODERS, expensive, make_cache

from pipeline import extraction as ext
from pipeline.cache import PreprocessedCache

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pipeline.embeddings.RandomInitWarning")]

REPO = Path(__file__).resolve().parent.parent
CASES = [f"CHUS-{i:03d}" for i in range(1, 8)]
TINY_CT = {"ct": TINY_ENCODERS["ct"]}


def cli_args(cache: PreprocessedCache, out: Path) -> list[str]:
    return [
        "--modality",
        "ct",
        "--cache",
        str(cache.root),
        "--out",
        str(out),
        "--random-init",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--no-progress",
        "--encoder-config",
        json.dumps(TINY_CT),
    ]


def slowed_run(args: list[str], patch: str) -> subprocess.Popen:
    """The real command in a child process, with a sleep patched into one step."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        torch.set_num_threads(2)  # as in-process (conftest): same kernels, same bits
        import pipeline.embeddings as emb  # the store: writes the final file
        import pipeline.extraction as ext  # runs the encoders, writes the shards
        {patch}
        from pipeline.cli.embed import extract_embeddings
        extract_embeddings({args!r})
    """)
    return subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited early ({proc.returncode}): {out.decode()} {err.decode()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("child made no progress")
        time.sleep(0.02)


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def read(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with h5py.File(path, "r") as h5:
        return (list(h5["case_ids"].asstr()[()]), list(h5["fingerprints"].asstr()[()]), h5["ct"][()])


@pytest.fixture(scope="module")
@expensive
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    cache = make_cache(root / "cache", CASES, params={"variant": "crash-test"}, seed=1)
    ref = root / "ref" / "ct.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ext.run_extraction(
            cache.root, "ct", ref, random_init=True, device="cpu", batch_size=2, encoder_kwargs=TINY_CT, progress=False
        )
    return cache, read(ref)


def test_kill9_while_writing_shards_then_resume_matches_uninterrupted(setup, tmp_path):
    cache, (ref_ids, ref_fps, ref_ct) = setup
    out = tmp_path / "emb" / "ct.h5"
    shards = tmp_path / "emb" / ext.SHARD_DIR_NAME
    # Sleep between writing a shard's temporary file and renaming it into place, so the
    # kill lands with a half-finished shard on disk.
    proc = slowed_run(
        cli_args(cache, out),
        textwrap.dedent("""
        _save = ext._save_array
        def _slow(handle, arr):
            _save(handle, arr)
            time.sleep(0.4)
        ext._save_array = _slow
    """)
        .strip()
        .replace("\n", "\n        "),
    )
    done = lambda: list(shards.rglob("*.npy"))  # noqa: E731
    wait_for(lambda: len(done()) >= 3 and temps(shards), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_done = len(done())
    assert 3 <= n_done < len(CASES)
    assert not out.exists()  # no partial file under the final name
    assert temps(shards)  # a half-written shard was left behind ...

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ext.run_extraction(
            cache.root, "ct", out, random_init=True, device="cpu", batch_size=2, encoder_kwargs=TINY_CT, progress=False
        )
    assert res.per_encoder["ct"].reused == n_done
    assert res.per_encoder["ct"].computed == len(CASES) - n_done
    assert not temps(tmp_path)  # ... and removed, never read
    ids, fps, ct = read(out)
    assert ids == ref_ids == CASES and fps == ref_fps
    np.testing.assert_array_equal(ct, ref_ct)  # bit-identical to the uninterrupted run


def test_kill9_while_assembling_then_rerun_reuses_everything(setup, tmp_path):
    cache, (ref_ids, _, ref_ct) = setup
    out = tmp_path / "emb" / "ct.h5"
    # code_version() is called with the temporary .h5 already open: stall there.
    proc = slowed_run(cli_args(cache, out), "emb.code_version = lambda: time.sleep(60) or 'stalled'")
    wait_for(lambda: list(out.parent.glob(f".{out.name}.*.tmp")), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(out.parent.glob(f".{out.name}.*.tmp"))
    assert len(list((out.parent / ext.SHARD_DIR_NAME).rglob("*.npy"))) == len(CASES)

    # The real command, in a process of its own; then once more on the complete file.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pipeline.cli.embed", *cli_args(cache, out)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"ct: 0 computed, {len(CASES)} reused" in r.stdout
    assert not temps(tmp_path)
    ids, _, ct = read(out)
    assert ids == ref_ids
    np.testing.assert_array_equal(ct, ref_ct)

    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stdout and "nothing computed" in r.stdout
