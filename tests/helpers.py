"""What every test layer shares: the checkout, its interpreter, and running the repo's own entry points as a user
would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def run(cmd: list[str], cwd: Path = REPO, env: dict | None = None, timeout: int = 600, check: bool = True):
    """Run a command, returning the CompletedProcess; on failure show its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def evaluate_alone(trainer, dataset, batch_size=None) -> dict:
    """The single-set path (TRL's own evaluate) on `dataset`, as the trainer's one eval set."""
    kept, kept_batch = trainer.eval_dataset, trainer.args.per_device_eval_batch_size
    trainer.eval_dataset = dataset
    trainer.args.per_device_eval_batch_size = batch_size or kept_batch
    try:
        return trainer.evaluate()
    finally:
        trainer.eval_dataset, trainer.args.per_device_eval_batch_size = kept, kept_batch
