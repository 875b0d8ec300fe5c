"""Tokenised pairs cached on disk: tokenise once per data and tokenizer, memory-map on every launch and rank.

    prep = tokcache.prepare(script_args, tokenizer, max_length, max_prompt_length, num_proc)
    prep.train, prep.eval    # memory-mapped datasets.Dataset: prompt_ids / chosen_ids / rejected_ids
    prep.report              # data_report.json: counts that add up to the rows read
    prep.listings            # skipped, dropped and duplicate rows with file:line, for output_dir

Layout under $FASTDPO_CACHE/tokens (default ~/.cache/fastdpo/tokens):
  <key>/               one source split, read, checked and tokenised. The key hashes everything the ids depend on:
                       the source's content (local files: a digest of their bytes; Hub: datasets' fingerprint of the
                       revision), split, max_train_samples, column_map, ranked/judged options, the tokenizer (its
                       tokenizer.json, special tokens, chat template), max_length, max_prompt_length, library
                       versions, the data path's code and FORMAT. Any change makes a new key, never a stale hit.
    tokens.arrow       prompt_ids / chosen_ids / rejected_ids (int32, truncated) of every pair that fits, in order
    rows.arrow         every row read: where, untruncated lengths, status (ok/truncated/dropped), pair hash
    skipped.jsonl      rows that could not be used (read with --skip_bad_rows)
    meta.json          counts, layout, file sizes; an entry is used only if all of it checks out
    take-<hash>.arrow  tokens.arrow's rows in a split's order (held-out eval, dedup, shuffle) when not all of them
  digests/             content digests of local data files, reused while size, mtime and inode are unchanged
An entry is built as <key>.tmp-<host>-<pid> and renamed when complete. One that fails its checks (truncated,
unreadable) is reported with its path, moved aside as <key>.bad-<time> and rebuilt. The split (held-out eval,
dedup, max_eval_samples, shuffle) is recomputed from rows.arrow on each launch: milliseconds.

Processes: the local main process of each node builds (with a file lock against other jobs); the other ranks
wait by polling the files, not in a collective, so a long first build cannot hit a distributed timeout. Every
rank then memory-maps the same files: memory per node does not grow with the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset

from . import data, errors, files, layouts, ranks, sources, watchdog
from .errors import FIX_SKIP, DataError, Notes

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: layouts (detected per source), notes, pairs per row
PROGRESS_SECONDS = 30.0  # one plain progress line this often during long builds (tail -f)
SMALL_SOURCE_BYTES = 1 << 20  # below this a pool's start-up costs more than it saves
POOL_MIN_CPUS = 4  # fewer CPUs: one process with the tokenizer's threads beats a pool (see default_workers)
STATUS = {"ok": 0, "truncated": 1, "dropped": 2}
LISTINGS = ("skipped_rows.jsonl", "dropped_rows.jsonl", "duplicate_rows.jsonl", "no_pair_rows.jsonl")  # output_dir

IDS = pa.list_(pa.int32())
TOKENS_SCHEMA = pa.schema([("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS)])
ROWS_SCHEMA = pa.schema([("where", pa.string()), ("prompt_len", pa.int32()), ("chosen_len", pa.int32()),
                         ("rejected_len", pa.int32()), ("status", pa.int8()), ("hash", pa.binary(16))])


# -------------------------------------------------------------------------------------------- fingerprints


def tokenizer_digest(tokenizer) -> str:
    """Everything about the tokenizer that decides the ids: its tokenizer.json (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens, post-processor), special tokens and chat template, and the library versions."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow (Python) tokenizer: hash the files it saves
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            for p in sorted(Path(tmp).iterdir()):
                h.update(p.name.encode() + p.read_bytes())
    for value in (type(tokenizer).__name__, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token,
                  tokenizer.bos_token_id, getattr(tokenizer, "split_special_tokens", None),
                  transformers.__version__, tokenizers.__version__):
        h.update(repr(value).encode())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------------ building


