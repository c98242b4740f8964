#!/usr/bin/env bash
# One check on a CUDA host (a few minutes of device time): versions, the tests marked `cuda`,
# and the paper-size step benchmark. Usage: benchmarks/gpu_check.sh [cuda|cpu] [steps]
# (cpu with few steps only checks this script's logic).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
STEPS="${2:-5}"
PY="${PYTHON:-.venv/bin/python}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
      f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN {torch.backends.cudnn.allow_tf32}")
PYEOF
echo "== tests marked cuda (skipped without a GPU)"
"$PY" -m pytest -q -m cuda -rs tests/test_pooling.py
echo "== paper-size step benchmark on $DEVICE ($STEPS steps, fp32)"
"$PY" benchmarks/bench_cell.py --size paper --device "$DEVICE" --steps "$STEPS"
