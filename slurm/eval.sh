#!/usr/bin/env bash
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
# Pass@k with tool metrics of a trained run: `axpo eval` (local backend, one GPU, no Ray); the
# report goes to runs/<job name>-<job id>/eval/ unless --out is given.
#   sbatch -A ACCOUNT -p PARTITION [--gres=gpu:1] slurm/eval.sh --run RUN_FOLDER \
#     [--questions FILE.jsonl] [--config CONFIG] [key=value ...]
# Arguments go to `axpo eval`; the rest is slurm/launch.sh (settings there, guide: docs/slurm.md).
export AXPO_CONFIG=${AXPO_CONFIG:-demo}
export AXPO_COMMAND=${AXPO_COMMAND:-eval}
# The batch script runs from a spool copy; the submitted path (the job's Command) locates slurm/.
if [[ -z ${AXPO_REPO:-} ]]; then
  submitted=$(scontrol -o show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -e 's/.* Command=//' -e 's/ .*//')
  AXPO_REPO=$(cd "$(dirname "$submitted")/.." && pwd)
  export AXPO_REPO
fi
exec bash "$AXPO_REPO/slurm/launch.sh" "$@"