@dataclass
class _Job:
    """What tokenising a batch needs; workers inherit it through fork (the tokenizer is never pickled)."""

    tokenizer: object
    options: layouts.Options
    templated: bool
    max_length: int | None
    max_prompt_length: int | None
    encode: object = None
    layout: layouts.Layout | None = None  # detected from the source's first row before the workers start


_JOB: _Job | None = None


def _work(batch: sources.RawBatch):
    """One batch: read, convert through the layout, tokenise, truncate. Returns (tokens, rows, errors, stats)."""
    job = _JOB
    errors: list = []
    got = data.convert_rows(batch.items, batch.where, job.layout, job.templated, errors)
    rows = got.pairs
    conv = sum(isinstance(r["chosen"], list) for r in rows)
    stats = {"kinds": {"messages": conv, "text": len(rows) - conv}, "notes": got.notes, "unused_text": got.unused_text,
             "empty_prompts": got.empty_prompts, "rows_with_pairs": got.rows_with_pairs, "no_pair": got.no_pair}
    if not rows:
        return None, None, errors, stats
    ids = data.tokenize_pairs({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}, job.tokenizer,
                              job.encode)
    bos = job.tokenizer.bos_token_id
    keep, status = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}, []
    for p, c, r in zip(ids["prompt_ids"], ids["chosen_ids"], ids["rejected_ids"], strict=True):
        p2, c2, r2, s = data.truncate_pair(p, c, r, job.max_length, job.max_prompt_length, bos)
        status.append(STATUS[s])
        if s != "dropped":
            keep["prompt_ids"].append(p2)
            keep["chosen_ids"].append(c2)
            keep["rejected_ids"].append(r2)
    tokens = pa.record_batch([pa.array(keep[k], IDS) for k in TOKENS_SCHEMA.names], schema=TOKENS_SCHEMA)
    meta = pa.record_batch([
        pa.array(got.where, pa.string()),
        pa.array([len(x) for x in ids["prompt_ids"]], pa.int32()),
        pa.array([len(x) for x in ids["chosen_ids"]], pa.int32()),
        pa.array([len(x) for x in ids["rejected_ids"]], pa.int32()),
        pa.array(status, pa.int8()),
        pa.array([data.pair_hash(r) for r in rows], pa.binary(16)),
    ], schema=ROWS_SCHEMA)
    return tokens, meta, errors, stats


def _worker_init():
    import signal

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
    """(tokens, rows, errors, stats, done) per batch, in source order; at most 2 batches per worker in flight."""
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


