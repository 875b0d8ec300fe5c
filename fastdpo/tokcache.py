"""Tokenised pairs cached on disk: tokenise once per data and tokenizer, memory-map on every launch and rank.

    prep = tokcache.prepare(spec, tokenizer, num_proc)   # spec: a fastdpo.dataspec.DataSpec
    prep.train, prep.eval    # memory-mapped datasets.Dataset: prompt_ids / chosen_ids / rejected_ids
    prep.report              # data_report.json: counts that add up to the rows read (fastdpo.report)
    prep.listings            # skipped, dropped and duplicate rows with file:line, for output_dir

The pipeline's stages, with the disk in the middle: each source is read, converted and checked (fastdpo.checks)
and tokenised (fastdpo.tokens) into its own entry, once (fastdpo.tokbuild writes it); the split (fastdpo.splits)
and the accounting (fastdpo.report) are recomputed from the entries' rows.arrow on each launch: milliseconds.

Layout under $FASTDPO_CACHE/tokens (default ~/.cache/fastdpo/tokens):
  <key>/               one source split, read, checked and tokenised. The key hashes everything the ids depend on:
                       the source's content (local files: a digest of their bytes; Hub: datasets' fingerprint of the
                       revision), split, max_train_samples, column_map, ranked/judged options, the tokenizer (its
                       tokenizer.json, special tokens, chat template), max_length, max_prompt_length, library
                       versions, the code of every pipeline stage and FORMAT. Any change makes a new key, never a
                       stale hit.
    tokens.arrow       prompt_ids / chosen_ids / rejected_ids (int32, truncated) of every pair that fits, in order
    rows.arrow         every row read: where, untruncated lengths, status (ok/truncated/dropped), pair hash
    skipped.jsonl      rows that could not be used (read with --skip_bad_rows)
    meta.json          counts, layout, file sizes; an entry is used only if all of it checks out
    take-<hash>.arrow  tokens.arrow's rows in a split's order (held-out eval, dedup, shuffle) when not all of them
  mix-<hash>.arrow     a mixture's train rows (fastdpo.mixture): its sources' token rows, copies included, in the
                       plan's order. The hash covers the sources' entry keys and the rows the plan draws from each,
                       so the same recipe reuses it, and a changed amount or seed writes another, from the same
                       source entries (tokenised once whatever the amounts).
  digests/             content digests of local data files, reused while size, mtime and inode are unchanged
An entry is built as <key>.tmp-<host>-<pid> and renamed when complete. One that fails its checks (truncated,
unreadable) is reported with its path, moved aside as <key>.bad-<time> and rebuilt.

Processes: the local main process of each node builds (with a file lock against other jobs); the other ranks
wait by polling the files, not in a collective, so a long first build cannot hit a distributed timeout. Every
rank then memory-maps the same files: memory per node does not grow with the number of ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import xxhash
from datasets import Dataset
from filelock import FileLock, Timeout

from . import (
    checks,
    dataspec,
    errors,
    files,
    layouts,
    mixture,
    ranks,
    report,
    sources,
    splits,
    tokbuild,
    tokcopy,
    tokens,
    watchdog,
)
from .dataspec import DataSpec, SourceSpec
from .errors import DataError, Notes, RowPolicy
from .tokbuild import FORMAT, STATUS, default_workers

logger = logging.getLogger(__name__)

SMALL_SOURCE_BYTES = 1 << 20  # below this a pool's start-up costs more than it saves


# -------------------------------------------------------------------------------------------- fingerprints


def tokenizer_digest(tokenizer) -> str:
    """Everything about the tokenizer that decides the ids: its tokenizer.json (vocabulary, merges, normalizer,
    pre-tokenizer, added tokens, post-processor), special tokens and chat template, and the library versions."""
    import tokenizers  # heavy (transformers loads torch): imported only when a key is computed
    import transformers  # heavy, as above

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


def code_files() -> list[Path]:
    """The source files of every stage of the data pipeline, this module included (a package: all its files)."""
    out = []
    # not fastdpo.mixture: an entry's ids do not depend on a plan; a mixed file is named by the rows it holds
    modules = (errors, files, sources, layouts, dataspec, checks, tokens, splits, tokbuild, tokcopy, report)
    for module in (*modules, sys.modules[__name__]):
        path = Path(module.__file__)
        out += sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    return out


def _job(spec: DataSpec, tokenizer) -> tokbuild.Job:
    import trl  # heavy (torch, transformers): only its version is read, for the key

    settings = {"tokenizer": tokenizer_digest(tokenizer), "max_length": spec.max_length,
                "max_prompt_length": spec.max_prompt_length, "trl": trl.__version__, "code": code_digest()}
    return tokbuild.Job(tokenizer, tokens.templated(tokenizer), spec.max_length, spec.max_prompt_length, settings,
                        tokens.encoder(tokenizer))


def code_digest() -> str:
    """The pipeline's code (`code_files`): an upgrade of any stage rebuilds entries rather than reusing ones an older
    rule made, without relying on someone remembering to bump FORMAT."""
    h = hashlib.sha256()
    for path in code_files():
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


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

    def entry(self, src: SourceSpec, job: tokbuild.Job, workers: int, build: bool = True,
              source: sources.Source | None = None) -> Entry | None:
        """The entry of one source (`source`: src already opened), found, waited for, or built by this process."""
        source = source or src.open()
        parts = {"format": FORMAT, "source": source.fingerprint(self.digests), "limit": src.limit,
                 **src.options.key(), **job.settings}
        key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
        found = self.find(key)
        if found is not None or not build:
            return found
        if not self.leader:
            return _wait(lambda: self.find(key), f"{source.label} ({self.root / key})")
        lock = FileLock(str(self.root / f"{key}.lock"), timeout=watchdog.wait_timeout())
        try:
            held = lock.acquire()  # another job on this node (or a shared disk) may be at it
        except Timeout:
            raise watchdog.WaitTimeout(
                f"{ranks.describe()}: waited {watchdog.wait_timeout():.0f} s for {lock.lock_file} (another job "
                f"building the token cache of {source.label}); if that job is only slow, raise FASTDPO_WAIT_TIMEOUT"
            ) from None
        with held, watchdog.phase(f"tokenising {source.label}", bound=watchdog.wait_timeout()):
            return self.find(key) or self._make(key, source, src, job, workers, parts)

    def _make(self, key: str, source: sources.Source, src: SourceSpec, job: tokbuild.Job, workers: int,
               parts: dict) -> Entry:
        """Build the entry under a temporary name and rename it in place (we hold the lock)."""
        for stale in self.root.glob(f"{key}.tmp-*"):  # a killed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.mkdir(parents=True)
        try:
            small = isinstance(source, sources.FilesSource) and sum(
                p.stat().st_size for p in source.files) < SMALL_SOURCE_BYTES
            meta = tokbuild.build(source, src, job, 1 if small or isinstance(source, sources.RowsSource) else workers,
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
            one = np.zeros(len(rows), np.int32)  # every row from this entry
            files.write_atomic(target, lambda tmp: tokcopy.copy_rows(tmp, [entry.path / "tokens.arrow"], one, rows))
            found = target
        return Dataset.from_file(str(found))

    def mix(self, entries: list[Entry], pieces: list[np.ndarray], order: np.ndarray | None) -> tuple[Dataset, bool]:
        """(the token rows `pieces[i]` of `entries[i]`, one after the other or in `order`, as one memory-mapped
        file; whether it was written now). Named by what it holds, so the same plan finds it again."""
        src = np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(pieces)])
        rows = np.concatenate(pieces).astype(np.int64)
        if order is not None:
            src, rows = src[order], rows[order]
        h = xxhash.xxh3_128()
        for e in entries:
            h.update(e.path.name.encode() + b"\0")
        h.update(src.tobytes())
        h.update(rows.tobytes())
        path = self.root / f"mix-{h.hexdigest()[:24]}.arrow"

        def valid():
            try:
                return path if _read_stream(path).num_rows == len(rows) else None
            except (OSError, pa.ArrowException):
                return None

        found = valid() or (None if self.leader else _wait(valid, path.name))
        if found is None:
            paths = [e.path / "tokens.arrow" for e in entries]
            files.write_atomic(path, lambda tmp: tokcopy.copy_rows(tmp, paths, src, rows))
        return Dataset.from_file(str(path)), found is None


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


def train_entry(spec, tokenizer, num_proc=None, cache_dir=None, build: bool = True) -> Entry | None:
    """The cache entry of the train split as training would build it (the analyzer reads and fills it)."""
    spec = DataSpec.of(spec)
    return Cache(cache_dir).entry(spec.train, _job(spec, tokenizer), default_workers(num_proc), build)


class _Where:
    """rows.arrow's where column, read one value at a time (only for the rows a message names)."""

    def __init__(self, table: pa.Table):
        self.column = table.column("where")

    def __getitem__(self, i: int) -> str:
        return self.column[i].as_py()


