#!/usr/bin/env bash
# One check on a CUDA host (a few minutes of device time): versions, the tests marked `cuda`,
# train_fold itself at the paper's size in fp32 and bf16, then N such folds side by side on the
# one GPU (the grid's throughput when cells share it). Needs a preprocessed demo cache
# (`make demo` first, or CACHE=path to one).
# Usage: benchmarks/gpu_check.sh [cuda|cpu] [steps] [side-by-side N]
# (cpu with few steps only checks this script's logic).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
STEPS="${2:-10}"
SIDE="${3:-4}"
EPOCHS="${EPOCHS:-3}"
PY="${PYTHON:-.venv/bin/python}"
CACHE="${CACHE:-cache/preprocessed}"
status=0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" - <<'PYEOF'
import os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
      f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN {torch.backends.cudnn.allow_tf32}, "
      f"{len(os.sched_getaffinity(0))} CPUs")
PYEOF
echo "== tests marked cuda (skipped without a GPU)"
"$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_pooling.py tests/test_resample_torch.py \
    tests/test_reproducibility.py || status=1
if [ ! -f "$CACHE/cohort.json" ]; then echo "no demo cache at $CACHE: run \`make demo\` first" >&2; exit 1; fi
bench=("$PY" benchmarks/bench_cell.py --size paper-fold --cache "$CACHE" --device "$DEVICE" --epochs "$EPOCHS" --steps "$STEPS")
precisions="fp32 bf16-autocast"
[ "$DEVICE" = cpu ] && precisions=fp32  # bf16 autocast is refused on CPU
for precision in $precisions; do
    echo "== the production step: train_fold at the paper's size on $DEVICE, $precision, $EPOCHS epochs x $STEPS steps"
    "${bench[@]}" --precision "$precision" || status=1
done
echo "== $SIDE such folds side by side on the one device (fp32), wall time of the whole"
start=$(date +%s.%N)
for i in $(seq "$SIDE"); do "${bench[@]}" > "/tmp/side_$i.log" 2>&1 & done
wait
end=$(date +%s.%N)
grep -h "measured:\|projected paper cell" /tmp/side_*.log
"$PY" -c "print(f'$SIDE folds side by side: {$end - $start:.1f} s wall in all')"
exit $status
