"""Preference data: any supported source -> TRL's preference format -> token ids.

Training (`train_dpo.py`) and the dataset analyzer (`scripts/analyze_dataset.py`) both call `load_pairs`
and `tokenize_pairs`, so they see identical tokens by construction.

Accepted layouts, detected from the columns:
  standard        prompt, chosen, rejected as strings
  conversational  prompt, chosen, rejected as message lists (the Dolci sets)
  implicit prompt chosen, rejected as whole transcripts; the prompt is their shared prefix (Anthropic/hh-rlhf)
  column map      any other layout renamed with `column_map` (Intel/orca_dpo_pairs: system, question)
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset

from . import tiny

logger = logging.getLogger(__name__)

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_EVAL_FRACTION = 0.1
FIX_SKIP = "fix the row, or pass --skip_bad_rows true to skip bad rows (they are counted and listed in output_dir)"


class DataError(ValueError):
    """Bad input, with the place it was found and what to do about it."""


@dataclass
class Skipped:
    rows: list[dict] = field(default_factory=list)

    def add(self, where: str, problem: str) -> None:
        self.rows.append({"where": where, "problem": problem})


# ----------------------------------------------------------------------------------------------- reading


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> tuple[list, list[str]]:
    rows, where = [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the line") from None
            where.append(f"{path}:{lineno}")
    return rows, where


def _read_json(path: Path) -> tuple[list, list[str]]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Extra data"):  # JSON lines saved with a .json name
            return _read_jsonl(path)
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); fix the file") from None
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: one list of rows inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of rows (or an object holding one list), got an object "
                            f"with keys {sorted(data)[:8]}")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data, [f"{path} row {i}" for i in range(1, len(data) + 1)]


def _read_table(path: Path, kind: str) -> tuple[list, list[str]]:
    from datasets import load_dataset

    ds = load_dataset(kind, data_files=str(path), split="train")
    offset = 2 if kind == "csv" else 1  # a CSV's first line is its header
    label = "line" if kind == "csv" else "row"
    return ds.to_list(), [f"{path} {label} {i + offset}" for i in range(len(ds))]


def read_file(path: str | Path) -> tuple[list, list[str]]:
    """Rows of one local file and, for each, where it came from (file:line or file row N)."""
    path = Path(path)
    kind = _suffix(path)
    if kind == ".jsonl":
        return _read_jsonl(path)
    if kind == ".json":
        return _read_json(path)
    if kind in (".parquet", ".csv"):
        return _read_table(path, kind[1:])
    raise DataError(f"{path}: unsupported file type {kind or '(none)'}; use .jsonl, .json, .parquet or .csv "
                    "(optionally .gz)")


def read_source(source: str, config: str | None = None, split: str = "train") -> tuple[list, list[str]]:
    """Rows of a split from an embedded dataset, a local file, a local folder or a Hub dataset id."""
    if source == tiny.DATASET_ID:
        rows = tiny.preference_rows(split)
        return rows, [f"{source} [{split}] row {i}" for i in range(1, len(rows) + 1)]
    if source == tiny.SFT_DATASET_ID:
        rows = tiny.sft_rows()
        return rows, [f"{source} row {i}" for i in range(1, len(rows) + 1)]
    path = Path(source).expanduser()
    if path.is_file():
        return read_file(path)
    if source.startswith((".", "/", "~")) and not path.exists():
        raise DataError(f"{source}: no such file or folder")
    # A folder goes through the same `load_dataset` code path as a Hub id (splits from file names).
    from datasets import load_dataset

    try:
        ds = load_dataset(source, config, split=split)
    except ValueError as e:
        if "Unknown split" in str(e) or "split" in str(e).lower():
            raise DataError(f"{source}: has no split {split!r} ({e}); set dataset_train_split / "
                            "dataset_test_split to one of its splits") from None
        raise
    return ds.to_list(), [f"{source} [{split}] row {i}" for i in range(1, len(ds) + 1)]


# ------------------------------------------------------------------------------------------- normalising

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_messages(text: str) -> list[dict] | None:
    """Anthropic hh-rlhf transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') as messages, else None."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_implicit(chosen, rejected) -> tuple:
    """Shared prefix of two transcripts = the prompt. Messages split on whole turns; text on a word boundary."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        hc, hr = _hh_messages(chosen), _hh_messages(rejected)
        if hc is not None and hr is not None:
            chosen, rejected = hc, hr
    if isinstance(chosen, list):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        return chosen[:i], chosen[i:], rejected[i:]
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    while i > 0 and not chosen[i - 1].isspace():  # never split a word between prompt and answer
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _check_messages(value, name: str) -> str | None:
    if not value:
        return f"field {name!r} is an empty message list"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"field {name!r} message {j + 1} must be an object with 'role' and 'content'"
        if not isinstance(m["content"], str):
            return f"field {name!r} message {j + 1} has non-string content ({type(m['content']).__name__})"
    return None


def _check(row: dict) -> str | None:
    """The problem with a normalised row, or None."""
    kinds = set()
    for name in ("prompt", "chosen", "rejected"):
        value = row.get(name)
        if isinstance(value, str):
            kinds.add("text")
            if not value.strip() and name != "prompt":
                return f"field {name!r} is empty"
        elif isinstance(value, list):
            kinds.add("messages")
            if name == "prompt" and not value:
                continue  # a bare completion pair has no prompt turns
            problem = _check_messages(value, name)
            if problem:
                return problem
        elif value is None:
            return f"field {name!r} is missing or null"
        else:
            return f"field {name!r} must be a string or a list of messages, got {type(value).__name__}"
    if len(kinds) > 1:
        return "mixes plain strings and message lists; use one layout per row"
    if row["chosen"] == row["rejected"]:
        return "chosen is identical to rejected (no preference to learn)"
    if isinstance(row["chosen"], list):
        for name in ("chosen", "rejected"):
            if row[name][-1]["role"] != "assistant":
                return f"field {name!r} must end with an assistant message"
    return None


def normalize_row(raw, column_map: dict[str, str] | None) -> dict:
    """One raw row -> {"prompt", "chosen", "rejected"} (strings, or message lists). Raises DataError(problem)."""
    if not isinstance(raw, dict):
        raise DataError(f"expected an object with prompt/chosen/rejected, got {type(raw).__name__}")
    if column_map:
        missing = [src for src in column_map.values() if src not in raw]
        if missing:
            raise DataError(f"missing column(s) {missing} named in column_map; columns present: {sorted(raw)}")
        mapped = {dst: raw[src] for dst, src in column_map.items()}
    else:
        mapped = raw
    for name in ("chosen", "rejected"):
        if name not in mapped:
            raise DataError(f"missing column {name!r}; columns present: {sorted(raw)}. Rename the columns or set "
                            "column_map (e.g. '{\"prompt\": \"question\", \"chosen\": \"good\", \"rejected\": \"bad\"}')")
    chosen, rejected = mapped["chosen"], mapped["rejected"]
    system = mapped.get("system")
    if "prompt" in mapped:
        prompt = mapped["prompt"]
        # A text prompt with message-list answers, or a system column: build the conversation.
        if isinstance(prompt, str) and (system is not None or isinstance(chosen, list)):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(prompt, list) and isinstance(chosen, str) and isinstance(rejected, str):
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
    else:
        if not isinstance(chosen, (str, list)) or type(chosen) is not type(rejected):
            raise DataError("without a prompt column, chosen and rejected must both be transcripts (strings or "
                            "message lists)")
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"field 'system' must be a string, got {type(system).__name__}")
        if system.strip() and isinstance(prompt, list):
            prompt = [{"role": "system", "content": system}] + prompt
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    problem = _check(row)
    if problem:
        raise DataError(problem)
    return row


def normalize(raw_rows: list, where: list[str], column_map: dict | None, skip_bad_rows: bool,
              skipped: Skipped) -> list[dict]:
    rows = []
    for raw, place in zip(raw_rows, where):
        try:
            rows.append(normalize_row(raw, column_map))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{place}: {e}; {FIX_SKIP}") from None
            skipped.add(place, str(e))
    if skipped.rows:
        logger.warning("skipped %d bad rows (listed in skipped_rows.jsonl in output_dir)", len(skipped.rows))
    return rows


# --------------------------------------------------------------------------------------------- loading


@dataclass
class Pairs:
    train: Dataset
    eval: Dataset | None
    skipped: Skipped


def _as_fraction(value: str | None) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if not 0 < f < 1:
        raise DataError(f"dataset_test_split={value!r}: a fraction must lie between 0 and 1 (e.g. 0.05)")
    return f


def _to_dataset(rows: list[dict], what: str) -> Dataset:
    if not rows:
        raise DataError(f"{what}: no usable rows")
    return Dataset.from_list(rows)


def load_pairs(args) -> Pairs:
    """Train (and eval) pairs in TRL's preference format from the script arguments (see ScriptArguments)."""
    skipped = Skipped()
    source = args.dataset_name
    raw, where = read_source(source, args.dataset_config, args.dataset_train_split)
    if args.max_train_samples is not None:
        raw, where = raw[: args.max_train_samples], where[: args.max_train_samples]
    rows = normalize(raw, where, args.column_map, args.skip_bad_rows, skipped)

    eval_rows = None
    fraction = _as_fraction(args.dataset_test_split)
    if fraction is None and args.dataset_test_split and not args.eval_dataset_name and Path(source).expanduser().is_file():
        # A single file has no named splits. Hold out a fraction rather than fail, so any recipe (the tiny one
        # names the embedded "test" split) runs on a user's file with just --dataset_name.
        fraction = DEFAULT_EVAL_FRACTION
        logger.warning("%s is a single file with no %r split: holding out %d%% of its rows for eval (set "
                       "dataset_test_split to a fraction to choose, or eval_dataset_name to a file)", source,
                       args.dataset_test_split, round(100 * fraction))
    if args.eval_dataset_name:
        raw_e, where_e = read_source(args.eval_dataset_name, args.dataset_config, args.dataset_test_split or "train")
        eval_rows = normalize(raw_e, where_e, args.column_map, args.skip_bad_rows, skipped)
    elif fraction is not None:
        import random

        order = list(range(len(rows)))
        random.Random(args.dataset_seed).shuffle(order)
        n_eval = max(1, math.floor(len(rows) * fraction))
        held = set(order[:n_eval])
        eval_rows = [rows[i] for i in sorted(held)]
        rows = [r for i, r in enumerate(rows) if i not in held]
    elif args.dataset_test_split:
        raw_e, where_e = read_source(source, args.dataset_config, args.dataset_test_split)
        eval_rows = normalize(raw_e, where_e, args.column_map, args.skip_bad_rows, skipped)
    if eval_rows is not None and args.max_eval_samples is not None:
        eval_rows = eval_rows[: args.max_eval_samples]

    train = _to_dataset(rows, f"{source} [{args.dataset_train_split}]")
    if args.dataset_shuffle_seed is not None:
        train = train.shuffle(seed=args.dataset_shuffle_seed)
    evalset = _to_dataset(eval_rows, f"{source} [eval]") if eval_rows is not None else None
    return Pairs(train, evalset, skipped)


