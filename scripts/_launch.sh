# Shared body of scripts/dpo_train.sh and scripts/dpo_instruct_train.sh (they set RECIPE, then source this).
# One launcher per node via srun; each runs `accelerate launch` with the config BACKEND names (default DeepSpeed
# ZeRO-2, accelerate_config.yaml).
# On SIGUSR1 (time-limit warning, `scancel --signal=USR1 --full`) or SIGTERM (time limit reached, preemption,
# node shutdown; SIGKILL follows after Slurm's KillWait) training saves a checkpoint and stops, then this script
# requeues the job, which resumes from that checkpoint. A plain `scancel` also saves, but is not requeued.
# A crash (a rank killed by a signal, a collective or CUDA error, a lost node) or a stall (fastdpo/watchdog.py)
# is requeued too, up to RETRIES times per job, and resumes from the last complete checkpoint; a mistake that
# would repeat (a configuration or data error, an output_dir another run holds, an exception before the first step)
# is not. Either way one line near the end says which rank on which node failed first, of what, and what happens.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

# The batch shell gets USR1 (from --signal=B:USR1@..., or scancel --full); srun passes it on to every
# process of the step on every node. Trapped first thing: an untrapped USR1 would kill the shell.
preempted=0
requeued=0
cancelled=0
srun_pid=
stop_ranks() {  # USR1 is a plain signal for srun to pass on; SIGTERM would make srun end the step
  [[ -n $srun_pid ]] && kill -USR1 "$srun_pid" 2>/dev/null || true
}
on_usr1() {
  preempted=1
  echo "=== $(date -Is) got SIGUSR1: saving a checkpoint"
  stop_ranks
}
on_term() {
  # Slurm ends a job with SIGTERM to every process of every step (the ranks too), SIGKILL after KillWait.
  # The shell may be killed before srun returns, so a job that Slurm is ending is requeued now; it starts
  # again only once every process of this one has exited, i.e. after the checkpoint is written (or cut off,
  # in which case the previous complete one is resumed).
  [[ $preempted == 1 && ($requeued == 1 || $cancelled == 1) ]] && return
  preempted=1
  echo "=== $(date -Is) got SIGTERM: saving a checkpoint before Slurm's SIGKILL"
  stop_ranks
  local state=unknown reason=unknown
  [[ $(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null) =~ JobState=([A-Z_]+).*Reason=([^ ]+) ]] \
    && state=${BASH_REMATCH[1]} reason=${BASH_REMATCH[2]}
  if [[ $state == RUNNING ]]; then
    return  # only a signal, the job goes on: requeue once the ranks have saved, as for USR1
  elif [[ $reason == None ]]; then
    # `scancel JOBID`: Slurm gives a time limit or a preemption a reason, a user's cancel none.
    cancelled=1
    echo "=== $(date -Is) cancelled (scancel): the checkpoint is saved but the job is not requeued; submit the same command to resume"
  elif scontrol requeue "$SLURM_JOB_ID"; then
    requeued=1
    echo "=== $(date -Is) job ending ($state, $reason): requeued job $SLURM_JOB_ID, it resumes from the last complete checkpoint"
  fi
}
trap on_usr1 USR1
trap on_term TERM

[[ -f train_dpo.py && -f accelerate_config.yaml ]] \
  || die "$PWD is not the repo root: cd to the fastdpo checkout and submit from there (sbatch scripts/dpo_train.sh)"
[[ -d logs ]] \
  || die "logs/ is missing: mkdir logs (sbatch writes the job log to logs/ and, without it, fails with no output at all)"
[[ -f $RECIPE ]] || die "recipe $RECIPE not found: set RECIPE=recipes/<name>.yaml (ls recipes/)"
# The entry point: train_dpo.py, or train_sft.py for an SFT recipe (same flags, same recipe layout).
ENTRY=${ENTRY:-train_dpo.py}
[[ $ENTRY == train_dpo.py || $ENTRY == train_sft.py ]] \
  || die "ENTRY=$ENTRY: set ENTRY=train_dpo.py (default) or ENTRY=train_sft.py"