def prepare(spec, tokenizer, num_proc: int | None = None, cache_dir: str | Path | None = None) -> Prepared:
    """Train and eval datasets exactly as training uses them, from the cache or built now (see module doc).
    `spec`: a DataSpec (or script arguments, read by DataSpec.of)."""
    start = time.perf_counter()
    spec = DataSpec.of(spec)
    logger.info("data: %s", tokens.layout_note(tokens.templated(tokenizer)))
    cache, job, workers = Cache(cache_dir), _job(spec, tokenizer), default_workers(num_proc)
    if spec.mixture is not None:
        return _mixture(spec, cache, job, workers, start)
    train_source = spec.train.open()
    evals = splits.eval_spec(spec, train_source)
    logger.info("data: %s", evals.note)
    train = cache.entry(spec.train, job, workers, source=train_source)
    held = None
    if evals.source is not None:
        held = cache.entry(spec.eval_source(evals.source, evals.split), job, workers)
    entries = [train] + ([held] if held is not None else [])
    skipped = _checked(entries, spec.policy, train_source.label)
    t_rows, e_rows = train.rows(), held.rows() if held is not None else None
    where_of = {"train": _Where(t_rows), "eval": _Where(e_rows) if e_rows is not None else None}
    plan = splits.plan_splits(spec, evals, t_rows.column("hash").to_pylist(),
                              e_rows.column("hash").to_pylist() if e_rows is not None else None, where_of["train"],
                              where_of["eval"])
    splits.check_eval_left(plan, evals)
    listed = report.listings(skipped, [r for e in entries for r in e.no_pair()], plan, where_of)
    counts = {}
    train_rows, counts["train"] = _fitting(t_rows, plan.train, "train", spec, listed)
    if spec.shuffle_seed is not None:  # the permutation datasets' Dataset.shuffle(seed) draws
        train_rows = train_rows[splits.shuffle_order(len(train_rows), spec.shuffle_seed)]
    train_ds, eval_ds = cache.take(train, train_rows), None
    if plan.eval is not None:
        e_table, e_entry = (t_rows, train) if plan.eval_from_train else (e_rows, held)
        eval_rows, counts["eval"] = _fitting(e_table, plan.eval, "eval", spec, listed)
        eval_ds = cache.take(e_entry, eval_rows)
    return _reported(spec, entries, plan, counts, listed, train_ds, eval_ds, start)


