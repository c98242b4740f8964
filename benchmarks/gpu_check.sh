#!/usr/bin/env bash
# One check on a CUDA host (a few minutes of device time): versions, the tests marked `cuda`,
# and train_fold itself at the paper's size (needs the demo cache: `make demo` first). Usage: benchmarks/gpu_check.sh [cuda|cpu] [steps]
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
echo "== the production step: train_fold at the paper's size on $DEVICE, 2 epochs x $STEPS steps, fp32 then bf16"
if [ ! -f cache/preprocessed/cohort.json ]; then echo "no demo cache at cache/preprocessed: run \`make demo\` first" >&2; exit 1; fi
"$PY" benchmarks/bench_cell.py --size paper-fold --device "$DEVICE" --epochs 2 --steps "$STEPS"
"$PY" benchmarks/bench_cell.py --size paper-fold --device "$DEVICE" --epochs 2 --steps "$STEPS" --precision bf16-autocast
