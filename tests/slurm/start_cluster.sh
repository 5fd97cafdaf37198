#!/usr/bin/env bash
# Start (or stop) a one-node SLURM cluster on this machine: munge, slurmctld and slurmd, with the
# machine as its only compute node. CI runs it before the tests; developers can run it too.
#
#   tests/slurm/start_cluster.sh            start it (idempotent: an answering cluster is left alone)
#   tests/slurm/start_cluster.sh --install  first install munge and SLURM from the distribution's packages
#   tests/slurm/start_cluster.sh --stop     stop the daemons this script started
#
# Settings (environment):
#   AXPO_SLURM_DIR  state, spool, pid and log files of the daemons (default: /tmp/axpo-slurm)
#   SLURM_CONF      where slurm.conf is written (default: /etc/slurm/slurm.conf); a slurm.conf this
#                   script did not write is never overwritten
#
# Made for containers and CI machines: no cgroups (proctrack/linuxproc, task/none), no accounting
# database, the daemons run as root. Not root? The commands that need it go through sudo.
set -euo pipefail

STATE_DIR=${AXPO_SLURM_DIR:-/tmp/axpo-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARKER="# written by axpo-nemo tests/slurm/start_cluster.sh"

if [[ $(id -u) -eq 0 ]]; then
  SUDO=()
else
  SUDO=(sudo -n)
fi

log() { echo "[start_cluster] $*"; }
die() { echo "[start_cluster] error: $*" >&2; exit 1; }

stop_cluster() {
  local name pid
  for name in slurmd slurmctld; do
    if [[ -f "$STATE_DIR/$name.pid" ]]; then
      pid=$(cat "$STATE_DIR/$name.pid")
      if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        "${SUDO[@]}" kill "$pid" || true
      fi
    fi
  done
}

install_packages() {
  log "installing munge and SLURM"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    munge slurmctld slurmd slurm-client
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munge is already running"
    return
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating a munge key"
    "${SUDO[@]}" mungekey --create --keyfile=/etc/munge/munge.key
    "${SUDO[@]}" chown munge:munge /etc/munge/munge.key
    "${SUDO[@]}" chmod 0400 /etc/munge/munge.key
  fi
  "${SUDO[@]}" mkdir -p /run/munge
  "${SUDO[@]}" chown munge:munge /run/munge
  "${SUDO[@]}" chmod 0755 /run/munge
  log "starting munged"
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u munge -- /usr/sbin/munged
  else
    sudo -n -u munge /usr/sbin/munged
  fi
  for _ in $(seq 1 20); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      return
    fi
    sleep 0.5
  done
  die "munged does not answer (munge -n | unmunge fails); see /var/log/munge/munged.log"
}

write_conf() {
  local node_line host
  if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; set SLURM_CONF to another path"
  fi
  host=$(hostname -s)
  # `slurmd -C` prints this machine's real CPU/memory layout; keep only the node description.
  node_line=$(slurmd -C | head -n 1)
  [[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
  "${SUDO[@]}" mkdir -p "$(dirname "$CONF")" "$STATE_DIR/state" "$STATE_DIR/spool"
  "${SUDO[@]}" tee "$CONF" >/dev/null <<CONF
$MARKER
ClusterName=axpo-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
MailProg=/bin/true
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire (default 120 s) before it may start again.
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

wait_idle() {
  local node state
  node=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=//' -e 's/ .*//')
  for _ in $(seq 1 60); do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    case "$state" in
      idle*|mixed*|allocated*) log "node $node is $state"; return ;;
      down*|drain*) "${SUDO[@]}" scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
    esac
    sleep 1
  done
  echo "--- slurmctld.log" >&2; tail -n 20 "$STATE_DIR/slurmctld.log" >&2 || true
  echo "--- slurmd.log" >&2; tail -n 20 "$STATE_DIR/slurmd.log" >&2 || true
  die "node $node did not become idle within 60 s (state: ${state:-unknown})"
}

case "${1:-}" in
  --stop) stop_cluster; exit 0 ;;
  --install) install_packages ;;
  "") ;;
  *) die "unknown argument '$1' (use --install or --stop)" ;;
esac

command -v slurmctld >/dev/null || die "slurmctld is not installed (run with --install, or: apt-get install munge slurmctld slurmd slurm-client)"
export SLURM_CONF="$CONF"
if [[ -f $CONF ]] && timeout 10 scontrol ping 2>/dev/null | grep -q UP &&
  timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mixed|allocated'; then
  log "a cluster is already up"
  exit 0
fi
start_munge
write_conf
stop_cluster
log "starting slurmctld and slurmd (logs in $STATE_DIR)"
"${SUDO[@]}" slurmctld -f "$CONF"
"${SUDO[@]}" slurmd -f "$CONF"
wait_idle
