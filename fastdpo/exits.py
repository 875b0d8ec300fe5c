"""The way out of a training process: each exception gets its exit code and a failure note for the launcher.

    with exits():                 # train_dpo.py, train_sft.py
        main(*cfg.parse_args())

DataError -> 2, output_dir locked -> 73, Preempted -> 75 (requeued), SystemExit("message") -> 1 (a setting that
cannot work; noted as a configuration error, not retried), any other exception -> noted with its last line (a
crash: retried by scripts/_launch.sh). The process group is torn down on the way out. The codes and kinds are
fastdpo.ranks' table; this module sits at the top, above everything it names.
"""

from __future__ import annotations

import logging
import sys
import traceback

import torch.distributed as dist

from . import ranks, watchdog
from .errors import DataError
from .preemption import Preempted
from .runlock import Locked

logger = logging.getLogger("fastdpo")


def _code(kind, e, step) -> int | None:
    """The exit code for exception `e` (None: let it propagate), after logging it and leaving its failure note."""
    if isinstance(e, DataError):
        logger.error("%s", e)
        ranks.note_failure(ranks.DATA_ERROR, str(e), step)
        return ranks.DATA_ERROR
    if isinstance(e, Preempted):  # a signal before the first step: nothing to checkpoint yet
        logger.warning("preempted (%s); rerun the same command to resume", e)
        return ranks.PREEMPTED
    if isinstance(e, Locked):
        logger.error("%s", e)
        ranks.note_failure(ranks.OUTPUT_LOCKED, str(e), step)
        return ranks.OUTPUT_LOCKED
    if isinstance(e, SystemExit):
        if isinstance(e.code, str):
            ranks.note_failure(ranks.CONFIG_ERROR, e.code, step)
        elif e.code not in (None, 0) and e.code != ranks.PREEMPTED:
            ranks.note_failure(e.code, f"exited {e.code}", step)
    elif isinstance(e, Exception):
        ranks.note_failure(1, "".join(traceback.format_exception_only(kind, e)), step)
    return None


class exits:
    """The entry points' top level: each way out gets its exit code and a failure note (see the module)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        code = None
        try:
            if e is None:
                return False
            code = _code(kind, e, watchdog.last_step())
            if code is None:
                return False
        finally:
            watchdog.stop()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        sys.exit(code)
