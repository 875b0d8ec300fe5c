"""Building one token-cache entry: a source streamed in batches through forked workers, each batch converted and
checked (fastdpo.checks) and tokenised (fastdpo.tokens), written as Arrow streams with the entry's meta.json last.
The format of an entry is defined here; fastdpo.tokcache finds, checks and reads entries and decides when to build.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import resource
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from . import checks, files, layouts, sources, splits, tokens, watchdog
from .dataspec import SourceSpec

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: layouts (detected per source), notes, pairs per row
PROGRESS_SECONDS = 30.0  # one plain progress line this often during long builds (tail -f)
POOL_MIN_CPUS = 4  # fewer CPUs: one process with the tokenizer's threads beats a pool (see default_workers)
STATUS = {"ok": 0, "truncated": 1, "dropped": 2}

IDS = pa.list_(pa.int32())
TOKENS_SCHEMA = pa.schema([("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)])
ROWS_SCHEMA = pa.schema([("where", pa.string()), ("prompt_len", pa.int32()), ("chosen_len", pa.int32()),
                         ("rejected_len", pa.int32()), ("status", pa.int8()), ("hash", pa.binary(16))])


@dataclass
class Job:
    """What tokenising a batch needs; workers inherit it through fork (the tokenizer is never pickled)."""

    tokenizer: object
    templated: bool
    max_length: int | None
    max_prompt_length: int | None
    settings: dict  # what the ids depend on besides the source: tokenizer, lengths, library versions, code
    encode: object = None
    layout: layouts.Layout | None = None  # detected from the source's first row before the workers start


_JOB: Job | None = None


def _work(batch: sources.RawBatch):
    """One batch: read, convert through the layout, check, tokenise, truncate. Returns (token ids, rows, errors,
    what the checks found, kinds)."""
    job = _JOB
    bad: list = []
    got = checks.convert_rows(batch.items, batch.where, job.layout, job.templated, bad)
    pairs, where = got.pairs, got.where
    got.pairs, got.where = [], []  # the pairs go back as token ids, not as text
    conv = sum(isinstance(r["chosen"], list) for r in pairs)
    kinds = {"messages": conv, "text": len(pairs) - conv}
    if not pairs:
        return None, None, bad, got, kinds
    full, cut, status = tokens.tokenize_truncated(tokens.columns(pairs), job.tokenizer, job.encode, job.max_length,
                                                  job.max_prompt_length, where, job.layout.columns.get("tools"))
    keep = [i for i, s in enumerate(status) if s != "dropped"]
    ids = pa.record_batch([pa.array([cut[k][i] for i in keep], IDS) for k in TOKENS_SCHEMA.names],
                          schema=TOKENS_SCHEMA)
    rows = pa.record_batch([
        pa.array(where, pa.string()),
        pa.array([len(x) for x in full["prompt_ids"]], pa.int32()),
        pa.array([len(x) for x in full["chosen_ids"]], pa.int32()),
        pa.array([len(x) for x in full["rejected_ids"]], pa.int32()),
        pa.array([STATUS[s] for s in status], pa.int8()),
        pa.array([splits.pair_hash(r) for r in pairs], pa.binary(16)),
    ], schema=ROWS_SCHEMA)
    return ids, rows, bad, got, kinds


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle


def default_workers(num_proc: int | None) -> int:
    """Tokenising processes. Below POOL_MIN_CPUS, one: this process, whose fast tokenizer encodes each batch on
    every core with its own threads (measured on 2 cores: 10% faster and 20% less CPU than 2 forked workers, for
    any dataset_num_proc). From POOL_MIN_CPUS up, a pool of single-threaded workers, one per CPU this process may
    use, or dataset_num_proc if smaller: it also spreads the ~15% of the work done in Python (templates, JSON,
    checks), which one process would leave serial."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpus < POOL_MIN_CPUS:
        return 1
    return max(1, min(num_proc or cpus, cpus))