def _checked(entries: list[Entry], policy: RowPolicy, label: str) -> list[dict]:
    """The entries' skipped rows, once the checks a fresh read makes have passed (an entry lists every bad row it
    met, whatever the policy it was built under); each source's layout logged."""
    skipped = [r for e in entries for r in e.skipped()]
    policy.settle(skipped)
    for e in entries:
        if e.meta.get("refusal"):
            raise DataError(e.meta["refusal"])
    if not entries[0].meta["rows"]:
        raise DataError(f"{label}: no usable rows")
    for e in entries:
        logger.info("data: %s", report.layout_line(e.meta))
    return skipped


def _fitting(table: pa.Table, indices: list[int], name: str, spec: DataSpec, listed: dict):
    """(tokens.arrow rows of a split's pairs that fit max_length, the split's counts); a pair whose prompt leaves no
    room for an answer is listed as dropped."""
    status = table.column("status").to_numpy()
    token_row = np.cumsum(status != STATUS["dropped"]) - 1  # tokens.arrow holds the rows that fit, in order
    idx = np.asarray(indices, dtype=np.int64)
    st = status[idx] if len(idx) else np.zeros(0, np.int8)
    dropped = idx[st == STATUS["dropped"]]
    prompt = table.column("prompt_len").to_numpy()
    for i in dropped.tolist():
        listed["dropped_rows.jsonl"].append({"where": table.column("where")[i].as_py(), "problem": (
            f"{name}: the prompt is {prompt[i]} tokens (max_prompt_length {spec.max_prompt_length}), no room for an "
            f"answer in max_length {spec.max_length}; set max_prompt_length below max_length to keep it")})
    counts = {"pairs": int(len(idx)), "truncated": int((st == STATUS["truncated"]).sum()),
              "dropped": int(len(dropped))}
    if counts["dropped"]:
        logger.warning("%s: dropped %d of %d pairs whose prompt alone does not fit max_length=%s; set "
                       "max_prompt_length below max_length to keep them (listed in dropped_rows.jsonl)", name,
                       counts["dropped"], counts["pairs"], spec.max_length)
    rows = token_row[idx[st != STATUS["dropped"]]]
    if not len(rows):
        raise DataError(f"{name}: every pair was dropped: no prompt fits max_length={spec.max_length}")
    return rows, counts


