"""Run an entry point with one fault injected at an exact moment, as a hostile user or cluster would:

    python tests/faults.py kill-in-save:8 train_dpo.py --output_dir ...   # SIGKILL while checkpoint-8 is written
    python tests/faults.py term-at-step:3 train_dpo.py --output_dir ...   # SIGTERM to itself at the end of step 3

Waiting for a folder to appear and then killing races the save (a tiny model saves in milliseconds); this
wrapper makes the moment deterministic. It patches transformers only, never fastdpo, and then runs the real
script as __main__: everything else (the signal handlers, the checkpoint marker, the resume) is the product.
"""

import os
import runpy
import signal
import sys


def kill_in_save(step: int) -> None:
    """SIGKILL in the middle of writing checkpoint-<step>/trainer_state.json: the model, optimizer and RNG state
    are on disk, the trainer state is half written, exactly what `kill -9` during a save leaves."""
    from transformers.trainer_callback import TrainerState

    save = TrainerState.save_to_json

    def save_then_die(self, json_path):
        if f"checkpoint-{step}" in str(json_path):
            with open(json_path, "w") as f:
                f.write('{"best_metric": null, "global_st')
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, json_path)

    TrainerState.save_to_json = save_then_die


def term_at_step(step: int) -> None:
    """SIGTERM, as `kill PID` or Slurm would send it, delivered as step <step> ends (before the callbacks run)."""
    from transformers.trainer_callback import CallbackHandler

    on_step_end = CallbackHandler.on_step_end

    def signal_then_continue(self, args, state, control):
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return on_step_end(self, args, state, control)

    CallbackHandler.on_step_end = signal_then_continue


FAULTS = {"kill-in-save": kill_in_save, "term-at-step": term_at_step}

if __name__ == "__main__":
    fault, script, *args = sys.argv[1:]
    name, _, step = fault.partition(":")
    FAULTS[name](int(step))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
