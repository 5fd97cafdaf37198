#!/usr/bin/env bash
#SBATCH --job-name=cpu_demo
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
# The embedded demo (conf/demo.yaml) on one node's CPUs with the local backend: no Ray, no GPU.
# The same launcher as the cluster jobs; CI submits it to a one-node SLURM with a shortened config.
#   sbatch slurm/cpu_demo.sh [key=value ...]
export AXPO_CONFIG=${AXPO_CONFIG:-demo}
export AXPO_COMMAND=${AXPO_COMMAND:-train}
export GPUS_PER_NODE=${GPUS_PER_NODE:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# The batch script runs from a spool copy; the submitted path (the job's Command) locates slurm/.
if [[ -z ${AXPO_REPO:-} ]]; then
  submitted=$(scontrol -o show job "${SLURM_JOB_ID:?submit this script with sbatch}" | sed -e 's/.* Command=//' -e 's/ .*//')
  AXPO_REPO=$(cd "$(dirname "$submitted")/.." && pwd)
  export AXPO_REPO
fi
exec bash "$AXPO_REPO/slurm/launch.sh" "$@"