# How the ranks shard the model: README "What fits where" says which one a model and GPU need.
BACKEND=${BACKEND:-zero2}
case $BACKEND in
  zero2) ACCELERATE_CONFIG=accelerate_config.yaml ;;        # DeepSpeed ZeRO-2 (ds_config.json)
  zero3) ACCELERATE_CONFIG=accelerate_config_zero3.yaml ;;  # DeepSpeed ZeRO-3 (ds_config_zero3.json)
  fsdp2) ACCELERATE_CONFIG=accelerate_config_fsdp2.yaml ;;  # PyTorch FSDP2
  *) die "BACKEND=$BACKEND: set BACKEND=zero2 (default: DeepSpeed ZeRO-2), zero3 (DeepSpeed ZeRO-3, parameters sharded too) or fsdp2 (PyTorch FSDP2)" ;;
esac
[[ -f $ACCELERATE_CONFIG ]] || die "BACKEND=$BACKEND needs $ACCELERATE_CONFIG in the repo root: restore it (git checkout $ACCELERATE_CONFIG)"

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

# Crash and stall retries per job, counted across requeues in a file beside the log (the submit directory: shared
# by every node of a cluster, as the log is). Preemption requeues are not counted: they are unlimited.
RETRIES=${RETRIES:-3}
[[ $RETRIES =~ ^[0-9]+$ ]] || die "RETRIES=$RETRIES: give a number of retries (0 turns retrying off)"
retry_file=$PWD/logs/.fastdpo-retries-$SLURM_JOB_ID
retries_used=$(cat "$retry_file" 2>/dev/null || echo 0)
# Where each rank leaves a note when it fails (fastdpo/ranks.py), one folder per attempt.
export FASTDPO_FAILURE_DIR=$PWD/logs/.fastdpo-failures-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}
rm -rf "$FASTDPO_FAILURE_DIR"
# This attempt's part of the job log (appended to across requeues), for torch elastic's report of failed ranks.
job_log=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2- || true)
log_offset=$(stat -c %s "$job_log" 2>/dev/null || echo 0)

# After a failed attempt (not a preemption): say who failed first and of what, then retry or stop.
after_failure() {
  local rc=$1 decision what reason resume
  IFS=$'\x1f' read -r decision what reason resume < <(python -m fastdpo.failures "$FASTDPO_FAILURE_DIR" "$job_log" "$log_offset" 2>/dev/null \
    || printf 'retry\x1funknown (the failure notes could not be read)\x1f\x1f?\n')
  local head="=== $(date -Is) failed (srun exited $rc): first failure: $what"
  if [[ $decision == stop ]]; then
    echo "$head; not retried: $reason"
  elif (( retries_used >= RETRIES )); then
    echo "$head; not retried: the retry budget is spent ($retries_used of $RETRIES retries used; RETRIES sets it)"
  else
    retries_used=$((retries_used + 1))
    echo "$retries_used" > "$retry_file"
    # The failed node is not excluded from the requeued job: a crash does not prove the node is at fault (the OOM
    # killer, a bad batch), Slurm's own health checks drain broken nodes, and excluding one can leave a job that
    # needs every node of its partition pending forever. To exclude one by hand while the job is pending:
    # scontrol update JobId=<id> ExcNodeList=<node>.
    echo "$head; requeueing, retry $retries_used of $RETRIES, resumes from $resume"
    rm -rf "$FASTDPO_FAILURE_DIR"  # read; the line above says what it held
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "=== $(date -Is) scontrol requeue refused (a job needs --requeue, and the cluster JobRequeue): submit the same command again to resume"
  fi
  rm -f "$retry_file"  # the job ends here; the failure notes stay in $FASTDPO_FAILURE_DIR for a post-mortem
  exit "$rc"
}

# The GPUs Slurm gave this node (--gres=gpu:N) unless GPUS_PER_NODE says otherwise (CPU test runs do).
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[[ -n $GPUS_PER_NODE ]] \
  || die "no GPUs allocated on this node: request them (--gres=gpu:4) or set GPUS_PER_NODE"
NNODES=${SLURM_NNODES:-1}
# The first host of the allocation runs rank 0; every node's launcher meets it there. A name that does not
# resolve would leave torchrun retrying its rendezvous for 15 minutes; fail now instead (and again on any
# node that cannot resolve it, inside srun below).
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_HOST
getent hosts "$MAIN_HOST" >/dev/null \
  || die "the main host $MAIN_HOST (first node of $SLURM_JOB_NODELIST) does not resolve on $(hostname); torchrun would retry for 15 minutes. Fix the cluster's DNS or /etc/hosts, or exclude the node (sbatch --exclude=$MAIN_HOST)"
