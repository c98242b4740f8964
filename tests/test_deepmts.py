"""DeepMTS+DAFT network: shapes, upstream-defining structure, DAFT semantics, gradient flow,
FM fusion sizes, optimiser groups and a tiny overfit."""

from __future__ import annotations

import pytest
import torch
from sksurv.metrics import concordance_index_censored
from torch import nn

from models.daft import DAFTBlock, daft_bottleneck_dim
from models.deepmts import (
    DeepMTS,
    DeepMTSConfig,
    ResidualStage,
    SurvivalDenseNet,
    densenet_output_size,
)
from models.fusion import FMProjection
from models.losses import cox_ph_loss, deepmts_loss, soft_dice_loss

N_CLIN = 5
TINY = (32, 32, 32)


def _batch(b: int = 2, size=TINY, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 2, *size, generator=g)
    clinical = torch.randn(b, N_CLIN, generator=g)
    return image, clinical


def _grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# --- DAFT ---------------------------------------------------------------------------------


def test_daft_shapes_bottleneck_and_no_bias():
    block = DAFTBlock(in_channels=288, n_tabular=11)
    assert block.bottleneck_dim == int((288 + 11) / 7) == 42
    assert block.aux.aux_base.weight.shape == (42, 299) and block.aux.aux_base.bias is None
    assert block.aux.aux_out.weight.shape == (2 * 288, 42) and block.aux.aux_out.bias is None
    assert daft_bottleneck_dim(2, 1) == 1  # int(3 / 7) = 0 is guarded to 1
    x = torch.randn(2, 288, 2, 3, 4)
    assert block(x, torch.randn(2, 11)).shape == x.shape


def test_daft_zero_output_layer_gives_zero_and_unit_scale_gives_identity():
    torch.manual_seed(0)
    c, n_tab = 6, 3
    block = DAFTBlock(c, n_tab)
    x = torch.randn(2, c, 3, 4, 5)
    tab = torch.randn(2, n_tab)
    with torch.no_grad():
        block.aux.aux_out.weight.zero_()
    # alpha = beta = 0: output alpha * F + beta is 0 (it would be F with a "1 +" on the scale).
    assert torch.count_nonzero(block(x, tab)) == 0

    # Make hidden unit 0 = relu(tab[:, 0]) = 1, alpha = 1 from it, beta = 0: identity.
    tab[:, 0] = 1.0
    with torch.no_grad():
        block.aux.aux_base.weight.zero_()
        block.aux.aux_base.weight[0, c] = 1.0
        block.aux.aux_out.weight.zero_()
        block.aux.aux_out.weight[:c, 0] = 1.0
    torch.testing.assert_close(block(x, tab), x)


def test_daft_matches_explicit_formula_with_random_weights():
    torch.manual_seed(1)
    c, n_tab = 5, 4
    block = DAFTBlock(c, n_tab, bottleneck_dim=3)
    x, tab = torch.randn(3, c, 2, 3, 4), torch.randn(3, n_tab)
    h = torch.cat([x.mean(dim=(2, 3, 4)), tab], dim=1)
    att = torch.relu(h @ block.aux.aux_base.weight.T) @ block.aux.aux_out.weight.T
    alpha, beta = att[:, :c], att[:, c:]
    torch.testing.assert_close(block(x, tab), alpha[..., None, None, None] * x + beta[..., None, None, None])


# --- structure at the paper's widths (constructed, not run) ---------------------------------


