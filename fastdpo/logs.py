"""Logs for humans tailing a file: one plain line per logging step, progress bars only on terminals, and none of the
library lines a user cannot act on (`QUIET`: each named by its logger and message, with the reason)."""

from __future__ import annotations

import datetime
import logging
import math
import re
import sys
import time
import warnings

import torch
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

logger = logging.getLogger("fastdpo")


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


# (logger, the message's start, when, why it is dropped). Only these records go: the same loggers' other lines stay.
QUIET = (
    ("DeepSpeed", "Setting accelerator to CPU", _no_cuda,
     "DeepSpeed says so whenever it is imported on a machine without CUDA, where CPU is the only choice; with CUDA "
     "present the line means CUDA was not found, a real problem, and it is kept"),
    ("trl.trainer.dpo_trainer", "`padding_free=True` is temporarily unavailable", None,
     "TRL 1.16 dropped padding_free and says to set it false; fastdpo implements it (fastdpo/trainer.py), and where "
     "it falls back to TRL's padded path it logs why ('padding_free: using the stock padded path because ...')"),
    ("transformers.trainer", "There were missing keys in the checkpoint model loaded: ['lm_head.weight'].", None,
     "a model with tied embeddings saves the shared matrix once, as embed_tokens; on resume the Trainer loads with "
     "strict=False and lists lm_head.weight as missing although the tie gives it the loaded values (a resumed run "
     "ends bit-identical to an uninterrupted one: tests/e2e/test_train.py and test_first_hour.py). An untied model "
     "saves lm_head.weight, so the line cannot hide a real loss there"),
)


# Python warnings, by message and category: (regex at the message's start, category, why).
QUIET_WARNINGS = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning,
     "transformers 5.23 renamed it is_activation_checkpointing; TRL 1.16 (trl/models/utils.py) still reads the old "
     "name where it turns recomputation off around its reference pass (the stock path); drop this when TRL moves"),
)


class _Drop(logging.Filter):
    def __init__(self, start: str, when):
        super().__init__()
        self.start, self.when = start, when

    def filter(self, record: logging.LogRecord) -> bool:
        # accelerate's logger adapter (TRL's loggers) puts "[RANK n] " before the message
        message = re.sub(r"^\[RANK \d+\] ", "", record.getMessage())
        return not (message.startswith(self.start) and (self.when is None or self.when()))


def quiet() -> None:
    """Drop the QUIET records and warnings: a filter on each named logger, so their other records are untouched.
    Run at import (below): DeepSpeed and transformers may log these while the arguments are still being parsed."""
    for name, start, when, _ in QUIET:
        log = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in log.filters):
            log.addFilter(_Drop(start, when))
    for message, category, _ in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


quiet()


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout, force=True,
    )
    import datasets  # heavy: logs sits below every module, and the light tools (memory, failures) never set up logging
    import transformers  # heavy, as datasets above

    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()
    if not sys.stderr.isatty():  # no carriage-return bars in log files
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


class _Bar(ProgressCallback):
    """The usual tqdm bar, without re-printing each log dict (ProgressLine prints one line instead)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def use_plain_progress(trainer) -> None:
    """Replace the Trainer's dict printing with ProgressLine; keep a bar only when attached to a terminal."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if sys.stderr.isatty() and not trainer.args.disable_tqdm:
        trainer.add_callback(_Bar())
    trainer.add_callback(ProgressLine())


def batch_arithmetic(args) -> str:
    pairs = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return (f"{args.per_device_train_batch_size} pairs/device x {args.world_size} processes x "
            f"{args.gradient_accumulation_steps} accumulation = {pairs} pairs per optimizer step")


def epochs(max_steps: int, args, train_dataloader) -> str:
    """The epochs max_steps really covers (with max_steps set, num_train_epochs is ignored), as the Trainer counts
    steps per epoch: micro-batches per epoch / accumulation, rounded up."""
    try:
        per_epoch = max(math.ceil(len(train_dataloader) / args.gradient_accumulation_steps), 1)
    except TypeError:  # an iterable dataset has no length
        return f"{args.num_train_epochs} epochs asked" if args.max_steps <= 0 else "epochs unknown: no dataset length"
    return f"{max_steps / per_epoch:.4g} epochs of {per_epoch} steps"


# an eval set's own reward accuracy, which TRL logs for every set (fastdpo.trainer: eval sets by name)
EVAL_SET = re.compile(r"^eval_(.+)_rewards/accuracies$")


def _fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


class ProgressLine(TrainerCallback):
    """`step 3/20 | loss 0.6931 | acc 0.50 | margin 0.000 | lr 1.0e-06 | 512 tok/s | eta 0:00:12`."""

    def __init__(self):
        self.t0 = self.t_last = None
        self.step0 = 0
        self.tokens_last = 0.0

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.t0 = self.t_last = time.time()
        self.step0 = state.global_step
        if state.is_world_process_zero:
            logger.info("batch: %s", batch_arithmetic(args))
            logger.info("optimizer steps: %d (%s)%s", state.max_steps, epochs(state.max_steps, args, train_dataloader),
                        f", resuming at step {state.global_step}" if state.global_step else "")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.time()
        tokens = logs.get("num_tokens", 0.0)
        tok_s = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9) if self.tokens_last else None
        self.tokens_last, self.t_last = tokens, now
        done = state.global_step - self.step0
        eta = (now - self.t0) / done * (state.max_steps - state.global_step) if done else None
        parts = [
            f"step {state.global_step}/{state.max_steps}",
            f"loss {_fmt(logs.get('loss'), '.4f')}",
            f"acc {_fmt(logs.get('rewards/accuracies'), '.2f')}",
            f"margin {_fmt(logs.get('rewards/margins'), '.3f')}",
            f"lr {_fmt(logs.get('learning_rate'), '.1e')}",
            f"{_fmt(tok_s, '.0f')} tok/s",
            f"eta {datetime.timedelta(seconds=round(eta)) if eta is not None else 'n/a'}",
        ]
        print(" | ".join(parts), flush=True)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """The eval line; with eval sets by name (`eval_<name>_...` keys) it is over all their pairs, and a line per
        set follows it."""
        if not (state.is_world_process_zero and metrics):
            return
        when = f"step {state.global_step}/{state.max_steps}" if state.max_steps else "before training"
        sets = [m.group(1) for m in map(EVAL_SET.match, metrics) if m]
        for head, prefix in [(f"eval {when}", "eval_")] + [(f"eval {when} | {n}", f"eval_{n}_") for n in sets]:
            print(f"{head} | loss {_fmt(metrics.get(prefix + 'loss'), '.4f')} | "
                  f"acc {_fmt(metrics.get(prefix + 'rewards/accuracies'), '.2f')} | "
                  f"margin {_fmt(metrics.get(prefix + 'rewards/margins'), '.3f')}", flush=True)
