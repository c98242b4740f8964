from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Two cores here and in CI: keep intra-op threads bounded so parallel helpers don't thrash.
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parent.parent
STS_ROOT = REPO.parent / "shared" / "data" / "sts_petct"


@pytest.fixture
def sts_root() -> Path:
    """The real PET/CT case in HECKTOR layout, or skip when this checkout lacks it."""
    if not (STS_ROOT / "imagesTr" / "STS-001__CT.nii.gz").is_file():
        pytest.skip(f"real PET/CT case not found at {STS_ROOT} (a checkout on its own has no ../shared)")
    return STS_ROOT