def test_paper_configuration_structure():
    cfg = DeepMTSConfig(n_clinical=11, fm_dims={"ct": 512, "pet": 768}, fm_proj=256)
    model = DeepMTS(cfg)
    stem = model.densenet.stem[0]
    assert stem.weight.shape == (24, 3, 3, 3, 3) and stem.stride == (2, 2, 2) and stem.padding == (0, 0, 0)
    pool = model.densenet.stem[2]
    assert isinstance(pool, nn.MaxPool3d) and pool.kernel_size == 3 and pool.stride == 2 and pool.padding == 0
    # Seg taps 4+8+16+32+64 = 124, DenseNet taps 16+32+64 = 112 feed the two 64-unit dense layers.
    assert [t[0].out_channels for t in model.segmenter.taps] == [4, 8, 16, 32, 64]
    assert model.seg_fc[1].in_features == 124 and model.seg_fc[1].out_features == 64
    assert model.dense_fc[1].in_features == 112 and model.dense_fc[1].out_features == 64
    assert [len(b) for b in model.densenet.blocks] == [4, 8, 16]
    layer = model.densenet.blocks[2][0].body
    assert layer[2].out_channels == 64 and layer[6].out_channels == 16 and layer[6].kernel_size == (3, 3, 3)
    # DAFT after the last dense block: 32 + 16 * 16 = 288 channels, bottleneck int((288 + 11) / 7).
    assert model.densenet.daft.in_channels == 288 and model.densenet.daft.bottleneck_dim == 42
    assert [len(s.convs) for s in model.segmenter.encoder] == [2, 2, 3, 3, 4]
    assert [len(s.convs) for s in model.segmenter.decoder] == [3, 3, 2, 2]
    assert [s.proj[0].out_channels for s in model.segmenter.decoder] == [64, 32, 16, 8]
    assert model.segmenter.decoder[0].proj[0].in_channels == 128 + 64  # upsampled + skip
    assert model.segmenter.out_conv.out_channels == 2
    assert model.risk_head[1].in_features == 64 + 64 + 11 + 2 * 256
    assert densenet_output_size((48, 80, 80), 3) == (2, 4, 4)


def test_densenet_grid_sizes_at_full_input_size():
    cfg = DeepMTSConfig(n_clinical=3, dense_blocks=(1, 1, 1))  # fewer layers, same grids
    net = SurvivalDenseNet(cfg).eval()
    sizes = []
    hooks = [b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:]))) for b in net.blocks]
    with torch.no_grad():
        taps = net(torch.randn(1, 3, 48, 80, 80), torch.randn(1, 3))
    for h in hooks:
        h.remove()
    assert sizes == [(11, 19, 19), (5, 9, 9), (2, 4, 4)]
    assert taps.shape == (1, 112)


def test_residual_stage_wiring():
    torch.manual_seed(2)
    stage = ResidualStage(3, 4, n_convs=3).eval()
    x = torch.randn(1, 3, 4, 4, 4)
    with torch.no_grad():
        s = stage.proj(x)
        s = stage.convs[0](x) + s  # the first 3x3 conv reads the stage input, not the projection
        s = stage.convs[1](s) + s
        s = stage.convs[2](s) + s
        torch.testing.assert_close(stage(x), s)


# --- forward at tiny and full size ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["gate", "binary", "soft"])
def test_forward_shapes_tiny(mode):
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, tumour_input=mode, fm_dims={"ct": 12, "pet": 7}, fm_proj=4))
    image, clinical = _batch()
    out = model(image, clinical, {"ct": torch.randn(2, 12), "pet": torch.randn(2, 7)})
    assert out["seg_prob"].shape == (2, 1, *TINY) and out["risk"].shape == (2,)
    assert ((out["seg_prob"] >= 0) & (out["seg_prob"] <= 1)).all()
    assert torch.isfinite(out["risk"]).all()


@pytest.mark.slow  # a full-size forward: seconds of CPU
def test_forward_full_size_paper_widths():
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig(n_clinical=N_CLIN)).eval()
    image, clinical = _batch(b=1, size=(48, 80, 80))
    with torch.no_grad():
        out = model(image, clinical)
    assert out["seg_prob"].shape == (1, 1, 48, 80, 80) and out["risk"].shape == (1,)


