"""What a new user reads when a path, a cache or a manifest is not the one expected."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import pipeline.embeddings as emb
from pipeline.artefacts import ProvenanceError, missing_path
from pipeline.manifest import read_manifest
from tests.test_embeddings import CASES, make_cache, run


def test_missing_path_says_it_does_not_exist_and_lists_the_neighbours(tmp_path):
    (tmp_path / "ct.h5").write_bytes(b"")
    (tmp_path / "ctpet.h5").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    msg = missing_path(tmp_path / "ctpte.h5", "embedding file", "*.h5", hint="make one")
    assert "does not exist" in msg and "ct.h5, ctpet.h5" in msg and "notes.txt" not in msg
    assert msg.endswith("make one")
    # A missing parent: the nearest folder that exists is listed.
    assert "ct.h5" in missing_path(tmp_path / "nope" / "x.h5", "embedding file", "*.h5")


def test_a_mistyped_embeddings_path_lists_the_files_beside_it(tmp_path):
    (tmp_path / "ctpet.h5").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        emb.read_embeddings(tmp_path / "ctpte.h5")
    assert "does not exist" in str(err.value) and "ctpet.h5" in str(err.value)


def test_a_mistyped_cache_path_lists_the_caches_beside_it(tmp_path):
    make_cache(tmp_path / "preprocessed")
    with pytest.raises(FileNotFoundError) as err:
        emb.open_cache(tmp_path / "preprocesed")
    msg = str(err.value)
    assert "does not exist" in msg and "preprocessed/cohort.json" in msg
    assert "Make one with" not in msg  # not advised to build a cache at the mistyped path


def test_a_wrong_manifest_name_lists_the_csvs_and_a_missing_column_names_the_schema(tmp_path):
    (tmp_path / "data_manifest.csv").write_text("case_id\nA\n")
    with pytest.raises(FileNotFoundError) as err:
        read_manifest(tmp_path / "data_manifest_.csv")
    assert "does not exist" in str(err.value) and "data_manifest.csv" in str(err.value)
    with pytest.raises(ValueError) as err:
        read_manifest(tmp_path / "data_manifest.csv")
    msg = str(err.value)
    assert "pipeline/manifest.py" in msg and "build-manifest" in msg and "make-demo-cohort" in msg


def test_embeddings_of_another_cache_name_both_caches_and_the_differing_parameter(tmp_path):
    made = make_cache(tmp_path / "a", params={"spacing": 1.0, "variant": "a"})
    out = tmp_path / "ct.h5"
    run(made, "ct", out)
    other = make_cache(tmp_path / "b", params={"spacing": 2.0, "variant": "a"})
    with warnings.catch_warnings(), pytest.raises(ProvenanceError) as err:
        warnings.simplefilter("ignore", emb.RandomInitWarning)
        emb.read_embeddings(out, cache=other, case_ids=CASES)
    msg = str(err.value)
    assert str(made.root.resolve()) in msg and str(other.root.resolve()) in msg
    assert "spacing: 1.0 there, 2.0 here" in msg and "variant" not in msg


def test_the_random_init_warning_is_said_once(tmp_path, capsys):
    cache = make_cache(tmp_path / "c")
    out = tmp_path / "ct.h5"
    run(cache, "ct", out)
    # A console (a fresh interpreter, no warning recorder): one stderr line.
    code = ("from pipeline.embeddings import read_embeddings; "
            f"read_embeddings({str(out)!r}, cache={str(cache.root)!r})")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("randomly initialised") == 1 and len(err.strip().splitlines()) == 1, err
    # A recorder: it gets the warning once, and nothing is printed besides.
    with pytest.warns(emb.RandomInitWarning) as record:
        emb.read_embeddings(out, cache=cache)
    assert len([w for w in record if w.category is emb.RandomInitWarning]) == 1
    assert "randomly initialised" not in capsys.readouterr().err
