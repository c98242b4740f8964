"""The registry of embedding sets: one entry per set, asked by the CLI, study, report, predict
and the embedding writer."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline import embedding_sets, embeddings, study
from pipeline.cli.embed import extract_embeddings as extract_main
from pipeline.cli.train import default_run_name
from pipeline.embedding_sets import EMBEDDING_SETS, SET_NAMES, embedding_set, set_of_datasets
from pipeline.report import labels


def test_every_consumer_reads_the_registry():
    datasets = {n: s.datasets for n, s in EMBEDDING_SETS.items()}
    assert SET_NAMES == ("ct", "pet", "ctpet")
    assert embeddings.MODALITIES == datasets
    assert study.MODALITY_SETS == datasets
    assert study.MODALITY_LABELS == {"ct": "CT", "pet": "PET", "ctpet": "CT+PET"}
    assert [c.name for c in study.configurations(projections=(64,), baseline=False)] == [
        f"{n}-d64" for n in SET_NAMES]
    assert labels.TABLE1_CNN == (study.BASELINE, *SET_NAMES)
    assert labels.PEER_GROUP_LABELS["head-ctpet"] == "peer: CT+PET embedding head"
    assert embedding_set("ctpet").dims == {"ct": 512, "pet": 768}


def test_set_names_follow_the_datasets_they_read():
    assert set_of_datasets(["pet", "ct"]) == "ctpet"
    assert set_of_datasets(["pet"]) == "pet"
    assert default_run_name(["pet", "ct"], None) == "ctpet-dorig"
    assert default_run_name(["ct", "radiomics"], 64) == "ct+radiomics-d64"  # no set reads that pair
    with pytest.raises(ValueError, match="no embedding set reads the datasets \\['radiomics'\\]"):
        set_of_datasets(["radiomics"])
    with pytest.raises(ValueError, match="unknown embedding set 'mri'"):
        embedding_set("mri")


def test_a_new_set_is_one_entry(monkeypatch):
    new = embedding_sets.EmbeddingSet("petct2", ("pet", "ct"), "PET+CT (2)", "tab:purple")
    monkeypatch.setitem(EMBEDDING_SETS, "petct2", new)
    assert "petct2 = PET-FM + CT-FM (768-d, 512-d)" in embedding_sets.set_help()


def test_extract_embeddings_offers_the_registered_sets():
    out = " ".join(CliRunner().invoke(extract_main, ["--help"]).output.split())
    assert "[ct|pet|ctpet]" in out and "ct = CT-FM (512-d)" in out
    bad = CliRunner().invoke(extract_main, ["--modality", "mri"])
    assert bad.exit_code != 0 and "'mri' is not one of 'ct', 'pet', 'ctpet'" in bad.output
