#!/usr/bin/env bash
# One Ray node of a SLURM job, started by slurm/launch.sh through srun (one task per node):
#   ray_node.sh head     the head (GCS) on the first node, which is also a worker
#   ray_node.sh worker   a worker that joins the head (retrying while the head comes up)
# The node registers under its SLURM node name, so the launcher can name a node that is missing.
# On SIGUSR2 (the launcher stopping the step through srun) or SIGTERM it copies this node's Ray
# session logs to $AXPO_ATTEMPT_DIR/ray/<node>/ and stops Ray.
# Environment (from the launcher): AXPO_RAY_HEAD_IP, AXPO_RAY_PORT, AXPO_ATTEMPT_DIR.
set -uo pipefail

role=${1:?usage: ray_node.sh head|worker}
node=${SLURMD_NODENAME:-$(hostname -s)}
: "${AXPO_RAY_HEAD_IP:?}" "${AXPO_RAY_PORT:?}" "${AXPO_ATTEMPT_DIR:?}"
ray_pid=""

# Ray recommends many open files; raise the soft limit as far as the hard one allows.
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck disable=SC2317  # invoked by the trap below
save_logs_and_stop() {
  local logs=/tmp/ray/session_latest/logs
  if [[ -d $logs ]]; then
    mkdir -p "$AXPO_ATTEMPT_DIR/ray/$node"
    cp -r "$logs/." "$AXPO_ATTEMPT_DIR/ray/$node/" 2>/dev/null || true
  fi
  ray stop --force >/dev/null 2>&1 || true
  if [[ -n $ray_pid ]]; then kill "$ray_pid" 2>/dev/null; fi
  exit 0
}
trap save_logs_and_stop USR2 TERM INT

common=(--node-name="$node" --disable-usage-stats)
if [[ $role == head ]]; then
  echo "[ray-node] $node: starting the Ray head on $AXPO_RAY_HEAD_IP:$AXPO_RAY_PORT"
  ray start --head --node-ip-address="$AXPO_RAY_HEAD_IP" --port="$AXPO_RAY_PORT" \
    --include-dashboard=false "${common[@]}" --block &
  ray_pid=$!
  wait "$ray_pid"
  echo "[ray-node] $node: the Ray head exited (status $?)" >&2
  exit 1
fi

for attempt in $(seq 1 30); do
  echo "[ray-node] $node: joining $AXPO_RAY_HEAD_IP:$AXPO_RAY_PORT (attempt $attempt)"
  ray start --address="$AXPO_RAY_HEAD_IP:$AXPO_RAY_PORT" "${common[@]}" --block &
  ray_pid=$!
  wait "$ray_pid"
  echo "[ray-node] $node: ray start exited (status $?); retrying in 10 s" >&2
  ray stop --force >/dev/null 2>&1 || true
  sleep 10
done
echo "[ray-node] $node: could not join the Ray head after 30 attempts" >&2
exit 1
