#!/bin/bash
# DPO, OLMo 3 Think recipe, DeepSpeed ZeRO-2 (or BACKEND=zero3 / fsdp2) on 1 node or many. Submit from the repo root:
#   sbatch scripts/dpo_train.sh                                   # 1 node x 4 GPUs
#   sbatch --nodes=2 scripts/dpo_train.sh --max_steps 100         # 2 nodes; arguments go to train_dpo.py
#   RECIPE=recipes/smollm2_orca.yaml sbatch scripts/dpo_train.sh  # another recipe
#   sbatch --gres=gpu:8 --cpus-per-task=64 --mem=512G scripts/dpo_train.sh   # 8-GPU nodes: one process per GPU
#   BACKEND=zero3 sbatch --nodes=4 scripts/dpo_train.sh           # parameters sharded too (bigger models)
#   tail -f logs/dpo-think-<jobid>.out
# Knobs (environment): RECIPE, GPUS_PER_NODE (default: the GPUs Slurm allocated), ACCELERATE_ARGS,
#   BACKEND: zero2 (default, DeepSpeed ZeRO-2), zero3 (DeepSpeed ZeRO-3) or fsdp2 (PyTorch FSDP2); see docs/sharded.md.
# Before srun the job checks that the run fits the GPUs' memory (fastdpo/memory.py) and stops with the fix if it does
#   not; FASTDPO_SKIP_MEMORY_CHECK=1 skips that check.
# Failures: RETRIES (crash and stall requeues per job, default 3; preemption requeues are unlimited),
#   FASTDPO_STALL_TIMEOUT / FASTDPO_STALL_GRACE (stall watchdog bounds in seconds, default 600 / 1800).
# Only the default RECIPE and the job name differ from the other script; the rest is scripts/_launch.sh.
#SBATCH --job-name=dpo-think
#SBATCH --nodes=1
# One launcher per node; accelerate starts one training process per GPU.
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
# About 8 cores and 64 GB of host memory per GPU: data workers, the launcher, checkpoint writing.
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=24:00:00
# One log per job, appended to across requeues.
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# 10 minutes before the time limit the batch shell gets USR1: enough to finish the step and write a
# ZeRO-2 checkpoint (weights plus sharded optimizer state) of a 7B model; then the job requeues itself.
#SBATCH --signal=B:USR1@600
# Cluster-specific: uncomment (drop one #) and edit.
##SBATCH --partition=gpu
##SBATCH --account=my_project
##SBATCH --qos=normal
##SBATCH --exclusive

# module load cuda/12.4   # clusters with environment modules: the CUDA your torch build wants

RECIPE=${RECIPE:-recipes/olmo3_think.yaml}
# sbatch runs a copy of this script from a spool directory; the repo is where it was submitted.
cd "${SLURM_SUBMIT_DIR:-.}"
[[ -f scripts/_launch.sh ]] || { echo "error: submit from the repo root ($PWD has no scripts/_launch.sh)" >&2; exit 1; }
source scripts/_launch.sh
