"""Safe, strict loading of CT-FM / PET-FM weights from every container users may hold."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.checkpoints import (
    CheckpointError,
    load_ct_fm,
    load_pet_fm,
    load_state_dict_strict,
    random_ct_fm,
    random_pet_fm,
    read_ct_fm_state_dict,
    read_pet_fm_state_dict,
)
from pipeline.artefacts import sha256_file

CT_SMALL = dict(init_filters=4, blocks_down=(1, 2, 1))
PET_SMALL = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=8, window_size=6, global_attn_indexes=(1,)
)


def _ct_input() -> torch.Tensor:
    return torch.rand(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(11))


def _pet_input() -> torch.Tensor:
    return torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(12))


def _sam_model_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A whole SAM-Med3D-style model state: encoder plus prompt encoder and mask decoder."""
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 8)
    state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(3, 4)
    state["mask_decoder.iou_token.weight"] = torch.randn(1, 8)
    return state


# --------------------------------------------------------------------------- CT-FM


def test_ct_flat_safetensors_roundtrip(tmp_path):
    model = random_ct_fm(0, **CT_SMALL)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    loaded, digest = load_ct_fm(path, **CT_SMALL)
    assert digest == sha256_file(path) and len(digest) == 64
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ct_input()), model(_ct_input()), rtol=0, atol=0)


def test_ct_encoder_prefix_and_missing_num_batches_tracked(tmp_path):
    model = random_ct_fm(1, **CT_SMALL)
    state = {f"encoder.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "internal.safetensors"
    save_file(state, str(path))
    read = read_ct_fm_state_dict(path)
    assert set(read) == set(model.state_dict())
    loaded, _ = load_ct_fm(path, **CT_SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ct_input()), model(_ct_input()), rtol=0, atol=0)


def _full_size_state(model_cls) -> dict[str, torch.Tensor]:
    """Random tensors with the release's names and shapes (no slow layer init)."""
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in model_cls().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    return {
        k: (torch.randn(s, generator=gen) if d.is_floating_point else torch.zeros(s, dtype=d))
        for k, (s, d) in shapes.items()
    }


@pytest.mark.slow  # full-size checkpoint: seconds of CPU
def test_ct_full_size_release_layout(tmp_path):
    """The real key set at the real size: flat keys, no num_batches_tracked stored."""
    from models.ct_fm import CTFMEncoder

    full = _full_size_state(CTFMEncoder)
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}, str(path))
    loaded, digest = load_ct_fm(path)
    assert digest == sha256_file(path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(full[key], value), key


def test_ct_foreign_and_misshaped_keys_are_listed(tmp_path):
    state = random_ct_fm(0, **CT_SMALL).state_dict()
    state["head.weight"] = torch.zeros(3)
    state["conv_init.weight"] = torch.zeros(4, 1, 5, 5, 5)
    del state["layers.0.blocks.0.conv1.weight"]
    path = tmp_path / "foreign.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError) as err:
        load_ct_fm(path, **CT_SMALL)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys (1): layers.0.blocks.0.conv1.weight" in msg
    assert "unexpected keys (1): head.weight" in msg
    assert "conv_init.weight (file [4, 1, 5, 5, 5] vs model [4, 1, 3, 3, 3])" in msg


def test_ct_not_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"conv_init.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        load_ct_fm(path)
    with pytest.raises(CheckpointError, match="weight file not found"):
        read_ct_fm_state_dict(tmp_path / "absent.safetensors")


# --------------------------------------------------------------------------- PET-FM


def test_pet_flat_whole_model_pth(tmp_path):
    model = random_pet_fm(0, **PET_SMALL)
    path = tmp_path / "seganypet_v1.pth"
    torch.save(_sam_model_state(model), path)
    read = read_pet_fm_state_dict(path)
    assert set(read) == set(model.state_dict())  # prompt encoder / mask decoder dropped
    loaded, digest = load_pet_fm(path, **PET_SMALL)
    assert digest == sha256_file(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pet_input()), model(_pet_input()), rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_pet_training_dict_with_namespace_optimizer_and_numpy(tmp_path, prefix):
    model = random_pet_fm(1, **PET_SMALL)
    state = {f"{prefix}{k}": v for k, v in _sam_model_state(model).items()}
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    params[0].sum().backward()
    optimizer.step()  # real moment buffers in the optimizer state
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[120, 180])
    path = tmp_path / "sam_model_latest.pth"
    torch.save(
        {
            "epoch": 200,
            "model_state_dict": state,
            "optimizer_state_dict": optimizer.state_dict(),
            "lr_scheduler_state_dict": scheduler.state_dict(),
            "losses": [0.5, 0.4],
            "dices": [np.float64(0.7)],
            "best_loss": 0.4,
            "best_dice": np.float64(0.7),
            "args": argparse.Namespace(model_type="vit_b_ori", lr=1e-4, multi_gpu=bool(prefix)),
            "used_datas": ["data/train/PET"],
        },
        path,
    )
    loaded, _ = load_pet_fm(path, fast_windowed=False, **PET_SMALL)
    assert loaded.fast_windowed is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pet_input()), model(_pet_input()), rtol=0, atol=1e-5)


