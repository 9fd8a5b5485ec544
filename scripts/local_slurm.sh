#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on this machine, for tests and for trying sweeps.
#
#   scripts/local_slurm.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, root)
#   scripts/local_slurm.sh start     # munged + slurmctld + slurmd; prints `export SLURM_CONF=...`
#   scripts/local_slurm.sh status    # sinfo of the running cluster (exit 1 if it is down)
#   scripts/local_slurm.sh stop      # stop the three daemons by their pid files, delete the state
#
# Everything lives in $PROVQ_SLURM_DIR (default /tmp/provq-slurm): config, munge key and socket,
# state, spool, logs, pid files. The ports are not SLURM's defaults, so a system SLURM keeps
# working; clients find this cluster through SLURM_CONF. It needs root: slurmd starts the jobs
# and munged signs their credentials. No cgroups: ProctrackType=proctrack/linuxproc and
# TaskPlugin=task/none work inside containers.
set -euo pipefail

DIR=${PROVQ_SLURM_DIR:-/tmp/provq-slurm}
CTLD_PORT=${PROVQ_SLURM_CTLD_PORT:-26817}
SLURMD_PORT=${PROVQ_SLURM_SLURMD_PORT:-26818}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "$1 needs root (slurmd runs jobs, munged signs them); run it with sudo"
}

have_binaries() {
    command -v munged >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v sbatch >/dev/null
}

cmd_install() {
    if have_binaries; then echo "slurm and munge are installed"; return; fi
    need_root install
    command -v apt-get >/dev/null || die "no apt-get: install SLURM (slurmctld, slurmd, client) and munge by hand"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; }
}

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    # Leave 10% to the OS; with CR_CPU memory is not scheduled, only checked against --mem.
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<EOF
# Written by scripts/local_slurm.sh: a single-node test cluster; state under $DIR.
ClusterName=provq-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
# Fast turnaround for tests: short grace after SIGTERM, finished jobs leave squeue soon.
KillWait=5
MinJobAge=60
MaxArraySize=1001
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    mkdir -p "$DIR/munge"
    chmod 0700 "$DIR/munge"
    if [ ! -f "$DIR/munge/munge.key" ]; then
        # A fresh random key for this cluster only.
        head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
        chmod 0400 "$DIR/munge/munge.key"
    fi
    pid_alive "$DIR/munge/munged.pid" && return
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start; see $DIR/log/munged.log"
}

show_logs() {
    echo "--- slurmctld.log" >&2; tail -n 8 "$DIR/log/slurmctld.log" >&2 || true
    echo "--- slurmd.log" >&2; tail -n 8 "$DIR/log/slurmd.log" >&2 || true
}

wait_for_node() {
    local i daemon
    for i in $(seq 1 60); do
        if SLURM_CONF=$CONF sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
            return 0
        fi
        sleep 0.5
        # A daemon that died at start (a port in use, a bad config) will not come back.
        for daemon in slurmctld slurmd; do
            if [ "$i" -gt 2 ] && ! pid_alive "$DIR/$daemon.pid"; then
                show_logs
                die "$daemon exited at start (logs above, under $DIR/log)"
            fi
        done
    done
    show_logs
    die "the node did not come up within 30 s (logs above, under $DIR/log)"
}

cmd_start() {
    need_root start
    have_binaries || die "SLURM/munge missing: run '$0 install' first"
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    write_config
    start_munge
    export SLURM_CONF=$CONF
    # -c: a clean start, no jobs or node state left from an earlier cluster in this directory.
    pid_alive "$DIR/slurmctld.pid" || slurmctld -c -f "$CONF" \
        || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF" -N "$NODE" \
        || die "slurmd did not start; see $DIR/log/slurmd.log"
    wait_for_node
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {
    local file=$1 i pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$file"
}

cmd_stop() {
    [ -d "$DIR" ] || { echo "no local cluster under $DIR"; return; }
    # slurmd first so it does not try to re-register with a controller that is going away.
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munge/munged.pid"
    rm -rf "$DIR"
    echo "stopped; removed $DIR"
}

cmd_status() {
    [ -f "$CONF" ] || die "no local cluster under $DIR (start it with '$0 start')"
    SLURM_CONF=$CONF sinfo
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|status   (state in \$PROVQ_SLURM_DIR, default /tmp/provq-slurm)" >&2; exit 2 ;;
esac
