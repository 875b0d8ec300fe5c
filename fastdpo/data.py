"""Preference data: any supported source -> TRL's preference form -> token ids; the split (eval, dedup) shared by DPO
and SFT.

Layers, imports running one way: fastdpo.errors (row errors, notes) -> fastdpo.files -> fastdpo.sources (raw rows
with their places) -> fastdpo.layouts (detect the layout once per source, convert each row) -> this module
(tokenise exactly as TRL 1.16 does, truncate, split) -> fastdpo.tokcache (the on-disk cache training reads).
Training, the dataset analyzer and scripts/evaluate.py all go through `layouts` and `tokenize_pairs`, so they see
identical tokens by construction.

A row that cannot be read (invalid UTF-8, malformed JSON, a CSV record with the wrong field count), has a
structural problem, or has roles no chat template can render is a row error: it fails with its place and the fix,
or is skipped and listed with --skip_bad_rows. Oddities with a rule (merged turns, empty answers, chosen =
rejected) are counted with their first places (fastdpo.errors.Notes).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field

from datasets import Dataset

from . import layouts
from .errors import FIX_SKIP, NOTE_TEXT, DataError, Notes, Skipped, TemplateMissing
from .sources import Source, decode, open_source

logger = logging.getLogger(__name__)

DEFAULT_EVAL_FRACTION = 0.1
NO_EVAL = ("", "none", "null", "no")  # dataset_test_split values that mean "no eval split"
DEDUP = ("eval", "all", "none")


# ------------------------------------------------------------------------------------------- normalising


def normalize_row(raw, column_map: dict[str, str] | None = None, templated: bool = True,
                  layout: layouts.Layout | None = None) -> dict:
    """One raw row -> {"prompt", "chosen", "rejected"} (strings, or message lists), its layout detected from the row
    itself unless given. Raises DataError(problem), also for a row that gives no pair (chosen = rejected).

    `templated`: the tokenizer has a chat template. Without one, implicit-prompt transcripts stay raw text, and a
    conversational row raises TemplateMissing (a setup error, not a bad row).
    """
    layout = layout or layouts.detect(raw, layouts.Options(column_map))
    pairs, notes = layout.convert(raw, templated)
    if not pairs:
        raise DataError(NOTE_TEXT.get(notes[0], notes[0]) if notes else "no pair in this row")
    return pairs[0]


@dataclass
class Converted:
    """Pairs of a run of raw rows, with their places, and what happened to the rows on the way."""

    pairs: list = field(default_factory=list)
    where: list = field(default_factory=list)
    notes: Notes = field(default_factory=Notes)
    unused_text: set = field(default_factory=set)  # unread columns that held text in some row
    empty_prompts: int = 0
    rows_with_pairs: int = 0
    no_pair: list = field(default_factory=list)  # {"where", "problem"} of every row that gave no pair


def convert_rows(items, places, layout: layouts.Layout | None, templated: bool, errors: list) -> Converted:
    """Raw items of a batch -> pairs through `layout`; row errors (unreadable, not a pair) go to `errors` as
    (where, problem). A row that gives several pairs (ranked data) has places `where (pair k of n)`."""
    out = Converted()
    used = layout.used() if layout is not None else set()
    for item, where in zip(items, places, strict=True):
        try:
            row = decode(item)
            if layout is None:
                raise DataError(f"expected an object with the columns of a preference pair, got {type(row).__name__}")
            pairs, notes = layout.convert(row, templated)
        except TemplateMissing as e:
            raise TemplateMissing(f"{where}: {e}") from None
        except DataError as e:
            errors.append((where, str(e)))
            continue
        for kind in notes:
            out.notes.add(kind, where)
        if not pairs:
            out.no_pair.append({"where": where, "problem": NOTE_TEXT.get(notes[0], notes[0]) if notes else "no pair"})
        if isinstance(row, dict):
            out.unused_text.update(k for k, v in row.items() if k not in used and layouts.any_text(v))
        out.rows_with_pairs += bool(pairs)
        for k, pair in enumerate(pairs, start=1):
            out.pairs.append(pair)
            out.where.append(where if len(pairs) == 1 else f"{where} (pair {k} of {len(pairs)})")
            out.empty_prompts += not pair["prompt"]
    return out


def check_prompts(layout: layouts.Layout | None, pairs: int, empty_prompts: int, unused_text, label: str) -> str | None:
    """A source whose prompts come out empty for most pairs while it has unread text columns (any non-empty string
    or messages) trains answers without their questions: the refusal, or None."""
    if layout is None or not pairs or empty_prompts * 2 <= pairs or not unused_text:
        return None
    cols = sorted(unused_text)
    return (f"{label}: {empty_prompts:,} of {pairs:,} pairs have an empty prompt (layout {layout.describe()}) while "
            f"column(s) {cols} hold text that is not read; if {cols[0]!r} is the prompt, set column_map "
            f"'{{\"prompt\": \"{cols[0]}\"}}', otherwise drop the column(s) from the data")


def layout_note(templated: bool) -> str:
    """What happens to implicit-prompt transcripts with this tokenizer (logged once per run)."""
    if templated:
        return "chat template: messages rendered through it; Human/Assistant transcripts become messages"
    return ("no chat template: plain-text rows tokenised as raw text; implicit-prompt transcripts split by TRL's "
            "extract_prompt (as stock TRL does)")


def pair_hash(row: dict) -> bytes:
    """16 bytes identifying a normalised pair (duplicates, eval rows that also occur in train)."""
    import xxhash

    blob = json.dumps([row["prompt"], row["chosen"], row["rejected"]], ensure_ascii=False, sort_keys=True)
    return xxhash.xxh3_128_digest(blob.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------------------- small-data API (in memory)


def read_source(source: str, config: str | None = None, split: str = "train", limit: int | None = None,
                skipped: Skipped | None = None) -> tuple[list, list[str]]:
    """Rows of a split as one list (SFT data, evaluation sets, tests), with where each came from. Rows that
    cannot be read fail with their place, or go to `skipped` when one is given."""
    rows, where = [], []
    for batch in open_source(source, config, split).batches(limit):
        for item, place in zip(batch.items, batch.where, strict=True):
            try:
                rows.append(decode(item))
            except DataError as e:
                if skipped is None:
                    raise DataError(f"{place}: {e}; {FIX_SKIP}") from None
                skipped.add(place, str(e))
                continue
            where.append(place)
    return rows, where


def read_pairs(source: str, options: layouts.Options, templated: bool, config: str | None = None,
               split: str = "train", limit: int | None = None, skip_bad_rows: bool = False,
               skipped: Skipped | None = None) -> tuple[Converted, layouts.Layout | None]:
    """Pairs of a split in memory (evaluation sets, the analyzer's sample, tests): detect, convert, account. Row
    errors fail with their place, or go to `skipped` with skip_bad_rows."""
    src = open_source(source, config, split)
    layout, batches = layouts.detect_source(src.batches(limit), options)
    out = Converted()
    for batch in batches:
        errors: list = []
        got = convert_rows(batch.items, batch.where, layout, templated, errors)
        for where, problem in errors:
            if not skip_bad_rows:
                raise DataError(f"{where}: {problem}; {FIX_SKIP}")
            if skipped is not None:
                skipped.add(where, problem)
        out.pairs += got.pairs
        out.where += got.where
        out.notes.merge(got.notes)
        out.unused_text |= got.unused_text
        out.empty_prompts += got.empty_prompts
        out.rows_with_pairs += got.rows_with_pairs
        out.no_pair += got.no_pair
    refusal = check_prompts(layout, len(out.pairs), out.empty_prompts, out.unused_text, src.label)
    if refusal:
        raise DataError(refusal)
    return out, layout


@dataclass
class Pairs:
    train: Dataset
    eval: Dataset | None
    skipped: Skipped
    notes: Notes = field(default_factory=Notes)


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


@dataclass
class EvalSpec:
    """Where eval pairs come from: nowhere, a held-out fraction of the train rows, or another split/source."""

    fraction: float | None = None
    source: str | None = None
    split: str | None = None
    note: str = ""


def eval_spec(args, train_source: Source | None = None) -> EvalSpec:
    """Decided before any row is read, so a bad value fails in seconds, not after tokenising."""
    if getattr(args, "dedup", "eval") not in DEDUP:
        raise DataError(f"dedup={args.dedup!r}: expected one of {', '.join(DEDUP)} (eval drops eval pairs that also "
                        "occur in train, all also repeats within a split, none keeps everything)")
    test = args.dataset_test_split
    if args.eval_dataset_name:
        split = test if test and test.strip().lower() not in NO_EVAL and _as_fraction(test) is None else "train"
        return EvalSpec(source=args.eval_dataset_name, split=split,
                        note=f"eval pairs from {args.eval_dataset_name} [{split}]")
    if test is None or test.strip().lower() in NO_EVAL:
        return EvalSpec(note=f"no eval split (dataset_test_split={test!r}): training without evaluation")
    fraction = _as_fraction(test)
    if fraction is not None:
        return EvalSpec(fraction=fraction, note=f"holding out {fraction:g} of the train rows for eval "
                                                f"(dataset_seed {args.dataset_seed})")
    if train_source is None:
        train_source = open_source(args.dataset_name, args.dataset_config, args.dataset_train_split)
    if train_source.single_file:
        # A single file has no named splits. Hold out a fraction rather than fail, so any recipe (the tiny one
        # names the embedded "test" split) runs on a user's file with just --dataset_name.
        logger.warning("%s is a single file with no %r split: holding out %d%% of its rows for eval (set "
                       "dataset_test_split to a fraction to choose, none for no eval, or eval_dataset_name to a "
                       "file)", args.dataset_name, test, round(100 * DEFAULT_EVAL_FRACTION))
        return EvalSpec(fraction=DEFAULT_EVAL_FRACTION, note=f"holding out {DEFAULT_EVAL_FRACTION:g} of the "
                        f"train rows for eval (dataset_seed {args.dataset_seed})")
    return EvalSpec(source=args.dataset_name, split=test, note=f"eval pairs from {args.dataset_name} [{test}]")


@dataclass
class SplitPlan:
    """Which rows train and evaluate, and why the others do not (every row accounted for)."""

    train: list[int]  # indices into the train source's rows, in order
    eval: list[int] | None  # indices into the eval rows: the train source's (held out) or the eval source's
    eval_from_train: bool
    removed: list[tuple[str, int, str]] = field(default_factory=list)  # (source "train"/"eval", index, problem)
    repeats: dict = field(default_factory=lambda: {"train": 0, "eval": 0, "eval_in_train": 0})
    unused: list[int] = field(default_factory=list)  # eval rows beyond max_eval_samples


def plan_splits(args, spec: EvalSpec, train_hashes: list[bytes], eval_hashes: list[bytes] | None,
                train_where, eval_where) -> SplitPlan:
    """Split, deduplicate and cap. `dedup`: "eval" (default) drops eval pairs that also occur in train; "all" also
    drops repeats within each split (the first stays); "none" keeps everything. Repeats are counted either way."""
    mode = getattr(args, "dedup", "eval")
    n = len(train_hashes)
    train, evals, from_train = list(range(n)), None, False
    if spec.fraction is not None:
        order = list(range(n))
        random.Random(args.dataset_seed).shuffle(order)
        held = set(order[: max(1, math.floor(n * spec.fraction))])
        evals, from_train = sorted(held), True
        train = [i for i in train if i not in held]
    elif spec.source is not None:
        evals = list(range(len(eval_hashes)))
    plan = SplitPlan(train, evals, from_train)
    e_hashes, e_where = (train_hashes, train_where) if from_train else (eval_hashes, eval_where)

    def repeats(indices, hashes, where, kind, src):
        first, keep = {}, []
        for i in indices:
            j = first.setdefault(hashes[i], i)
            if j != i:
                plan.repeats[kind] += 1
                if mode == "all":
                    plan.removed.append((src, i, f"repeats the pair at {where[j]}"))
                    continue
            keep.append(i)
        return keep, first

    plan.train, seen = repeats(plan.train, train_hashes, train_where, "train", "train")
    if plan.eval is not None:
        src = "train" if from_train else "eval"
        plan.eval, _ = repeats(plan.eval, e_hashes, e_where, "eval", src)
        keep = []
        for i in plan.eval:
            j = seen.get(e_hashes[i])
            if j is not None:
                plan.repeats["eval_in_train"] += 1
                if mode != "none":
                    plan.removed.append((src, i, f"eval pair also in train at {train_where[j]} (dedup: none keeps it)"))
                    continue
            keep.append(i)
        plan.eval = keep
        if args.max_eval_samples is not None:
            plan.eval, plan.unused = plan.eval[: args.max_eval_samples], plan.eval[args.max_eval_samples:]
    return plan


def load_pairs(args, tokenizer=None) -> Pairs:
    """Train (and eval) pairs in TRL's preference form, in memory (evaluation sets, tests). Training at scale goes
    through fastdpo.tokcache.prepare, which streams the same reading, checks and split to a disk cache.

    `tokenizer` decides how implicit-prompt transcripts are read (see `normalize_row`); None = with a template.
    """
    templated = tokenizer is None or bool(getattr(tokenizer, "chat_template", None))
    skipped = Skipped()
    options = layouts.Options.of(args)
    source = open_source(args.dataset_name, args.dataset_config, args.dataset_train_split)
    spec = eval_spec(args, source)
    logger.info("%s: %s", args.dataset_name, spec.note)
    train, layout = read_pairs(args.dataset_name, options, templated, args.dataset_config, args.dataset_train_split,
                               args.max_train_samples, args.skip_bad_rows, skipped)
    if layout is not None:
        logger.info("%s: layout %s", args.dataset_name, layout.describe())
    evals = None
    if spec.source is not None:
        evals, _ = read_pairs(spec.source, options, templated, args.dataset_config, spec.split, None,
                              args.skip_bad_rows, skipped)
    plan = plan_splits(args, spec, [pair_hash(r) for r in train.pairs],
                       [pair_hash(r) for r in evals.pairs] if evals is not None else None, train.where,
                       evals.where if evals is not None else None)
    pool = train.pairs if plan.eval_from_train or evals is None else evals.pairs
    trainset = _to_dataset([train.pairs[i] for i in plan.train], f"{args.dataset_name} [{args.dataset_train_split}]")
    if args.dataset_shuffle_seed is not None:
        trainset = trainset.shuffle(seed=args.dataset_shuffle_seed)
    evalset = None
    if plan.eval is not None:
        check_eval_left(plan, spec)
        evalset = _to_dataset([pool[i] for i in plan.eval], f"{args.dataset_name} [eval]")
    return Pairs(trainset, evalset, skipped, train.notes.merge(evals.notes) if evals else train.notes)


def check_eval_left(plan: SplitPlan, spec: EvalSpec) -> None:
    if plan.eval is not None and not plan.eval and plan.repeats["eval_in_train"]:
        raise DataError(f"{spec.source or 'the held-out rows'} [eval]: every eval pair also occurs in train "
                        f"({plan.repeats['eval_in_train']}), so none is left to evaluate on; use other eval rows, "
                        "or pass --dedup none to keep them")


# ------------------------------------------------------------------------------------------ tokenising


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _encoder(tokenizer):
    """texts, add_special_tokens -> ids, the same ids as `tokenizer(texts)["input_ids"]`.

    For a plain fast tokenizer this calls the backend's `encode_batch_fast` (no character offsets: ~15-20% less
    CPU than `encode_batch`) after the same set-up `__call__` does (no truncation or padding, its special-token
    splitting). Tokenizers that customise encoding in Python keep the ordinary call.
    """
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the ordinary call is always right
        TokenizersBackend = None
    backend = getattr(tokenizer, "_tokenizer", None)
    plain = (TokenizersBackend is not None and isinstance(tokenizer, TokenizersBackend)
             and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
             and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
             and not hasattr(tokenizer, "_switch_to_input_mode") and hasattr(backend, "encode_batch_fast"))
    if not plain:
        return lambda texts, special: tokenizer(texts, add_special_tokens=special)["input_ids"]

    from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

    def encode(texts, special):
        tokenizer.set_truncation_and_padding(PaddingStrategy.DO_NOT_PAD, TruncationStrategy.DO_NOT_TRUNCATE,
                                             None, 0, None, None)
        if backend.encode_special_tokens != tokenizer.split_special_tokens:
            backend.encode_special_tokens = tokenizer.split_special_tokens
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]

    return encode


def tokenize_pairs(batch: dict, tokenizer, encode=None) -> dict:
    """Untruncated ids for a batch of pairs, exactly as TRL 1.16's DPOTrainer tokenises them.

    Conversational rows go through the chat template (prompt with the generation prompt; prompt + answer);
    text rows get the EOS appended and the tokenizer's special tokens. The answer starts where prompt and
    prompt + answer diverge. Templates are rendered to text for the whole batch and encoded in one call, which
    gives the same ids as tokenising inside apply_chat_template (it renders, then encodes without special tokens).
    """
    encode = encode or _encoder(tokenizer)
    prompts, chosens, rejecteds = batch["prompt"], batch["chosen"], batch["rejected"]
    n = len(prompts)
    conv = [i for i in range(n) if isinstance(prompts[i], list) or isinstance(chosens[i], list)]
    text = [i for i in range(n) if not (isinstance(prompts[i], list) or isinstance(chosens[i], list))]
    ids: list = [None] * n
    if conv:
        render = tokenizer.apply_chat_template
        p_text = render([prompts[i] for i in conv], tokenize=False, add_generation_prompt=True)
        c_text = render([prompts[i] + chosens[i] for i in conv], tokenize=False)
        r_text = render([prompts[i] + rejecteds[i] for i in conv], tokenize=False)
        out = encode(p_text + c_text + r_text, False)
        k = len(conv)
        for j, i in enumerate(conv):
            ids[i] = (out[j], out[k + j], out[2 * k + j])
    if text:
        eos = tokenizer.eos_token
        p_text = [prompts[i] for i in text]
        c_text = [prompts[i] + (chosens[i] if chosens[i].endswith(eos) else chosens[i] + eos) for i in text]
        r_text = [prompts[i] + (rejecteds[i] if rejecteds[i].endswith(eos) else rejecteds[i] + eos) for i in text]
        out = encode(p_text + c_text + r_text, True)
        k = len(text)
        for j, i in enumerate(text):
            ids[i] = (out[j], out[k + j], out[2 * k + j])
    result = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p, pc, pr in ids:
        m = min(_common_prefix(p, pc), _common_prefix(p, pr))
        result["prompt_ids"].append(p[:m])
        result["chosen_ids"].append(pc[m:])
        result["rejected_ids"].append(pr[m:])
    return result


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
    """Tokenise, truncate and drop what cannot fit, in memory; return the dataset TRL trains on and the counts.

    The small-data path (evaluation sets, tests); training goes through fastdpo.tokcache, which produces the same
    rows through the same functions, streamed and cached on disk.
    """
    bos = tokenizer.bos_token_id
    encode = _encoder(tokenizer)

    def fn(batch):
        out = tokenize_pairs(batch, tokenizer, encode)
        status = []
        for i in range(len(out["prompt_ids"])):
            p, c, r, s = truncate_pair(out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i],
                                       max_length, max_prompt_length, bos)
            out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i] = p, c, r
            status.append(s)
        out["status"] = status
        return out

    tokenized = ds.map(fn, batched=True, batch_size=256, num_proc=num_proc if num_proc and num_proc > 1 else None,
                       remove_columns=ds.column_names, desc=f"Tokenizing {name}")
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
