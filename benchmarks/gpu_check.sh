#!/usr/bin/env bash
# The check on a CUDA host, in two commands of under 10 minutes each (a lent GPU gives about
# 15 minutes in all). Needs a preprocessed demo cache (`make demo` first, or CACHE=path).
#
#   bash benchmarks/gpu_check.sh quick   # versions, the tests marked `cuda`, a paper-size fold's
#                                        # step eager vs CUDA graph, N folds side by side (~5 min)
#   bash benchmarks/gpu_check.sh cell    # one paper-length cell (100 epochs x 50 steps at
#                                        # 48 x 80 x 80), measured, curves printed (<= CELL_LIMIT s)
#   bash benchmarks/gpu_check.sh cpu     # this script's logic on the CPU, a few steps
#
# Environment: CACHE, PYTHON, SIDE (folds side by side, default 4), STEPS (steps per epoch of the
# short runs, default 25), CELL_LIMIT (seconds for the paper cell, default 540; on time-out the
# script says so, and the cell's last printed lines are what it reached).
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT="${1:-quick}"
PY="${PYTHON:-.venv/bin/python}"
CACHE="${CACHE:-cache/preprocessed}"
SIDE="${SIDE:-4}"
STEPS="${STEPS:-25}"
CELL_LIMIT="${CELL_LIMIT:-540}"
DEVICE=cuda
if [ "$WHAT" = cpu ]; then DEVICE=cpu; STEPS=1; SIDE=2; fi
status=0
if [ ! -f "$CACHE/cohort.json" ]; then echo "no demo cache at $CACHE: run \`make demo\` first" >&2; exit 1; fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv || true
"$PY" - <<'PYEOF'
import os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
      f"{len(os.sched_getaffinity(0))} CPUs")
PYEOF
bench=("$PY" benchmarks/bench_cell.py --size paper-fold --cache "$CACHE" --device "$DEVICE")

if [ "$WHAT" = quick ] || [ "$WHAT" = cpu ]; then
    echo "== tests marked cuda (skipped without a GPU)"
    "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_pooling.py tests/test_resample_torch.py \
        tests/test_reproducibility.py tests/test_step_capture.py tests/test_train_device.py || status=1
    for mode in eager graph; do
        echo "== a paper-size fold, step mode $mode: 2 epochs x $STEPS steps"
        "${bench[@]}" --epochs 2 --steps "$STEPS" --step-mode "$mode" || status=1
    done
    echo "== $SIDE such folds side by side on the one device (step mode auto), 1 epoch x $STEPS steps each"
    start=$(date +%s.%N)
    for i in $(seq "$SIDE"); do "${bench[@]}" --epochs 1 --steps "$STEPS" > "/tmp/side_$i.log" 2>&1 & done
    wait
    end=$(date +%s.%N)
    grep -h "measured:" /tmp/side_*.log
    "$PY" -c "print(f'$SIDE folds side by side: {$end - $start:.1f} s wall in all, {($end - $start) / $SIDE:.1f} s per fold')"
fi

if [ "$WHAT" = cell ] || [ "$WHAT" = cpu ]; then
    epochs=100 steps=50
    [ "$WHAT" = cpu ] && epochs=1 steps=1
    echo "== one paper-length cell: $epochs epochs x $steps steps (step mode auto), at most $CELL_LIMIT s"
    timeout "$CELL_LIMIT" "${bench[@]}" --epochs "$epochs" --steps "$steps"
    rc=$?
    if [ $rc = 124 ]; then echo "the paper cell did not finish within $CELL_LIMIT s: not measured"; status=1
    elif [ $rc != 0 ]; then status=1; fi
fi
exit $status
