"""Which process this is and which one writes, and the exit codes a training process ends with.

One notion of "the process that writes", in two scopes:

    ranks.writes("node")   # caches (embedded model, token cache, reference cache): each node's local main process,
                           # because nodes need not share the cache folder
    ranks.writes("run")    # output_dir (lock, run.json, checkpoint markers, reports): global rank 0, or each node's
                           # local main process with save_on_each_node (output_dir is then per node)

Both read the launcher's environment (RANK, LOCAL_RANK, set by torchrun/accelerate before Python starts), so they
give the same answer before and after torch.distributed is initialised, in every module.

The exit codes and failure kinds are the one table that the way out (fastdpo.exits), the watchdog, preemption and
the launcher's reading of a failed attempt (fastdpo.failures, scripts/_launch.sh) share. At the bottom of the
process floor: imports nothing from the package.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

logger = logging.getLogger("fastdpo")


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


# --------------------------------------------------------------------------------- exit codes and failure notes

# What a training process's exit code tells scripts/_launch.sh (which retries crashes and stalls, not mistakes).
DATA_ERROR = 2           # bad data (fastdpo.errors.DataError): would fail the same way again
OUTPUT_LOCKED = 73       # sysexits EX_CANTCREAT: another run holds output_dir (fastdpo.runlock)
STALLED = 70             # sysexits EX_SOFTWARE: the watchdog found no progress (fastdpo.watchdog); retried
PREEMPTED = 75           # sysexits EX_TEMPFAIL: checkpointed on SIGUSR1/SIGTERM (fastdpo.preemption); requeued
CONFIG_ERROR = 78        # sysexits EX_CONFIG: a setting or path that cannot work; would fail the same way again
KINDS = {DATA_ERROR: "data error", OUTPUT_LOCKED: "output_dir in use", STALLED: "stall", PREEMPTED: "preempted",
         CONFIG_ERROR: "configuration error"}
# The kinds that would fail the same way again (not retried), as the launcher's line words them.
REPEATS = {KINDS[DATA_ERROR]: "a data error", KINDS[CONFIG_ERROR]: "a configuration error",
           KINDS[OUTPUT_LOCKED]: "output_dir is in use by another run"}


def note_failure(code: int, message: str, step: int | None = None) -> None:
    """Leave this rank's failure for the launcher: $FASTDPO_FAILURE_DIR/rank-<R>.json (set by scripts/_launch.sh,
    one folder per job attempt on the submit directory's filesystem). Written whole or not at all; never raises:
    the exit code is what matters, this only explains it."""
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


def note_started() -> None:
    """Which node and pid this rank is: torch elastic names a rank killed by a signal by its number and the host
    name it resolves (often not the Slurm node name); this maps the number to the node."""
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
