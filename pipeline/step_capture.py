"""A training step captured once in a CUDA graph and replayed (``TrainConfig.step_mode = "graph"``).

At the paper's size a step launches ~3,300 small kernels and the GPU is busy about half of the
step (``benchmarks/gpu.md``): launches, not arithmetic, bound it. A CUDA graph records the
step's kernels once and replays them with one launch. What a graph needs, and how the step
gives it:

* fixed shapes and fixed addresses: the step reads its batch through two static buffers, the
  row indices ``idx [B]`` and the augmentation ``theta [B, 3, 4]``, copied in before each
  replay; everything else it reads (the cohort's tensors on the device, the model, the
  optimiser state, the EMA) lives at fixed addresses for the whole fold;
* no host sync inside: the augmentation's randomness is drawn on the host before the step
  (:func:`pipeline.dataset.draw_affine`, from the fold's CPU generator, so the random stream
  is the eager step's); the Cox loss uses masked ops on an accelerator
  (:func:`models.losses.cox_ph_loss`); Adam is fused and ``capturable`` with its learning rate
  a device tensor (:func:`pipeline.train.make_optimiser`, :func:`pipeline.train.set_lr`);
* lazy state made before capture: the first ``warmup`` steps run eagerly on a side stream
  (Adam's moments, cuDNN's plans, the EMA's first copy), as the CUDA-graph guide does.

On the CPU there is no graph: the same static-buffer path runs eagerly, so the code that
fills the buffers and calls the step is covered by the CPU tests, and gives the eager step's
bits (``tests/test_step_capture.py``). A capture that fails warns and leaves the fold eager.

Not measured on a GPU yet (``benchmarks/gpu_check.sh`` does): the gain, and whether the
captured step repeats exactly (the test marked ``cuda`` checks it against itself and
against the eager step).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["CapturedStep", "CaptureWarning"]

#: Eager steps before the capture (the PyTorch CUDA-graph guide's warm-up).
WARMUP_STEPS = 3


class CaptureWarning(UserWarning):
    """The step could not be captured in a CUDA graph; the fold trains eagerly."""


class CapturedStep:
    """A fixed-shape step ``compute(idx, theta) -> {name: loss tensor}`` run from static buffers.

    Args:
        compute: the device part of a step (:func:`pipeline.train.step_compute` bound to its
            fold): reads ``idx [B]`` (int64 rows) and ``theta [B, 3, 4]``, updates the model,
            optimiser and EMA in place, returns detached loss tensors.
        device: the training device; a graph is captured on CUDA only.
        warmup: eager steps before the capture.
    """

    def __init__(
        self, compute: Callable[..., dict[str, torch.Tensor]], device: torch.device, warmup: int = WARMUP_STEPS
    ):
        self.compute = compute
        self.device = device
        self.warmup = int(warmup)
        self.capture = device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.idx: torch.Tensor | None = None
        self.theta: torch.Tensor | None = None
        self.out: dict[str, torch.Tensor] = {}
        self.steps = 0

    @property
    def captured(self) -> bool:
        """Whether steps now replay a CUDA graph."""
        return self.graph is not None

    def __call__(self, idx: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step on rows ``idx [B]`` with augmentation ``theta [B, 3, 4]`` (both on the device)."""
        if self.idx is None:
            self.idx, self.theta = torch.empty_like(idx), torch.empty_like(theta)
        if idx.shape != self.idx.shape or theta.shape != self.theta.shape:
            raise ValueError(
                f"a captured step has fixed shapes: idx {tuple(self.idx.shape)}, theta "
                f"{tuple(self.theta.shape)}; got {tuple(idx.shape)}, {tuple(theta.shape)}"
            )
        self.idx.copy_(idx, non_blocking=True)
        self.theta.copy_(theta, non_blocking=True)
        self.steps += 1
        if not self.capture:
            return self.compute(self.idx, self.theta)
        if self.graph is None and self.steps <= self.warmup:
            return self._side_stream_step()
        if self.graph is None and not self._capture():
            return self.compute(self.idx, self.theta)
        self.graph.replay()
        return {k: v.clone() for k, v in self.out.items()}  # the graph's outputs are overwritten next replay

    def _side_stream_step(self) -> dict[str, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.compute(self.idx, self.theta)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self) -> bool:
        """Record the step in a graph (it runs at the first replay); False, with a warning and the
        fold left eager, when the capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.out = self.compute(self.idx, self.theta)
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            self.capture, self.out = False, {}
            warnings.warn(
                f"the training step could not be captured in a CUDA graph ({exc}); this fold trains "
                "eagerly (step_mode 'eager' avoids the attempt)",
                CaptureWarning,
                stacklevel=3,
            )
            return False
        self.graph = graph
        return True
