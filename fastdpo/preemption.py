"""Save a checkpoint and stop cleanly on SIGUSR1 (Slurm's time-limit warning, or `scancel --signal=USR1 --full`).

The sbatch scripts requeue the job afterwards, and the requeued run resumes from that checkpoint
(train_dpo.py resumes from the last checkpoint in output_dir), with the same data order and schedule.

    cb = PreemptionCallback()      # in the main thread, before training: installs the handler
    trainer.add_callback(cb)
    trainer.train(...)
    if cb.preempted:               # checkpoint written by every rank; skip the final save
        sys.exit(PREEMPTED_EXIT_CODE)
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger("fastdpo")

# sysexits' EX_TEMPFAIL, "try again later": not a crash, and not a finished run.
PREEMPTED_EXIT_CODE = 75

_signalled = False  # set by the handler; read by work that runs before the Trainer's loop (the reference pass)


def stop_requested() -> bool:
    """True once this process got the preemption signal (any PreemptionCallback's handler)."""
    return _signalled


class Preempted(Exception):
    """Stopped at a safe point outside the training loop (e.g. between reference-pass chunks); rerun resumes."""


class PreemptionCallback(TrainerCallback):
    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self.signalled = False  # this process got the signal
        self.preempted = False  # all ranks stopped together after saving a checkpoint
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        # Only set a flag: the step in flight finishes, and the save happens at a step boundary.
        global _signalled
        self.signalled = _signalled = True

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

    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted or not self._any_rank_signalled(args):
            return
        self.preempted = True
        control.should_save = True
        control.should_training_stop = True
        if state.is_world_process_zero:
            logger.warning("preempted (%s): saving a checkpoint at step %d/%d and stopping",
                           signal.Signals(self.signum).name, state.global_step, state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        # Every rank writes its own part of a ZeRO checkpoint; wait for all of them before anyone
        # exits, because the launcher kills the remaining ranks as soon as one exits non-zero.
        if self.preempted and dist.is_available() and dist.is_initialized():
            dist.barrier()