def _build(source: sources.Source, limit: int | None, job: _Job, workers: int, dest: Path, parts: dict) -> dict:
    """Stream the source through the workers into dest/{tokens,rows}.arrow; returns meta (written last)."""
    global _JOB
    start, cpu0 = time.perf_counter(), _cpu()
    job.layout, batches = layouts.detect_source(source.batches(limit), job.options)
    _JOB = job
    progress = Progress(source.label)
    n_rows = n_tokens = with_pairs = empty_prompts = 0
    skipped, no_pair, kinds, notes, unused_text = [], [], {"messages": 0, "text": 0}, Notes(), set()
    with pa.OSFile(str(dest / "tokens.arrow"), "wb") as tf, pa.OSFile(str(dest / "rows.arrow"), "wb") as rf, \
            pa.ipc.new_stream(tf, TOKENS_SCHEMA) as tokens_out, pa.ipc.new_stream(rf, ROWS_SCHEMA) as rows_out:
        for tokens, rows, errors, stats, done in _results(batches, workers):
            for where, problem in errors:
                skipped.append({"where": where, "problem": problem})
            for k in kinds:
                kinds[k] += stats["kinds"][k]
            notes.merge(stats["notes"])
            unused_text |= stats["unused_text"]
            empty_prompts += stats["empty_prompts"]
            with_pairs += stats["rows_with_pairs"]
            no_pair += stats["no_pair"]
            if rows is not None:
                tokens_out.write_batch(tokens)
                rows_out.write_batch(rows)
                n_rows += rows.num_rows
                n_tokens += tokens.num_rows
            progress.update(n_rows + len(skipped), done)
    for name, listed in (("skipped.jsonl", skipped), ("no_pair.jsonl", no_pair)):
        if listed:
            with open(dest / name, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in listed)
    seconds = time.perf_counter() - start
    layout = job.layout.report() if job.layout is not None else {"name": None}
    used = job.layout.used() if job.layout is not None else set()
    layout.update({"kinds": kinds, "unused_text_columns": sorted(unused_text - used)})
    meta = {"format": FORMAT, "parts": parts, "source": source.label, "rows": n_rows, "tokens": n_tokens,
            "skipped": len(skipped), "rows_with_pairs": with_pairs,
            "items": with_pairs + len(skipped) + len(no_pair), "layout": layout, "notes": notes.as_dict(),
            "empty_prompts": empty_prompts,
            "refusal": data.check_prompts(job.layout, n_rows, empty_prompts, unused_text, source.label),
            "workers": workers, "seconds": round(seconds, 2), "cpu_seconds": round(_cpu() - cpu0, 2),
            "files": {name: (dest / name).stat().st_size for name in ("tokens.arrow", "rows.arrow")}}
    logger.info("tokenised %s: %s pairs in %.1f s (%.0f pairs/s, %d process%s, %s rows skipped)", source.label,
                f"{n_rows:,}", seconds, n_rows / max(seconds, 1e-9), workers, "es" if workers > 1 else "",
                len(skipped))
    files.atomic_write(dest / "meta.json", json.dumps(meta, indent=1))
    return meta


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


# ------------------------------------------------------------------------------------------------- entries


def _read_stream(path: Path) -> pa.Table:
    """The table of an Arrow stream file, memory-mapped (zero-copy): counting rows reads no data."""
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()  # buffers keep the map alive


def check_entry(path: Path) -> tuple[dict | None, str | None]:
    """(meta, None) for a complete, consistent entry; (None, problem) otherwise; (None, None) if absent."""
    if not path.exists():
        return None, None
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return None, f"format {meta.get('format')}, this code writes {FORMAT}"
        for name, size in meta["files"].items():
            actual = (path / name).stat().st_size
            if actual != size:
                return None, f"{name} is {actual} bytes, {size} were written (truncated or overwritten)"
        n_tokens, n_rows = _read_stream(path / "tokens.arrow").num_rows, _read_stream(path / "rows.arrow").num_rows
        if (n_tokens, n_rows) != (meta["tokens"], meta["rows"]):
            return None, (f"holds {n_tokens} token rows and {n_rows} rows, meta.json says "
                          f"{meta['tokens']}/{meta['rows']}")
    except FileNotFoundError as e:
        return None, f"{Path(e.filename).name if e.filename else 'a file'} is missing (an interrupted build?)"
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    return meta, None


def _move_aside(path: Path, problem: str) -> None:
    failed = files.move_aside(path)
    logger.warning("token cache %s: %s; %s", path, problem,
                   f"{failed}, building elsewhere" if failed else "moved aside and rebuilding")


@dataclass
class Entry:
    path: Path
    meta: dict
    built: bool = False  # built by this call (a cache miss)

    def tokens(self) -> Dataset:
        return Dataset.from_file(str(self.path / "tokens.arrow"))

    def rows(self) -> pa.Table:
        return _read_stream(self.path / "rows.arrow")

    def skipped(self) -> list[dict]:
        return self._listed("skipped.jsonl")

    def no_pair(self) -> list[dict]:
        """Rows that gave no pair (chosen = rejected, ties, unlabelled), each with why."""
        return self._listed("no_pair.jsonl")

    def notes(self) -> Notes:
        return Notes.from_dict(self.meta.get("notes"))

    def _listed(self, name: str) -> list[dict]:
        p = self.path / name
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


