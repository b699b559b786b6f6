#!/usr/bin/env bash
# Start a one-node SLURM (Debian slurm-wlm + munge) on this machine, for the SLURM tests and CI.
# Idempotent: run it again and it only checks that the node is up. Needs root (apt, daemons).
#   tests/slurm/start_cluster.sh          # installs if missing, writes /etc/slurm/slurm.conf, starts daemons
# Exit 0 once `sinfo` shows the node idle; otherwise print why on stderr and exit non-zero (.ci/run then fails;
# elsewhere the SLURM tests skip).
set -uo pipefail

TIMEOUT_S=${SLURM_START_TIMEOUT_S:-60}
CONF_DIR=/etc/slurm
NODE=$(hostname -s)
LOG_DIR=/var/log/slurm

die() { echo "start_cluster: $*" >&2; exit 1; }

node_idle() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }

[[ $(id -u) -eq 0 ]] || die "must run as root (installs packages and starts slurmctld/slurmd); uid=$(id -u)"

# Already up (daemons running and the node answers): nothing to do.
if command -v sinfo >/dev/null && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && node_idle; then
    echo "start_cluster: SLURM already up on $NODE"; exit 0
fi

# 1. Packages (apt-get update only when the package lists lack slurm-wlm).
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then
        apt-get update -qq >/dev/null || die "apt-get update failed (no network or no Debian mirror?)"
    fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi

# 2. Munge key + munged.
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none || die "cannot write munge key"
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key; chmod 0700 /etc/munge; chmod 0755 /run/munge
if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged || die "munged failed to start (see /var/log/munge/munged.log)"
    else
        /usr/sbin/munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
    fi
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge round trip failed (munge -n | unmunge)"

# 3. slurm.conf for this one node.
CPUS=$(nproc)
MEM_MB=$(free -m | awk '/^Mem:/{print int($2 * 0.9)}')
mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/slurm
cat > "$CONF_DIR/slurm.conf.new" <<CONF
# Written by tests/slurm/start_cluster.sh: a one-node test cluster, no accounting daemon.
ClusterName=unifusion-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120): 10 keeps requeue tests short.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
# SIGTERM -> SIGKILL delay. submitit ignores SIGTERM, so a requeued job runs on for KillWait seconds: keep it short.
KillWait=3
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=120 State=UP
CONF
mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
# Only read when a cgroup plugin is in use; harmless otherwise, and silences slurmd's lookup.
[[ -f "$CONF_DIR/cgroup.conf" ]] || echo "CgroupPlugin=autodetect" > "$CONF_DIR/cgroup.conf"

# 4. Daemons (slurmctld first; both daemonise themselves).
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log"

# 5. Wait for the node to be idle.
for ((i = 0; i < TIMEOUT_S; i++)); do
    if node_idle; then
        echo "start_cluster: SLURM up on $NODE ($CPUS CPUs, ${MEM_MB} MB) after ${i}s; partition debug"
        exit 0
    fi
    # A node left DOWN/DRAIN by an earlier run comes back on request.
    if (( i == 5 )); then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; fi
    sleep 1
done
echo "--- sinfo:" >&2; sinfo -N -l >&2 || true
echo "--- slurmctld.log tail:" >&2; tail -n 15 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null || true
echo "--- slurmd.log tail:" >&2; tail -n 15 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
die "node $NODE not idle after ${TIMEOUT_S}s"
