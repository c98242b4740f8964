#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `slurm` tests (and for trying
# `run-study --executor submitit --cluster slurm` without a real cluster).
#
#   scripts/slurm_cluster.sh install     apt-get the daemons where missing (root; CI runs this)
#   scripts/slurm_cluster.sh start DIR   write DIR/slurm.conf from this machine's CPUs and memory,
#                                        start munged, slurmctld and slurmd (root), wait for the node
#   scripts/slurm_cluster.sh stop DIR    stop the daemons that `start DIR` started (their pid files)
#
# Everything lives in DIR: configuration, state, spool, logs, a private munge socket and key,
# free ports. Nothing under /etc is changed and a system Slurm or munge is left alone. Point
# the clients at it with `export SLURM_CONF=DIR/slurm.conf`. No accounting (no slurmdbd), as on
# many small clusters: sacct fails there, and run-study follows its tasks with squeue/scontrol.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "slurm_cluster: $*" >&2; exit 1; }

install() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && { echo "slurm_cluster: ${PACKAGES[*]} already installed"; return; }
    [ "$(id -u)" -eq 0 ] || die "installing ${missing[*]} needs root (apt-get)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1
    [ "$(id -u)" -eq 0 ] || die "slurmd must run as root"
    for b in munged slurmctld slurmd sinfo; do command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] \
        || die "$b not found: run '$0 install' first"; done
    mkdir -p "$dir"/{state,spool,munge,log}
    dir=$(cd "$dir" && pwd)
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave a tenth of the memory (at least 512 MiB) to the system.
    mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024); r = int(m / 10); if (r < 512) r = 512; print m - r}' /proc/meminfo)
    chmod 700 "$dir/munge"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
    chmod 400 "$dir/munge/munge.key"
    cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm_cluster.sh: one node, ${cpus} CPUs, ${mem_mb} MB.
ClusterName=hnfmtest
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
# cred_expire: a requeued job may start again after this many seconds (default 120).
AuthInfo=socket=${dir}/munge/munge.socket,cred_expire=10
CryptoType=crypto/munge
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    local munged=/usr/sbin/munged
    "$munged" --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
    export SLURM_CONF=$dir/slurm.conf
    /usr/sbin/slurmctld -f "$dir/slurm.conf"
    /usr/sbin/slurmd -f "$dir/slurm.conf" -N "$host"
    local i state=""
    for i in $(seq 1 60); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
        case "$state" in idle*|mixed*|allocated*) break ;; esac
        sleep 0.5
    done
    case "$state" in
        idle*|mixed*|allocated*) ;;
        *) tail -n 20 "$dir"/log/*.log >&2 || true; stop "$dir"; die "the node did not come up (state '${state}')" ;;
    esac
    echo "slurm_cluster: up in $dir (node ${host}: ${cpus} CPUs, ${mem_mb} MB); export SLURM_CONF=$dir/slurm.conf"
}

stop() {
    local dir=$1 f pid
    for f in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
    echo "slurm_cluster: stopped the daemons of $dir"
}

case "${1:-}" in
    install) install ;;
    start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
