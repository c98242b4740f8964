"""The static-buffer training step (step mode "graph"): the CPU runs its code path eagerly and
must give the eager step's bits; on CUDA it is captured in a graph (tests marked ``cuda``)."""

from __future__ import annotations

import pytest
import torch

from pipeline.dataset import load_cohort
from pipeline.splits import get_folds
from pipeline.step_capture import CapturedStep
from pipeline.train import TrainConfig, resolve_step_mode, set_lr, setup_fold, train_epoch


def _config(step_mode: str, device: str = "cpu") -> TrainConfig:
    return TrainConfig(
        epochs=2,
        steps_per_epoch=3,
        batch_size=4,
        eval_batch_size=4,
        ema_decay=0.5,
        model={"preset": "tiny"},
        step_mode=step_mode,
        device=device,
        threads=1,
    )


def _train_two_epochs(tiny_study, tmp_path, step_mode: str, device: str = "cpu"):
    cohort = load_cohort(tiny_study["manifest"], tiny_study["cache"])
    folds = get_folds(tmp_path / "folds.json", cohort, n_folds=3)
    cfg = _config(step_mode, device)
    state = setup_fold(cohort, folds, 0, cfg)
    losses = [train_epoch(state, cohort, cfg, epoch) for epoch in range(cfg.epochs)]
    weights = {k: v.detach().cpu().clone() for k, v in state.ema.module.state_dict().items()}
    return state, losses, weights


@pytest.mark.slow
def test_the_static_buffer_step_is_the_eager_step_bit_for_bit_on_cpu(tiny_study, tmp_path):
    eager, eager_losses, eager_weights = _train_two_epochs(tiny_study, tmp_path, "eager")
    graph, graph_losses, graph_weights = _train_two_epochs(tiny_study, tmp_path, "graph")
    assert eager.captured is None
    assert graph.captured is not None and graph.captured.steps == 6 and not graph.captured.captured
    assert graph_losses == eager_losses
    for name, value in eager_weights.items():
        assert torch.equal(value, graph_weights[name]), name
    # The batch's rows and augmentation went through the static buffers: the last batch is there.
    assert graph.captured.idx.shape == (4,) and graph.captured.theta.shape == (4, 3, 4)


def test_a_captured_step_refuses_another_shape():
    step = CapturedStep(lambda idx, theta: {"loss": theta.sum() + idx.sum()}, torch.device("cpu"))
    step(torch.arange(4), torch.zeros(4, 3, 4))
    with pytest.raises(ValueError, match="fixed shapes"):
        step(torch.arange(3), torch.zeros(3, 3, 4))


def test_step_mode_auto_is_eager_on_cpu_and_graph_needs_fp32():
    assert resolve_step_mode(TrainConfig(), torch.device("cpu")) == "eager"
    assert resolve_step_mode(TrainConfig(), torch.device("cuda")) == "graph"
    assert resolve_step_mode(TrainConfig(precision="bf16-autocast"), torch.device("cuda")) == "eager"
    assert resolve_step_mode(TrainConfig(step_mode="graph"), torch.device("cpu")) == "graph"
    with pytest.raises(ValueError, match="step_mode 'graph' needs precision 'fp32'"):
        TrainConfig(step_mode="graph", precision="bf16-autocast")
    with pytest.raises(ValueError, match="step_mode"):
        TrainConfig(step_mode="compiled")


def test_set_lr_fills_a_tensor_rate_in_place_and_replaces_a_float():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.5}])
    set_lr(opt, [0.5], 0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    rate = torch.tensor(0.5)
    opt.param_groups[0]["lr"] = rate
    set_lr(opt, [0.5], 0.3)
    assert opt.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.slow
def test_the_captured_step_replays_a_graph_repeats_exactly_and_tracks_the_eager_step(tiny_study, tmp_path):
    graph, graph_losses, graph_weights = _train_two_epochs(tiny_study, tmp_path, "graph", "cuda")
    assert graph.captured is not None and graph.captured.captured, "the step was not captured"
    again, again_losses, again_weights = _train_two_epochs(tiny_study, tmp_path, "graph", "cuda")
    assert again_losses == graph_losses
    assert all(torch.equal(v, again_weights[k]) for k, v in graph_weights.items())
    _, eager_losses, _ = _train_two_epochs(tiny_study, tmp_path, "eager", "cuda")
    for g, e in zip(graph_losses, eager_losses):  # capturable Adam keeps its step count on the device
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-4)
