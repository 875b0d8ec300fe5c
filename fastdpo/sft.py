"""SFT data: the same sources as DPO (embedded, local file, folder, Hub id), in the two layouts SFTTrainer reads.

  conversational  messages: a list of {"role", "content"} (loss on the whole rendered conversation)
  prompt/completion  prompt and completion, strings or message lists (loss on the completion only)

Rows are read by `fastdpo.data.read_source`, so file types, gzip and error places match the DPO stage.
"""

from __future__ import annotations

import math
import random

from . import data

LAYOUTS = ("messages", "prompt/completion")


def _layout(row: dict) -> str | None:
    if isinstance(row, dict) and "messages" in row:
        return "messages"
    if isinstance(row, dict) and "prompt" in row and "completion" in row:
        return "prompt/completion"
    return None


def _check(row: dict, layout: str) -> str | None:
    if layout == "messages":
        return data._check_messages(row["messages"], "messages")
    for key in ("prompt", "completion"):
        value = row[key]
        if isinstance(value, list):
            problem = data._check_messages(value, key)
            if problem:
                return problem
        elif not isinstance(value, str) or not value:
            return f"{key} must be a non-empty string or a list of messages"
    return None


def _rows(raw: list, where: list[str], skip_bad_rows: bool, skipped: data.Skipped) -> list[dict]:
    layout = _layout(raw[0]) if raw else None
    if layout is None:
        cols = sorted(raw[0]) if raw and isinstance(raw[0], dict) else raw[:1]
        raise data.DataError(f"{where[0] if where else 'dataset'}: SFT needs a `messages` column or `prompt` and "
                             f"`completion` columns, found {cols}; a preference file trains with train_dpo.py")
    keep = ["messages"] if layout == "messages" else ["prompt", "completion"]
    rows = []
    for row, place in zip(raw, where):
        problem = "not the layout of the first row" if _layout(row) != layout else _check(row, layout)
        if problem:
            if not skip_bad_rows:
                raise data.DataError(f"{place}: {problem}; {data.FIX_SKIP}")
            skipped.add(place, problem)
            continue
        rows.append({k: row[k] for k in keep})
    return rows


def load_sft(args) -> data.Pairs:
    """Train (and eval) SFT datasets from the script arguments, the split rules of `data.load_pairs`."""
    skipped = data.Skipped()
    unreadable = skipped if args.skip_bad_rows else None  # invalid UTF-8, malformed JSON: row errors too
    raw, where = data.read_source(args.dataset_name, args.dataset_config, args.dataset_train_split,
                                  args.max_train_samples, unreadable)
    rows = _rows(raw, where, args.skip_bad_rows, skipped)
    eval_rows = None
    fraction = data._as_fraction(args.dataset_test_split)
    if args.eval_dataset_name or (args.dataset_test_split and fraction is None):
        source = args.eval_dataset_name or args.dataset_name
        raw_e, where_e = data.read_source(source, args.dataset_config, args.dataset_test_split or "train",
                                          skipped=unreadable)
        eval_rows = _rows(raw_e, where_e, args.skip_bad_rows, skipped)
    elif fraction is not None:
        order = list(range(len(rows)))
        random.Random(args.dataset_seed).shuffle(order)
        held = set(order[: max(1, math.floor(len(rows) * fraction))])
        eval_rows = [rows[i] for i in sorted(held)]
        rows = [r for i, r in enumerate(rows) if i not in held]
    if eval_rows is not None and args.max_eval_samples is not None:
        eval_rows = eval_rows[: args.max_eval_samples]
    train = data._to_dataset(rows, f"{args.dataset_name} [{args.dataset_train_split}]")
    if args.dataset_shuffle_seed is not None:
        train = train.shuffle(seed=args.dataset_shuffle_seed)
    evalset = data._to_dataset(eval_rows, f"{args.dataset_name} [eval]") if eval_rows is not None else None
    return data.Pairs(train, evalset, skipped)