def test_input_validation():
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN))
    image, clinical = _batch()
    with pytest.raises(ValueError, match="input_size"):
        model(image.permute(0, 1, 3, 4, 2)[..., :16], clinical)
    with pytest.raises(ValueError, match="clinical"):
        model(image, clinical[:, :3])
    with pytest.raises(ValueError, match="must cover exactly"):
        DeepMTS(DeepMTSConfig.tiny(N_CLIN, fm_dims={"ct": 3}))(image, clinical, None)
    with pytest.raises(ValueError, match="divisible by 16"):
        DeepMTSConfig(n_clinical=1, input_size=(40, 80, 80))
    with pytest.raises(ValueError, match="too small"):
        DeepMTSConfig(n_clinical=1, input_size=(16, 32, 32))
    with pytest.raises(ValueError, match="n_clinical >= 1"):
        DeepMTSConfig(n_clinical=0)
    with pytest.raises(ValueError, match="tumour_input"):
        DeepMTSConfig(n_clinical=1, tumour_input="hard")


def test_tumour_input_modes_build_the_documented_channels():
    image = torch.arange(2 * 2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2, 2) + 1
    prob = torch.rand(2, 1, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    m = (prob > 0.5).float()
    for mode, expected in {
        "gate": torch.cat([image * m, m], dim=1),
        "binary": torch.cat([image, m], dim=1),
        "soft": torch.cat([image, prob], dim=1),
    }.items():
        model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, tumour_input=mode))
        torch.testing.assert_close(model.tumour_map_input(image, prob), expected)


# --- gradient flow --------------------------------------------------------------------------


@pytest.mark.parametrize("mode,cox_reaches_decoder", [("gate", False), ("binary", False), ("soft", True)])
def test_gradient_flow(mode, cox_reaches_decoder):
    torch.manual_seed(0)
    # Glorot risk weights: with the default zero start no gradient passes the risk layer yet.
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, tumour_input=mode, gate_threshold=0.3, zero_init_risk=False)).eval()
    image, clinical = _batch(b=4)
    time, event = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 0, 1, 1])
    seg = model.segmenter
    decoder_side = nn.ModuleList([seg.decoder, seg.out_conv])

    cox_ph_loss(model(image, clinical)["risk"], time, event).backward()
    assert _grad_norm(seg.encoder) > 0  # through the five encoder taps, in every mode
    assert _grad_norm(model.densenet) > 0
    assert (_grad_norm(decoder_side) > 0) == cox_reaches_decoder

    model.zero_grad(set_to_none=True)
    mask = (torch.rand(4, 1, *TINY, generator=torch.Generator().manual_seed(1)) > 0.8).float()
    soft_dice_loss(model(image, clinical)["seg_prob"], mask).backward()
    assert _grad_norm(decoder_side) > 0 and _grad_norm(seg.encoder) > 0
    assert _grad_norm(model.densenet) == 0 and _grad_norm(model.risk_head) == 0


# --- FM fusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("proj", [64, 128, 256, None])
@pytest.mark.parametrize("modalities", [("ct",), ("pet",), ("ct", "pet")])
def test_fm_projection_sizes(proj, modalities):
    dims = {"ct": 512, "pet": 768}
    fm_dims = {m: dims[m] for m in modalities}
    fusion = FMProjection(fm_dims, proj)
    expected = sum(fm_dims.values()) if proj is None else proj * len(modalities)
    assert fusion.out_dim == expected
    out = fusion({m: torch.randn(3, dims[m]) for m in modalities})
    assert out.shape == (3, expected)
    n_linear = sum(isinstance(m, nn.Linear) for m in fusion.modules())
    assert n_linear == (0 if proj is None else len(modalities))
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, fm_dims=fm_dims, fm_proj=proj))
    assert model.risk_head[1].in_features == 2 * 64 + N_CLIN + expected


