"""SHA-256 of one paper-size training step's gradients: the paper's DeepMTS+DAFT (default
widths) at 48 x 80 x 80, batch 2, fixed random inputs, forward + loss + backward on one CPU
thread. ``portable_numerics.sh`` runs it here and on an emulated CPU: with portable numerics
the digests agree, so the paper-size network's kernels (wider convolutions, other oneDNN
blocking than the demo's) add in the same order on both.

Usage: python benchmarks/paper_step_digest.py
"""

from __future__ import annotations

import pipeline  # noqa: F401  (first: pins the CPU kernels before numpy and torch load)

# isort: split

import hashlib

import torch

from models.deepmts import DeepMTS, DeepMTSConfig
from models.losses import deepmts_loss
from pipeline.runtime import compute_threads, deterministic_kernels, environment_record
from pipeline.train import model_to_layout, to_model_layout


def main() -> None:
    size, n = (48, 80, 80), 2
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    with compute_threads(1), deterministic_kernels():
        model = model_to_layout(DeepMTS(DeepMTSConfig(n_clinical=13)), device)
        mask = torch.zeros(n, 1, *size)
        mask[:, :, 16:32, 27:53, 27:53] = 1
        out = model(to_model_layout(torch.randn(n, 2, *size, generator=g), device), torch.randn(n, 13, generator=g))
        loss, _ = deepmts_loss(out, mask, torch.tensor([300.0, 700.0]), torch.ones(n, dtype=torch.bool))
        loss.backward()
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.grad.detach().contiguous().numpy().tobytes())
        env = environment_record(device)
    print(
        f"paper step: loss {loss.item():.9g}, gradients sha256 {digest.hexdigest()[:16]} "
        f"(numerics {env['numerics']}, ATen {env['cpu_capability']}, oneDNN {env['onednn_isa']})"
    )


if __name__ == "__main__":
    main()
