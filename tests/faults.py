"""Run an entry point with one fault injected at an exact moment, as a hostile user or cluster would:

    python tests/faults.py kill-in-save:8 train_dpo.py --output_dir ...   # SIGKILL while checkpoint-8 is written
    python tests/faults.py term-at-step:3 train_dpo.py --output_dir ...   # SIGTERM to itself at the end of step 3
    python tests/faults.py int-at-step:3 train_dpo.py --output_dir ...    # Ctrl-C (SIGINT) at the end of step 3
    FASTDPO_FAULT=kill-at-step:5@1 PYTHONPATH=tests/fault_site torchrun ... train_dpo.py   # rank 1 only, any launcher

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


def signal_at_step(step: int, signum: int) -> None:
    """SIGKILL (what the OOM killer or a failed GPU does) or SIGSTOP (a rank that cannot run: a hung driver, a frozen
    node) to itself as step <step> ends."""
    from transformers.trainer_callback import CallbackHandler

    on_step_end = CallbackHandler.on_step_end

    def signal_then_continue(self, args, state, control):
        if state.global_step == step:
            print(f"fault: pid {os.getpid()} sends itself {signal.Signals(signum).name} after step {step}", flush=True)
            os.kill(os.getpid(), signum)
        return on_step_end(self, args, state, control)

    CallbackHandler.on_step_end = signal_then_continue


def interrupt_at_step(step: int, times: int = 1, target: str = "self") -> None:
    """Ctrl-C as step <step> ends: SIGINT to itself (`times` of them, back to back: a user pressing twice), or to
    the launcher that started this rank (torchrun and accelerate give their ranks sessions of their own, so a
    Ctrl-C in the terminal reaches only the launcher, which passes it on)."""
    from transformers.trainer_callback import CallbackHandler

    on_step_end = CallbackHandler.on_step_end

    def interrupt_then_continue(self, args, state, control):
        if state.global_step == step:
            pid = os.getppid() if target == "launcher" else os.getpid()
            for _ in range(times):
                os.kill(pid, signal.SIGINT)
        return on_step_end(self, args, state, control)

    CallbackHandler.on_step_end = interrupt_then_continue


def interrupt_at_load(_: int) -> None:
    """Ctrl-C while the tokenizer loads, before any training step (the step number is unused)."""
    from transformers import AutoTokenizer

    load = AutoTokenizer.from_pretrained.__func__

    def interrupt_then_load(cls, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return load(cls, *args, **kwargs)

    AutoTokenizer.from_pretrained = classmethod(interrupt_then_load)


def interrupt_at_import(_: int) -> None:
    """Ctrl-C while the entry point imports TRL (seconds of imports, before anything is read or written)."""

    class InterruptOnTrl:
        def find_spec(self, name, path=None, target=None):
            if name == "trl":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None  # the normal finders import it

    sys.meta_path.insert(0, InterruptOnTrl())


def hang_in_step(step: int) -> None:
    """Stuck and alive as step <step> + 1 begins (a stuck filesystem read, a spinning kernel): the main thread sleeps
    in the training loop, outside any collective, while the other ranks wait for it in theirs."""
    import time

    from transformers.trainer_callback import CallbackHandler

    on_step_begin = CallbackHandler.on_step_begin

    def stuck_inside_a_step(self, args, state, control):
        if state.global_step == step:
            print(f"fault: pid {os.getpid()} hangs in step {step + 1}", flush=True)
            time.sleep(3600)
        return on_step_begin(self, args, state, control)

    CallbackHandler.on_step_begin = stuck_inside_a_step


FAULTS = {"kill-in-save": kill_in_save, "term-at-step": term_at_step,
          "kill-at-step": lambda step: signal_at_step(step, signal.SIGKILL),
          "stop-at-step": lambda step: signal_at_step(step, signal.SIGSTOP), "hang-in-step": hang_in_step,
          "int-at-step": interrupt_at_step, "int-twice-at-step": lambda step: interrupt_at_step(step, times=2),
          "int-launcher-at-step": lambda step: interrupt_at_step(step, target="launcher"),
          "int-at-load": interrupt_at_load, "int-at-import": interrupt_at_import}


def from_environment() -> None:
    """FASTDPO_FAULT=<fault>:<step>@<rank>[@always] in a training process of that global rank (tests/fault_site's
    sitecustomize calls this in every Python process; launchers and helpers have no RANK or another one). Only in
    the first attempt of a Slurm job unless @always: the requeued attempt must be able to finish."""
    spec = os.environ.get("FASTDPO_FAULT")
    if not spec or "RANK" not in os.environ:
        return
    fault, rank, *always = spec.split("@")
    if os.environ["RANK"] != rank or (not always and os.environ.get("SLURM_RESTART_COUNT", "0") != "0"):
        return
    name, _, step = fault.partition(":")
    FAULTS[name](int(step))

if __name__ == "__main__":
    fault, script, *args = sys.argv[1:]
    name, _, step = fault.partition(":")
    FAULTS[name](int(step))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
