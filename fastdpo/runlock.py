"""One run per output_dir: an exclusive lock file, held by the process that writes output_dir.

A second run on the same folder (a resubmitted job while the first still runs, two array tasks with one path)
would train into it too and interleave or break its checkpoints. So the writer (fastdpo.ranks) creates
`output_dir/.fastdpo.lock` holding its host, pid, process start time, boot id and Slurm job id, and every other
run stops at once with who holds it and the fix.

What it relies on: creating the file with `os.link` of a fully written temporary file (atomic on local disks,
NFSv3/v4 and Lustre, the classic NFS-safe lock; where hard links are refused, `O_CREAT | O_EXCL`, atomic on NFSv3+
and Lustre), and `rename` to take over a stale one. No flock/fcntl: NFS honours them only with a working lock
daemon, and a holder that is gone would keep a server-side lock until it times out. The holder touches the file every
minute (a heartbeat), and a lock counts as stale when its holder is gone:
- this host (same boot): no process with that pid and start time;
- another host: its Slurm job is not running (`scontrol show job`), or, without Slurm, no heartbeat for 10 minutes
  (measured against the filesystem's own clock, so clock skew between hosts does not matter);
- the same Slurm job id (a requeue or a restart of this very job): taken over, the previous attempt has ended.
A stale lock is taken over with a warning naming the old holder.

    lock = runlock.acquire(output_dir)   # in every rank: the writer takes it, the others learn the outcome
    ...                                  # released when the process exits (or lock.release())
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import torch.distributed as dist

from . import ranks, watchdog

logger = logging.getLogger("fastdpo")

NAME = ".fastdpo.lock"
HEARTBEAT = 60.0
STALE_AFTER = 600.0
SLURM_ALIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"}


class Locked(SystemExit):
    """output_dir is held by another run (a SystemExit: the message is what the user reads)."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None when there is no such
    process. Tells a live holder from a new process that got the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _job() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _record(nonce: str) -> dict:
    return {"host": socket.gethostname(), "node": ranks.host(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "boot": _boot_id(), "slurm_job_id": _job(), "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nonce": nonce}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable (written by something else, or truncated): judged by its heartbeat alone


def _fs_now(folder: Path) -> float:
    """The filesystem's clock: the mtime of a file created now (on NFS the server sets it)."""
    probe = folder / f".fastdpo.clock-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def _slurm_state(job: str) -> str | None:
    """JobState of a Slurm job, "GONE" when Slurm no longer knows it, None when Slurm cannot be asked."""
    if not shutil.which("scontrol"):
        return None
    try:
        r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if m := re.search(r"JobState=(\S+)", r.stdout):
        return m[1]
    return "GONE" if "Invalid job id" in r.stderr else None


def _stale(holder: dict, age: float) -> str | None:
    """Why the lock's holder is gone, or None when it may still be running."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == _job():
        if holder.get("slurm_restart") != os.environ.get("SLURM_RESTART_COUNT"):
            return f"it was an earlier attempt of this Slurm job {_job()} (restart {holder.get('slurm_restart') or 0})"
    if holder.get("host") == socket.gethostname() and holder.get("boot") == _boot_id():
        pid = holder.get("pid")
        if isinstance(pid, int) and _start_time(pid) == holder.get("start"):
            return None
        return f"its process (pid {pid}) is gone from this host"
    if holder.get("host") == socket.gethostname() and holder.get("boot"):
        return "this host rebooted since"
    if holder.get("slurm_job_id"):
        state = _slurm_state(holder["slurm_job_id"])
        if state == "GONE" or (state is not None and state not in SLURM_ALIVE):
            return f"its Slurm job {holder['slurm_job_id']} is {state.lower() if state != 'GONE' else 'gone'}"
        if state is not None:
            return None
    if age > STALE_AFTER:
        return f"no heartbeat for {age:.0f} s (the holder touches it every {HEARTBEAT:.0f} s)"
    return None


def _describe(holder: dict, age: float) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, since {holder.get('since', '?')}, "
            f"heartbeat {age:.0f} s ago")


_held: list[RunLock] = []


def release_all() -> None:
    """Release the locks this process holds (before an exit that skips atexit: the watchdog's os._exit runs it)."""
    for lock in list(_held):
        lock.release()


class RunLock:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / NAME
        self.nonce = secrets.token_hex(8)
        self.stop = threading.Event()

    def _create(self) -> bool:
        """Atomically create the lock with our record in it; False when it exists."""
        tmp = self.out / f"{NAME}.{socket.gethostname()}.{os.getpid()}.{self.nonce}"
        tmp.write_text(json.dumps(_record(self.nonce), indent=1) + "\n")
        try:
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:
                # NFS: a retransmitted LINK can report failure although it worked (the link count says), or the
                # filesystem has no hard links (fall back to an exclusive create)
                if tmp.stat().st_nlink == 2:
                    return True
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w") as f:
                    f.write(tmp.read_text())
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            try:
                age = _fs_now(self.out) - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            reason = _stale(holder, age)
            if reason is None:
                raise Locked(
                    f"output_dir {self.out} is in use by another run ({_describe(holder, age)}); two runs in one "
                    f"folder would interleave or break each other's checkpoints. Fix: wait for that run, stop it"
                    f"{' (scancel ' + holder['slurm_job_id'] + ')' if holder.get('slurm_job_id') else ''}, or pass "
                    f"another --output_dir. If you are sure no run uses the folder, delete {self.path}")
            aside = self.path.with_name(f"{NAME}.stale-{self.nonce}")
            try:
                os.rename(self.path, aside)  # one taker wins; the others find the new lock on their next turn
            except FileNotFoundError:
                continue
            if _read(aside) != holder:  # renamed a lock someone else had just created: give it back
                os.link(aside, self.path) if not self.path.exists() else None
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            logger.warning("output_dir %s: taking over the lock of a run that is gone (%s; %s)", self.out,
                           _describe(holder, age), reason)
        else:
            raise Locked(f"output_dir {self.out}: could not take {self.path} after 5 tries (other runs keep "
                         "taking it); pass another --output_dir")
        logger.info("output_dir %s: locked for this run (%s)", self.out, self.path.name)
        ranks.note_output_dir(self.out)
        atexit.register(self.release)
        watchdog.before_exit(release_all)
        _held.append(self)
        threading.Thread(target=self._heartbeat, name="fastdpo-runlock", daemon=True).start()

    def _mine(self) -> bool:
        held = _read(self.path)
        return bool(held) and held.get("nonce") == self.nonce

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT):
            try:
                if self._mine():
                    os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self.stop.set()
        if self in _held:
            _held.remove(self)
        try:
            if self._mine():
                self.path.unlink()
        except OSError:
            pass


def acquire(out, save_on_each_node: bool = False) -> RunLock | None:
    """Take output_dir's lock in its writer; every rank raises Locked (same message) when it is held."""
    lock, problem = None, None
    if ranks.writes("run", save_on_each_node):
        lock = RunLock(out)
        try:
            lock.acquire()
        except Locked as e:
            problem = str(e)
    if dist.is_available() and dist.is_initialized() and not save_on_each_node:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise Locked(problem)
    return lock
