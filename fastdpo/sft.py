"""SFT data: the DPO stage's pipeline (sources, message conversion, eval split and dedup) in the two layouts
SFTTrainer reads.

  conversational     messages (or conversations: {role, content} or sharegpt's {from, value}, typed content
                     parts): loss on the whole rendered conversation
  prompt/completion  prompt and completion, strings or message lists (loss on the completion only)

Rows are read by `fastdpo.sources`, converted with `fastdpo.layouts`' message rules (role names, typed parts, two
turns of one role merged) and split by `fastdpo.data.eval_spec` / `plan_splits`, exactly as preference pairs: a
single file with a named eval split holds out 10%, eval rows that repeat train rows are dropped and counted.
"""

from __future__ import annotations

import json
import logging

from . import data, layouts
from .errors import FIX_SKIP, DataError, Notes, Skipped
from .sources import decode, open_source

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


def _read(source: str, config, split: str, limit, args, skipped: Skipped, notes: Notes):
    """(rows, places) of one SFT split; the layout from its first row, as for preference data."""
    src = open_source(source, config, split)
    tags = layouts.Tags.of(getattr(args, "column_map", None))
    layout, rows, where = None, [], []
    def bad(place, problem):
        if not args.skip_bad_rows:
            raise DataError(f"{place}: {problem}; {FIX_SKIP}")
        skipped.add(place, str(problem))

    for batch in src.batches(limit):
        for item, place in zip(batch.items, batch.where, strict=True):
            try:
                row = decode(item)
            except DataError as e:
                bad(place, e)
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
                bad(place, e)
                continue
            where.append(place)
    return rows, where


def _hash(row: dict) -> bytes:
    import xxhash

    return xxhash.xxh3_128_digest(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass"))


def load_sft(args) -> data.Pairs:
    """Train (and eval) SFT datasets from the script arguments, with the split rules of preference data."""
    skipped, notes = Skipped(), Notes()
    source = open_source(args.dataset_name, args.dataset_config, args.dataset_train_split)
    spec = data.eval_spec(args, source)
    logger.info("%s: %s", args.dataset_name, spec.note)
    rows, where = _read(args.dataset_name, args.dataset_config, args.dataset_train_split, args.max_train_samples,
                        args, skipped, notes)
    eval_rows = eval_where = None
    if spec.source is not None:
        eval_rows, eval_where = _read(spec.source, args.dataset_config, spec.split, None, args, skipped, notes)
    plan = data.plan_splits(args, spec, [_hash(r) for r in rows],
                            [_hash(r) for r in eval_rows] if eval_rows is not None else None, where, eval_where)
    data.check_eval_left(plan, spec)
    for src, i, problem in plan.removed:
        logger.info("%s: %s", (where if src == "train" or plan.eval_from_train else eval_where)[i], problem)
    pool = rows if plan.eval_from_train else eval_rows
    train = data._to_dataset([rows[i] for i in plan.train], f"{args.dataset_name} [{args.dataset_train_split}]")
    if args.dataset_shuffle_seed is not None:
        train = train.shuffle(seed=args.dataset_shuffle_seed)
    evalset = None
    if plan.eval is not None:
        evalset = data._to_dataset([pool[i] for i in plan.eval], f"{args.dataset_name} [eval]")
    if notes.counts:
        logger.info("SFT data: rows changed by rule: %s", notes.line())
    if plan.removed:
        logger.info("SFT data: %d eval rows also in train removed (dedup %s)", len(plan.removed), args.dedup)
    return data.Pairs(train, evalset, skipped, notes)