def _reported(spec: DataSpec, entries: list[Entry], plan: splits.SplitPlan, counts: dict, listed: dict,
              train_ds: Dataset, eval_ds: Dataset | None, start: float) -> Prepared:
    """The datasets with their accounting (checked to add up), data_report.json and listings; both logged."""
    metas = [e.meta for e in entries]
    acc = report.accounting(metas, counts, plan, listed, len(train_ds), len(eval_ds) if eval_ds is not None else 0)
    notes = Notes()
    for e in entries:
        notes.merge(e.notes())
    built = any(e.built for e in entries)
    cache = {"train": str(entries[0].path), "eval": str(entries[1].path) if len(entries) > 1 else None,
             "built": built, "seconds": round(time.perf_counter() - start, 2)}
    out = report.data_report(counts, acc, plan, spec.dedup, [m["layout"] for m in metas], notes, cache)
    line = report.accounting_line(acc, sum(m["rows_with_pairs"] for m in metas))
    logger.info("data: %s (%s in %.1f s, %s)", line, "tokenised" if built else "from cache", cache["seconds"],
                entries[0].path)
    if notes.counts:
        logger.info("data: rows changed or left out by rule: %s", notes.line())
    out["accounting_line"] = line
    return Prepared(train_ds, eval_ds, out, {k: v for k, v in listed.items() if v})


# ------------------------------------------------------------------------------------------------ mixtures


def _mixture_entries(spec: DataSpec, cache: Cache, job, workers: int):
    """(train sources, their entries, hold-out fraction per source, eval sets as (spec, entry)): each source's
    eval from its own rows, split or the recipe's eval_datasets, decided before any row is read."""
    sources_, entries, holdout, evals = spec.sources, [], [], []
    for src in sources_:
        opened = src.open()
        if not spec.eval_sets:
            one = splits.eval_spec(dataclasses.replace(spec, train=src, eval_name=None, mixture=None), opened)
            logger.info("data: %s: %s", src.display, one.note)
            holdout.append(one.fraction)
            if one.source is not None:
                evals.append(dataclasses.replace(src, split=one.split, amount=None))
        else:
            holdout.append(None)
        entries.append(cache.entry(src, job, workers, source=opened))
    evals += list(spec.eval_sets)
    return sources_, entries, holdout, [(e, cache.entry(e, job, workers)) for e in evals]


def _rows(src: SourceSpec, entry: Entry) -> tuple[mixture.Rows, pa.Table]:
    table = entry.rows()
    fits = table.column("status").to_numpy() != STATUS["dropped"]
    return mixture.Rows(src.display, table.column("hash").to_pylist(), fits, _Where(table), src.amount), table


