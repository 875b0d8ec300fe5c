"""Failures that are not preemption, on 2 CPU processes (torchrun) or one: a rank that stops (SIGSTOP) or hangs
alive, a second run on the same output_dir, the stale lock a crash leaves, 2 processes on an empty cache.

Faults are injected at exact moments (tests/faults.py, through tests/fault_site/sitecustomize.py for ranks that
torchrun starts), never by racing timers; the product code is not patched. The Slurm cases (a rank killed on node 2,
a configuration error, the retry budget) are in tests/slurm/test_slurm.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastdpo import runlock
from fastdpo.checkpoints import MARKER
from tests.helpers import PYTHON, REPO, run

TORCHRUN = str(Path(PYTHON).with_name("torchrun"))
ARGS = ["--use_cpu", "true", "--eval_before_train", "false", "--logging_steps", "1", "--save_strategy", "steps",
        "--save_steps", "2"]


def torchrun(out, steps, env, fault=None, args=()):
    extra = {"FASTDPO_FAULT": fault, "PYTHONPATH": str(REPO / "tests" / "fault_site")} if fault else {}
    t0 = time.monotonic()
    proc = run([TORCHRUN, "--nproc_per_node", "2", "train_dpo.py", *ARGS, "--max_steps", str(steps),
                "--output_dir", str(out), *args], env={**env, **extra}, check=fault is None, timeout=600)
    return proc, proc.stdout + proc.stderr, time.monotonic() - t0


def classify(notes, tmp_path, log_text):
    """fastdpo.failures as scripts/_launch.sh runs it after a failed attempt: its four fields."""
    log = tmp_path / "attempt.log"
    log.write_text(log_text)
    line = run([PYTHON, "-m", "fastdpo.failures", str(notes), str(log), "0"]).stdout.strip()
    return line.split("\x1f")


@pytest.mark.slow
def test_stopped_and_hung_ranks_end_the_job_with_stacks_and_the_rerun_resumes(tmp_path):
    """2 processes on an empty cache build the embedded model once (they used to race: transformers 5 saves weights
    on rank 0 only); a SIGSTOPped rank is named by the rank waiting for it; a rank hung alive prints its own stack;
    each time the watchdog ends the job within its bound, and the rerun resumes from the last complete checkpoint."""
    notes = tmp_path / "notes"
    env = {"FASTDPO_CACHE": str(tmp_path / "empty-cache"), "FASTDPO_STALL_TIMEOUT": "5", "FASTDPO_STALL_GRACE": "300",
           "FASTDPO_FAILURE_DIR": str(notes)}
    out = tmp_path / "out"

    proc, text, _ = torchrun(out, 12, env, fault="stop-at-step:4@1")
    assert proc.returncode != 0 and "Unrecognized model" not in text, text[-4000:]
    stall = re.search(r"watchdog: rank 0 \(local 0\) on \S+, pid \d+: no progress for (\d+) s \(bound (\d+) s", text)
    assert stall, text[-4000:]
    assert int(stall[2]) == 5 and int(stall[1]) <= 5 + 2, stall[0]  # within the bound (plus one 1 s tick)
    assert re.search(r"likely cause: rank 1 \(local 1\) on \S+, pid \d+: no heartbeat for \d+ s", text), text[-4000:]
    assert "Thread 0x" in text and "in all_reduce" in text  # rank 0's stacks: waiting for rank 1 in a collective
    assert f"exitcode  : {70}" in text  # the watchdog's exit code, which scripts/_launch.sh retries
    assert (out / "checkpoint-2" / MARKER).is_file()
    # what scripts/_launch.sh decides from the notes and torch elastic's report: a stall, retried, from checkpoint-2
    decision, first, reason, resume = classify(notes, tmp_path, text)
    assert (decision, reason, resume) == ("retry", "", "checkpoint-2"), first
    assert re.match(r"rank 0 \(local 0\) on \S+ stalled at step 3: no progress for \d+ s .*likely cause: rank 1 ",
                    first)
    shutil.rmtree(notes)

    proc, text, _ = torchrun(out, 12, env, fault="hang-in-step:4@1")
    assert proc.returncode != 0 and f"resuming from {out}/checkpoint-2" in text, text[-4000:]
    assert "in stuck_inside_a_step" in text  # the hung rank's own stack (tests/faults.py), alive
    assert re.search(r"rank 1 \(local 1\) on \S+, pid \d+: not in a collective, stuck in faults\.py:\d+ in "
                     r"stuck_inside_a_step", text), text[-4000:]

    # evaluations mid-run and at the end, checkpoint saves: none trips the 5 s bound (grace, and a beat per batch)
    proc, text, _ = torchrun(out, 12, env, args=["--eval_strategy", "steps", "--eval_steps", "6"])
    assert f"resuming from {out}/checkpoint-4" in text and "step 12/12" in text, text[-4000:]
    assert "watchdog: rank" not in text.replace("watchdog: a rank", "")
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_second_run_on_one_output_dir_is_refused_and_a_crash_leaves_a_lock_the_next_run_takes_over(tmp_path):
    out = tmp_path / "out"
    cmd = ["train_dpo.py", *ARGS, "--max_steps", "6", "--output_dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "FASTDPO_STALL_TIMEOUT": "3600"}
    # The first run hangs, alive, once checkpoint-2 is written: it holds output_dir for as long as we need.
    first = subprocess.Popen([PYTHON, "tests/faults.py", "hang-in-step:2", *cmd], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoint-2" / MARKER).is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not reach checkpoint-2"
            time.sleep(0.5)
        lock = json.loads((out / ".fastdpo.lock").read_text())
        assert lock["pid"] == first.pid

        t0 = time.monotonic()
        second = run([PYTHON, *cmd], check=False, env={"FASTDPO_FAILURE_DIR": str(tmp_path / "notes")})
        took = time.monotonic() - t0
        text = second.stdout + second.stderr
        assert second.returncode == 73, text[-3000:]
        decision, first_failure, reason, _ = classify(tmp_path / "notes", tmp_path, text)
        assert (decision, reason) == ("stop", "output_dir is in use by another run"), first_failure
        assert f"output_dir {out} is in use by another run (host" in text and f"pid {first.pid}" in text
        assert "Fix: wait for that run, stop it, or pass another --output_dir" in text
        assert "step 1/" not in text and took < 120, took  # refused at start-up (imports dominate on 2 busy cores)
        assert first.poll() is None and json.loads((out / ".fastdpo.lock").read_text()) == lock  # first unaffected
        assert (out / "checkpoint-2" / MARKER).is_file()
    finally:
        first.send_signal(signal.SIGKILL)  # the crash: nothing of ours runs, the lock file stays behind
        first.wait()
    assert (out / ".fastdpo.lock").is_file()

    third = run([PYTHON, *cmd])
    assert f"output_dir {out}: taking over the lock of a run that is gone (host" in third.stdout
    assert f"its process (pid {first.pid}) is gone from this host" in third.stdout
    assert f"resuming from {out}/checkpoint-2" in third.stdout and "step 6/6" in third.stdout
    assert not (out / ".fastdpo.lock").exists()  # released at exit


def test_lock_holders_judged_gone_or_alive(tmp_path, monkeypatch):
    """Who may take a lock over: the real rules on this host's real processes (no Slurm: another host's lock is
    judged by its heartbeat alone)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        me = runlock._record("x")
        assert runlock._stale({**me, "pid": alive.pid, "start": runlock._start_time(alive.pid)}, 0) is None
        assert "is gone from this host" in runlock._stale({**me, "pid": dead.pid}, 0)
        # pid reused by another process: a start time that does not match is a different process
        assert "is gone from this host" in runlock._stale({**me, "pid": alive.pid, "start": "1"}, 0)
        assert "rebooted" in runlock._stale({**me, "boot": "another-boot"}, 0)
        other = {**me, "host": "elsewhere", "slurm_job_id": None}
        assert runlock._stale(other, 60) is None and "no heartbeat for 700 s" in runlock._stale(other, 700)
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        requeued = {**other, "slurm_job_id": "77", "slurm_restart": "0"}
        assert "an earlier attempt of this Slurm job 77" in runlock._stale(requeued, 5)
    finally:
        alive.kill()
        alive.wait()

    lock = runlock.RunLock(tmp_path)
    lock.acquire()
    held = json.loads((tmp_path / runlock.NAME).read_text())
    assert held["pid"] == os.getpid() and held["start"] == runlock._start_time(os.getpid())
    with pytest.raises(runlock.Locked, match=f"is in use by another run .*pid {os.getpid()}"):
        runlock.RunLock(tmp_path).acquire()  # this process is alive: a second holder is refused
    lock.release()
    assert not (tmp_path / runlock.NAME).exists()
