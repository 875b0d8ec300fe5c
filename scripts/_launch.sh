# Shared body of scripts/dpo_train.sh and scripts/dpo_instruct_train.sh (they set RECIPE, then source this).
# One launcher per node via srun; each runs `accelerate launch` with DeepSpeed ZeRO-2 (accelerate_config.yaml).
# On SIGUSR1 (time-limit warning or `scancel --signal=USR1 --full`) training saves a checkpoint and stops,
# then this script requeues the job, which resumes from that checkpoint.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

# The batch shell gets USR1 (from --signal=B:USR1@..., or scancel --full); srun passes it on to every
# process of the step on every node. Trapped first thing: an untrapped USR1 would kill the shell.
preempted=0
srun_pid=
trap 'preempted=1; echo "=== $(date -Is) got SIGUSR1: saving a checkpoint"; [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2>/dev/null || true' USR1

[[ -f train_dpo.py && -f accelerate_config.yaml ]] \
  || die "$PWD is not the repo root: cd to the fastdpo checkout and submit from there (sbatch scripts/dpo_train.sh)"
[[ -d logs ]] \
  || die "logs/ is missing: mkdir logs (sbatch writes the job log to logs/ and, without it, fails with no output at all)"
[[ -f $RECIPE ]] || die "recipe $RECIPE not found: set RECIPE=recipes/<name>.yaml (ls recipes/)"
# The entry point: train_dpo.py, or train_sft.py for an SFT recipe (same flags, same recipe layout).
ENTRY=${ENTRY:-train_dpo.py}
[[ $ENTRY == train_dpo.py || $ENTRY == train_sft.py ]] \
  || die "ENTRY=$ENTRY: set ENTRY=train_dpo.py (default) or ENTRY=train_sft.py"

# The active environment, else the repo's .venv.
if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then
  source .venv/bin/activate
fi
command -v accelerate >/dev/null \
  || die "no Python environment with accelerate: run \`make setup\` (creates .venv) or activate yours before sbatch"

# Secrets (HF_TOKEN, WANDB_API_KEY) become environment variables; xtrace is off so they are never echoed.
if [[ -f .env ]]; then
  case $- in *x*) xtrace=on ;; *) xtrace=off ;; esac
  set +x
  set -a; source .env; set +a
  [[ $xtrace == on ]] && set -x
fi

[[ -n ${SLURM_JOB_ID:-} ]] \
  || die "not inside a Slurm job; prerequisites look fine, submit with: sbatch $0 [train_dpo.py flags]"

# The GPUs Slurm gave this node (--gres=gpu:N) unless GPUS_PER_NODE says otherwise (CPU test runs do).
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[[ -n $GPUS_PER_NODE ]] \
  || die "no GPUs allocated on this node: request them (--gres=gpu:4) or set GPUS_PER_NODE"
NNODES=${SLURM_NNODES:-1}
# The first host of the allocation runs rank 0; every node's launcher meets it there.
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Derived from the job id so two jobs sharing a node do not fight over the rendezvous port.
MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))

echo "=== $(date -Is) job ${SLURM_JOB_NAME:-?} ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0})"
echo "nodes:   $NNODES ($SLURM_JOB_NODELIST), main $MAIN_HOST:$MAIN_PORT"
echo "gpus:    $GPUS_PER_NODE per node, $((NNODES * GPUS_PER_NODE)) processes"
echo "recipe:  $RECIPE  entry: $ENTRY  args: $*"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
python - <<'PY'
import sys
from importlib.metadata import version
print(f"python:  {sys.version.split()[0]} ({sys.executable})")
print("libs:    " + "  ".join(f"{p} {version(p)}" for p in ("torch", "trl", "transformers", "accelerate", "deepspeed")))
PY

# Log lines reach logs/ as they happen (Python block-buffers stdout when it is a file).
export PYTHONUNBUFFERED=1

launcher=()
# Slurm 22.05+ srun does not inherit --cpus-per-task; without it the launcher and all ranks share one core.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && launcher+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# USR1 is ignored in the launcher (the ignore survives exec) and handled by the training processes
# (fastdpo/preemption.py); a launcher that died of the signal would take the ranks down with it.
# Single quotes: SLURM_NODEID is expanded by each node's own shell.
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${launcher[@]}" \
  bash -c 'trap "" USR1; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' launch \
    --config_file accelerate_config.yaml \
    --num_machines "$NNODES" --num_processes $((NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT" \
    ${ACCELERATE_ARGS:-} \
    "$ENTRY" --config "$RECIPE" "$@" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; wait again until srun itself has exited.
while true; do
  rc=0
  wait "$srun_pid" || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

if [[ $preempted == 1 && $rc != 0 ]]; then
  # The ranks saved a checkpoint and exited with 75 (torchrun reports that as a failure above); a run
  # that finished anyway exits 0 and is not requeued.
  echo "=== $(date -Is) stopped for preemption; requeueing job $SLURM_JOB_ID, it resumes from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "=== $(date -Is) training exited with $rc"
exit "$rc"
