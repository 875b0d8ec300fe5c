"""SFT data: the preference pipeline's stages (sources, message rules, the skip-or-fail policy, splits) in the two
layouts SFTTrainer reads.

  conversational     messages (or conversations: {role, content} or sharegpt's {from, value}, typed content
                     parts): loss on the whole rendered conversation
  prompt/completion  prompt and completion, strings or message lists (loss on the completion only)

Rows are read by `fastdpo.sources`, converted with `fastdpo.layouts`' message rules (role names, typed parts, two
turns of one role merged) and split by `fastdpo.splits`, exactly as preference pairs: a single file with a named
eval split holds out 10%, eval rows that repeat train rows are dropped and counted.
"""

from __future__ import annotations

import logging

from . import layouts, splits
from .dataspec import DataSpec, SourceSpec
from .errors import DataError, Notes, Skipped
from .sources import decode

logger = logging.getLogger(__name__)

LAYOUTS = ("messages", "prompt/completion")


def _layout(row) -> tuple[str, str] | None:
    """(layout, column) of an SFT row, or None."""
    if not isinstance(row, dict):
        return None
    conv = next((k for k in layouts.CONVERSATION_COLUMNS if k in row), None)
    if conv is not None:
        return "messages", conv
    if "prompt" in row and "completion" in row:
        return "prompt/completion", "prompt"
    return None


def _convert(row: dict, layout: tuple[str, str], tags: layouts.Tags, notes: Notes, where: str) -> dict:
    name, col = layout
    if name == "messages":
        msgs, merged = layouts.merge_runs(layouts.to_messages(row[col], col, tags))
        if merged:
            notes.add("merged_turns", where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"field {col!r} has no assistant turn: nothing to learn")
        return {"messages": msgs}
    out = {}
    for key in ("prompt", "completion"):
        value = row[key]
        if isinstance(value, (list, dict)):
            out[key] = layouts.to_messages(value, key, tags)
        elif isinstance(value, str) and value:
            out[key] = value
        else:
            raise DataError(f"{key} must be a non-empty string or a list of messages")
    return out


def _read(source: SourceSpec, spec: DataSpec, skipped: Skipped, notes: Notes):
    """(rows, places) of one SFT split; the layout from its first row, as for preference data."""
    src = source.open()
    tags = layouts.Tags.of(source.options.column_map)
    layout, rows, where = None, [], []
    for batch in src.batches(source.limit):
        for item, place in zip(batch.items, batch.where, strict=True):
            try:
                row = decode(item)
            except DataError as e:
                spec.policy.row(place, e, skipped)
                continue
            if layout is None:
                layout = _layout(row)
                if layout is None:
                    cols = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{place}: SFT needs a `messages` column (or `conversations`), or `prompt` and "
                                    f"`completion` columns, found {cols}; a preference file trains with train_dpo.py")
                logger.info("%s: SFT layout %s (column %r)", src.label, *layout)
            try:
                if _layout(row) != layout:
                    raise DataError(f"not the layout of the first row ({layout[0]}, column {layout[1]!r})")
                rows.append(_convert(row, layout, tags, notes, place))
            except DataError as e:
                spec.policy.row(place, e, skipped)
                continue
            where.append(place)
    return rows, where


def load_sft(spec) -> splits.Split:
    """Train (and eval) SFT datasets from a DataSpec (or script arguments), with the split rules of preference data."""
    spec = DataSpec.of(spec)
    skipped, notes = Skipped(), Notes()
    evals = splits.eval_spec(spec, spec.train.open())
    logger.info("%s: %s", spec.train.name, evals.note)
    rows, where = _read(spec.train, spec, skipped, notes)
    eval_rows = eval_where = None
    if evals.source is not None:
        eval_rows, eval_where = _read(spec.eval_source(evals.source, evals.split), spec, skipped, notes)
    train, evalset, plan = splits.split_rows(spec, evals, rows, where, eval_rows, eval_where, splits.row_hash)
    for src, i, problem in plan.removed:
        logger.info("%s: %s", (where if src == "train" or plan.eval_from_train else eval_where)[i], problem)
    if notes.counts:
        logger.info("SFT data: rows changed by rule: %s", notes.line())
    if plan.removed:
        logger.info("SFT data: %d eval rows also in train removed (dedup %s)", len(plan.removed), spec.dedup)
    return splits.Split(train, evalset, skipped, notes)
