"""Unit tests of the stage-two trainer's building blocks (no training loop)."""

from __future__ import annotations

import pytest
import torch

from pipeline.dataset import AugmentConfig, augment_batch
from pipeline.train import TrainConfig, lr_factor


def _volume(b=2, c=2, d=8, h=12, w=16):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, c, d, h, w, generator=g)


def test_augment_identity_when_ranges_are_zero():
    img = _volume()
    mask = (img[:, :1] > 0.5).float()
    cfg = AugmentConfig(flip_prob=0.0, max_shift_vox=0.0, max_rotation_deg=0.0)
    out_img, out_mask = augment_batch(img, mask, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out_img, img, atol=1e-5, rtol=0)
    assert torch.equal(out_mask, mask)


def test_augment_flip_is_left_right_on_the_w_axis():
    img = _volume()
    mask = (img[:, :1] > 0.5).float()
    cfg = AugmentConfig(flip_prob=1.0, max_shift_vox=0.0, max_rotation_deg=0.0)
    out_img, out_mask = augment_batch(img, mask, cfg, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out_img, torch.flip(img, dims=[4]), atol=1e-5, rtol=0)
    assert torch.equal(out_mask, torch.flip(mask, dims=[4]))


def test_augment_shift_moves_content_by_whole_voxels_and_keeps_mask_binary():
    img = torch.zeros(1, 1, 8, 16, 16)
    img[0, 0, 4, 8, 8] = 1.0
    mask = img.clone()
    cfg = AugmentConfig(flip_prob=0.0, max_shift_vox=3.0, max_rotation_deg=5.0)
    gen = torch.Generator().manual_seed(3)
    out_img, out_mask = augment_batch(img.repeat(4, 1, 1, 1, 1), mask.repeat(4, 1, 1, 1, 1), cfg, gen)
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    # Content moves (random transform) but stays within the shift bound of the original.
    for k in range(4):
        if out_mask[k].sum() == 0:
            continue
        z, y, x = (out_mask[k, 0] > 0).nonzero()[0].tolist()
        assert abs(z - 4) <= 3 and abs(y - 8) <= 4 and abs(x - 8) <= 4


def test_augment_is_reproducible_by_seed():
    img = _volume()
    mask = (img[:, :1] > 0.5).float()
    cfg = AugmentConfig()
    a = augment_batch(img, mask, cfg, torch.Generator().manual_seed(7))
    b = augment_batch(img, mask, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_lr_schedule_warmup_then_step_decay():
    cfg = TrainConfig()
    assert [lr_factor(e, cfg) for e in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(24, cfg) == 1.0
    assert lr_factor(25, cfg) == pytest.approx(0.3)
    assert lr_factor(50, cfg) == pytest.approx(0.09)
    assert lr_factor(99, cfg) == pytest.approx(0.3**3)


def test_train_config_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.epochs, cfg.steps_per_epoch, cfg.batch_size, cfg.eval_batch_size) == (100, 50, 8, 16)
    assert (cfg.lr, cfg.warmup_epochs, cfg.lr_step_epochs, cfg.lr_gamma) == (1e-3, 5, 25, 0.3)
    assert (cfg.ema_decay, cfg.wd_classifier, cfg.wd_densenet, cfg.patience) == (0.999, 0.1, 1e-4, 40)
    assert (cfg.cox_weight, cfg.seed) == (2.0, 42)


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", 0),
        ("batch_size", 1),
        ("inner_val_fraction", 0.6),
        ("ema_decay", 1.0),
        ("proj", 0),
        ("tumour_input", "hard"),
    ],
)
def test_train_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_round_trip_and_unknown_option():
    cfg = TrainConfig(proj=128, model={"seg_filters": [2, 4, 8, 16, 32]}, augment={"flip_prob": 0.0})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"epochz": 3})


def test_split_seed_follows_the_seed_unless_set_and_old_run_configs_keep_their_hash():
    from pipeline.artefacts import params_hash
    from pipeline.train import config_hash

    assert TrainConfig().split_seed == 42 and TrainConfig(seed=7).split_seed == 7
    assert TrainConfig.from_dict({"seed": 7}).split_seed == 7  # a config written before the field
    assert TrainConfig(seed=43, split_seed=42).split_seed == 42
    # A run.json written before split_seed (and gpu_eval_batch_size, train_c_every, step_mode) existed
    # hashed the config without them: that hash stays.
    old = {
        k: v
        for k, v in TrainConfig(seed=7).to_dict().items()
        if k not in ("split_seed", "gpu_eval_batch_size", "train_c_every", "step_mode")
    }
    assert config_hash(TrainConfig(seed=7).to_dict()) == params_hash(old) == config_hash(old)
    assert config_hash(TrainConfig(seed=8, split_seed=7).to_dict()) != config_hash(TrainConfig(seed=8).to_dict())


def test_model_presets_name_errors_and_demo_size_runs():
    from models.deepmts import DeepMTS, DeepMTSConfig

    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        DeepMTSConfig.from_preset("huge", n_clinical=13)
    assert DeepMTSConfig.from_preset("paper", 13) == DeepMTSConfig(n_clinical=13)
    model = DeepMTS(DeepMTSConfig.from_preset("demo", 13, input_size=(24, 32, 32))).eval()
    out = model(torch.zeros(2, 2, 24, 32, 32), torch.zeros(2, 13))
    assert out["risk"].shape == (2,) and out["seg_prob"].shape == (2, 1, 24, 32, 32)


@pytest.mark.parametrize("standardise", [True, False])
def test_fm_stats_fill_missing_with_the_training_mean_in_both_modes(standardise):
    import numpy as np

    from pipeline.train import apply_fm_stats, fit_fm_stats

    train = np.array([[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]])
    stats = fit_fm_stats(train, standardise)
    assert stats["fill"] == [3.0, 20.0]
    new = apply_fm_stats(np.array([[np.nan, 20.0], [7.0, np.nan]]), stats).numpy()
    if standardise:
        # Training rows after filling are z-scored: mean 0, SD 1 per feature.
        z = apply_fm_stats(train, stats).numpy()
        np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-6)
        np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-6)
        np.testing.assert_allclose(new[0], 0.0, atol=1e-6)
    else:
        np.testing.assert_allclose(new, [[3.0, 20.0], [7.0, 20.0]])


def test_hash_ignores_the_train_c_frequency_but_not_a_gpu_evaluation_batch_other_than_before():
    from pipeline.train import config_hash

    base = config_hash(TrainConfig().to_dict())
    assert config_hash(TrainConfig(train_c_every=1).to_dict()) == base  # a diagnostic's frequency only
    assert config_hash(TrainConfig(gpu_eval_batch_size=32).to_dict()) != base
    with pytest.raises(ValueError, match="train_c_every"):
        TrainConfig(train_c_every=0)
