#!/usr/bin/env bash
# CI (root, Debian 12): the real parts some tests drive, from Debian's archive, where missing:
# Slurm's daemons and clients with munge (tests marked `slurm`, scripts/slurm_cluster.sh) and
# Chromium (tests marked `browser`, driven by Playwright, a pip test extra). One `apt-get
# update`, only when something is missing. `make test` never runs this: without these parts
# those tests skip with the reason (and fail under CI=true).
set -euo pipefail
PACKAGES=(slurmctld slurmd slurm-client munge chromium)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_test_parts: ${PACKAGES[*]} already installed"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "install_test_parts: installing ${missing[*]} needs root (apt-get)" >&2; exit 1; }
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
