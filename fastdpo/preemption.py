"""Save a checkpoint and stop cleanly on SIGUSR1, SIGTERM or a first Ctrl-C (SIGINT).

SIGUSR1: Slurm's time-limit warning (`--signal=B:USR1@600`) or `scancel --signal=USR1 --full`; there is time.
SIGTERM: what Slurm sends when it ends a job (scancel, time limit, preemption) and what `kill` sends; SIGKILL
follows after Slurm's KillWait (default 30 s), so the save has that long. A kill mid-save leaves the previous
complete checkpoint usable (fastdpo.checkpoints).
SIGINT (Ctrl-C), during the training loop: the first one is a preemption like the others (the step in flight
finishes, a checkpoint is saved, exit 75); a second one stops at once (exit 130) without that checkpoint. Before
the loop (loading, tokenising, the reference pass) and after it (final save, evaluation, push) there is no step
boundary to wait for, so Ctrl-C stops at once with one line. torchrun and `accelerate launch` start the ranks in
sessions of their own, so a Ctrl-C in the terminal reaches only the launcher, which passes one SIGINT to each rank
and SIGKILLs them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) later.

The sbatch scripts requeue the job afterwards, and the requeued run resumes from that checkpoint
(train_dpo.py resumes from the newest complete checkpoint in output_dir), with the same data order and schedule.

    cb = PreemptionCallback()      # in the main thread, before loading anything: installs the handlers
    trainer.add_callback(cb)
    trainer.train(...)
    if cb.preempted:               # checkpoint written by every rank; skip the final save
        sys.exit(PREEMPTED_EXIT_CODE)

Work outside the training loop (tokenising, the reference pass) polls `stop_requested()` and raises
`Preempted`, which the entry points turn into the same exit code; a signal that arrives before the first step
stops there too, without a checkpoint (there is nothing to save yet).
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from . import ranks

logger = logging.getLogger("fastdpo")

# sysexits' EX_TEMPFAIL, "try again later": not a crash, and not a finished run (fastdpo.ranks' table).
PREEMPTED_EXIT_CODE = ranks.PREEMPTED
# 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C.
INTERRUPTED_EXIT_CODE = 130
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_signalled: str | None = None  # name of the signal the handler got; read by work before the Trainer's loop


def stop_requested() -> bool:
    """True once this process got a preemption signal (any PreemptionCallback's handler)."""
    return _signalled is not None


class Preempted(Exception):
    """Stopped at a safe point outside the training loop (e.g. between reference-pass chunks); rerun resumes."""


def _say(line: str) -> None:
    # os.write, not print or logging: a handler runs between two bytecodes of the main thread, possibly inside a
    # print or a log call of its own, which a buffered stream refuses to re-enter. Rank 0 speaks for all ranks.
    if os.environ.get("RANK", "0") == "0":
        os.write(2, f"{line}\n".encode())


class PreemptionCallback(TrainerCallback):
    def __init__(self, signums: tuple[int, ...] = SIGNALS):
        self.signalled = False  # this process got a signal
        self.preempted = False  # all ranks stopped together after saving a checkpoint
        self.phase = "before"  # before / training / after the Trainer's loop: what a Ctrl-C means
        self.step = 0  # optimizer steps done, for the second Ctrl-C's line
        self.pid = os.getpid()
        for signum in signums:
            signal.signal(signum, self._on_signal)
        # A process started in the background (`cmd &` in a script, nohup) has SIGINT ignored: keep it so.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_signal(self, signum, frame):
        # Only set a flag: the step in flight finishes, and the save happens at a step boundary.
        global _signalled
        self.signalled = True
        _signalled = _signalled or signal.Signals(signum).name

    def _on_interrupt(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data worker (datasets' map): the main process speaks and stops
            os._exit(INTERRUPTED_EXIT_CODE)
        if self.phase == "training" and not self.signalled:
            self._on_signal(signum, frame)
            _say(f"Ctrl-C: finishing step {self.step + 1} and saving a checkpoint, then stopping "
                 "(Ctrl-C again stops at once, without it)")
            return
        if self.phase == "training":
            pending = self.step if self.preempted else self.step + 1  # the save in progress, or the step in flight
            line = (f"stopped at once (second Ctrl-C): no checkpoint was written for step {pending}; rerun "
                    "the same command to resume from the last complete checkpoint")
        elif self.phase == "before":
            line = "stopped (Ctrl-C) before the first training step: nothing to save; rerun the same command to start"
        else:
            line = ("stopped (Ctrl-C) after training, before the final model was saved in full; rerun the same "
                    "command to finish from the last complete checkpoint")
        _say(line)
        raise SystemExit(INTERRUPTED_EXIT_CODE)

    def _any_rank_signalled(self, args) -> bool:
        # The signal reaches ranks at slightly different times (or only some of them); if one rank
        # left the loop alone, the others would hang in their next collective. So every rank asks
        # the same question at every step end, and all stop if any was signalled. The tensor lives
        # on the training device so this works with NCCL as well as gloo; one int per step is noise.
        if not (dist.is_available() and dist.is_initialized()):
            return self.signalled
        flag = torch.tensor([int(self.signalled)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_begin(self, args, state, control, **kwargs):
        # A signal during loading or the reference pass: stop before the first step instead of training one
        # step only to checkpoint it (and, under SIGTERM, likely be killed mid-save).
        if self._any_rank_signalled(args):
            raise Preempted(f"{_signalled or 'a signal on another rank'} before the first step")
        self.phase, self.step = "training", state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.preempted or not self._any_rank_signalled(args) or state.global_step >= state.max_steps:
            return  # (the last step: finishing, final save included, beats a checkpoint and a requeue)
        self.preempted = True
        control.should_save = True
        control.should_training_stop = True
        if state.is_world_process_zero:
            logger.warning("preempted (%s): saving a checkpoint at step %d/%d and stopping",
                           _signalled or "signal on another rank", state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        # Every rank writes its own part of a ZeRO checkpoint; wait for all of them before anyone
        # exits, because the launcher kills the remaining ranks as soon as one exits non-zero.
        if self.preempted and dist.is_available() and dist.is_initialized():
            dist.barrier()
        self.phase = "after"