def _results(batches, workers: int):
    """`_work`'s results and `done` per batch, in source order; at most 2 batches per worker in flight."""
    if workers <= 1:
        for b in batches:
            yield (*_work(b), b.done)
        return
    ctx = mp.get_context("fork")  # the tokenizer and job reach the workers by inheritance, not pickling
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; also silences the fork warning
    try:
        pool = ctx.Pool(workers, initializer=_worker_init)
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    with pool:
        pending: deque = deque()
        for b in batches:
            pending.append((pool.apply_async(_work, (b,)), b.done))
            if len(pending) >= 2 * workers:
                res, done = pending.popleft()
                yield (*res.get(), done)
        while pending:
            res, done = pending.popleft()
            yield (*res.get(), done)


class Progress:
    """`tokenising <label>: 3,200 pairs (32%), 114 pairs/s, eta 0:01:00` every PROGRESS_SECONDS."""

    def __init__(self, label: str, every: float | None = None):
        self.label, self.every = label, PROGRESS_SECONDS if every is None else every
        self.t0 = self.last = time.perf_counter()

    def update(self, rows: int, done: float) -> None:
        watchdog.beat(f"tokenising {self.label}")  # a long build is progress, not a stall
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.t0
        eta = elapsed * (1 - done) / done if done > 0 else None
        logger.info("tokenising %s: %s pairs (%.0f%%), %.0f pairs/s, eta %s", self.label, f"{rows:,}", 100 * done,
                    rows / elapsed, _hms(eta))


def _hms(seconds) -> str:
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def build(source: sources.Source, src: SourceSpec, job: Job, workers: int, dest: Path, parts: dict) -> dict:
    """Stream the source through the workers into dest/{tokens,rows}.arrow; returns meta (written last)."""
    global _JOB
    start, cpu0 = time.perf_counter(), _cpu()
    job.layout, batches = layouts.detect_source(source.batches(src.limit), src.options)
    _JOB = job
    progress = Progress(source.label)
    found, skipped, kinds, n_rows, n_tokens = checks.Converted(), [], {"messages": 0, "text": 0}, 0, 0
    with pa.OSFile(str(dest / "tokens.arrow"), "wb") as tf, pa.OSFile(str(dest / "rows.arrow"), "wb") as rf, \
            pa.ipc.new_stream(tf, TOKENS_SCHEMA) as tokens_out, pa.ipc.new_stream(rf, ROWS_SCHEMA) as rows_out:
        for ids, rows, bad, got, batch_kinds, done in _results(batches, workers):
            skipped += [{"where": where, "problem": problem} for where, problem in bad]
            found.merge(got)
            for k in kinds:
                kinds[k] += batch_kinds[k]
            if rows is not None:
                tokens_out.write_batch(ids)
                rows_out.write_batch(rows)
                n_rows += rows.num_rows
                n_tokens += ids.num_rows
            progress.update(n_rows + len(skipped), done)
    for name, listed in (("skipped.jsonl", skipped), ("no_pair.jsonl", found.no_pair)):
        if listed:
            with open(dest / name, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in listed)
    seconds = time.perf_counter() - start
    layout = job.layout.report() if job.layout is not None else {"name": None}
    used = job.layout.used() if job.layout is not None else set()
    layout.update({"kinds": kinds, "unused_text_columns": sorted(found.unused_text - used)})
    meta = {"format": FORMAT, "parts": parts, "source": source.label, "rows": n_rows, "tokens": n_tokens,
            "skipped": len(skipped), "rows_with_pairs": found.rows_with_pairs,
            "items": found.rows_with_pairs + len(skipped) + len(found.no_pair), "layout": layout,
            "notes": found.notes.as_dict(), "empty_prompts": found.empty_prompts,
            "refusal": checks.check_prompts(job.layout, n_rows, found.empty_prompts, found.unused_text, source.label),
            "workers": workers, "seconds": round(seconds, 2), "cpu_seconds": round(_cpu() - cpu0, 2),
            "files": {name: (dest / name).stat().st_size for name in ("tokens.arrow", "rows.arrow")}}
    logger.info("tokenised %s: %s pairs in %.1f s (%.0f pairs/s, %d process%s, %s rows skipped)", source.label,
                f"{n_rows:,}", seconds, n_rows / max(seconds, 1e-9), workers, "es" if workers > 1 else "",
                len(skipped))
    files.atomic_write(dest / "meta.json", json.dumps(meta, indent=1))
    return meta


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
