"""``train-survival``'s presets: the demo's network on a demo-size cache, checked before any file is written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import expensive

from pipeline.cli.train import default_run_name, resolve_preset, train_survival
from pipeline.demo import DEMO_SURVIVAL_SIZE_XYZ, DEMO_TRAIN

pytestmark = pytest.mark.slow  # trains networks or runs the console scripts end to end


@pytest.fixture(scope="module")
@expensive
def demo_size_cache(tiny_study, tmp_path_factory):
    """The tiny cohort preprocessed with the demo's survival size (pipeline.demo)."""
    from pipeline.preprocess import PreprocessParams, preprocess_cohort

    cache = tmp_path_factory.mktemp("demo_size") / "cache"
    params = PreprocessParams(
        survival_size_xyz=DEMO_SURVIVAL_SIZE_XYZ, ctfm_size_xyz=(32, 32, 16), petfm_size_xyz=(32, 32, 32)
    )
    preprocess_cohort(tiny_study["manifest"], cache, params, workers=2, progress=False)
    return cache


def _args(tiny_study, cache, tmp_path, *extra):
    return [
        "--manifest",
        str(tiny_study["manifest"]),
        "--cache",
        str(cache),
        "--out",
        str(tmp_path / "run"),
        "--folds",
        str(tmp_path / "folds.json"),
        "--n-folds",
        "3",
        "--quiet",
        *extra,
    ]


def test_paper_network_on_the_demo_cache_names_the_preset_and_writes_nothing(tiny_study, demo_size_cache, tmp_path):
    result = CliRunner().invoke(train_survival, _args(tiny_study, demo_size_cache, tmp_path, "--preset", "paper"))
    assert result.exit_code == 1
    assert "error:" in result.output and "--preset demo" in result.output
    assert " x ".join(map(str, DEMO_SURVIVAL_SIZE_XYZ)) in result.output
    # Nothing written: the corrected command into the same folder then runs (no "config_hash differs").
    assert list(tmp_path.iterdir()) == []
    fixed = CliRunner().invoke(
        train_survival,
        _args(
            tiny_study,
            demo_size_cache,
            tmp_path,
            "--preset",
            "demo",
            "--fold",
            "0",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
        ),
    )
    assert fixed.exit_code == 0, fixed.output
    assert (tmp_path / "run" / "fold_0" / "done.json").is_file()


def test_auto_takes_the_demo_preset_on_a_demo_cache_under_explicit_options(tiny_study, demo_size_cache, tmp_path):
    result = CliRunner().invoke(
        train_survival,
        _args(tiny_study, demo_size_cache, tmp_path, "--fold", "0", "--epochs", "1", "--steps-per-epoch", "1"),
    )
    assert result.exit_code == 0, result.output
    assert "preset: demo (--preset auto" in result.output
    cfg = json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    assert cfg["model"] == DEMO_TRAIN["model"] and cfg["ema_decay"] == DEMO_TRAIN["ema_decay"]
    assert cfg["batch_size"] == DEMO_TRAIN["batch_size"]
    assert cfg["epochs"] == 1 and cfg["steps_per_epoch"] == 1  # explicit options win over the preset


def test_auto_is_paper_on_other_sizes_and_says_why():
    assert resolve_preset("auto", (80, 80, 48))[0] == "paper"
    assert resolve_preset("auto", DEMO_SURVIVAL_SIZE_XYZ)[0] == "demo"
    assert resolve_preset("paper", DEMO_SURVIVAL_SIZE_XYZ) == ("paper", "--preset paper")


def test_run_folders_take_the_study_configuration_names():
    assert default_run_name([], None) == "baseline"
    assert default_run_name(["pet", "ct"], 256) == "ctpet-d256"
    assert default_run_name(["pet"], None) == "pet-dorig"
    assert default_run_name(["radiomics"], 64) == "radiomics-d64"


def test_mistyped_paths_say_they_do_not_exist_and_list_what_is_nearby(tiny_study, tmp_path):
    """A wrong --manifest, --cache or --embeddings names the absent path and what exists beside it,
    and suggests no command that would build something at the mistyped path."""
    emb = tmp_path / "emb"
    emb.mkdir()
    for name in ("ctpet.h5", "pet.h5", "notes.txt"):
        (emb / name).write_text("")
    runner = CliRunner()

    def run(*swap):
        args = _args(tiny_study, tiny_study["cache"], tmp_path)
        for option, value in zip(swap[::2], swap[1::2]):
            args[args.index(option) + 1] = value
        res = runner.invoke(train_survival, args)
        assert res.exit_code == 1 and "Traceback" not in res.output
        return res.output

    manifest = tiny_study["manifest"]
    out = run("--manifest", str(manifest.with_name("manifst.csv")))
    assert f"{manifest.with_name('manifst.csv')}: no such manifest (path does not exist)" in out
    assert f"*.csv in {manifest.parent}/: manifest.csv" in out

    cache = tiny_study["cache"]
    out = run("--cache", str(cache.with_name("cashe")))
    assert f"{cache.with_name('cashe')}: no such preprocessed cache (path does not exist)" in out
    assert f"folders holding cohort.json in {cache.parent}/: cache" in out
    assert f"--out {cache.with_name('cashe')}" not in out

    args = _args(tiny_study, cache, tmp_path, "--embeddings", str(emb / "ctpet.h55"))
    out = runner.invoke(train_survival, args).output
    assert f"{emb / 'ctpet.h55'}: no such embedding file (path does not exist); *.h5 in {emb}/: ctpet.h5, pet.h5" in out
    assert "notes.txt" not in out and "run `extract-embeddings` first" not in out
    # A missing parent folder is said too; the listing comes from the nearest folder that exists.
    args = _args(tiny_study, cache, tmp_path, "--embeddings", str(emb / "sub" / "deeper" / "ctpet.h5"))
    out = runner.invoke(train_survival, args).output
    assert f"neither does {emb / 'sub' / 'deeper'}" in out and f"*.h5 in {emb}/: ctpet.h5, pet.h5" in out
