#!/usr/bin/env bash
# A private one-node Slurm (munge + slurmctld + slurmd from Debian's slurm-wlm) for the Slurm tests.
# Needs root. Everything lives in one folder with its own munge socket and ports, so it never
# touches, or clashes with, a Slurm already running on the machine.
#
#   tests/local_slurm.sh install               # apt-get slurm-wlm and munge when slurmctld is missing
#   eval "$(tests/local_slurm.sh start)"       # prints: export SLURM_CONF=... LOCAL_SLURM_DIR=...
#   srun -n 2 --mpi=pmi2 .venv/bin/python -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.size)'
#   tests/local_slurm.sh stop "$LOCAL_SLURM_DIR"
#
# Settings that matter for hpcrender:
# - CPUs declared as 4 (LOCAL_SLURM_CPUS) and OverSubscribe, so `srun -n 3` runs on a 2-core box.
# - MpiDefault=pmi2: PyPI's mpich (beside mpi4py in the venv) speaks PMI-2; with the wrong PMI
#   every task silently becomes its own size-1 world.
# - JobRequeue=1 and a short KillWait, so requeue and signal tests finish in seconds.
# - MinJobAge=4: `sbatch --wait` keeps polling every 2 s only while MinJobAge is this short (it backs
#   off to 8 s and 32 s otherwise, which would add half a minute to every waited job).
# - cred_expire=8: a requeued job may start again only after this (120 s by default).
set -euo pipefail

SBIN=/usr/sbin

die() { echo "local_slurm: $*" >&2; exit 1; }

installed() { [[ -x $SBIN/slurmctld && -x $SBIN/slurmd && -x $SBIN/munged ]]; }

install_slurm() {
  if installed; then return 0; fi
  [[ $(id -u) == 0 ]] || die "slurm-wlm is missing and installing it needs root"
  command -v apt-get >/dev/null || die "slurm-wlm is missing and there is no apt-get to install it"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

port_free() {
  # A port is free when nothing accepts a connection on it.
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_port() {
  local p i
  if [[ -n ${LOCAL_SLURM_PORT:-} ]]; then echo "$LOCAL_SLURM_PORT"; return; fi
  for i in $(seq 1 50); do
    p=$((20000 + RANDOM % 5000 * 2))
    if port_free "$p" && port_free $((p + 1)); then echo "$p"; return; fi
  done
  die "no free pair of ports found"
}

write_conf() {
  local d=$1 host=$2 port=$3
  cat >"$d/slurm.conf" <<EOF
ClusterName=hpcrender-test
# Job ids from a random start: MPICH names its shared-memory segments after the job, and a segment that a
# killed run of an earlier test cluster left in /dev/shm must not be reopened by a new job with the same id.
FirstJobId=$(( (RANDOM << 10 | RANDOM % 1024) % 30000000 + 1000 ))
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/munge/munge.sock,cred_expire=8
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
# No cgroups: the tests run in containers where cgroup plugins cannot start.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
KillWait=5
MinJobAge=4
InactiveLimit=0
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=${LOCAL_SLURM_CPUS:-4} State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

show_logs() {
  local d=$1 f
  for f in "$d/munge/munged.log" "$d/log/slurmctld.log" "$d/log/slurmd.log"; do
    [[ -f $f ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
  done
  return 0
}

start() {
  installed || die "slurm-wlm and munge are not installed (run: $0 install)"
  local d host port i
  d=${1:-$(mktemp -d /tmp/local-slurm.XXXXXX)}
  mkdir -p "$d"/{state,spool,log,munge}
  # munged refuses keys and sockets in folders that others may write to (mktemp gives 700 elsewhere).
  chmod 755 "$d" "$d/munge"
  host=$(hostname -s)
  port=$(pick_port)
  dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$d/munge/munge.key"
  $SBIN/munged --socket="$d/munge/munge.sock" --key-file="$d/munge/munge.key" \
    --pid-file="$d/munge/munged.pid" --log-file="$d/munge/munged.log" --seed-file="$d/munge/munged.seed" \
    || { show_logs "$d"; die "munged did not start"; }
  write_conf "$d" "$host" "$port"
  SLURM_CONF=$d/slurm.conf $SBIN/slurmctld -f "$d/slurm.conf" || { show_logs "$d"; die "slurmctld did not start"; }
  SLURM_CONF=$d/slurm.conf $SBIN/slurmd -f "$d/slurm.conf" -N "$host" || { show_logs "$d"; die "slurmd did not start"; }
  for i in $(seq 1 60); do
    if SLURM_CONF=$d/slurm.conf sinfo -h -o %T 2>/dev/null | grep -qx idle; then
      echo "export SLURM_CONF=$d/slurm.conf LOCAL_SLURM_DIR=$d"
      return 0
    fi
    sleep 0.5
  done
  show_logs "$d"
  stop "$d"
  die "the node did not become idle within 30 s"
}

ours() {
  # The pid still names one of this folder's daemons (a stale pid file may point at anything else).
  [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF "$2"
}

stop() {
  local d=$1 f pid i alive pids=()
  [[ -f $d/slurm.conf ]] || die "$d holds no local Slurm"
  # Jobs first, so that no job step outlives its slurmd.
  SLURM_CONF=$d/slurm.conf scancel --user="$(id -un)" >/dev/null 2>&1 || true
  SLURM_CONF=$d/slurm.conf scontrol shutdown >/dev/null 2>&1 || true
  for f in "$d/slurmd.pid" "$d/slurmctld.pid" "$d/munge/munged.pid"; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    if ours "$pid" "$d"; then kill "$pid" 2>/dev/null && pids+=("$pid"); fi
  done
  # All at once, then wait for them to go, so that the folder can be removed and its ports reused.
  for i in $(seq 1 50); do
    alive=0
    for pid in ${pids[@]+"${pids[@]}"}; do ours "$pid" "$d" && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for pid in ${pids[@]+"${pids[@]}"}; do
    if ours "$pid" "$d"; then kill -9 "$pid" 2>/dev/null || true; fi
  done
  if [[ -z ${LOCAL_SLURM_KEEP:-} ]]; then rm -rf "$d"; fi
}

case "${1:-}" in
  install) install_slurm ;;
  start) start "${2:-}" ;;
  stop) stop "${2:?usage: local_slurm.sh stop DIR}" ;;
  *) echo "usage: local_slurm.sh install | start [DIR] | stop DIR" >&2; exit 2 ;;
esac
