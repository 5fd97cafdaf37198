#!/usr/bin/env bash
#SBATCH --job-name=axpo
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
# The one SLURM launcher behind every slurm/*.sh job. Submit a wrapper (`sbatch slurm/axpo_8b.sh
# ++axpo.r=0.5`) or this script with AXPO_CONFIG set. Every argument is passed to the trainer as a
# config override (key=value, +key=value, ++key=value; `axpo eval` options too). docs/slurm.md
# describes everything below.
#
# What it does, in order:
#   1. one log folder per job, <AXPO_LOG_ROOT>/<job name>-<job id>/: job.txt (what ran where),
#      resolved.yaml (`axpo config show` of the config and overrides), and per attempt
#      attempt-<n>/: driver.log, ray-<node>.log, ray/<node>/ (each node's Ray session logs);
#   2. output_dir defaults to <AXPO_RUNS_ROOT>/<job name>-<job id>: a requeued job (same id) finds
#      its checkpoints there and resumes (checkpoint.resume: auto);
#   3. backend nemo: cluster.num_nodes and cluster.gpus_per_node follow the allocation; a Ray head
#      on the first node and a worker on every other node (srun; inside the container through
#      pyxis when CONTAINER is set), then waits until every node and its GPUs have registered,
#      failing after AXPO_RAY_TIMEOUT seconds with the missing nodes named;
#      backend local: no Ray, the trainer runs on the first node;
#   4. runs the trainer on the first node; on SIGUSR1 (`#SBATCH --signal=B:USR1@<seconds>`, sent
#      before the time limit) it forwards the signal, the trainer checkpoints and exits 75, and the
#      job requeues itself (`scontrol requeue`); the next attempt resumes from that checkpoint.
#
# Settings (environment; node count, partition, account, time and GPUs come from sbatch flags):
#   AXPO_CONFIG       config name or path (default: demo)
#   AXPO_COMMAND      train | sft | eval (default: train)
#   AXPO_BACKEND      local | nemo: overrides the resolved config's `backend` for the launch decision
#   AXPO_RAY          auto | 1 | 0: start Ray (auto: for backend nemo and a train/sft command)
#   AXPO_ENTRY        the trainer command, replacing the default (the arguments are appended)
#   AXPO_PYTHON       the Python that runs everything (default: python)
#   AXPO_LOG_ROOT     default: $SLURM_SUBMIT_DIR/logs
#   AXPO_RUNS_ROOT    default: $SLURM_SUBMIT_DIR/runs
#   HF_HOME           default: $SLURM_SUBMIT_DIR/.cache/huggingface (shared by every node)
#   AXPO_REPO         this checkout (found from the job's command when unset)
#   AXPO_MAX_REQUEUES stop requeueing after this many restarts (default: 50)
#   AXPO_ARRAY_ARGS   a folder of <task id>.args files (tools/sweep.py --array): a task's arguments
#   AXPO_RAY_PORT     Ray GCS port (default: 6379);  AXPO_RAY_TIMEOUT  seconds (default: 900)
#   GPUS_PER_NODE     GPUs each node must register with Ray, and cluster.gpus_per_node (default:
#                     the job's GPUs per node when it asked for GRES, else 8; 0 for a CPU Ray cluster)
#   CONTAINER         an image or .sqsh for pyxis (--container-image); unset: the host environment
#   MOUNTS            extra --container-mounts (src:dst[,src:dst...]); the checkout, the submit
#                     folder, the log and run roots and HF_HOME are mounted automatically
set -euo pipefail

die() { echo "[axpo-launch] error: $*" >&2; exit 2; }
say() { echo "[axpo-launch] $(date '+%F %T') $*"; }

[[ -n ${SLURM_JOB_ID:-} ]] || die "run this through sbatch (SLURM_JOB_ID is not set)"

# -- where things are ----------------------------------------------------------------------------
if [[ -z ${AXPO_REPO:-} ]]; then
  # The batch script runs from a spool copy: the submitted path is the job's Command.
  submitted=$(scontrol -o show job "$SLURM_JOB_ID" | sed -e 's/.* Command=//' -e 's/ .*//')
  AXPO_REPO=$(cd "$(dirname "$submitted")/.." 2>/dev/null && pwd) || AXPO_REPO=""
