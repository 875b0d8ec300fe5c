"""Which process this is, which process writes, and waits for another process that end with a named error.

One notion of "the process that writes", in two scopes:

    ranks.writes("node")   # caches (embedded model, token cache, reference cache): each node's local main process,
                           # because nodes need not share the cache folder
    ranks.writes("run")    # output_dir (lock, run.json, checkpoint markers, reports): global rank 0, or each node's
                           # local main process with save_on_each_node (output_dir is then per node)

Both read the launcher's environment (RANK, LOCAL_RANK, set by torchrun/accelerate before Python starts), so they
give the same answer before and after torch.distributed is initialised, in every module.

    path = ranks.wait_for(lambda: find(), "the token cache entry for data/x.jsonl", "the local main process")

polls `find()` until it returns something, logs who it waits for every 30 s, and raises `WaitTimeout` naming what
it waited for and for whom after FASTDPO_WAIT_TIMEOUT seconds (default 4 hours: longer than any cache build this
repo does on its recipes), instead of hanging forever when the writer died.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger("fastdpo")

WAIT_TIMEOUT = 4 * 3600.0
WAIT_LOG_SECONDS = 30.0


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def host() -> str:
    """The node's name as Slurm knows it (what `--exclude` takes), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def describe() -> str:
    """`rank 1 (local 0) on node2, pid 1234`: how every message about a process names it."""
    return f"rank {rank()} (local {local_rank()}) on {host()}, pid {os.getpid()}"


def writes(scope: str = "run", save_on_each_node: bool = False) -> bool:
    """True in the one process that writes `scope` ("node": shared caches; "run": output_dir)."""
    if scope == "node" or (scope == "run" and save_on_each_node):
        return local_rank() == 0
    if scope == "run":
        return rank() == 0
    raise ValueError(f"scope {scope!r}: 'node' or 'run'")


def writer_name(scope: str = "run") -> str:
    return f"the local main process (local rank 0) on {host()}" if scope == "node" else "rank 0"


class WaitTimeout(RuntimeError):
    """Another process did not produce what this one waits for within the deadline."""


def wait_timeout() -> float:
    return float(os.environ.get("FASTDPO_WAIT_TIMEOUT", WAIT_TIMEOUT))


def wait_for(check, what: str, who: str, timeout: float | None = None, poll: float = 1.0):
    """Poll `check()` until it returns something other than None; raise WaitTimeout after `timeout` seconds."""
    from . import watchdog

    timeout = wait_timeout() if timeout is None else timeout
    start = last = time.monotonic()
    with watchdog.phase(f"waiting for {who} to write {what}", bound=timeout + 60):
        while True:
            found = check()
            if found is not None:
                return found
            now = time.monotonic()
            if now - start >= timeout:
                raise WaitTimeout(
                    f"{describe()}: waited {now - start:.0f} s for {who} to write {what}; it did not. Look in the log "
                    f"for that process's error (it may have crashed or hung). If it is only slow, raise "
                    f"FASTDPO_WAIT_TIMEOUT (now {timeout:.0f} s)")
            if now - last >= WAIT_LOG_SECONDS:
                last = now
                logger.info("%s: waiting %.0f s (of %.0f) for %s to write %s", describe(), now - start, timeout, who,
                            what)
            time.sleep(poll)


# --------------------------------------------------------------------------------- exit codes and failure notes

# What a training process's exit code tells scripts/_launch.sh (which retries crashes and stalls, not mistakes).
DATA_ERROR = 2           # bad data (fastdpo.data.DataError): would fail the same way again
OUTPUT_LOCKED = 73       # sysexits EX_CANTCREAT: another run holds output_dir (fastdpo.runlock)
STALLED = 70             # sysexits EX_SOFTWARE: the watchdog found no progress (fastdpo.watchdog); retried
PREEMPTED = 75           # sysexits EX_TEMPFAIL: checkpointed on SIGUSR1/SIGTERM (fastdpo.preemption); requeued
CONFIG_ERROR = 78        # sysexits EX_CONFIG: a setting or path that cannot work; would fail the same way again
KINDS = {DATA_ERROR: "data error", OUTPUT_LOCKED: "output_dir in use", STALLED: "stall", PREEMPTED: "preempted",
         CONFIG_ERROR: "configuration error"}


def note_failure(code: int, message: str, step: int | None = None) -> None:
    """Leave this rank's failure for the launcher: $FASTDPO_FAILURE_DIR/rank-<R>.json (set by scripts/_launch.sh,
    one folder per job attempt on the submit directory's filesystem). Written whole or not at all; never raises:
    the exit code is what matters, this only explains it."""
    import json

    folder = os.environ.get("FASTDPO_FAILURE_DIR")
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank-{rank()}.json")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"rank": rank(), "local_rank": local_rank(), "host": host(), "pid": os.getpid(),
                       "code": code, "kind": KINDS.get(code, "crash"), "step": step, "time": time.time(),
                       "message": message.strip().splitlines()[-1][:500] if message.strip() else ""}, f)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the failure note in %s (%s)", folder, e)


class exits:
    """The entry points' top level (train_dpo.py, train_sft.py): each way out gets its exit code and a failure note.

        with ranks.exits():
            main(*cfg.parse_args())

    DataError -> 2, output_dir locked -> 73, Preempted -> 75 (requeued), SystemExit("message") -> 1 (a setting that
    cannot work; noted as a configuration error, not retried), any other exception -> noted with its last line (a
    crash: retried by scripts/_launch.sh). The process group is torn down on the way out."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        import sys
        import traceback

        from . import data, runlock, watchdog
        from .preemption import Preempted

        log = logging.getLogger("fastdpo")
        step = watchdog.last_step()
        code = None
        try:
            if e is None:
                return False
            if isinstance(e, data.DataError):
                log.error("%s", e)
                note_failure(DATA_ERROR, str(e), step)
                code = DATA_ERROR
            elif isinstance(e, Preempted):  # a signal before the first step: nothing to checkpoint yet
                log.warning("preempted (%s); rerun the same command to resume", e)
                code = PREEMPTED
            elif isinstance(e, runlock.Locked):
                log.error("%s", e)
                note_failure(OUTPUT_LOCKED, str(e), step)
                code = OUTPUT_LOCKED
            elif isinstance(e, SystemExit):
                if isinstance(e.code, str):
                    note_failure(CONFIG_ERROR, e.code, step)
                elif e.code not in (None, 0) and e.code != PREEMPTED:
                    note_failure(e.code, f"exited {e.code}", step)
                return False
            elif isinstance(e, Exception):
                note_failure(1, "".join(traceback.format_exception_only(kind, e)), step)
                return False
            else:
                return False
        finally:
            watchdog.stop()
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        sys.exit(code)


def note_started() -> None:
    """Which node and pid this rank is: torch elastic names a rank killed by a signal by its number and the host
    name it resolves (often not the Slurm node name); this maps the number to the node."""
    import json

    folder = os.environ.get("FASTDPO_FAILURE_DIR")
    if folder:
        try:
            os.makedirs(os.path.join(folder, "started"), exist_ok=True)
            with open(os.path.join(folder, "started", f"rank-{rank()}.json"), "w") as f:
                json.dump({"rank": rank(), "local_rank": local_rank(), "host": host(), "pid": os.getpid()}, f)
        except OSError:
            pass


def note_output_dir(out) -> None:
    """Tell the launcher where this run writes, so its retry line can name the checkpoint it resumes from."""
    folder = os.environ.get("FASTDPO_FAILURE_DIR")
    if folder:
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "output_dir"), "w") as f:
                f.write(f"{os.path.abspath(out)}\n")
        except OSError:
            pass
