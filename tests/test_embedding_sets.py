"""The registry of encoders and embedding sets: one entry per encoder or set, asked by the
extraction, the CLIs, the study, the report and prediction."""

from __future__ import annotations

import json
import warnings

import h5py
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import cache, embedding_sets, hub_weights, study, study_spec
from pipeline.cli.embed import extract_embeddings as extract_main
from pipeline.cli.train import default_run_name
from pipeline.embedding_sets import (
    EMBEDDING_SETS,
    ENCODERS,
    EmbeddingSet,
    embedding_set,
    encoder_names,
    full_set,
    head_group,
    set_names,
    set_of_encoders,
    set_of_group,
    weights_by_encoder,
)
from pipeline.report import labels


def test_every_consumer_reads_the_registry():
    assert set_names() == ("ct", "pet", "ctpet") and encoder_names() == ("ct", "pet")
    assert full_set() == "ctpet"
    assert [c.name for c in study_spec.configurations(projections=(64,), baseline=False)] == [
        f"{n}-d64" for n in set_names()
    ]
    assert labels.table1_cnn() == (study_spec.BASELINE, *set_names())
    assert labels.table1_peers() == ("clinical", "radiomics", "head-ct", "head-pet", "head-ctpet")
    assert labels.peer_group_labels()["head-ctpet"] == "peer: CT+PET embedding head"
    assert embedding_set("ctpet").dims == {"ct": 512, "pet": 768}
    # The cache's input names and the Hub's files are the encoders' entries.
    assert (cache.CTFM_CT, cache.PETFM_PET) == (ENCODERS["ct"].input_key, ENCODERS["pet"].input_key)
    assert hub_weights.hub_file("pet").repo_id == ENCODERS["pet"].hub_repo
    # One spelling of a head's report group.
    peer = study_spec.Peer("embeddings", "ctpet", 64)
    assert peer.name == "head-ctpet-d64" and peer.group == head_group("ctpet") == "head-ctpet"
    assert set_of_group("head-ctpet") == set_of_group("ctpet") == "ctpet" and set_of_group("clinical") is None


def test_set_names_follow_the_encoders_they_read():
    assert set_of_encoders(["pet", "ct"]) == "ctpet"
    assert set_of_encoders(["pet"]) == "pet"
    assert default_run_name(["pet", "ct"], None) == "ctpet-dorig"
    assert default_run_name(["ct", "radiomics"], 64) == "ct+radiomics-d64"  # no set reads that pair
    with pytest.raises(ValueError, match="no embedding set reads the encoders \\['radiomics'\\]"):
        set_of_encoders(["radiomics"])
    with pytest.raises(ValueError, match="unknown embedding set 'mri'"):
        embedding_set("mri")
    with pytest.raises(ValueError, match="unknown embedding set 'mri'"):
        study_spec.Configuration("mri", 64)
    assert weights_by_encoder({"ct_weights": "a.safetensors", "pet_weights": None}) == {
        "ct": "a.safetensors",
        "pet": None,
    }
    with pytest.raises(TypeError, match="mri_weights"):
        weights_by_encoder({"mri_weights": "x"})


def test_the_encoders_code_is_named_not_imported():
    """The registry loads no torch: the builders are ``module:attribute`` text, resolved when used."""
    from models import checkpoints

    for entry in ENCODERS.values():
        for ref in (entry.loader, entry.random_builder, entry.architecture, entry.weights_source):
            assert isinstance(ref, str) and embedding_sets.resolve(ref) is not None
    assert embedding_sets.resolve(ENCODERS["ct"].random_builder) is checkpoints.random_ct_fm
    assert embedding_sets.resolve(ENCODERS["pet"].architecture) == checkpoints.PET_FM_NAME