class Cache:
    """The cache folder, or a fallback under the temp folder when it cannot be written (a warning, not a failure)."""

    def __init__(self, root: str | Path | None = None):
        self.primary = Path(root).expanduser() if root else files.cache_root() / "tokens"
        self.fallback = Path(tempfile.gettempdir()) / f"fastdpo-{os.getuid()}" / "tokens"
        self.leader = ranks.writes("node")
        problem = files.probe_writable(self.primary)
        self.root = self.primary
        if problem is not None:
            again = files.probe_writable(self.fallback)
            if again is not None:
                raise DataError(f"token cache: neither {self.primary} ({problem}) nor {self.fallback} ({again}) can be "
                                "written; set FASTDPO_CACHE to a writable folder")
            if self.leader:
                logger.warning("token cache %s is not writable (%s): using %s for this run; set FASTDPO_CACHE to a "
                               "writable folder to keep tokenised data across runs", self.primary, problem,
                               self.fallback)
            self.root = self.fallback
        self.digests = self.root / "digests"

    def find(self, key: str) -> Entry | None:
        """A valid entry under the cache folder or the fallback; a bad one is reported and moved aside."""
        for root in dict.fromkeys([self.primary, self.root]):
            path = root / key
            meta, problem = check_entry(path)
            if meta is not None:
                return Entry(path, meta)
            if problem and self.leader:
                _move_aside(path, problem)
        return None

    def entry(self, source: sources.Source, limit: int | None, job: _Job, settings: dict, workers: int,
              build: bool = True) -> Entry | None:
        parts = {"format": FORMAT, "source": source.fingerprint(self.digests), "limit": limit, **settings}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
        found = self.find(key)
        if found is not None or not build:
            return found
        if not self.leader:
            return _wait(lambda: self.find(key), f"{source.label} ({self.root / key})")
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.root / f"{key}.lock"), timeout=watchdog.wait_timeout())
        try:
            held = lock.acquire()  # another job on this node (or a shared disk) may be at it
        except Timeout:
            raise watchdog.WaitTimeout(
                f"{ranks.describe()}: waited {watchdog.wait_timeout():.0f} s for {lock.lock_file} (another job "
                f"building the token cache of {source.label}); if that job is only slow, raise FASTDPO_WAIT_TIMEOUT"
            ) from None
        with held, watchdog.phase(f"tokenising {source.label}", bound=watchdog.wait_timeout()):
            found = self.find(key)
            if found is not None:
                return found
            for stale in self.root.glob(f"{key}.tmp-*"):  # a killed build's leftovers (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
            tmp.mkdir(parents=True)
            try:
                small = isinstance(source, sources.FilesSource) and sum(
                    p.stat().st_size for p in source.files) < SMALL_SOURCE_BYTES
                meta = _build(source, limit, job, 1 if small or isinstance(source, sources.RowsSource) else workers,
                              tmp, parts)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            try:
                os.replace(tmp, self.root / key)
            except OSError:  # built meanwhile by another node sharing this disk whose lock we did not see
                shutil.rmtree(tmp, ignore_errors=True)
                theirs = self.find(key)
                if theirs is None:
                    raise
                return theirs
        return Entry(self.root / key, meta, built=True)

    def take(self, entry: Entry, rows: np.ndarray) -> Dataset:
        """entry's token rows `rows`, in that order, as one memory-mapped file (tokens.arrow itself if all)."""
        import xxhash

        if len(rows) == entry.meta["tokens"] and np.array_equal(rows, np.arange(len(rows))):
            return entry.tokens()
        name = f"take-{xxhash.xxh3_64_hexdigest(rows.astype(np.int64).tobytes())}.arrow"
        paths = list(dict.fromkeys([entry.path / name, self.root / f"{entry.path.name}-{name}"]))

        def valid():
            for p in paths:
                try:
                    if _read_stream(p).num_rows == len(rows):
                        return p
                except (OSError, pa.ArrowException):
                    continue
            return None

        found = valid()
        if found is None and not self.leader:
            found = _wait(valid, f"{entry.path.name}/{name}")
        if found is None:
            target = paths[0] if files.probe_writable(entry.path) is None else paths[-1]
            table = _read_stream(entry.path / "tokens.arrow")

            def write(tmp):
                with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, TOKENS_SCHEMA) as out:
                    for i in range(0, len(rows), 256):  # bounded memory: 256 pairs at a time
                        out.write_table(table.take(pa.array(rows[i: i + 256])))

            files.write_atomic(target, write)
            found = target
        return Dataset.from_file(str(found))


