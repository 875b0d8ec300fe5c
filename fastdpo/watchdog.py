"""A stall becomes a failure, with evidence: a thread in every rank that ends the process when nothing progresses.

A hung collective, a stuck filesystem or a GPU in a bad state leaves every rank of a job waiting, silently, until
the process group's timeout (NCCL 10 min, gloo 30 min), holding every GPU and printing nothing. The watchdog
measures time since the last progress:

- in training, progress is an optimizer step; the bound is max(FASTDPO_STALL_TIMEOUT, 5 x the slowest of the last
  100 steps), so it adapts to the run and a slow model never trips it;
- before the first step ends (loading, tokenising, the probe, the reference pass, the first step itself), around an
  evaluation or a checkpoint save, and after training (final save, final evaluation), the bound is
  FASTDPO_STALL_GRACE; the reference pass (one beat per chunk), evaluation (per prediction step) and waits for
  another process (`wait_for`, its own deadline) report progress.

When the bound passes, the rank logs why, every Python thread's stack (faulthandler), which rank is the likely
cause (each rank publishes a heartbeat with its step and where its main thread is to the process group's store:
a rank whose heartbeat stopped is stopped or dead; a rank whose main thread is not inside a collective is stuck in
its own code), tells the other ranks through the store (they dump their stacks and stop too), leaves a failure note
(fastdpo.ranks.note_failure), runs what was registered with `before_exit` (the output_dir lock's release) and exits
70, which scripts/_launch.sh retries from the last complete checkpoint. The process group's timeout is set to
FASTDPO_STALL_GRACE, so a collective never waits longer than the watchdog.

    watchdog.start()                        # after torch.distributed is initialised (train_dpo.py does it)
    trainer.add_callback(watchdog.Callback())
    watchdog.beat("reference chunk 3/40")   # anywhere that makes progress
    with watchdog.phase("tokenising x", bound=3600): ...   # a long stretch without beats
    path = watchdog.wait_for(find, "the token cache entry for data/x.jsonl", "the local main process")

`wait_for` polls `find()` until it returns something, logs who it waits for every 30 s, and raises `WaitTimeout`
naming what it waited for and for whom after FASTDPO_WAIT_TIMEOUT seconds (default 4 hours: longer than any cache
build this repo does on its recipes), instead of hanging forever when the writer died.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
from transformers import TrainerCallback

from . import frameworks, ranks

logger = logging.getLogger("fastdpo")

FLOOR = 600.0  # FASTDPO_STALL_TIMEOUT: the least a training step may take before it counts as a stall
GRACE = 1800.0  # FASTDPO_STALL_GRACE: outside steady training; transformers' ddp_timeout default
FACTOR = 5.0
WINDOW = 100
KEY = "fastdpo/watchdog"
# Where a main thread waiting on other ranks sits: a collective, DeepSpeed's comm layer, or autograd (whose
# hooks run DDP's and ZeRO's gradient reductions).
WAITING = ("torch/distributed/", "torch/nn/parallel/distributed.py", "deepspeed/comm/", "torch/autograd/",
           "torch/_tensor.py")
WAIT_TIMEOUT = 4 * 3600.0  # FASTDPO_WAIT_TIMEOUT: how long `wait_for` waits for another process
WAIT_LOG_SECONDS = 30.0

_before_exit: list[Callable[[], None]] = []  # run when the watchdog ends the process (os._exit skips atexit)


def before_exit(fn: Callable[[], None]) -> None:
    """Run `fn` before the watchdog ends the process (once per function, in the order registered)."""
    if fn not in _before_exit:
        _before_exit.append(fn)


def _env(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise SystemExit(f"{name}={value!r}: give seconds, e.g. {name}={int(default)}") from None
    if seconds <= 0:
        raise SystemExit(f"{name}={value!r}: must be above 0 seconds")
    return seconds


class Watchdog:
    def __init__(self, floor: float, grace: float):
        self.floor, self.grace = floor, grace
        self.steps = collections.deque(maxlen=WINDOW)
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.what = "starting up"
        self.step = 0
        self.steady = False  # between optimizer steps of a running training loop
        self.phases: list[tuple[str, float | None]] = []
        self.stopped = threading.Event()
        self.fired = False
        self.store = frameworks.default_store()
        self.tick = min(max(floor / 5, 0.5), 5.0)
        self.thread = threading.Thread(target=self._run, name="fastdpo-watchdog", daemon=True)

    # ------------------------------------------------------------------------- what the main thread reports

    def beat(self, what: str | None = None) -> None:
        with self.lock:
            self.last = time.monotonic()
            if what:
                self.what = what

    def bound(self) -> tuple[float, str]:
        with self.lock:
            if self.phases:
                what, bound = self.phases[-1]
                return (float("inf") if bound is None else bound), f"while {what}"
            if self.steady:
                slowest = max(self.steps, default=0.0)
                bound = max(self.floor, FACTOR * slowest)
                return bound, (f"max(FASTDPO_STALL_TIMEOUT {self.floor:g} s, {FACTOR:g} x the slowest of the last "
                               f"{len(self.steps)} steps {slowest:.2f} s)")
            return self.grace, f"FASTDPO_STALL_GRACE {self.grace:g} s, {self.what}"

    # ---------------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while not self.stopped.wait(self.tick):
            self._publish()
            other = self._peer_stall()
            if other is not None:
                self._fire(f"{other['who']} reported a stall ({other['why']})", told=True)
            bound, why = self.bound()
            idle = time.monotonic() - self.last
            if idle > bound:
                self._fire(f"no progress for {idle:.0f} s (bound {bound:.0f} s: {why}); last progress: {self.what}")

    def _where(self) -> tuple[str, bool]:
        """The main thread's innermost frame, and whether it is waiting on other ranks."""
        frame = sys._current_frames().get(threading.main_thread().ident)
        top, waiting = "?", False
        depth = 0
        while frame is not None and depth < 200:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            if top == "?":
                top = f"{os.path.basename(path)}:{frame.f_lineno} in {frame.f_code.co_name}"
            if any(w in path for w in WAITING):
                waiting = True
            frame, depth = frame.f_back, depth + 1
        return top, waiting

    def _publish(self) -> None:
        if self.store is None:
            return
        where, waiting = self._where()
        record = {"who": ranks.describe(), "rank": ranks.rank(), "step": self.step, "what": self.what,
                  "time": time.time(), "where": where, "waiting": waiting}
        try:
            self.store.set(f"{KEY}/hb/{ranks.rank()}", json.dumps(record))
        except Exception:  # the store's host is gone: nothing to publish to, the bound still holds
            pass

    def _peer_stall(self) -> dict | None:
        if self.store is None:
            return None
        try:
            if self.store.check([f"{KEY}/stall"]):
                return json.loads(self.store.get(f"{KEY}/stall"))
        except Exception:
            return None
        return None

    def _peers(self) -> list[dict]:
        out = []
        for r in range(ranks.world_size()):
            try:
                if self.store.check([f"{KEY}/hb/{r}"]):
                    out.append(json.loads(self.store.get(f"{KEY}/hb/{r}")))
                else:
                    out.append({"who": f"rank {r}", "rank": r, "time": None})
            except Exception:
                break
        return out

    def _culprits(self) -> str:
        """Which rank is the likely cause, from every rank's heartbeat."""
        peers = self._peers()
        if not peers:
            return "no other rank's heartbeat could be read"
        now = time.time()

        def age(p):
            return "ever" if p.get("time") is None else f"{now - p['time']:.0f} s"

        # A live rank publishes every tick; one that has not for two ticks is stopped, dead or cut off.
        silent = [p for p in peers if p.get("time") is None or now - p["time"] > 2 * self.tick + 1]
        if silent:
            return "; ".join(f"{p['who']}: no heartbeat for {age(p)}, last at step {p.get('step', '?')} in "
                             f"{p.get('where', '?')} (stopped, dead, or its node is gone)" for p in silent)
        behind = min(p["step"] for p in peers)
        if behind < max(p["step"] for p in peers):
            late = [p for p in peers if p["step"] == behind]
            return "; ".join(f"{p['who']}: behind at step {p['step']}, in {p['where']}" for p in late)
        own = [p for p in peers if not p.get("waiting")]
        if own:
            return "; ".join(f"{p['who']}: not in a collective, stuck in {p['where']} ({p['what']})" for p in own)
        return "every rank is waiting in a collective (a hung collective or network: see the stacks)"

    def _fire(self, reason: str, told: bool = False) -> None:
        if self.fired:
            return
        self.fired = True
        me = ranks.describe()
        logger.error("watchdog: %s: %s. Stacks of every thread of this rank follow; exiting %d so the job is "
                     "retried from the last complete checkpoint", me, reason, ranks.STALLED)
        sys.stdout.flush()
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stdout, all_threads=True)
        sys.stdout.flush()
        cause = reason
        if self.store is not None and not told:
            done = threading.Event()
            found = {}

            def ask():
                found["cause"] = self._culprits()
                try:
                    self.store.set(f"{KEY}/stall", json.dumps({"who": me, "why": reason}))
                except Exception:
                    pass
                done.set()

            threading.Thread(target=ask, daemon=True).start()
            if done.wait(15):  # the store's host may be the stuck one: never wait on it for long
                cause = found["cause"]
                logger.error("watchdog: %s: likely cause: %s", me, cause)
            else:
                logger.error("watchdog: %s: the process group's store did not answer in 15 s (its host, rank 0's "
                             "node, may be the stuck one)", me)
        ranks.note_failure(ranks.STALLED, f"{reason}; likely cause: {cause}" if not told else
                           f"stopped: {reason}", self.step)
        for fn in _before_exit:  # os._exit skips atexit: the next attempt should find output_dir free
            fn()
        sys.stdout.flush()
        os._exit(ranks.STALLED)


