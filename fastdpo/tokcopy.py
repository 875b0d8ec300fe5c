"""Copying token rows between token files (tokens.arrow and what is made from it): the rows a split or a mixture
takes, in its order, copies included, written as one new file.

    tokcopy.copy_rows(tmp, [path_a, path_b], src, rows)   # row rows[i] of file [path_a, path_b][src[i]], for each i

Memory does not grow with the files the rows come from, and the copying costs per row copied; each source is
read through once, sequentially, for the index of its record batches (~0.1 s per 200 MB from the page cache).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .tokbuild import TOKENS_SCHEMA

CHUNK, WINDOW = 256, 8192  # pairs written at a time; pairs copied before the sources are mapped afresh


def _index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(byte offset, first row) of each record batch of a token file (first rows end with the total), read through a
    plain file one batch at a time, so that none of its pages stays resident."""
    offsets, starts = [], [0]
    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.MessageReader.open_stream(f)
        schema = pa.ipc.read_schema(reader.read_next_message())
        while True:
            offset = f.tell()
            try:
                message = reader.read_next_message()
            except StopIteration:
                break
            offsets.append(offset)
            starts.append(starts[-1] + pa.ipc.read_record_batch(message, schema).num_rows)
    return np.asarray(offsets, np.int64), np.asarray(starts, np.int64)


class _Batches:
    """Record batches of token files, each mapped on first use (by its offset from _index)."""

    def __init__(self, paths: list[Path], offsets: list[np.ndarray]):
        self.maps, self.offsets, self.read = [pa.memory_map(str(p)) for p in paths], offsets, {}

    def get(self, source: int, batch: int) -> pa.RecordBatch:
        if (source, batch) not in self.read:
            self.maps[source].seek(int(self.offsets[source][batch]))
            message = pa.ipc.read_message(self.maps[source])
            self.read[source, batch] = pa.ipc.read_record_batch(message, TOKENS_SCHEMA)
        return self.read[source, batch]


def copy_rows(tmp: Path, sources_: list[Path], src: np.ndarray, rows: np.ndarray) -> None:
    """Write token row rows[i] of the file sources_[src[i]], for every i in order, to tmp, in memory that does not
    grow with the sources and time per row copied: each row is taken from the record batch that holds it (a
    Table.take joins every chunk of a column first, a copy of the whole source per call), CHUNK pairs at a time;
    only the batches a window of WINDOW pairs needs are mapped, and mapped afresh for the next window (a map kept
    open holds every page it touched, headers included)."""
    index = [_index(p) for p in sources_]
    batch = np.empty(len(rows), np.int64)
    local = np.empty(len(rows), np.int64)
    for k, (_, starts) in enumerate(index):  # the batch that holds each pair, and the pair's row in it
        mine = src == k
        batch[mine] = np.searchsorted(starts, rows[mine], side="right") - 1
        local[mine] = rows[mine] - starts[batch[mine]]
    with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, TOKENS_SCHEMA) as out:
        for start in range(0, len(rows), WINDOW):
            window = _Batches(sources_, [offsets for offsets, _ in index])  # the last window's maps let go
            for i in range(start, min(start + WINDOW, len(rows)), CHUNK):
                j = min(i + CHUNK, start + WINDOW, len(rows))
                key = src[i:j].astype(np.int64) * (1 << 32) + batch[i:j]
                order = np.argsort(key, kind="stable")
                keys, cuts = np.unique(key[order], return_index=True)
                groups = np.split(order, cuts[1:])
                taken = [window.get(int(k >> 32), int(k & 0xFFFFFFFF)).take(pa.array(local[i:j][g]))
                         for k, g in zip(keys, groups, strict=True)]
                chunk = pa.Table.from_batches(taken, TOKENS_SCHEMA)
                if len(groups) > 1:  # back to the pairs' order (a take of this small chunk)
                    chunk = chunk.take(pa.array(np.argsort(order)))
                out.write_table(chunk)
    pa.default_memory_pool().release_unused()