def test_fm_projection_order_is_deterministic_and_inputs_checked():
    ct, pet = torch.randn(2, 3), torch.randn(2, 4)
    a = FMProjection({"pet": 4, "ct": 3}, None)
    b = FMProjection({"ct": 3, "pet": 4}, None)
    assert a.names == b.names == ("ct", "pet")
    torch.testing.assert_close(a({"pet": pet, "ct": ct}), torch.cat([ct, pet], dim=1))
    torch.testing.assert_close(b({"ct": ct, "pet": pet}), torch.cat([ct, pet], dim=1))
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        a({"ct": torch.randn(2, 5), "pet": pet})
    with pytest.raises(ValueError, match="must cover exactly"):
        a({"ct": ct})
    empty = FMProjection({}, 64)
    assert empty.out_dim == 0 and empty(None, reference=torch.zeros(5, 2)).shape == (5, 0)


# --- optimiser groups -----------------------------------------------------------------------


def test_param_groups_cover_every_parameter_once_with_paper_decays():
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, fm_dims={"ct": 6}, fm_proj=4))
    groups = {g["name"]: g for g in model.param_groups()}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    classifier = {id(p) for p in groups["classifier"]["params"]}
    assert groups["classifier"]["weight_decay"] == 0.1
    for layer in (model.seg_fc[1], model.dense_fc[1], model.risk_head[1], model.fusion.projections["ct"]):
        assert id(layer.weight) in classifier and id(layer.bias) not in classifier
    assert groups["classifier_bias"]["weight_decay"] == 0.0
    assert groups["densenet"]["weight_decay"] == 1e-4
    assert id(model.densenet.daft.aux.aux_base.weight) in {id(p) for p in groups["densenet"]["params"]}
    assert groups["segmentation"]["weight_decay"] == 0.0
    torch.optim.Adam(model.param_groups(), lr=1e-3)  # accepted by torch


# --- learning -------------------------------------------------------------------------------


def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, head_dropout=0.0, dense_dropout=0.0, tumour_input="soft"))
    image, clinical = _batch(b=3, seed=7)
    mask = torch.zeros(3, 1, *TINY)
    mask[:, :, 10:20, 12:22, 8:18] = 1.0
    image[:, :, 10:20, 12:22, 8:18] += 2.0  # a visible "tumour"
    time, event = torch.tensor([5.0, 1.0, 3.0]), torch.tensor([1, 1, 0])
    opt = torch.optim.Adam(model.param_groups(), lr=1e-2)
    history = []
    for _ in range(8):
        loss, parts = deepmts_loss(model(image, clinical), mask, time, event)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(parts)
    assert history[-1]["total"] < 0.6 * history[0]["total"]
    assert history[-1]["dice"] < history[0]["dice"] - 0.03
    # A partial-likelihood loss is > 0; a flipped sign would also "decrease" (towards -inf).
    assert 0 < history[-1]["cox"] < 0.5 * history[0]["cox"]
    # The trained risk orders the batch: case 1 (relapse at 1) above cases 0 (relapse at 5) and
    # 2 (censored at 3), the only two comparable pairs; a Cox loss of the wrong sign reverses them.
    with torch.no_grad():
        risk = model(image, clinical)["risk"].double().numpy()
    c = concordance_index_censored(event.bool().numpy(), time.double().numpy(), risk)[0]
    assert c > 0.9, risk


# --- the image reaches the risk -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gate", "binary", "soft"])
def test_risk_depends_on_the_image_through_the_survival_densenet(mode):
    """Same clinical vector, different images: different risks, and the survival DenseNet
    passes a non-zero gradient back to the image (a network that ignores the image, or a
    DenseNet fed only the tumour map, would fail)."""
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, tumour_input=mode, zero_init_risk=False)).eval()
    image, _ = _batch(b=2, seed=4)
    clinical = torch.randn(1, N_CLIN).expand(2, N_CLIN)
    risk = model(image, clinical)["risk"]
    assert abs(float(risk[0] - risk[1])) > 1e-4

    # The DenseNet path alone, with a tumour map that covers a block of each volume.
    prob = torch.zeros(2, 1, *TINY)
    prob[:, :, 8:24, 8:24, 8:24] = 0.9
    image = image.clone().requires_grad_(True)
    taps = model.densenet(model.tumour_map_input(image, prob), clinical)
    taps.sum().backward()
    inside = image.grad[:, :, 8:24, 8:24, 8:24]
    assert float(inside.abs().sum()) > 0
    if mode == "gate":  # gated images: voxels outside the tumour map cannot matter
        outside = image.grad.clone()
        outside[:, :, 8:24, 8:24, 8:24] = 0
        assert float(outside.abs().sum()) == 0