def _wait(check, what: str, poll: float = 1.0):
    """Poll until the local main process has written what this rank needs (no collective), up to a deadline."""
    return watchdog.wait_for(check, f"the token cache {what}", ranks.writer_name("node"), poll=poll)


# ----------------------------------------------------------------------------------------------- preparing


@dataclass
class Prepared:
    train: Dataset
    eval: Dataset | None
    report: dict
    listings: dict = field(default_factory=dict)  # file name in output_dir -> rows {"where", "problem"}


def settings_for(tokenizer, options: layouts.Options, max_length, max_prompt_length) -> dict:
    import trl

    return {**options.key(), "tokenizer": tokenizer_digest(tokenizer), "max_length": max_length,
            "max_prompt_length": max_prompt_length, "trl": trl.__version__, "code": code_digest()}


def code_digest() -> str:
    """The data path's own code (reading, layouts, tokenising): an upgrade of it rebuilds entries rather than
    reusing ones an older rule made, without relying on someone remembering to bump FORMAT."""
    h = hashlib.sha256()
    for module in (errors, files, sources, layouts, data):
        path = Path(module.__file__)
        for part in sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]:  # a package: all
            h.update(part.read_bytes())
    return h.hexdigest()[:16]


def _job(args, tokenizer, max_length, max_prompt_length) -> _Job:
    return _Job(tokenizer, layouts.Options.of(args), bool(tokenizer.chat_template), max_length, max_prompt_length,
                data._encoder(tokenizer))


def train_entry(args, tokenizer, max_length, max_prompt_length, num_proc=None, cache_dir=None,
                build: bool = True) -> Entry | None:
    """The cache entry of the train split as training would build it (the analyzer reads and fills it)."""
    cache = Cache(cache_dir)
    job = _job(args, tokenizer, max_length, max_prompt_length)
    source = sources.open_source(args.dataset_name, args.dataset_config, args.dataset_train_split)
    return cache.entry(source, args.max_train_samples, job, settings_for(tokenizer, job.options, max_length,
                                                                          max_prompt_length),
                       default_workers(num_proc), build)


def describe_layout(meta: dict) -> str:
    """A cache entry's layout as the log line shows it (meta.json's "layout")."""
    if not meta.get("name"):
        return "none (no readable row)"
    cols = ", ".join(f"{k} <- {v}" for k, v in meta["columns"].items())
    unused = f"; not read: {', '.join(meta['unused_columns'])}" if meta.get("unused_columns") else ""
    keys = (f"; message keys not read: {', '.join(meta['unused_message_keys'])}"
            if meta.get("unused_message_keys") else "")
    return f"{meta['name']}{' (column_map)' if meta.get('from_column_map') else ''}: {cols}{unused}{keys}"


class _Where:
    """rows.arrow's where column, read one value at a time (only for the rows a message names)."""

    def __init__(self, column: pa.ChunkedArray):
        self.column = column

    def __getitem__(self, i: int) -> str:
        return self.column[i].as_py()