def test_extract_embeddings_offers_the_registered_sets_and_encoders():
    out = " ".join(CliRunner().invoke(extract_main, ["--help"]).output.split())
    assert "[ct|pet|ctpet]" in out and "ct = CT-FM (512-d)" in out
    assert "--ct-weights" in out and "--pet-weights" in out and "$HNFM_PET_FM_WEIGHTS" in out
    bad = CliRunner().invoke(extract_main, ["--modality", "mri"])
    assert bad.exit_code != 0 and "'mri' is not one of 'ct', 'pet', 'ctpet'" in bad.output


@pytest.fixture
def pet_again(monkeypatch):
    """A test registry with one set more: a second name for the PET-FM's embeddings."""
    new = EmbeddingSet("petagain", ("pet",), "PET again", "tab:purple")
    monkeypatch.setitem(EMBEDDING_SETS, new.name, new)
    return new


def test_a_new_set_reaches_every_name_and_label(pet_again):
    assert "petagain = PET-FM (768-d)" in embedding_sets.set_help()
    assert study_spec.Configuration.from_name("petagain-d64").encoders == ("pet",)
    assert [c.name for c in study_spec.configurations(projections=(64,), baseline=False)][-1] == "petagain-d64"
    assert labels.group_label("petagain") == "DeepMTS+DAFT + PET again"
    assert labels.group_label("head-petagain") == "peer: PET again embedding head"
    assert labels.embedding_label("head-petagain") == "PET again"
    assert set_of_encoders(["pet"]) == "pet"  # the first set reading them keeps its name


@pytest.mark.slow
def test_a_new_set_is_one_entry(pet_again, tmp_path):
    """Registered in a test registry, a new set is extracted, trained, run as a study's
    configuration with its embedding head, and reported, with nothing else added."""
    from helpers import TINY_ENCODERS, make_spec, make_study_inputs

    from pipeline.embeddings import RandomInitWarning, read_embeddings
    from pipeline.extraction import run_extraction
    from pipeline.report import write_report

    inputs = make_study_inputs(tmp_path / "inputs", n_cases=16)
    out = tmp_path / "new" / "petagain.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        res = run_extraction(
            inputs["cache"],
            "petagain",
            out,
            random_init=True,
            device="cpu",
            progress=False,
            encoder_kwargs={"pet": TINY_ENCODERS["pet"]},
        )
        loaded = read_embeddings(out, cache=inputs["cache"])
    assert res.embedding_set == "petagain" and res.per_encoder["pet"].computed == 16
    assert loaded.datasets == ["pet"] and loaded.attrs["modality"] == "petagain"
    with h5py.File(out) as h5:
        assert json.loads(h5.attrs["modalities"]) == ["pet"] and "ct" not in h5

    spec = make_spec(
        {**inputs, "embeddings": out},
        tmp_path / "study",
        configs=("baseline", "petagain-d64"),
        n_folds=2,
        peers=("heads",),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        study.prepare_study(spec, info={"synthetic": True, "data_source": "tiny test cohort", "settings": "test"})
        for cell in study_spec.grid(spec):
            study.run_cell(spec, cell)
        assert [p.name for p in spec.peer_list()] == ["head-petagain-d64"]
        study.run_peer(spec, spec.peer_list()[0], study_spec.FIRST_SPLIT)
    run = json.loads((spec.run_dir(study_spec.Configuration("petagain", 64)) / "run.json").read_text())
    assert run["modalities"] == ["pet"]

    md = write_report(spec.study_dir, tmp_path / "report").read_text()
    res = pd.read_csv(tmp_path / "report" / "results.csv")
    assert set(res["group"]) == {"baseline", "petagain", "head-petagain"} and res["done"].all()
    assert "DeepMTS+DAFT + PET again" in md and "peer: PET again embedding head" in md
    table1 = json.loads((tmp_path / "report" / "results.json").read_text())["table1"]["paper"]
    assert {r["group"]: r["status"] for r in table1} == {
        "baseline": "done",
        "petagain": "done",
        "head-petagain": "done",
    }
