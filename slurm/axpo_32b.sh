#!/usr/bin/env bash
#SBATCH --job-name=axpo_32b
#SBATCH --nodes=4
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@1800
#SBATCH --requeue
#SBATCH --open-mode=append
# AXPO on Qwen3-VL-32B-Thinking with the NeMo-RL backend (conf/cluster/axpo_32b.yaml).
#   sbatch -A ACCOUNT -p PARTITION [--nodes=N] [--gres=gpu:8] slurm/axpo_32b.sh [key=value ...]
# Arguments are config overrides; the rest is slurm/launch.sh (settings there, guide: docs/slurm.md).
export AXPO_CONFIG=${AXPO_CONFIG:-cluster/axpo_32b}
export AXPO_COMMAND=${AXPO_COMMAND:-train}
# The batch script runs from a spool copy; the submitted path (the job's Command) locates slurm/.
if [[ -z ${AXPO_REPO:-} ]]; then
  submitted=$(scontrol -o show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -e 's/.* Command=//' -e 's/ .*//')
  AXPO_REPO=$(cd "$(dirname "$submitted")/.." && pwd)
  export AXPO_REPO
fi
exec bash "$AXPO_REPO/slurm/launch.sh" "$@"