def prepare(args, tokenizer, max_length: int | None, max_prompt_length: int | None, num_proc: int | None = None,
            cache_dir: str | Path | None = None) -> Prepared:
    """Train and eval datasets exactly as training uses them, from the cache or built now (see module doc)."""
    start = time.perf_counter()
    templated = bool(tokenizer.chat_template)
    logger.info("data: %s", data.layout_note(templated))
    cache = Cache(cache_dir)
    job = _job(args, tokenizer, max_length, max_prompt_length)
    settings = settings_for(tokenizer, job.options, max_length, max_prompt_length)
    workers = default_workers(num_proc)
    train_source = sources.open_source(args.dataset_name, args.dataset_config, args.dataset_train_split)
    spec = data.eval_spec(args, train_source)
    logger.info("data: %s", spec.note)
    train = cache.entry(train_source, args.max_train_samples, job, settings, workers)
    evalent = None
    if spec.source is not None:
        evalent = cache.entry(sources.open_source(spec.source, args.dataset_config, spec.split), None, job, settings,
                              workers)
    entries = [train] + ([evalent] if evalent else [])
    skipped = [r for e in entries for r in e.skipped()]
    if skipped and not args.skip_bad_rows:  # an entry built with --skip_bad_rows holds them: fail as a fresh read
        raise DataError(f"{skipped[0]['where']}: {skipped[0]['problem']}; {FIX_SKIP}")
    for e in entries:
        if e.meta.get("refusal"):
            raise DataError(e.meta["refusal"])
    if not train.meta["rows"]:
        raise DataError(f"{train_source.label}: no usable rows")
    for e in entries:
        logger.info("data: %s: layout %s%s", e.meta["source"], describe_layout(e.meta["layout"]),
                    "" if not e.meta["layout"].get("unused_text_columns") else
                    f" (unread columns holding text: {', '.join(e.meta['layout']['unused_text_columns'])})")

    t_rows = train.rows()
    e_rows = evalent.rows() if evalent else None
    where_of = {"train": _Where(t_rows.column("where")),
                "eval": _Where(e_rows.column("where")) if e_rows is not None else None}
    plan = data.plan_splits(args, spec, t_rows.column("hash").to_pylist(),
                            e_rows.column("hash").to_pylist() if e_rows is not None else None,
                            where_of["train"], where_of["eval"])
    data.check_eval_left(plan, spec)
    listings: dict[str, list] = {name: [] for name in LISTINGS}
    listings["skipped_rows.jsonl"] = skipped
    listings["no_pair_rows.jsonl"] = [r for e in entries for r in e.no_pair()]
    notes = Notes()
    for e in entries:
        notes.merge(e.notes())
    for kind, i, problem in plan.removed:
        listings["duplicate_rows.jsonl"].append({"where": where_of[kind][i], "problem": problem})

    def split(table: pa.Table, indices: list[int], name: str):
        status = table.column("status").to_numpy()
        token_row = np.cumsum(status != STATUS["dropped"]) - 1  # tokens.arrow holds the rows that fit, in order
        idx = np.asarray(indices, dtype=np.int64)
        st = status[idx] if len(idx) else np.zeros(0, np.int8)
        dropped = idx[st == STATUS["dropped"]]
        prompt = table.column("prompt_len").to_numpy()
        for i in dropped.tolist():
            listings["dropped_rows.jsonl"].append({"where": table.column("where")[i].as_py(), "problem": (
                f"{name}: the prompt is {prompt[i]} tokens (max_prompt_length {max_prompt_length}), no room for an "
                f"answer in max_length {max_length}; set max_prompt_length below max_length to keep it")})
        counts = {"pairs": int(len(idx)), "truncated": int((st == STATUS["truncated"]).sum()),
                  "dropped": int(len(dropped))}
        if counts["dropped"]:
            logger.warning("%s: dropped %d of %d pairs whose prompt alone does not fit max_length=%s; set "
                           "max_prompt_length below max_length to keep them (listed in dropped_rows.jsonl)", name,
                           counts["dropped"], counts["pairs"], max_length)
        return token_row[idx[st != STATUS["dropped"]]], counts

    report = {}
    train_rows, report["train"] = split(t_rows, plan.train, "train")
    if not len(train_rows):
        raise DataError(f"train: every pair was dropped: no prompt fits max_length={max_length}")
    if args.dataset_shuffle_seed is not None:  # the permutation datasets' Dataset.shuffle(seed) draws
        train_rows = train_rows[np.random.default_rng(args.dataset_shuffle_seed).permutation(len(train_rows))]
    train_ds = cache.take(train, train_rows)
    eval_ds = None
    if plan.eval is not None:
        e_table, e_entry = (t_rows, train) if plan.eval_from_train else (e_rows, evalent)
        eval_rows, report["eval"] = split(e_table, plan.eval, "eval")
        if not len(eval_rows):
            raise DataError(f"eval: every pair was dropped: no prompt fits max_length={max_length}")
        eval_ds = cache.take(e_entry, eval_rows)

    read = sum(e.meta["items"] for e in entries)
    with_pairs = sum(e.meta["rows_with_pairs"] for e in entries)
    pairs = sum(e.meta["rows"] for e in entries)
    no_pair = len(listings["no_pair_rows.jsonl"])
    dropped = report["train"]["dropped"] + report.get("eval", {}).get("dropped", 0)
    accounting = {"rows_read": read, "pairs": pairs, "trained": len(train_ds),
                  "eval": len(eval_ds) if eval_ds is not None else 0, "skipped": len(skipped), "no_pair": no_pair,
                  "dropped": dropped, "duplicates_removed": len(plan.removed), "eval_unused": len(plan.unused)}
    made = sum(accounting[k] for k in ("trained", "eval", "dropped", "duplicates_removed", "eval_unused"))
    if read != with_pairs + len(skipped) + no_pair or made != pairs:
        # a bug, never the data's fault: say so rather than report numbers that do not add up
        raise RuntimeError(f"data accounting does not add up: {accounting}, {with_pairs} rows with pairs")
    report.update({
        "skipped_rows": len(skipped),
        "duplicates": {**plan.repeats, "removed": len(plan.removed), "dedup": getattr(args, "dedup", "eval")},
        "eval_unused_max_eval_samples": len(plan.unused),
        "accounting": accounting,
        "layout": train.meta["layout"],
        "eval_layout": evalent.meta["layout"] if evalent else None,
        "notes": notes.as_dict(),
        "cache": {"train": str(train.path), "eval": str(evalent.path) if evalent else None,
                  "built": train.built or bool(evalent and evalent.built),
                  "seconds": round(time.perf_counter() - start, 2)},
    })
    tail = (f"{dropped:,} dropped (too long) + {len(plan.removed):,} duplicates removed"
            + (f" + {len(plan.unused):,} eval pairs over max_eval_samples" if plan.unused else ""))
    trained = f"{accounting['trained']:,} trained + {accounting['eval']:,} eval"
    if pairs == with_pairs:  # one pair a row
        line = f"{read:,} rows read = {trained} + {len(skipped):,} skipped + {no_pair:,} without a pair + {tail}"
    else:  # ranked rows: several pairs a row
        line = (f"{read:,} rows read = {with_pairs:,} with pairs + {len(skipped):,} skipped + {no_pair:,} without a "
                f"pair; their {pairs:,} pairs = {trained} + {tail}")
    logger.info("data: %s (%s in %.1f s, %s)", line, "tokenised" if report["cache"]["built"] else "from cache",
                report["cache"]["seconds"], train.path)
    if notes.counts:
        logger.info("data: rows changed or left out by rule: %s", notes.line())
    report["accounting_line"] = line
    return Prepared(train_ds, eval_ds, report, {k: v for k, v in listings.items() if v})