_dog: Watchdog | None = None


def start() -> Watchdog | None:
    """Start this rank's watchdog (once) and set the process group's timeout to FASTDPO_STALL_GRACE."""
    global _dog
    if _dog is not None:
        return _dog
    floor, grace = _env("FASTDPO_STALL_TIMEOUT", FLOOR), _env("FASTDPO_STALL_GRACE", GRACE)
    grace = max(grace, floor)
    _dog = Watchdog(floor, grace)
    if dist.is_available() and dist.is_initialized():
        try:  # a collective gives up no later than the watchdog (NCCL and gloo alike)
            frameworks.set_pg_timeout(timedelta(seconds=grace))
        except (AttributeError, RuntimeError, ValueError) as e:
            logger.warning("watchdog: could not set the process group timeout to %.0f s (%s)", grace, e)
    _dog.thread.start()
    ranks.note_started()
    if ranks.rank() == 0:
        # worded without "step " followed by a space: the progress lines are `step N/M | ...`, and a log that never
        # trained (a refused run, a bad row) is told apart from one that did by that word
        logger.info("watchdog: a rank with no optimizer update for max(%g s, %g x the slowest recent one), or no "
                    "progress for %g s outside training, dumps its stacks and exits %d (retried); "
                    "FASTDPO_STALL_TIMEOUT / FASTDPO_STALL_GRACE set them", floor, FACTOR, grace, ranks.STALLED)
    return _dog