def test_daft_carries_the_clinical_vector_into_the_risk():
    """DAFT away from the identity and the risk head's direct clinical inputs zeroed, so the
    clinical vector can reach the risk only through DAFT: same image, different clinical
    vectors give different risks, and every DAFT weight gets a gradient from the risk (a
    network that skips DAFT fails both)."""
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, zero_init_risk=False)).eval()
    daft, h = model.densenet.daft, model.config.head_units
    with torch.no_grad():
        nn.init.normal_(daft.aux.aux_out.weight, std=0.5)
        model.risk_head[1].weight[:, 2 * h : 2 * h + N_CLIN] = 0.0
    image, _ = _batch(b=1, seed=8)
    image = image.expand(2, *image.shape[1:])
    clinical = torch.randn(2, N_CLIN, generator=torch.Generator().manual_seed(9))
    risk = model(image, clinical)["risk"]
    assert abs(float(risk[0] - risk[1])) > 1e-4
    same = model(image, clinical[:1].expand(2, N_CLIN))["risk"]
    torch.testing.assert_close(same[0], same[1])  # the difference above is the clinical vector's
    risk.sum().backward()
    for name, p in daft.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_initial_risk_is_constant_and_daft_starts_as_the_identity():
    """Zero-initialised risk layer: no initial ranking; identity DAFT: no random rescaling."""
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN)).eval()
    image, clinical = _batch(b=3, seed=5)
    risk = model(image, clinical)["risk"]
    torch.testing.assert_close(risk, torch.zeros(3))
    cox_ph_loss(risk, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 0])).backward()
    assert float(model.risk_head[1].weight.grad.abs().sum()) > 0
    x = torch.randn(3, model.densenet.last_block_channels, 2, 2, 2)
    torch.testing.assert_close(model.densenet.daft(x, clinical), x)
    with pytest.raises(ValueError, match="identity_init"):
        DAFTBlock(8, 3, scale_activation="sigmoid", identity_init=True)


def test_daft_conditions_the_densenet_on_the_clinical_vector_and_learns():
    """With a non-identity DAFT transform, the survival DenseNet's taps change when only the
    clinical vector changes, and the Cox loss passes gradient to DAFT's parameters. A network
    that bypasses its DAFT block would fail both (the clinical vector still reaches the risk
    head directly, so the test reads the DenseNet taps, which see it only through DAFT)."""
    torch.manual_seed(0)
    model = DeepMTS(DeepMTSConfig.tiny(N_CLIN, zero_init_risk=False)).eval()
    daft = model.densenet.daft
    assert daft is not None
    with torch.no_grad():
        nn.init.normal_(daft.aux.aux_out.weight, std=0.5)
    image, _ = _batch(b=2, seed=9)
    image = image[:1].expand(2, *image.shape[1:])  # one image, two clinical vectors
    clinical = torch.randn(2, N_CLIN, generator=torch.Generator().manual_seed(3))
    prob = torch.full((2, 1, *TINY), 0.5)
    x = model.tumour_map_input(image, prob)
    with torch.no_grad():
        taps = model.densenet(x, clinical)
    assert float((taps[0] - taps[1]).abs().max()) > 1e-4

    model.train()
    out = model(image, clinical)
    cox_ph_loss(out["risk"], torch.tensor([1.0, 2.0]), torch.tensor([1, 1])).backward()
    for name, param in daft.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
