"""The training step on the device: its invariants, checked on CPU.

On CUDA a Python number read from a device tensor (``float()``, ``.item()``, ``.cpu()``,
boolean tests ...) makes the host wait for the device. The step must not read any: these
tests count such reads of tensors on the training device during steps and check that
augmentation receives the device's tensors.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from pipeline import train
from pipeline.dataset import load_cohort
from pipeline.splits import get_folds
from pipeline.train import TrainConfig, cohort_on_device, setup_fold, train_epoch, train_step

#: Tensor methods that hand a device tensor's values to the host.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def count_host_reads(device: torch.device):
    """Count calls to :data:`HOST_READS` on tensors that live on ``device``, by method."""
    counts = {name: 0 for name in HOST_READS}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name):
        orig = originals[name]

        def counted(self, *args, **kwargs):
            if isinstance(self, torch.Tensor) and self.device == device:
                counts[name] += 1
            return orig(self, *args, **kwargs)

        return counted

    for name in HOST_READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)


def _config(**kw) -> TrainConfig:
    return TrainConfig(
        **(
            {
                "epochs": 3,
                "steps_per_epoch": 3,
                "batch_size": 4,
                "eval_batch_size": 8,
                "ema_decay": 0.5,
                "model": {"preset": "tiny"},
                "device": "cpu",
                "warmup_epochs": 0,
            }
            | kw
        )
    )


@pytest.fixture(scope="module")
def fold_state(tiny_study, tmp_path_factory):
    cohort = load_cohort(tiny_study["manifest"], tiny_study["cache"])
    folds = get_folds(tmp_path_factory.mktemp("dev") / "folds.json", cohort, n_folds=3)
    return cohort, folds


@pytest.mark.slow
def test_a_step_reads_nothing_back_from_the_device(fold_state, monkeypatch):
    """Steps and the EMA update return device tensors and never read device values on the host
    (the sampler's indices and the augmentation's generator live on the host by design). The
    Cox loss takes its accelerator path (masked ops), as it does on CUDA."""
    from models import losses

    monkeypatch.setattr(losses, "HOST_CHECKED_DEVICES", ())
    cohort, folds = fold_state
    cfg = _config()
    state = setup_fold(cohort, folds, 0, cfg)
    on = cohort_on_device(state, cohort)
    fit = torch.as_tensor(state.data.fit).to(state.device)
    batches = [fit[torch.as_tensor(b)] for b in state.sampler]
    state.model.train()
    # Here the CPU is the device, so even reads of the augmentation's host-side draws would count.
    with count_host_reads(state.device) as counts:
        parts = [train_step(state, on, idx, cfg) for idx in batches]
    assert sum(counts.values()) == 0, counts
    for p in parts:
        assert set(p) == {"dice", "cox", "total", "loss"}
        assert all(isinstance(v, torch.Tensor) and v.device == state.device and v.dim() == 0 for v in p.values())
    assert state.ema.n_averaged.item() == len(batches)


@pytest.mark.slow
def test_a_host_read_in_the_step_is_caught(fold_state):
    """The counter above is not blind: torch's own AveragedModel update reads its counter."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    cohort, folds = fold_state
    state = setup_fold(cohort, folds, 0, _config())
    torch_ema = AveragedModel(state.model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    with count_host_reads(state.device) as counts:
        torch_ema.update_parameters(state.model)
    assert counts["__bool__"] >= 1


@pytest.mark.slow
def test_device_ema_equals_torchs_averaged_model(fold_state):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    cohort, folds = fold_state
    state = setup_fold(cohort, folds, 0, _config())
    ref = AveragedModel(state.model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    for step in range(3):
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(0.01 * (step + 1))
        ref.update_parameters(state.model)
        state.ema.update_parameters(state.model)
    for a, b in zip(ref.module.state_dict().values(), state.ema.module.state_dict().values()):
        assert torch.equal(a, b)
    assert int(ref.n_averaged) == int(state.ema.n_averaged) == 3


@pytest.mark.slow
def test_augmentation_receives_the_training_devices_tensors(fold_state, monkeypatch):
    cohort, folds = fold_state
    cfg = _config()
    state = setup_fold(cohort, folds, 0, cfg)
    seen = []
    real = train.apply_affine

    def recording(images, masks, theta):
        seen.append((images.device, masks.device, theta.device))
        return real(images, masks, theta)

    monkeypatch.setattr(train, "apply_affine", recording)
    train_epoch(state, cohort, cfg, 0)
    assert len(seen) == cfg.steps_per_epoch
    assert all(d_img == d_msk == d_theta == state.device for d_img, d_msk, d_theta in seen)
    # The cohort is moved once per fold: a second epoch reuses the same device tensors.
    on = state.on_device
    train_epoch(state, cohort, cfg, 1)
    assert state.on_device is on and on["images"].device == state.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast is refused on CPU)")
@pytest.mark.cuda
@pytest.mark.slow
def test_bf16_autocast_curves_track_fp32(fold_state):
    """Same fold, same draws: bf16 autocast's epoch losses stay within a few percent of fp32's."""
    cohort, folds = fold_state
    curves = {}
    for precision in ("fp32", "bf16-autocast"):
        cfg = _config(precision=precision, device="cuda")
        state = setup_fold(cohort, folds, 0, cfg)
        curves[precision] = [train_epoch(state, cohort, cfg, e)["loss"] for e in range(cfg.epochs)]
    fp32, bf16 = np.array(curves["fp32"]), np.array(curves["bf16-autocast"])
    assert np.all(np.isfinite(bf16)), f"bf16 losses {bf16} (fp32 {fp32})"
    assert not np.array_equal(fp32, bf16)  # autocast did run in bf16
    np.testing.assert_allclose(bf16, fp32, rtol=0.05)


@pytest.mark.slow
def test_bf16_autocast_is_refused_on_cpu_before_any_fold(fold_state, tmp_path):
    """On CPU bf16 autocast gave NaN losses in some runs of this test's old CPU form (the same
    fold and draws each time): refused, naming the fix."""
    cohort, folds = fold_state
    cfg = _config(precision="bf16-autocast")
    with pytest.raises(ValueError, match="bf16-autocast.*--precision fp32"):
        setup_fold(cohort, folds, 0, cfg)
    with pytest.raises(ValueError, match="bf16-autocast"):
        train.train_survival(cohort, cfg, tmp_path / "run", folds, cache_params_hash="x")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_non_finite_training_loss_stops_the_fold_naming_it(fold_state, tmp_path):
    cohort, folds = fold_state
    cfg = _config(lr=1e30)
    with pytest.raises(FloatingPointError, match=r"fold 0, epoch \d+: non-finite training loss"):
        train.train_fold(cohort, folds, 0, cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "fold_0" / "done.json").exists()


def test_precision_is_validated():
    with pytest.raises(ValueError, match="precision must be one of"):
        _config(precision="fp16")


def test_memory_layout_is_chosen_per_device():
    assert train.memory_format(torch.device("cpu")) is torch.channels_last_3d
    assert train.memory_format(torch.device("cuda")) is torch.channels_last_3d
    assert train.memory_format(torch.device("meta")) is torch.contiguous_format
    x = train.to_model_layout(torch.zeros(1, 2, 4, 4, 4), torch.device("cpu"))
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