def stop() -> None:
    global _dog
    if _dog is not None:
        _dog.stopped.set()
        _dog = None


def beat(what: str | None = None) -> None:
    if _dog is not None:
        _dog.beat(what)


@contextlib.contextmanager
def phase(what: str, bound: float | None = None):
    """A stretch that reports no progress, with its own bound (None: no bound; the caller has its own deadline)."""
    dog = _dog
    if dog is None:
        yield
        return
    with dog.lock:
        dog.phases.append((what, bound))
    dog.beat()
    try:
        yield
    finally:
        with dog.lock:
            dog.phases.remove((what, bound))
        dog.beat()


class Callback(TrainerCallback):
    """Feeds the watchdog from the training loop: steps are progress, and what happens between them (evaluation,
    saving) or before the first one ends gets the grace bound. Add it last: it reads the should_save /
    should_evaluate that the other callbacks set at a step's end."""

    def __init__(self):
        self.step_start = None

    def on_train_begin(self, args, state, control, **kwargs):
        if _dog is not None:
            _dog.steady = False
            _dog.step = state.global_step
            _dog.beat(f"the first step (step {state.global_step + 1}) of training")

    def on_step_begin(self, args, state, control, **kwargs):
        if _dog is None:
            return
        if self.step_start is not None:  # the step before ended with a save or an evaluation: it is over
            _dog.steady = True
        self.step_start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if _dog is None:
            return
        now = time.monotonic()
        if _dog.step > 0 and self.step_start is not None and _dog.steady:
            _dog.steps.append(now - self.step_start)  # the first step (warm-up, allocation) is not a measure
        _dog.step = state.global_step
        busy = control.should_evaluate or control.should_save
        _dog.steady = not busy
        _dog.beat(f"step {state.global_step} done" + (" (evaluating or saving next)" if busy else ""))

    def on_prediction_step(self, args, state, control, **kwargs):
        beat()

    def on_evaluate(self, args, state, control, **kwargs):
        beat(f"evaluation at step {state.global_step} done")

    def on_save(self, args, state, control, **kwargs):
        beat(f"checkpoint-{state.global_step} saved")

    def on_train_end(self, args, state, control, **kwargs):
        if _dog is not None:
            _dog.steady = False
            _dog.beat("training done: final save and evaluation")


def last_step() -> int | None:
    """The last optimizer step this rank finished (None without a watchdog)."""
    return _dog.step if _dog is not None else None


# ------------------------------------------------------------------------------ waiting for another process


class WaitTimeout(RuntimeError):
    """Another process did not produce what this one waits for within the deadline."""


def wait_timeout() -> float:
    return float(os.environ.get("FASTDPO_WAIT_TIMEOUT", WAIT_TIMEOUT))


def wait_for(check, what: str, who: str, timeout: float | None = None, poll: float = 1.0):
    """Poll `check()` until it returns something other than None; raise WaitTimeout after `timeout` seconds."""
    timeout = wait_timeout() if timeout is None else timeout
    start = last = time.monotonic()
    with phase(f"waiting for {who} to write {what}", bound=timeout + 60):
        while True:
            found = check()
            if found is not None:
                return found
            now = time.monotonic()
            if now - start >= timeout:
                raise WaitTimeout(
                    f"{ranks.describe()}: waited {now - start:.0f} s for {who} to write {what}; it did not. Look in "
                    f"the log for that process's error (it may have crashed or hung). If it is only slow, raise "
                    f"FASTDPO_WAIT_TIMEOUT (now {timeout:.0f} s)")
            if now - last >= WAIT_LOG_SECONDS:
                last = now
                logger.info("%s: waiting %.0f s (of %.0f) for %s to write %s", ranks.describe(), now - start,
                            timeout, who, what)
            time.sleep(poll)
