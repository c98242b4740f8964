"""CT-FM encoder: the public SegResEncoder architecture and key names, pooled embedding."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from models.ct_fm import CTFMEncoder


def _public_keys(blocks_down=(1, 2, 2, 4, 4)) -> set[str]:
    """Key names of the public model.safetensors, spelled out from the architecture."""
    keys = {"conv_init.weight"}
    for level, n_blocks in enumerate(blocks_down):
        for block in range(n_blocks):
            prefix = f"layers.{level}.blocks.{block}"
            for norm in ("norm1", "norm2"):
                keys |= {
                    f"{prefix}.{norm}.{b}"
                    for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
                }
            keys |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
        if level < len(blocks_down) - 1:
            keys.add(f"layers.{level}.downsample.weight")
    return keys


def test_default_architecture_matches_public_release():
    with torch.device("meta"):
        model = CTFMEncoder()
    sd = model.state_dict()
    assert set(sd) == _public_keys()
    assert len(sd) == 161
    assert sum(p.numel() for p in model.parameters()) == 77_760_992
    assert sd["conv_init.weight"].shape == (32, 1, 3, 3, 3)
    assert sd["layers.3.downsample.weight"].shape == (512, 256, 3, 3, 3)
    assert sd["layers.4.blocks.3.conv2.weight"].shape == (512, 512, 3, 3, 3)
    assert "layers.4.downsample.weight" not in sd
    assert model.embedding_dim == 512
    assert isinstance(model, SegResEncoder)


def test_embedding_is_global_mean_of_last_map_of_monai_encoder():
    small = dict(in_channels=1, init_filters=4, blocks_down=(1, 2, 1))
    from models.checkpoints import random_ct_fm

    model = random_ct_fm(0, **small)
    reference = SegResEncoder(spatial_dims=3, **small).eval()
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = model(x)
        maps = reference(x)
    assert [m.shape[1] for m in maps] == [4, 8, 16]
    assert emb.shape == (2, 16) and model.embedding_dim == 16
    torch.testing.assert_close(emb, maps[-1].mean(dim=(2, 3, 4)), rtol=0, atol=1e-6)


def test_stays_in_eval_mode_and_uses_running_stats():
    from models.checkpoints import random_ct_fm

    model = random_ct_fm(1, init_filters=4, blocks_down=(1, 1))
    model.train()
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    # Batch statistics would couple the cases; running stats keep them independent.
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_input_validation():
    model = CTFMEncoder(init_filters=2, blocks_down=(1, 1))
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\].*\[1, 2, 8, 8, 8\]"):
        model(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="blocks_down"):
        CTFMEncoder(blocks_down=())
