#!/usr/bin/env bash
# Does a fold compute the same bytes on another CPU? A short demo fold (fold 2, 2 epochs x 4
# steps, the demo's network and settings) trained here, and again under valgrind, which runs
# the same binaries on an emulated CPU: an Intel Haswell (family 6 model 60) with AVX2 and no
# AVX-512, and other caches (L1d 32 KiB, L2 256 KiB, L3 8 MiB). oneDNN, ATen, MKL, OpenBLAS
# and numpy all read that emulated CPU when they choose their kernels and blocking.
#
# Prints the SHA-256 of each run's out-of-fold risks and curves (less wall times), and the
# kernel fields each run recorded; then the same for one paper-size training step's gradients
# (benchmarks/paper_step_digest.py: the paper's widths at 48 x 80 x 80, other blocking). Portable numerics (the default) should give one digest;
# HNFM_NUMERICS=native on an AVX-512 host should not. Needs the demo cache (make demo, or the
# steps 1-2 of docs/pipeline.md) and Debian's valgrind; takes ~10 min per emulated run.
# (The emulated runs' CPU fields come from /proc and /sys, which valgrind leaves as they are:
# they name the host; the libraries read CPUID, which valgrind emulates.)
#
# Usage: bash benchmarks/portable_numerics.sh [native|portable|both]  (default both)
set -euo pipefail
cd "$(dirname "$0")/.."
which valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)"; exit 2; }
work=$(mktemp -d /tmp/portable_numerics.XXXXXX)
trap 'rm -rf "$work"' EXIT
modes=${1:-both}; [ "$modes" = both ] && modes="portable native"

fold() {  # fold NAME MODE [WRAPPER...]
  local name=$1 mode=$2; shift 2
  local t0=$SECONDS
  HNFM_NUMERICS=$mode "$@" .venv/bin/python .venv/bin/train-survival --fold 2 --out "$work/$name" \
    --folds "$work/folds.json" --epochs 2 --steps-per-epoch 4 --select-from-epoch 0 --warmup-epochs 1 \
    --quiet > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }
  local oof curves
  oof=$(sha256sum "$work/$name/fold_2/oof.csv" | cut -c1-16)
  curves=$(cut -d, -f1-10 "$work/$name/fold_2/curves.csv" | sha256sum | cut -c1-16)
  .venv/bin/python - "$work/$name/fold_2/done.json" "$name" "$oof" "$curves" "$((SECONDS - t0))" <<'PY'
import json, sys
env = json.load(open(sys.argv[1]))["environment"]
print(f"{sys.argv[2]:<18} oof {sys.argv[3]}  curves {sys.argv[4]}  ({sys.argv[5]} s)  numerics {env['numerics']}, "
      f"ATen {env['cpu_capability']}, oneDNN {env['onednn_isa']}, CPU {env['cpu_family_model_stepping']} "
      f"{'avx512f' if 'avx512f' in env['cpu_flags'] else 'no avx512f'}, caches {env['cpu_caches']}")
PY
}

for mode in $modes; do
  fold "host-$mode" "$mode"
  fold "haswell-$mode" "$mode" valgrind -q --tool=none
done
for mode in $modes; do
  echo "host-$mode:    $(HNFM_NUMERICS=$mode .venv/bin/python benchmarks/paper_step_digest.py)"
  echo "haswell-$mode: $(HNFM_NUMERICS=$mode valgrind -q --tool=none .venv/bin/python benchmarks/paper_step_digest.py)"
done