def test_pet_bare_encoder_state_dict(tmp_path):
    model = random_pet_fm(2, **PET_SMALL)
    path = tmp_path / "encoder.pth"
    torch.save(model.state_dict(), path)
    loaded, _ = load_pet_fm(path, **PET_SMALL)
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pet_input()), model(_pet_input()), rtol=0, atol=0)


@pytest.mark.slow  # full-size checkpoint: seconds of CPU
def test_pet_full_size_whole_model(tmp_path):
    from models.pet_fm import PETFMEncoder

    full = _full_size_state(PETFMEncoder)
    path = tmp_path / "seganypet_v1.pth"
    torch.save({"model_state_dict": {f"module.image_encoder.{k}": v for k, v in full.items()}}, path)
    loaded, _ = load_pet_fm(path)
    assert len(loaded.state_dict()) == 189
    for key, value in loaded.state_dict().items():
        assert torch.equal(full[key], value), key


class _Payload:
    """Unpickling this would create a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pet_pickle_with_arbitrary_object_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"image_encoder.pos_embed": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: refused to unpickle.*Unsupported global"):
        read_pet_fm_state_dict(path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pet_plain_pickle_and_junk_are_refused(tmp_path):
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"x": os.getcwd}))  # legacy pickle carrying a function
    with pytest.raises(CheckpointError, match=str(plain)):
        read_pet_fm_state_dict(plain)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"{junk}: not a readable torch checkpoint"):
        read_pet_fm_state_dict(junk)
    st = tmp_path / "weights.safetensors"
    save_file({"a": torch.zeros(2)}, str(st))
    with pytest.raises(CheckpointError, match=str(st)):
        read_pet_fm_state_dict(st)


def test_pet_foreign_and_misshaped_files(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match=rf"{foreign}: no PET-FM image-encoder weights found"):
        read_pet_fm_state_dict(foreign)
    state = _sam_model_state(random_pet_fm(0, **PET_SMALL))
    state["image_encoder.blocks.0.attn.rel_pos_d"] = torch.zeros(15, 16)  # a global-size table
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.rel_pos_d \(file \[15, 16\] vs model \[11, 16\]\)"):
        load_pet_fm(wrong, **PET_SMALL)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_pet_fm_state_dict(listing)


# --------------------------------------------------------------------------- helpers


def test_load_state_dict_strict_rejects_non_tensors_and_leaves_module_untouched():
    module = torch.nn.Linear(2, 3)
    before = module.weight.clone()
    with pytest.raises(CheckpointError, match=r"some\.file: .*non-tensor values \(1\): bias"):
        load_state_dict_strict(module, {"weight": torch.ones(3, 2), "bias": [0, 0, 0]}, source="some.file")
    assert torch.equal(module.weight, before)
    load_state_dict_strict(module, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, source="ok")
    assert torch.equal(module.weight, torch.ones(3, 2))


def test_random_models_are_deterministic_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = random_pet_fm(5, **PET_SMALL)
    assert torch.equal(torch.rand(3), expected_next)
    b = random_pet_fm(5, **PET_SMALL)
    c = random_pet_fm(6, **PET_SMALL)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.blocks[0].attn.rel_pos_h, c.blocks[0].attn.rel_pos_h)
    assert a.blocks[0].attn.rel_pos_h.abs().max() > 0  # the quirk's tables are exercised
    ct_a, ct_b = random_ct_fm(5, **CT_SMALL), random_ct_fm(5, **CT_SMALL)
    assert all(torch.equal(v, ct_b.state_dict()[k]) for k, v in ct_a.state_dict().items())
    assert not torch.equal(random_ct_fm(6, **CT_SMALL).conv_init.weight, ct_a.conv_init.weight)
