"""Detection: a source's layout from its first row that fits one, tried family by family (explicit pairs, ranked,
judged; column_map first when the recipe names one). A row no family fits names what is missing."""

from __future__ import annotations

import dataclasses

from ..errors import DataError
from ..sources import decode
from . import column_map, graded, judged, not_pairs, pairs, ranked, swift
from .layout import OPTIONAL, Layout, NeedsOption, NotPairs, Options, get_path, has_path
from .messages import Tags, message_extras
from .pairs import ANSWER_COLUMNS

DETECT_ROWS = 16  # rows looked at for the layout when the first ones are unreadable or not pairs (row errors later)
NO_OPTIONS = Options()  # no column_map and no conversion option
# Tried in this order; each module's detect(row, keys, tags, options, where). not_pairs last: it names data that is
# no preference layout at all (KTO, unlabelled pairs) once every layout has declined.
FAMILIES = (pairs, ranked, graded, judged, swift, not_pairs)


def detect(row, options: Options = NO_OPTIONS, where: str = "") -> Layout:
    """The layout of a source from one row (its first readable one). Raises DataError naming what is missing."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with the columns of a preference pair, got "
                        f"{type(row).__name__}")
    layout = _detect(row, options, where)
    columns = dict(layout.columns)
    for part in OPTIONAL:  # named in the description when the detecting row has them (later rows are read too)
        col = layout.column_of(row, part)
        if col and not columns.get(part):
            columns[part] = col
    layout = dataclasses.replace(layout, columns=columns)
    extras = set()
    for part, col in layout.columns.items():
        if col and part not in ("tools", "chat_template_kwargs") and has_path(row, col):
            extras |= message_extras(get_path(row, col), layout.tags)
    return dataclasses.replace(layout, row_columns=row_columns(row, layout), message_keys=tuple(sorted(extras)))


def row_columns(row: dict, layout: Layout) -> tuple:
    """The row's columns, with the keys of a parent the layout reads only part of (input.messages ->
    input.parallel_tool_calls, ...), so none of them goes unlisted."""
    parents = {c.split(".")[0] for c in layout.columns.values() if c and "." in c}
    out = set(row)
    for p in parents:
        if isinstance(row.get(p), dict):
            out |= {f"{p}.{k}" for k in row[p]}
    return tuple(sorted(out))


def _detect(row: dict, options: Options, where: str) -> Layout:
    cmap = options.column_map
    tags = Tags.of(cmap)
    if cmap:
        return column_map.detect(row, cmap, tags, where)
    keys = set(row)
    for family in FAMILIES:
        layout = family.detect(row, keys, tags, options, where)
        if layout is not None:
            return layout
    for c, r in ANSWER_COLUMNS:
        if (c in keys) != (r in keys):
            raise DataError(f"{where}: missing column {r if c in keys else c!r}; columns present: {sorted(keys)}. "
                            "Rename the columns or set column_map (e.g. '{\"chosen\": \"good\", \"rejected\": "
                            "\"bad\"}')")
    raise DataError(f"{where}: no preference layout found in columns {sorted(keys)}: a pair needs chosen and "
                    "rejected (or preferred_output/non_preferred_output, response_chosen/response_rejected), with a "
                    "prompt, question or conversations column, or whole transcripts. Rename the columns or set "
                    "column_map (e.g. '{\"prompt\": \"question\", \"chosen\": \"good\", \"rejected\": \"bad\"}'; "
                    "dotted paths reach nested fields: input.messages)")


def detect_rows(items, places, options: Options = NO_OPTIONS) -> Layout | None:
    """The layout from the first row that decodes to an object and fits one (at most DETECT_ROWS rows are tried, so
    a bad first row stays a row error); None when no row decodes. Ranked/judged data without its option fails."""

    first_error, tried = None, 0
    for item, where in zip(items, places, strict=True):
        try:
            row = decode(item)
        except DataError:
            continue
        if not isinstance(row, dict):
            continue
        try:
            return detect(row, options, where)
        except (NeedsOption, NotPairs):  # a property of the whole source, not of this row
            raise
        except DataError as e:
            first_error = first_error or e
        tried += 1
        if tried >= DETECT_ROWS:
            break
    if first_error is not None:
        raise first_error
    return None


def detect_source(batches, options: Options = NO_OPTIONS):
    """(layout, batches): the layout of a stream of RawBatch, and the same stream from its start."""
    batches = iter(batches)
    seen, rows = [], 0
    layout = None
    for batch in batches:
        seen.append(batch)
        layout = detect_rows(batch.items, batch.where, options)
        rows += len(batch.items)
        if layout is not None or rows >= DETECT_ROWS:
            break

    def chained():
        yield from seen
        yield from batches

    return layout, chained()
