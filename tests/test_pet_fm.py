"""PET-FM encoder: public architecture, upstream parity, literal == fast windowed attention."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.pet_fm import PETFMEncoder, relative_position_table

DATA = Path(__file__).parent / "data"

# tests/data/pet_fm_upstream_tiny.pt was produced outside the repository by running
# SAM-Med3D's own ImageEncoderViT3D (uni-medical/SAM-Med3D@f3de1fa,
# segment_anything/modeling/image_encoder3D.py; use_rel_pos=True, qkv_bias=True, LayerNorm
# eps 1e-6) with a tiny config (img 16, patch 4 -> 4^3 grid, dim 32, 2 heads, depth 2, block 1
# global, window 6 so the windowed block pads 4 -> 6, neck to 16). torch.manual_seed(20240607);
# weight matrices ~ N(0, 1/fan_in); biases, rel-pos tables, pos_embed ~ N(0, 0.25) (norm
# weights 1 + N(0, 0.25)); input ~ N(0, 1) [1, 1, 16, 16, 16]. Stored: the config, upstream's
# state dict, the input, the token mean before the neck ("embedding") and the neck output.

TINY = dict(
    img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, out_chans=8, window_size=6, global_attn_indexes=(1,)
)


def _randomise(model: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Non-zero everything, including qkv biases and rel-pos tables (the quirk's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2 and "rel_pos" not in name and name != "pos_embed":
                p.copy_(noise * p[0].numel() ** -0.5)
            else:
                p.copy_(noise * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))


def _public_key_pattern() -> re.Pattern[str]:
    block = (
        r"blocks\.(\d+)\.(norm1\.(weight|bias)|norm2\.(weight|bias)|attn\.qkv\.(weight|bias)"
        r"|attn\.proj\.(weight|bias)|attn\.rel_pos_[dhw]|mlp\.lin[12]\.(weight|bias))"
    )
    other = (
        r"pos_embed|patch_embed\.proj\.(weight|bias)"
        r"|neck\.0\.weight|neck\.1\.(weight|bias)|neck\.2\.weight|neck\.3\.(weight|bias)"
    )
    return re.compile(rf"^({block}|{other})$")


def test_default_architecture_matches_public_vit_b_ori():
    with torch.device("meta"):
        model = PETFMEncoder()
    sd = model.state_dict()
    assert len(sd) == 189
    assert sum(p.numel() for p in model.parameters()) == 92_924_928
    pattern = _public_key_pattern()
    assert all(pattern.match(k) for k in sd), [k for k in sd if not pattern.match(k)]
    assert sd["pos_embed"].shape == (1, 8, 8, 8, 768)
    assert sd["patch_embed.proj.weight"].shape == (768, 1, 16, 16, 16)
    for i in range(12):
        rows = 15 if i in (2, 5, 8, 11) else 27
        for axis in "dhw":
            assert sd[f"blocks.{i}.attn.rel_pos_{axis}"].shape == (rows, 64)
        assert sd[f"blocks.{i}.attn.qkv.bias"].shape == (2304,)
        assert sd[f"blocks.{i}.mlp.lin1.weight"].shape == (3072, 768)
    assert sd["neck.0.weight"].shape == (384, 768, 1, 1, 1)
    assert sd["neck.2.weight"].shape == (384, 384, 3, 3, 3)
    assert sd["neck.3.bias"].shape == (384,)
    assert model.embedding_dim == 768


def test_matches_upstream_fixture_literal_and_fast():
    fx = torch.load(DATA / "pet_fm_upstream_tiny.pt", weights_only=True)
    cfg = fx["config"]
    for fast in (False, True):
        model = PETFMEncoder(fast_windowed=fast, **cfg)
        model.load_state_dict(fx["state_dict"], strict=True)
        with torch.no_grad():
            emb = model(fx["input"])
            neck = model.forward_neck(fx["input"])
        assert emb.shape == fx["embedding"].shape == (1, 32)
        torch.testing.assert_close(emb, fx["embedding"], rtol=0, atol=2e-5)
        torch.testing.assert_close(neck, fx["neck"], rtol=0, atol=5e-5)


def test_rel_pos_quirk_is_what_upstream_did():
    """A 'corrected' decomposition would not reproduce the upstream numbers."""
    fx = torch.load(DATA / "pet_fm_upstream_tiny.pt", weights_only=True)
    model = PETFMEncoder(fast_windowed=False, **fx["config"])
    model.load_state_dict(fx["state_dict"], strict=True)
    attn = model.blocks[1].attn  # global block on the 4^3 grid

    def corrected(x):
        b, s = x.shape[0], attn.rel_size
        q, k, v = attn._split_heads(x)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        qr = q.reshape(b, attn.num_heads, s, s, s, -1)
        rd, rh, rw = (relative_position_table(t, s) for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w))
        view = logits.view(b, attn.num_heads, s, s, s, s, s, s)
        view += torch.einsum("bndhwc,dkc->bndhwk", qr, rd)[..., :, None, None]
        view += torch.einsum("bndhwc,hkc->bndhwk", qr, rh)[..., None, :, None]
        view += torch.einsum("bndhwc,wkc->bndhwk", qr, rw)[..., None, None, :]
        return attn._merge_heads(logits.softmax(-1) @ v, (s, s, s))

    with torch.no_grad():
        attn.forward_literal = corrected  # instance attribute shadows the method
        emb_corrected = model(fx["input"])
    assert (emb_corrected - fx["embedding"]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,  # grid 4 padded to window 6
        dict(TINY, img_size=48, window_size=6),  # grid 6 == window: nothing padded
        dict(TINY, img_size=40, window_size=7, num_heads=4),  # grid 5 -> 7, odd sizes
    ],
)
def test_fast_equals_literal(cfg):
    model = PETFMEncoder(fast_windowed=False, **cfg)
    _randomise(model, seed=3)
    x = torch.randn(2, 1, cfg["img_size"], cfg["img_size"], cfg["img_size"], generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        literal = model.forward_tokens(x)
        model.set_fast_windowed(True)
        fast = model.forward_tokens(x)
    assert literal.abs().max() > 0.5  # unit-scale tokens, so 1e-5 is a meaningful bound
    torch.testing.assert_close(fast, literal, rtol=0, atol=1e-5)


def test_fast_attention_alone_equals_padded_literal_with_large_tables():
    """One windowed attention with big rel-pos tables and biases: the padded keys matter."""
    model = PETFMEncoder(fast_windowed=True, **TINY)
    _randomise(model, seed=5, scale=1.5)
    attn = model.blocks[0].attn
    x = torch.randn(2, 4, 4, 4, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fast = attn.forward_padded_fast(x)
        padded = torch.nn.functional.pad(x, (0, 0, 0, 2, 0, 2, 0, 2))
        literal = attn.forward_literal(padded)[:, :4, :4, :4]
        no_pad_keys = attn._merge_heads(  # dropping the padded keys must change the result
            (lambda q, k, v: ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1) @ v)(*attn._split_heads(x)), (4, 4, 4)
        )
    torch.testing.assert_close(fast, literal, rtol=0, atol=1e-5)
    assert (no_pad_keys - literal).abs().max() > 1e-2


def test_multi_window_grid_falls_back_to_literal_partition():
    cfg = dict(TINY, img_size=48, window_size=4)  # grid 6 > window 4: 2 windows per axis
    model = PETFMEncoder(fast_windowed=True, **cfg)
    _randomise(model, seed=7)
    x = torch.randn(1, 1, 48, 48, 48, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        fast = model(x)
        model.set_fast_windowed(False)
        literal = model(x)
    torch.testing.assert_close(fast, literal, rtol=0, atol=1e-6)


def test_shapes_eval_only_and_input_validation():
    model = PETFMEncoder(**TINY)
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 1, 32, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (3, 32)
        assert model.forward_neck(x).shape == (3, 8, 4, 4, 4)
        tokens = model.forward_tokens(x)
    torch.testing.assert_close(model(x), tokens.mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match=r"\[3, 1, 16, 32, 32\]"):
        model(torch.randn(3, 1, 16, 32, 32))
    with pytest.raises(ValueError, match="not a multiple"):
        PETFMEncoder(img_size=30, patch_size=8)


@pytest.mark.slow  # a full-size forward: ~10 s of CPU
def test_full_size_fast_forward_runs_on_the_real_grid():
    """One real-size forward (fast path, 8^3 grid padded to 14): 128^3 input -> 768-d."""
    from models.checkpoints import random_pet_fm

    model = random_pet_fm(0)
    x = torch.rand(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = model(x)
    assert emb.shape == (1, 768) and torch.isfinite(emb).all()
    assert emb.std() > 1e-3  # not collapsed to a constant


def test_batch_elements_are_independent():
    model = PETFMEncoder(**TINY)
    _randomise(model, seed=9)
    x = torch.randn(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-5)
