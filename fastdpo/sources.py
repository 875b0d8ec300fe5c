"""Reading preference data: every source streams batches of raw rows with the place each came from.

`open_source(name, config, split)` -> a Source whose `batches()` yields RawBatch: raw JSON lines (parsed later by
`decode`, so a bad line is a row error, not a failed file), rows already decoded (CSV records, Parquet and Hub
rows, JSON arrays), or BadRow markers (invalid UTF-8, a CSV record with the wrong field count). Places are
`file:line` for JSON lines and CSV (a quoted newline keeps the record's first line), `file row N` for JSON
arrays and Parquet, `id [split] row N` for Hub datasets. `fingerprint()` identifies a source's content for
fastdpo.tokcache (local files: a digest of their bytes; Hub: datasets' fingerprint of the prepared split).
No source is held as one Python list, except a JSON document, which has to be parsed whole.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import DatasetDict, load_dataset, load_from_disk
from datasets.data_files import DataFilesDict, get_data_patterns

from . import files, frameworks, tiny
from .errors import DataError

logger = logging.getLogger(__name__)

BOM = b"\xef\xbb\xbf"  # Excel and Notepad start UTF-8 files with it
BATCH_ROWS = 64  # rows per batch handed to a tokenising worker: ~2 MB of Think-shaped text
BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class BadRow:
    """A row that failed before it was a row (invalid UTF-8, a CSV record with the wrong number of fields)."""

    problem: str


@dataclass
class RawBatch:
    items: list  # per row: bytes (one JSON line, parsed by `decode`), a BadRow, or the row object itself
    where: list[str]
    done: float  # fraction of the source read when this batch was cut (progress lines, ETA)


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


class _Counted:
    """A binary file object whose `pos()` is the bytes consumed from disk (compressed bytes for .gz)."""

    def __init__(self, path: Path):
        self.raw = open(path, "rb")
        self.f = gzip.GzipFile(fileobj=self.raw) if path.suffix == ".gz" else self.raw

    def pos(self) -> int:
        return self.raw.tell()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        self.raw.close()


def _jsonl(path: Path):
    """(items, where, bytes read) per batch: raw JSON lines, parsed later so a bad line is a row error."""
    with _Counted(path) as src:
        items, where, size = [], [], 0
        for lineno, line in enumerate(src.f, start=1):
            if lineno == 1 and line.startswith(BOM):
                line = line[len(BOM):]
            if not line or line.isspace():
                continue  # blank lines are not rows, and do not shift the numbers of the others
            items.append(line)
            where.append(f"{path}:{lineno}")
            size += len(line)
            if len(items) >= BATCH_ROWS or size >= BATCH_BYTES:
                yield items, where, src.pos()
                items, where, size = [], [], 0
        if items:
            yield items, where, src.pos()


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _json(path: Path):
    """A JSON document: a list of rows, or an object holding one list. Parsed whole (a document has no rows to
    stream); JSON lines saved with a .json name are read line by line instead."""
    with _Counted(path) as src:
        data = src.f.read()
    data = data[len(BOM):] if data.startswith(BOM) else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{_line_of(data, e.start)}: invalid UTF-8 (byte 0x{data[e.start]:02x}); one JSON "
                        "document cannot skip a row: re-save the file as UTF-8, or as JSON lines") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        stripped = text.strip()
        if e.msg.startswith("Extra data") or (stripped.startswith("{") and "\n" in stripped):
            yield from _jsonl(path)  # JSON lines with a .json name: each line is a row (and a row error)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the file (one JSON "
                        "document cannot skip a row; JSON lines can)") from None
    if isinstance(rows, dict):  # {"train": [...]} or {"data": [...]}: one list of rows inside
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list), got an object "
                            f"with keys {sorted(rows)[:8]}")
        rows = lists[0]
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    size = len(data)
    for i in range(0, len(rows), BATCH_ROWS):
        chunk = rows[i: i + BATCH_ROWS]
        yield chunk, [f"{path} row {j}" for j in range(i + 1, i + len(chunk) + 1)], size * (i + len(chunk)) // len(rows)


def _csv(path: Path):
    """CSV records with the line each starts on (a quoted newline spans lines; csv.reader tracks them)."""
    bad_lines: list[int] = []

    with _Counted(path) as src:
        def lines():
            for lineno, raw in enumerate(src.f, start=1):
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    bad_lines.append(lineno)
                    yield raw.decode("utf-8", "replace")

        reader = csv.reader(lines())
        header = next(reader, None)
        if header is None:
            return
        end = reader.line_num
        items, where = [], []
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:
                continue  # a blank line
            bad = [n for n in bad_lines if start <= n <= end]
            if bad:
                item = BadRow(f"invalid UTF-8 on line {bad[0]}; re-save the file as UTF-8")
            elif len(fields) != len(header):
                item = BadRow(f"{len(fields)} fields where the header has {len(header)} (an unquoted comma or "
                              "quote?)")
            else:
                item = dict(zip(header, fields, strict=True))
            bad_lines[:] = [n for n in bad_lines if n > end]
            items.append(item)
            where.append(f"{path}:{start}")
            if len(items) >= BATCH_ROWS:
                yield items, where, src.pos()
                items, where = [], []
        if items:
            yield items, where, src.pos()


def _parquet(path: Path):
    size = path.stat().st_size
    source = pa.BufferReader(gzip.decompress(path.read_bytes())) if path.suffix == ".gz" else str(path)
    pf = pq.ParquetFile(source)
    total, n = max(pf.metadata.num_rows, 1), 0
    for rb in pf.iter_batches(batch_size=BATCH_ROWS):
        rows = rb.to_pylist()
        yield rows, [f"{path} row {j}" for j in range(n + 1, n + len(rows) + 1)], size * (n + len(rows)) // total
        n += len(rows)


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


class Source:
    """Where rows come from: `batches()` streams them, `fingerprint()` identifies their content for caches."""

    label: str
    single_file = False

    def batches(self, limit: int | None = None) -> Iterator[RawBatch]:
        raise NotImplementedError

    def fingerprint(self, memo_dir: Path | None = None) -> dict:
        raise NotImplementedError


def _limited(batches, limit: int | None) -> Iterator[RawBatch]:
    """At most `limit` rows (max_train_samples counts raw rows, bad ones included, as before)."""
    n = 0
    for batch in batches:
        if limit is not None and n + len(batch.items) >= limit:
            keep = limit - n
            yield RawBatch(batch.items[:keep], batch.where[:keep], 1.0)
            return
        n += len(batch.items)
        yield batch


class FilesSource(Source):
    def __init__(self, files: list[Path], label: str):
        self.files, self.label = files, label
        self.single_file = len(files) == 1 and Path(label).is_file()

    def batches(self, limit=None):
        sizes = [p.stat().st_size for p in self.files]
        total, before = max(sum(sizes), 1), 0

        def gen():
            nonlocal before
            for path, size in zip(self.files, sizes, strict=True):
                for items, where, pos in READERS[_suffix(path)](path):
                    yield RawBatch(items, where, min(1.0, (before + pos) / total))
                before += size

        return _limited(gen(), limit)

    def fingerprint(self, memo_dir=None):
        return {"files": [[str(p.resolve()), files.file_digest(p, memo_dir)] for p in self.files]}


class RowsSource(Source):
    """Rows already in memory (the embedded datasets)."""

    def __init__(self, rows: list, label: str, identity: dict):
        self.rows, self.label, self.identity = rows, label, identity

    def batches(self, limit=None):
        rows = self.rows[:limit] if limit is not None else self.rows
        for i in range(0, len(rows), BATCH_ROWS):
            chunk = rows[i: i + BATCH_ROWS]
            yield RawBatch(chunk, [f"{self.label} row {j}" for j in range(i + 1, i + len(chunk) + 1)],
                           (i + len(chunk)) / max(len(rows), 1))

    def fingerprint(self, memo_dir=None):
        return self.identity


class HubSource(Source):
    """A Hub dataset id (or a folder `datasets` reads itself), through `load_dataset` and its Arrow cache."""

    def __init__(self, name: str, config: str | None, split: str, data_dir: str | None = None,
                 data_files: list | None = None):
        self.name, self.config, self.split = name, config, split
        self.subset = {k: v for k, v in (("data_dir", data_dir), ("data_files", data_files)) if v is not None}
        self.label = f"{name} [{split}]"
        self._ds = None

    def dataset(self):
        if self._ds is None:
            try:
                self._ds = load_dataset(self.name, self.config, split=self.split, **self.subset)
            except ValueError as e:
                if "split" in str(e).lower():
                    raise DataError(f"{self.name}: has no split {self.split!r} ({e}); set dataset_train_split / "
                                    "dataset_test_split to one of its splits") from None
                raise
        return self._ds

    def batches(self, limit=None):
        ds = self.dataset().with_format("arrow")
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(0, n, BATCH_ROWS):
            rows = ds[i: min(i + BATCH_ROWS, n)].to_pylist()
            yield RawBatch(rows, [f"{self.label} row {j}" for j in range(i + 1, i + len(rows) + 1)],
                           (i + len(rows)) / max(n, 1))

    def fingerprint(self, memo_dir=None):
        # datasets' own fingerprint of the prepared split: its builder config, data files and their revision
        return {"hub": self.name, "config": self.config, "split": self.split, **self.subset,
                "dataset": frameworks.fingerprint(self.dataset())}


class SavedSource(HubSource):
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, read with `load_from_disk`."""

    def dataset(self):
        if self._ds is None:
            ds = load_from_disk(self.name)
            if isinstance(ds, DatasetDict):
                if self.split not in ds:
                    raise DataError(f"{self.name}: has no split {self.split!r} (saved splits: {sorted(ds)}); set "
                                    "dataset_train_split / dataset_test_split to one of them")
                ds = ds[self.split]
            self._ds = ds
        return self._ds

    def fingerprint(self, memo_dir=None):
        # the saved fingerprint, plus the files themselves: a folder saved again in place changes them
        files = sorted(Path(self.name).rglob("*.arrow"))
        return {**super().fingerprint(memo_dir),
                "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes beside its Arrow files
METADATA_FILES = ("dataset_info.json", "dataset_infos.json")  # Hub-style metadata next to data files: not rows


def _folder(path: Path, config: str | None, split: str) -> Source:
    """A local folder: split names from file names as `load_dataset` does, every supported file type read whole."""
    if any((path / name).is_file() for name in SAVED_MARKERS):
        return SavedSource(str(path), config, split)
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except FileNotFoundError:
        files = {}
    by_split = {str(k): [Path(f) for f in v if Path(f).name not in METADATA_FILES] for k, v in files.items()}
    data = {k: [f for f in v if _suffix(f) in READERS] for k, v in by_split.items()}
    if not any(data.values()):  # e.g. a save_to_disk or Arrow folder: let datasets read it
        return HubSource(str(path), config, split)
    if split not in data or not data[split]:
        found = sorted(k for k in data if data[k])
        raise DataError(f"{path}: has no split {split!r} (splits from file names: {found}); set "
                        "dataset_train_split / dataset_test_split to one of them")
    ignored = sorted(str(f.relative_to(path)) for f in by_split[split] if _suffix(f) not in READERS)
    if ignored:
        logger.warning("%s [%s]: not data files, not read: %s", path, split, ", ".join(ignored[:10]))
    kinds = sorted({_suffix(f) for f in data[split]})
    if len(kinds) > 1:
        logger.info("%s [%s]: reading all %d files (%s)", path, split, len(data[split]), ", ".join(kinds))
    return FilesSource(sorted(data[split]), str(path))


def open_source(source: str, config: str | None = None, split: str = "train", data_dir: str | None = None,
                data_files=None, columns=None) -> Source:
    """The rows of one split: an embedded dataset, a local file, a local folder or a Hub dataset id; with TRL's
    data_dir / data_files (a folder or Hub repo's subset; `path: json` with local files) and columns (only those
    read, as TRL's select_columns)."""
    if data_dir is not None or data_files is not None:
        found = _subset(source, config, split, data_dir, data_files)
    else:
        found = _open(source, config, split)
    return Columns(found, tuple(columns)) if columns else found


BUILDERS = ("json", "csv", "parquet")  # TRL's `path: json` + data_files: the files are the source


def _subset(source: str, config: str | None, split: str, data_dir: str | None, data_files) -> Source:
    """TRL's data_dir / data_files: local files when they exist (relative to a local folder `source`, or to the
    working folder for a builder name), otherwise the Hub repo's subset through load_dataset."""
    if isinstance(data_files, dict):
        if split not in data_files:
            raise DataError(f"{source}: data_files has no split {split!r} (it names {sorted(data_files)}); set the "
                            "entry's split: to one of them")
        data_files = data_files[split]
    base = Path(source).expanduser()
    local = base.is_dir() or source in BUILDERS
    root = (base if base.is_dir() else Path(".")) / (data_dir or "")
    if data_files is None:
        if root.is_dir():
            return _folder(root, config, split)
        if local:
            raise DataError(f"{root}: no such folder (data_dir {data_dir!r})")
        return HubSource(source, config, split, data_dir=data_dir)
    names = [data_files] if isinstance(data_files, str) else list(data_files)
    paths = [p for n in names for p in (sorted(root.glob(n)) if any(c in n for c in "*?[") else [root / n])]
    missing = [str(p) for p in paths if not p.is_file()]
    if local and (missing or not paths):
        raise DataError(f"{source}: data_files {missing[0] if missing else names[0]}: no such file")
    if not local:
        return HubSource(source, config, split, data_dir=data_dir, data_files=names)
    bad = [str(p) for p in paths if _suffix(p) not in READERS]
    if bad:
        raise DataError(f"{bad[0]}: unsupported file type; use .jsonl, .json, .parquet or .csv (optionally .gz)")
    return FilesSource(paths, str(paths[0]) if len(paths) == 1 else f"{source} {names}")


class Columns(Source):
    """Only the named columns of each row (TRL's `columns`): the rest is never seen by layout detection."""

    def __init__(self, inner: Source, columns: tuple):
        self.inner, self.columns = inner, columns
        self.label, self.single_file = inner.label, inner.single_file

    def batches(self, limit=None):
        for batch in self.inner.batches(limit):
            yield RawBatch([self._select(item) for item in batch.items], batch.where, batch.done)

    def _select(self, item):
        try:
            row = decode(item)
        except DataError as e:
            return BadRow(str(e))
        if not isinstance(row, dict):
            return row
        return {k: row[k] for k in self.columns if k in row}

    def fingerprint(self, memo_dir=None):
        return {**self.inner.fingerprint(memo_dir), "columns": list(self.columns)}


def _open(source: str, config: str | None = None, split: str = "train") -> Source:
    if source == tiny.DATASET_ID:
        return RowsSource(tiny.preference_rows(split), f"{source} [{split}]",
                          {"embedded": source, "split": split, "version": tiny.VERSION})
    if source == tiny.SFT_DATASET_ID:
        return RowsSource(tiny.sft_rows(), source, {"embedded": source, "version": tiny.VERSION})
    path = Path(source).expanduser()
    if path.is_file():
        if _suffix(path) not in READERS:
            raise DataError(f"{path}: unsupported file type {_suffix(path) or '(none)'}; use .jsonl, .json, .parquet "
                            "or .csv (optionally .gz)")
        return FilesSource([path], str(path))
    if source.startswith((".", "/", "~")) and not path.exists():
        raise DataError(f"{source}: no such file or folder")
    if path.is_dir():
        return _folder(path, config, split)
    return HubSource(source, config, split)


def decode(item):
    """A raw item of a batch -> the row object, or DataError(problem) for a row that cannot be read."""
    if isinstance(item, bytes):
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"invalid UTF-8 (byte 0x{item[e.start]:02x} at byte {e.start + 1} of the line); re-save "
                            "the file as UTF-8") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(item, BadRow):
        raise DataError(item.problem)
    return item