# ------------------------------------------------------------------------------------------ tokenising


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_pairs(batch: dict, tokenizer) -> dict:
    """Untruncated ids for a batch of pairs, exactly as TRL 1.16's DPOTrainer tokenises them.

    Conversational rows go through the chat template (prompt with the generation prompt; prompt + answer);
    text rows get the EOS appended. The answer starts where prompt and prompt + answer diverge. The chat
    template is rendered to text first so the tokenizer can encode a whole batch at once (a fast tokenizer's
    batch call is parallel), which gives the same ids as tokenising inside apply_chat_template.
    """
    prompts, chosens, rejecteds = batch["prompt"], batch["chosen"], batch["rejected"]
    if isinstance(prompts[0], list) or isinstance(chosens[0], list):
        render = tokenizer.apply_chat_template
        p_text = [render(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        c_text = [render(p + c, tokenize=False) for p, c in zip(prompts, chosens)]
        r_text = [render(p + r, tokenize=False) for p, r in zip(prompts, rejecteds)]
        special = False
    else:
        eos = tokenizer.eos_token
        p_text = list(prompts)
        c_text = [p + (c if c.endswith(eos) else c + eos) for p, c in zip(prompts, chosens)]
        r_text = [p + (r if r.endswith(eos) else r + eos) for p, r in zip(prompts, rejecteds)]
        special = True
    enc = lambda texts: tokenizer(texts, add_special_tokens=special)["input_ids"]  # noqa: E731
    p_ids, pc_ids, pr_ids = enc(p_text), enc(c_text), enc(r_text)
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p, pc, pr in zip(p_ids, pc_ids, pr_ids):
        n = min(_common_prefix(p, pc), _common_prefix(p, pr))
        out["prompt_ids"].append(p[:n])
        out["chosen_ids"].append(pc[n:])
        out["rejected_ids"].append(pr[n:])
    return out


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None,
                  max_prompt_length: int | None, bos_id: int | None = None):
    """Fit one pair into max_length. Returns (prompt, chosen, rejected, status).

    An over-long prompt keeps its end (the turn nearest the answer), and its leading BOS if it has one; then
    each answer is cut to what is left of max_length. status is "ok", "truncated" or "dropped" (the prompt
    alone leaves no room for an answer).
    """
    status = "ok"
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and prompt and prompt[0] == bos_id and max_prompt_length > 1
        tail = prompt[len(prompt) - (max_prompt_length - keep_bos):]
        prompt = ([bos_id] if keep_bos else []) + tail
        status = "truncated"
    if max_length is None:
        return prompt, chosen, rejected, status
    room = max_length - len(prompt)
    if room < 1:
        return prompt, chosen, rejected, "dropped"
    if len(chosen) > room or len(rejected) > room:
        chosen, rejected, status = chosen[:room], rejected[:room], "truncated"
    return prompt, chosen, rejected, status


def tokenize_dataset(ds: Dataset, tokenizer, max_length: int | None, max_prompt_length: int | None,
                     num_proc: int | None = None, name: str = "train") -> tuple[Dataset, dict]:
    """Tokenise, truncate and drop what cannot fit; return the dataset TRL trains on and the counts."""
    bos = tokenizer.bos_token_id

    def fn(batch):
        out = tokenize_pairs(batch, tokenizer)
        status = []
        for i in range(len(out["prompt_ids"])):
            p, c, r, s = truncate_pair(out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i],
                                       max_length, max_prompt_length, bos)
            out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i] = p, c, r
            status.append(s)
        out["status"] = status
        return out

    tokenized = ds.map(fn, batched=True, batch_size=256, num_proc=num_proc, remove_columns=ds.column_names,
                       desc=f"Tokenizing {name}")
    status = tokenized["status"]
    counts = {"pairs": len(status), "truncated": status.count("truncated"), "dropped": status.count("dropped")}
    if counts["dropped"]:
        logger.warning("%s: dropped %d of %d pairs whose prompt alone does not fit max_length=%s; set "
                       "max_prompt_length below max_length to keep them", name, counts["dropped"], len(status),
                       max_length)
        tokenized = tokenized.filter(lambda s: s != "dropped", input_columns="status")
    if not len(tokenized):
        raise DataError(f"{name}: every pair was dropped: no prompt fits max_length={max_length}")
    return tokenized.remove_columns("status"), counts
