#!/usr/bin/env bash
# A real single-node Slurm cluster for tests and benchmarks, all of it under one folder.
#
#   scripts/slurm.sh install        as root: apt-get install slurm-wlm munge when missing
#   scripts/slurm.sh up DIR         install if needed, configure under DIR, start munged (as user
#                                   munge, private socket), slurmctld and slurmd; wait until the
#                                   node has re-registered and is IDLE; print SLURM_CONF=DIR/slurm.conf
#   scripts/slurm.sh status DIR     the node's line from scontrol
#   scripts/slurm.sh down DIR       stop the three daemons by their pid files
#
# No cgroups and no systemd needed (proctrack/linuxproc, task/none), so it runs in a container
# as root. Ports are picked free at `up`, so two clusters on one machine do not collide.
# Clients (sbatch, squeue, lab-attendant's daemon) find the cluster through $SLURM_CONF.
set -euo pipefail

die() { echo "slurm.sh: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root: run as root, or apt-get install slurm-wlm munge"
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install slurm-wlm and munge"
    # Postinst scripts must not start system-wide daemons: a policy-rc.d that exits 101 says no.
    # An existing one (containers ship one) is left exactly as it was.
    local policy=/usr/sbin/policy-rc.d added=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added=1
    fi
    local rc=0
    { timeout 300 apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge; } >/dev/null 2>&1 || rc=$?
    [ -n "$added" ] && rm -f "$policy"
    [ "$rc" = 0 ] || die "apt-get install slurm-wlm munge failed (exit $rc)"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 node=$2 ctld_port=$3 slurmd_port=$4 hw
    # slurmd -C prints this machine's NodeName/CPUs/sockets/RealMemory exactly as slurmd sees them.
    hw=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$node/")
    cat > "$dir/slurm.conf" <<EOF
# Written by lab-attendant scripts/slurm.sh: a single-node cluster under $dir
ClusterName=labattendant
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
# Sampled every second, so a job over its memory is killed in a test's time (the default is 30 s).
JobAcctGatherFrequency=task=1
# The common site setup: memory is a consumable resource (CR_Core_Memory), and a job that asks
# for no --mem gets 1 GiB per CPU (and is killed above it: OverMemoryKill).
DefMemPerCPU=1024
MailProg=/bin/true
# Finished jobs stay visible to squeue/scontrol this long (there is no slurmdbd for sacct).
MinJobAge=300
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
KillWait=10
$hw NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

node_line() { SLURM_CONF="$1/slurm.conf" scontrol show node "$2" 2>/dev/null | tr '\n' ' '; }

up() {
    local dir=${1:?usage: slurm.sh up DIR}
    install
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ -e "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null \
        && die "a cluster is already up in $dir (scripts/slurm.sh down $dir first)"
    chmod 755 "$dir"   # munged runs as user munge and must reach its folder
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chown munge:munge "$dir/munge" && chmod 755 "$dir/munge"   # clients need x to reach the socket
    [ -e "$dir/munge/munge.key" ] || runuser -u munge -- mungekey --create --keyfile="$dir/munge/munge.key"
    local node launched
    node=$(hostname -s)
    write_conf "$dir" "$node" "$(free_port)" "$(free_port)"
    runuser -u munge -- munged --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" || die "munged did not start; see $dir/munge/munged.log"
    cp "$dir/munge/munged.pid" "$dir/munged.pid"
    launched=$(date +%s)
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -i || die "slurmctld did not start; see $dir/slurmctld.log"
    slurmd || die "slurmd did not start; see $dir/slurmd.log"
    # `sinfo idle` can be the controller's stale view: wait for this slurmd's registration.
    local deadline=$((SECONDS + 60)) line started
    while :; do
        line=$(node_line "$dir" "$node")
        started=$(sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' <<<"$line")
        if [[ "$line" == *"State=IDLE"* && -n "$started" && "$started" != None ]] \
                && [ "$(date -d "$started" +%s 2>/dev/null || echo 0)" -ge "$((launched - 1))" ]; then
            break
        fi
        [ $SECONDS -lt $deadline ] || { down "$dir"; die "node $node not IDLE after 60 s: $line (logs in $dir)"; }
        sleep 0.2
    done
    echo "SLURM_CONF=$dir/slurm.conf"
}

down() {
    local dir=${1:?usage: slurm.sh down DIR} name pid
    for name in slurmd slurmctld munged; do
        [ -e "$dir/$name.pid" ] || continue
        pid=$(cat "$dir/$name.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/$name.pid"
    done
}

case "${1:-}" in
    install) install ;;
    up) up "${2:-}" ;;
    down) down "${2:-}" ;;
    status) node_line "${2:?usage: slurm.sh status DIR}" "$(hostname -s)"; echo ;;
    *) die "usage: slurm.sh install | up DIR | down DIR | status DIR" ;;
esac