def _mixture(spec: DataSpec, cache: Cache, job, workers: int, start: float) -> Prepared:
    """A mixture's train set (one file of its sources' rows, copies included) and its eval sets by name, with the
    accounting per source; see fastdpo.mixture for the plan."""
    srcs, entries, holdout, evals = _mixture_entries(spec, cache, job, workers)
    all_entries = entries + [e for _, e in evals]
    _checked(all_entries, spec.policy, srcs[0].label)
    for src, e in zip(srcs, entries, strict=True):
        if not e.meta["rows"]:
            raise DataError(f"{src.label} (source {src.display!r}): no usable rows")
    got = [_rows(s, e) for s, e in zip(srcs + tuple(s for s, _ in evals), all_entries, strict=True)]
    parts, warnings = mixture.plan_rows([r for r, _ in got[: len(srcs)]], [r for r, _ in got[len(srcs):]], holdout,
                                        spec.seed, spec.dedup, spec.max_eval_samples)
    for w in warnings:
        logger.warning("data: %s", w)
    specs = list(srcs) + [s for s, _ in evals]
    listed = {name: [] for name in report.LISTINGS}
    for part, entry, (_, table) in zip(parts, all_entries, got, strict=True):
        tag = {"source": part.name}
        listed["skipped_rows.jsonl"] += [{**r, **tag} for r in entry.skipped()]
        listed["no_pair_rows.jsonl"] += [{**r, **tag} for r in entry.no_pair()]
        listed["duplicate_rows.jsonl"] += [{"where": _Where(table)[j], "problem": p, **tag} for j, p in part.removed]
        prompt = table.column("prompt_len").to_numpy()
        listed["dropped_rows.jsonl"] += [{"where": _Where(table)[j], "problem": (
            f"{split}: the prompt is {prompt[j]} tokens (max_prompt_length {spec.max_prompt_length}), no room for an "
            f"answer in max_length {spec.max_length}; set max_prompt_length below max_length to keep it"), **tag}
            for j, split in part.dropped]
    token_row = [np.cumsum(t.column("status").to_numpy() != STATUS["dropped"]) - 1 for _, t in got]
    pieces = [token_row[i][p.train] for i, p in enumerate(parts[: len(srcs)])]
    order = (splits.shuffle_order(sum(map(len, pieces)), spec.shuffle_seed) if spec.shuffle_seed is not None
             else None)
    train_ds, mixed_now = cache.mix(entries, pieces, order)
    eval_ds = {p.name: cache.take(all_entries[i], token_row[i][p.eval]) for i, p in enumerate(parts)
               if p.eval is not None and len(p.eval)}
    return _mixture_reported(spec, parts, specs, all_entries, got, listed, train_ds, eval_ds or None, mixed_now,
                             start)


def _mixture_reported(spec, parts, specs, entries, got, listed, train_ds, eval_ds, mixed_now, start) -> Prepared:
    """The accounting per source and for the mixture (checked to add up), logged a line each; data_report.json."""
    parts_acc, evals_acc, notes, repeats = {}, {}, Notes(), {"train": 0, "eval": 0, "eval_in_train": 0}
    for part, src, entry in zip(parts, specs, entries, strict=True):
        acc = report.part_accounting(entry.meta, part.counts, len(entry.no_pair()), part.role,
                                     mixture.describe_amount(src.amount))
        acc["layout"], acc["entry"] = entry.meta["layout"], str(entry.path)
        (parts_acc if part.role == "train" else evals_acc)[part.name] = acc
        notes.merge(entry.notes())
        for k in repeats:
            repeats[k] += part.counts["repeats"][k]
        line = report.mixture_line(acc)
        acc["line"] = line
        logger.info("data: %s %r (%s, %s): %s", "source" if part.role == "train" else "eval set", part.name,
                    src.label, acc["amount"] if part.role == "train" else "every row", line)
    total = report.mixture_accounting(parts_acc, evals_acc)
    status = [t.column("status").to_numpy() for _, t in got]
    truncated = lambda i, rows: int((status[i][rows] == STATUS["truncated"]).sum())  # noqa: E731
    train_counts = {"pairs": len(train_ds), "dropped": sum(p.counts["dropped"] for p in parts),
                    "truncated": sum(truncated(i, p.train) for i, p in enumerate(parts))}
    eval_counts = {p.name: {"pairs": int(len(p.eval)), "truncated": truncated(i, p.eval)}
                   for i, p in enumerate(parts) if p.eval is not None and len(p.eval)}
    built = any(e.built for e in entries)
    cache = {"train": [str(e.path) for e in entries], "mixture": train_ds.cache_files[0]["filename"],
             "built": built, "mixed": mixed_now, "seconds": round(time.perf_counter() - start, 2)}
    out = report.mixture_report(train_counts, eval_counts, total, parts_acc, evals_acc, repeats, spec.dedup,
                                [e.meta["layout"] for e in entries], notes, cache, spec.mixture.plain())
    line = report.mixture_line(total)
    logger.info("data: mixture of %d sources: %s (%s in %.1f s, %s)", len(parts_acc), line,
                "tokenised" if built else "mixed" if mixed_now else "from cache", cache["seconds"], cache["mixture"])
    out["accounting_line"] = line
    return Prepared(train_ds, eval_ds, out, {k: v for k, v in listed.items() if v})