fi
[[ -f ${AXPO_REPO:-}/slurm/launch.sh ]] ||
  die "cannot find the axpo-nemo checkout (looked at '${AXPO_REPO:-}'); set AXPO_REPO"
export AXPO_REPO

SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
cd "$SUBMIT_DIR"
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
  JOB_KEY="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
  JOB_KEY=$SLURM_JOB_ID
fi
JOB_TAG="${SLURM_JOB_NAME:-axpo}-$JOB_KEY"
ATTEMPT=${SLURM_RESTART_COUNT:-0}
LOG_ROOT=${AXPO_LOG_ROOT:-$SUBMIT_DIR/logs}
RUNS_ROOT=${AXPO_RUNS_ROOT:-$SUBMIT_DIR/runs}
# Weights and processors are fetched once into a folder every node sees (the submit folder's file
# system), not into each node's home cache.
export HF_HOME=${HF_HOME:-$SUBMIT_DIR/.cache/huggingface}
LOG_DIR="$LOG_ROOT/$JOB_TAG"
ATTEMPT_DIR="$LOG_DIR/attempt-$ATTEMPT"
mkdir -p "$ATTEMPT_DIR" "$RUNS_ROOT"
export AXPO_ATTEMPT_DIR=$ATTEMPT_DIR

CONFIG=${AXPO_CONFIG:-demo}
COMMAND=${AXPO_COMMAND:-train}
# A job array from tools/sweep.py --array: this task's arguments, one per line.
if [[ -n ${AXPO_ARRAY_ARGS:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
  task_args="$AXPO_ARRAY_ARGS/$SLURM_ARRAY_TASK_ID.args"
  [[ -f $task_args ]] || die "AXPO_ARRAY_ARGS is set but $task_args does not exist"
  mapfile -t extra <"$task_args"
  set -- "$@" "${extra[@]}"
fi
# Arguments: `--config X` picks the config; key=value are overrides; other options (`axpo eval`'s
# --run, --questions, --out) go to the command as they are.
USER_OVERRIDES=()
USER_OPTIONS=()
while (($#)); do
  case $1 in
    --config | -c) CONFIG=${2:?"--config needs a value"}; shift 2 ;;
    --config=*) CONFIG=${1#--config=}; shift ;;
    -*)
      USER_OPTIONS+=("$1")
      if (($# > 1)) && [[ $2 != -* && $2 != *=* ]]; then USER_OPTIONS+=("$2"); shift; fi
      shift ;;
    *) USER_OVERRIDES+=("$1"); shift ;;
  esac
done
PYTHON=${AXPO_PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RAY_PORT=${AXPO_RAY_PORT:-6379}
RAY_TIMEOUT=${AXPO_RAY_TIMEOUT:-900}
MAX_REQUEUES=${AXPO_MAX_REQUEUES:-50}
case $COMMAND in train|sft|eval) ;; *) die "AXPO_COMMAND must be train, sft or eval (got '$COMMAND')" ;; esac
[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || die "GPUS_PER_NODE must be a whole number (got '$GPUS_PER_NODE')"
if [[ $COMMAND != eval && ${#USER_OPTIONS[@]} -gt 0 ]]; then
  die "unexpected option(s) for $COMMAND: ${USER_OPTIONS[*]} (arguments are key=value overrides and --config)"
fi

# The checkout's code runs (not a copy installed in the image), on every node and in every Ray worker.
export PYTHONPATH="$AXPO_REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# NeMo-RL builds its worker venvs once per node itself; Ray's per-task `uv run` envs only contend.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
export RAY_USAGE_STATS_ENABLED=0

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${NODES[0]}

# -- srun in the host environment or in the container --------------------------------------------
STEP_ARGS=(--overlap --nodes=1 --ntasks=1 --nodelist="$HEAD")
CONTAINER_ARGS=()
if [[ -n ${CONTAINER:-} ]]; then
  mounts=()
  add_mount() { local m; for m in "${mounts[@]}"; do [[ $m == "$1" ]] && return; done; mounts+=("$1"); }
  for dir in "$AXPO_REPO" "$SUBMIT_DIR" "$LOG_ROOT" "$RUNS_ROOT"; do add_mount "$dir:$dir"; done
  if [[ -n ${HF_HOME:-} ]]; then mkdir -p "$HF_HOME"; add_mount "$HF_HOME:$HF_HOME"; fi
  joined=$(IFS=,; echo "${mounts[*]}")
  CONTAINER_ARGS=(
    --container-image="$CONTAINER"
    --container-name="axpo-$JOB_KEY"
    --container-mounts="$joined${MOUNTS:+,$MOUNTS}"
    --container-workdir="$SUBMIT_DIR"
    --no-container-mount-home
  )
fi
GPU_ARGS=()
if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
  GPU_ARGS=(--gres="gpu:$SLURM_GPUS_ON_NODE")
fi
# A Ray node gets every CPU of its node, as NeMo-RL's ray.sub does: without it a step holds one
# CPU, and the tool actors, data workers and vLLM's CPU side all share it.
RAY_CPU_ARGS=()
if [[ ${SLURM_CPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
  RAY_CPU_ARGS=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
fi
on_head() { srun "${STEP_ARGS[@]}" "${CONTAINER_ARGS[@]}" "$@"; }

{
  echo "attempt $ATTEMPT started $(date '+%F %T') on ${NODES[*]} (job $SLURM_JOB_ID, key $JOB_KEY)"
  echo "  config: $CONFIG  command: $COMMAND  container: ${CONTAINER:-none}  gpus/node: $GPUS_PER_NODE"
  echo "  arguments: ${USER_OPTIONS[*]} ${USER_OVERRIDES[*]}"
  echo "  checkout: $AXPO_REPO ($(git -C "$AXPO_REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
} >>"$LOG_DIR/job.txt"
say "log folder: $LOG_DIR (attempt $ATTEMPT)"

# -- resolved config: fails here, in seconds, on a bad key or value ------------------------------
OVERRIDES=("output_dir=$RUNS_ROOT/$JOB_TAG" "${USER_OVERRIDES[@]}")
if [[ $COMMAND == eval ]]; then
  OVERRIDES=("${USER_OVERRIDES[@]}")  # `axpo eval` writes to --out; output_dir is the trained run's
fi
resolve_config() {
  if ! on_head "$PYTHON" -m axpo_nemo.cli config show --config "$CONFIG" "${OVERRIDES[@]}" \
    >"$LOG_DIR/resolved.yaml.tmp" 2>"$ATTEMPT_DIR/config.err"; then
    cat "$ATTEMPT_DIR/config.err" >&2
    die "the config does not resolve (config '$CONFIG', overrides: ${OVERRIDES[*]})"
  fi
  rm -f "$ATTEMPT_DIR/config.err"
  mv "$LOG_DIR/resolved.yaml.tmp" "$LOG_DIR/resolved.yaml"
}
top_key() { sed -n "s/^$1: *//p" "$LOG_DIR/resolved.yaml" | head -n 1 | tr -d "'\""; }
resolve_config
BACKEND=${AXPO_BACKEND:-$(top_key backend)}

USE_RAY=${AXPO_RAY:-auto}
if [[ $USE_RAY == auto ]]; then
  USE_RAY=0
  [[ $BACKEND == nemo && $COMMAND != eval ]] && USE_RAY=1
fi
if [[ $BACKEND == nemo && $COMMAND != eval ]]; then
  # The allocation, not the file, says how many nodes and GPUs there are (overrides given to the
  # job still win: they come later).
  CLUSTER_OVERRIDES=("cluster.num_nodes=${#NODES[@]}")
  ((GPUS_PER_NODE > 0)) && CLUSTER_OVERRIDES+=("cluster.gpus_per_node=$GPUS_PER_NODE")
  OVERRIDES=("output_dir=$RUNS_ROOT/$JOB_TAG" "${CLUSTER_OVERRIDES[@]}" "${USER_OVERRIDES[@]}")
  resolve_config
fi
OUTPUT_DIR=$(top_key output_dir)
say "config $CONFIG: backend $BACKEND, output_dir ${OUTPUT_DIR:-?}, Ray: $([[ $USE_RAY == 1 ]] && echo yes || echo no)"

# -- the trainer command ---------------------------------------------------------------------------
if [[ -n ${AXPO_ENTRY:-} ]]; then
  read -r -a ENTRY <<<"$AXPO_ENTRY"
elif [[ $BACKEND == nemo && $COMMAND != eval ]]; then
  ENTRY=("$PYTHON" -m axpo_nemo.nemo.train --config "$CONFIG")
elif [[ $COMMAND == eval ]]; then
  ENTRY=("$PYTHON" -m axpo_nemo.cli eval --config "$CONFIG" --out "$RUNS_ROOT/$JOB_TAG/eval")
else
  ENTRY=("$PYTHON" -m axpo_nemo.cli "$COMMAND" --config "$CONFIG")
fi
ENTRY+=("${USER_OPTIONS[@]}" "${OVERRIDES[@]}")

# -- clean-up: stop the steps this script started, keep their logs --------------------------------
# srun takes SIGTERM as "kill the step now", so the Ray steps get SIGUSR2 (which srun relays to the
# task): each node copies its Ray logs and stops Ray; a step still running after 60 s is killed.
RAY_PIDS=()
DRIVER_PID=""
cleanup() {
  local pid deadline=$((SECONDS + 60))
  if [[ -n $DRIVER_PID ]]; then kill -TERM "$DRIVER_PID" 2>/dev/null || true; fi
  for pid in "${RAY_PIDS[@]}"; do kill -USR2 "$pid" 2>/dev/null || true; done
  for pid in "${RAY_PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
    kill -TERM "$pid" 2>/dev/null || true
  done
  RAY_PIDS=()
}
trap cleanup EXIT

# -- signals: the pre-timeout SIGUSR1 and SIGTERM --------------------------------------------------
SIGNALLED=""
EXIT_STOPPED=75
# shellcheck disable=SC2317  # invoked by the traps below
on_usr1() {
  SIGNALLED=USR1
  if [[ -n $DRIVER_PID ]]; then
    say "got SIGUSR1: forwarding it to the trainer (it checkpoints and exits $EXIT_STOPPED)"
    kill -USR1 "$DRIVER_PID" 2>/dev/null || true
  else
    say "got SIGUSR1 before the trainer started: it will not start; the job requeues"
  fi
}
# shellcheck disable=SC2317
on_term() {
  # scancel, preemption and the time limit send SIGTERM to every step as well: the trainer has it
  # already. Forwarding it through srun would kill the step before the checkpoint is written.
  [[ -n $SIGNALLED ]] || SIGNALLED=TERM
  say "got SIGTERM: waiting for the trainer to checkpoint and exit (no requeue)"
}
trap on_usr1 USR1
trap on_term TERM

requeue() {
  if ((ATTEMPT >= MAX_REQUEUES)); then
    die "not requeueing: $ATTEMPT restarts already (AXPO_MAX_REQUEUES=$MAX_REQUEUES)"
  fi
  cleanup
  trap - EXIT
  say "$1; requeueing job $JOB_KEY to resume"
  echo "attempt $ATTEMPT: requeued" >>"$LOG_DIR/job.txt"
  scontrol requeue "$JOB_KEY" ||
    die "scontrol requeue failed (submitted with --no-requeue?); to resume, submit again with output_dir=$OUTPUT_DIR"
  exit 0
}

# -- Ray -------------------------------------------------------------------------------------------
if [[ $USE_RAY == 1 ]]; then
  # The head's address as the other nodes reach it: its first non-loopback IPv4 address (some
  # /etc/hosts map the host name to 127.0.0.1), else the first address the head itself reports.
  HEAD_IP=$(getent ahostsv4 "$HEAD" | awk '$1 !~ /^127\./ { print $1; exit }')
  if [[ -z $HEAD_IP ]]; then
    HEAD_IP=$(srun "${STEP_ARGS[@]}" hostname -I | awk '{ print $1 }')
  fi
  [[ -n $HEAD_IP ]] || die "cannot find an IP address of the head node $HEAD"
  export AXPO_RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
  export AXPO_RAY_HEAD_IP=$HEAD_IP
  # Recent Ray authenticates every client with a token. One token per job, in the environment of
  # every step (never written to a file or a log), so the head, the workers and the driver agree.
  if [[ ${RAY_AUTH_MODE:-} != disabled ]]; then
    export RAY_AUTH_MODE=token
    if [[ -z ${RAY_AUTH_TOKEN:-} ]]; then
      RAY_AUTH_TOKEN=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
      export RAY_AUTH_TOKEN
    fi
  fi
  export AXPO_RAY_PORT=$RAY_PORT
  say "starting Ray: head on $HEAD ($AXPO_RAY_ADDRESS), ${#NODES[@]} node(s), $GPUS_PER_NODE GPU(s) each"
  srun "${STEP_ARGS[@]}" "${GPU_ARGS[@]}" "${RAY_CPU_ARGS[@]}" "${CONTAINER_ARGS[@]}" \
    bash "$AXPO_REPO/slurm/lib/ray_node.sh" head >"$ATTEMPT_DIR/ray-$HEAD.log" 2>&1 &
  RAY_PIDS+=($!)
  if ((${#NODES[@]} > 1)); then
    srun --overlap --nodes=$((${#NODES[@]} - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
      "${GPU_ARGS[@]}" "${RAY_CPU_ARGS[@]}" "${CONTAINER_ARGS[@]}" --output="$ATTEMPT_DIR/ray-%N.log" \
      bash "$AXPO_REPO/slurm/lib/ray_node.sh" worker &
    RAY_PIDS+=($!)
  fi
  nodes_csv=$(IFS=,; echo "${NODES[*]}")
  if ! on_head "$PYTHON" "$AXPO_REPO/slurm/lib/wait_for_ray.py" --address "$AXPO_RAY_ADDRESS" \
    --nodes "$nodes_csv" --gpus-per-node "$GPUS_PER_NODE" --timeout "$RAY_TIMEOUT"; then
    echo "[axpo-launch] the Ray cluster is incomplete; node logs: $ATTEMPT_DIR/ray-*.log" >&2
    echo "attempt $ATTEMPT ended $(date '+%F %T'): the Ray cluster did not come up" >>"$LOG_DIR/job.txt"
    exit 1
  fi
  export RAY_ADDRESS=$AXPO_RAY_ADDRESS
fi

# -- the trainer -------------------------------------------------------------------------------------
if [[ $SIGNALLED == USR1 ]]; then
  requeue "the pre-timeout signal came during start-up"
fi
# With Ray the GPUs belong to the Ray step; the driver only talks to it.
DRIVER_GPU_ARGS=("${GPU_ARGS[@]}")
if [[ $USE_RAY == 1 ]]; then DRIVER_GPU_ARGS=(); fi
say "trainer: ${ENTRY[*]}"
# srun relays SIGUSR1 to the trainer. The trainer runs in the background so that this shell can take
# a signal while waiting for it (bash runs traps only between commands).
srun "${STEP_ARGS[@]}" "${DRIVER_GPU_ARGS[@]}" "${CONTAINER_ARGS[@]}" "${ENTRY[@]}" \
  >>"$ATTEMPT_DIR/driver.log" 2>&1 &
DRIVER_PID=$!
while :; do
  rc=0
  wait "$DRIVER_PID" || rc=$?
  if ((rc > 128)) && kill -0 "$DRIVER_PID" 2>/dev/null; then
    continue  # a trapped signal interrupted the wait; the trainer is still finishing its step
  fi
  break
done
DRIVER_PID=""
say "trainer exited with status $rc"
echo "attempt $ATTEMPT ended $(date '+%F %T'): trainer exit $rc${SIGNALLED:+ after SIG$SIGNALLED}" >>"$LOG_DIR/job.txt"

if [[ $SIGNALLED == USR1 ]]; then
  if ((rc == EXIT_STOPPED)); then
    requeue "checkpoint written"
  elif ((rc == 128 + 10)); then
    # SIGUSR1 reached the trainer before it installed its handler: it had nothing new to save.
    requeue "the trainer was still starting"
  fi
fi
exit "$rc"