# Derived from the job id so two jobs sharing a node do not fight over the rendezvous port.
MAIN_PORT=$((20000 + SLURM_JOB_ID % 20000))

echo "=== $(date -Is) job ${SLURM_JOB_NAME:-?} ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0})"
echo "nodes:   $NNODES ($SLURM_JOB_NODELIST), main $MAIN_HOST:$MAIN_PORT"
echo "gpus:    $GPUS_PER_NODE per node, $((NNODES * GPUS_PER_NODE)) processes"
echo "backend: $BACKEND ($ACCELERATE_CONFIG)"
echo "recipe:  $RECIPE  entry: $ENTRY  args: $*"
echo "retries: $retries_used of $RETRIES used (crashes and stalls; preemption requeues are unlimited)"
echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (uncommitted changes)')"
python - <<'PY'
import sys
from importlib.metadata import version
print(f"python:  {sys.version.split()[0]} ({sys.executable})")
print("libs:    " + "  ".join(f"{p} {version(p)}" for p in ("torch", "trl", "transformers", "accelerate", "deepspeed")))
PY

# Will the run fit its GPUs? fastdpo/memory.py's estimate for the recipe (and any flag overriding it), BACKEND and
# GPU count against this node's GPU memory, before the job holds every GPU to load the model. Prints one line when
# it fits, the estimate and the fixes when it does not; FASTDPO_SKIP_MEMORY_CHECK=1 skips it.
memory_check() {
  python -m fastdpo.memory --check --recipe "$RECIPE" --backend "$BACKEND" --gpus $((NNODES * GPUS_PER_NODE)) \
    $([[ $ENTRY == train_sft.py ]] && echo --sft) "$@"
}
memory_check "$@" || exit 1

# Log lines reach logs/ as they happen (Python block-buffers stdout when it is a file).
export PYTHONUNBUFFERED=1

launcher=()
# Slurm 22.05+ srun does not inherit --cpus-per-task; without it the launcher and all ranks share one core.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && launcher+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# USR1 and TERM are ignored in the launcher (an ignore survives exec) and handled by the training processes
# (fastdpo/preemption.py): a launcher that died of USR1 would take the ranks down with it, and torchrun on
# SIGTERM kills its workers 30 s later whatever Slurm's KillWait. torchrun installs handlers for the signals its
# --signals_to_handle names (default SIGTERM,SIGINT,SIGHUP,SIGQUIT), which would replace the ignore: the list
# leaves SIGTERM out. Both names are set: torch's process context reads TORCHELASTIC_SIGNALS_TO_HANDLE, and torch
# 2.13's launcher overwrites it from that option, whose default comes from PET_SIGNALS_TO_HANDLE (with the first
# name alone, torch 2.13 still forwards SIGTERM and SIGKILLs the ranks 30 s later: tests/e2e/test_first_hour.py shows it).
# SIGINT stays torchrun's: it passes one SIGINT to each rank (their own sessions), which saves and stops as a
# Ctrl-C does. Single quotes: each node's own shell expands them.
srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${launcher[@]}" \
  bash -c 'getent hosts "$MAIN_HOST" >/dev/null || { echo "error: node $(hostname) cannot resolve the main host $MAIN_HOST" >&2; exit 1; }
           echo "launcher: node ${SLURMD_NODENAME:-$(hostname)}, machine rank $SLURM_NODEID of $SLURM_NNODES"
           trap "" USR1 TERM; export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
           exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' launch \
    --config_file "$ACCELERATE_CONFIG" \
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
  if [[ $cancelled == 1 || $requeued == 1 ]]; then
    echo "=== $(date -Is) stopped (training exited with $rc); $([[ $requeued == 1 ]] && echo requeued || echo 'cancelled, not requeued')"
    exit 0
  fi
  echo "=== $(date -Is) stopped for preemption; requeueing job $SLURM_JOB_ID, it resumes from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "=== $(date -Is) training exited with $rc"
if [[ $rc == 0 ]]; then
  rm -rf "$FASTDPO_FAILURE_DIR" "$retry_file"
  exit 0
fi
after_failure "$rc"
