"""The deterministic pooling path: same outputs and gradients as torch.nn's pooling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import pooling


@pytest.mark.parametrize("shape", [(2, 3, 9, 10, 11), (1, 2, 23, 39, 39), (2, 4, 8, 8, 8)])
@pytest.mark.parametrize("kind,kernel,stride", [("max", 2, None), ("max", 3, 2), ("avg", 2, 2)])
def test_deterministic_pooling_matches_torch_nn(shape, kind, kernel, stride):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    x = torch.relu(x)  # ties (zeros) as after a ReLU: the gradient must go where MaxPool3d sends it
    x[0, 0, :2, :2, :2] = 1.0  # a window of equal maxima
    ref_mod = nn.MaxPool3d(kernel, stride) if kind == "max" else nn.AvgPool3d(kernel, stride)
    det = pooling.deterministic_max_pool3d if kind == "max" else pooling.deterministic_avg_pool3d
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref_mod(a), det(b, kernel, stride)
    assert ya.shape == yb.shape
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    if kind == "max":
        assert torch.equal(ya, yb)
    torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-12, atol=1e-12)


def test_modules_are_torch_nn_pooling_off_cuda():
    """On CPU the subclasses run torch.nn's kernels (the CPU numbers do not move)."""
    x = torch.randn(1, 1, 6, 6, 6)
    assert not pooling.use_deterministic_path(x)
    assert torch.equal(pooling.MaxPool3d(3, stride=2)(x), nn.MaxPool3d(3, stride=2)(x))
    assert torch.equal(pooling.AvgPool3d(2, stride=2)(x), nn.AvgPool3d(2, stride=2)(x))
    assert pooling.MaxPool3d(2).state_dict() == {}
    with pytest.raises(ValueError, match="padding"):
        pooling.MaxPool3d(3, padding=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_deterministic_mode_backward_runs_on_cuda():
    """nn.MaxPool3d/AvgPool3d backward raise under deterministic algorithms on CUDA; these do not,
    and match the CUDA kernels."""
    x = torch.relu(torch.randn(2, 3, 23, 39, 39, device="cuda", dtype=torch.float64))
    prev = torch.are_deterministic_algorithms_enabled()
    for mod, ref in [
        (pooling.MaxPool3d(3, stride=2), nn.MaxPool3d(3, stride=2)),
        (pooling.MaxPool3d(2), nn.MaxPool3d(2)),
        (pooling.AvgPool3d(2, stride=2), nn.AvgPool3d(2, 2)),
    ]:
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(a).sum().backward()
        torch.use_deterministic_algorithms(True)
        try:
            y = mod(b)
            y.sum().backward()
        finally:
            torch.use_deterministic_algorithms(prev)
        torch.testing.assert_close(y, ref(a.detach()))
        torch.testing.assert_close(b.grad, a.grad)
