"""After a failed attempt: which rank on which node failed first, of what, and whether retrying can help.

scripts/_launch.sh runs this in the batch shell once srun has returned non-zero (not for preemption):

    python -m fastdpo.failures FAILURE_DIR LOG OFFSET
    -> prints one line of 4 fields: retry|stop, the first failure, why it is not retried, the checkpoint a retry
       resumes from

Evidence, in this order of trust:
- failure notes the ranks leave in FAILURE_DIR (fastdpo.ranks.note_failure: data/configuration errors, a taken
  output_dir, watchdog stalls, exceptions with their last line and step);
- torch elastic's own report in the job log (from OFFSET, this attempt): for every failed local rank its host,
  global rank, exit code and, for a signal, its name; the only witness of a rank killed by SIGKILL (the OOM
  killer, a failed GPU), which leaves no note.

A failure that would repeat is not retried: a data or configuration error, an output_dir another run holds, or an
exception before the first step that is not a signal. Everything else (a signal, a stall, a collective or CUDA
error during training, a lost node) is.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

from .ranks import REPEATS

SEP = "\x1f"
# torch elastic's ChildFailedError report: one block per failed local rank.
_REPORT = re.compile(r"time\s*:\s*(\d{4}-\d\d-\d\d_\d\d:\d\d:\d\d)\s*\n\s*host\s*:\s*(\S+)\s*\n\s*rank\s*:\s*(\d+) "
                     r"\(local_rank: (\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def _signame(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def reports(log_text: str) -> list[dict]:
    out = []
    for when, host, rank, local, code in _REPORT.findall(log_text):
        t = time.mktime(time.strptime(when, "%Y-%m-%d_%H:%M:%S"))
        out.append({"time": t, "host": host, "rank": int(rank), "local_rank": int(local), "code": int(code)})
    return out


def notes(folder: Path) -> list[dict]:
    out = []
    for path in sorted(Path(folder).glob("rank-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def started(folder: Path) -> dict[int, dict]:
    out = {}
    for path in Path(folder).glob("started/rank-*.json"):
        try:
            n = json.loads(path.read_text())
            out[n["rank"]] = n
        except (OSError, ValueError, KeyError):
            continue
    return out


def _who(n: dict) -> str:
    return f"rank {n['rank']} (local {n.get('local_rank', '?')}) on {n.get('host', '?')}"


def first_failure(found_notes: list[dict], found_reports: list[dict]) -> tuple[str, str | None]:
    """(`rank R (local L) on HOST <what>`, the deterministic reason or None)."""
    for n in found_notes:
        if n.get("kind") in REPEATS:
            return f"{_who(n)}: {n.get('message', '')}", REPEATS[n["kind"]]
    noted = {n["rank"] for n in found_notes}
    # (time to the second, priority, text): a signal first (its peers' collective errors follow from it), then a
    # stall the watchdog found itself, then an exception, then a bare exit code.
    events = []
    for r in found_reports:
        if r["code"] < 0:
            events.append((int(r["time"]), 0, f"{_who(r)} died of {_signame(r['code'])}", r))
        elif r["rank"] not in noted:
            events.append((int(r["time"]), 3, f"{_who(r)} exited {r['code']}", r))
    for n in found_notes:
        told = n.get("message", "").startswith("stopped:")
        prio = 1 if n.get("kind") == "stall" and not told else 2 if n.get("kind") != "stall" else 4
        step = f" at step {n['step']}" if n.get("step") else ""
        what = "stalled" if n.get("kind") == "stall" else "failed"
        events.append((int(n.get("time", 0)), prio, f"{_who(n)} {what}{step}: {n.get('message', '')}", n))
    if not events:
        return "no rank left a note and torch elastic reported none (the launcher or the node itself went away)", None
    events.sort(key=lambda e: (e[0], e[1]))
    signals = [e for e in events if e[1] == 0 and e[0] - events[0][0] <= 2]
    # torch elastic stamps a death when its agent notices it (to the second), a peer's collective error can be
    # noted a moment before: a signal within 2 s of the first event is the cause
    _, prio, text, ev = signals[0] if signals else events[0]
    if prio == 2 and not ev.get("step") and not any(e[1] == 0 for e in events):
        return text, "an error before the first step that is not a signal"
    return text, None


def resume_point(folder: Path) -> str | None:
    try:
        out = Path((Path(folder) / "output_dir").read_text().strip())
    except OSError:
        return None
    from .checkpoints import checkpoint_dirs, incomplete_reason  # heavy: torch and transformers, ~5 s

    complete = [p for p in checkpoint_dirs(out) if incomplete_reason(p) is None]
    return complete[-1].name if complete else None


def main(folder: str, log: str, offset: str) -> None:
    try:
        with open(log, "rb") as f:
            f.seek(int(offset or 0))
            text = f.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        text = ""
    found = reports(text)
    where = started(Path(folder))
    for r in found:  # the node's name as Slurm knows it, not whatever torch resolved
        r["host"] = where.get(r["rank"], r)["host"]
    what, reason = first_failure(notes(Path(folder)), found)
    resume = resume_point(Path(folder))
    # fields separated by US (0x1f): a tab would merge an empty field with the next in bash's `read`
    print(SEP.join(["stop" if reason else "retry", what.replace(SEP, " ").replace("\n", " "),
                     reason or "", resume or "step 0 (no complete checkpoint yet)"]))


if __name__ == "__main__":
    main(*sys.argv[1:4])
