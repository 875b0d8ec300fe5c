"""Splits: which rows train and which evaluate, DPO pairs and SFT rows alike, in memory and from the token cache.

The eval spec is decided before any row is read (a bad value fails in seconds, not after tokenising): nowhere, a
seeded fraction held out of the train rows, or another split or source. The plan works on content hashes: it holds
out, drops eval rows that also occur in train (and, with dedup all, repeats within a split), caps the eval rows at
max_eval_samples, and says why each row left out was left out, so every row is accounted for.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field

import numpy as np
import xxhash
from datasets import Dataset

from . import tokens
from .dataspec import DataSpec
from .errors import DataError, Notes, Skipped
from .sources import Source

logger = logging.getLogger(__name__)

DEFAULT_EVAL_FRACTION = 0.1
NO_EVAL = ("", "none", "null", "no")  # dataset_test_split values that mean "no eval split"
DEDUP = ("eval", "all", "none")


@dataclass
class EvalSpec:
    """Where eval pairs come from: nowhere, a held-out fraction of the train rows, or another split/source."""

    fraction: float | None = None
    source: str | None = None
    split: str | None = None
    note: str = ""


def _as_fraction(value: str | None) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if not 0 < f < 1:
        raise DataError(f"dataset_test_split={value!r}: a fraction must lie between 0 and 1 (e.g. 0.05)")
    return f


def eval_spec(spec: DataSpec, train_source: Source | None = None) -> EvalSpec:
    """Decided before any row is read, so a bad value fails in seconds, not after tokenising."""
    if spec.dedup not in DEDUP:
        raise DataError(f"dedup={spec.dedup!r}: expected one of {', '.join(DEDUP)} (eval drops eval pairs that also "
                        "occur in train, all also repeats within a split, none keeps everything)")
    test, name = spec.test_split, spec.train.name
    if spec.eval_name:
        split = test if test and test.strip().lower() not in NO_EVAL and _as_fraction(test) is None else "train"
        return EvalSpec(source=spec.eval_name, split=split, note=f"eval pairs from {spec.eval_name} [{split}]")
    if test is None or test.strip().lower() in NO_EVAL:
        return EvalSpec(note=f"no eval split (dataset_test_split={test!r}): training without evaluation")
    fraction = _as_fraction(test)
    if fraction is not None:
        return EvalSpec(fraction=fraction, note=f"holding out {fraction:g} of the train rows for eval "
                                                f"(dataset_seed {spec.seed})")
    if train_source is None:
        train_source = spec.train.open()
    if train_source.single_file:
        # A single file has no named splits. Hold out a fraction rather than fail, so any recipe (the tiny one
        # names the embedded "test" split) runs on a user's file with just --dataset_name.
        logger.warning("%s is a single file with no %r split: holding out %d%% of its rows for eval (set "
                       "dataset_test_split to a fraction to choose, none for no eval, or eval_dataset_name to a "
                       "file)", name, test, round(100 * DEFAULT_EVAL_FRACTION))
        return EvalSpec(fraction=DEFAULT_EVAL_FRACTION, note=f"holding out {DEFAULT_EVAL_FRACTION:g} of the "
                        f"train rows for eval (dataset_seed {spec.seed})")
    return EvalSpec(source=name, split=test, note=f"eval pairs from {name} [{test}]")


@dataclass
class SplitPlan:
    """Which rows train and evaluate, and why the others do not (every row accounted for)."""

    train: list[int]  # indices into the train source's rows, in order
    eval: list[int] | None  # indices into the eval rows: the train source's (held out) or the eval source's
    eval_from_train: bool
    removed: list[tuple[str, int, str]] = field(default_factory=list)  # (source "train"/"eval", index, problem)
    repeats: dict = field(default_factory=lambda: {"train": 0, "eval": 0, "eval_in_train": 0})
    unused: list[int] = field(default_factory=list)  # eval rows beyond max_eval_samples


def plan_splits(spec: DataSpec, evals: EvalSpec, train_hashes: list[bytes], eval_hashes: list[bytes] | None,
                train_where, eval_where) -> SplitPlan:
    """Split, deduplicate and cap. `dedup`: "eval" (default) drops eval pairs that also occur in train; "all" also
    drops repeats within each split (the first stays); "none" keeps everything. Repeats are counted either way."""
    n = len(train_hashes)
    train, held, from_train = list(range(n)), None, False
    if evals.fraction is not None and n and n - max(1, math.floor(n * evals.fraction)) < 1:
        logger.warning("%s: %d pair%s too few to hold out %g%% for eval: training without evaluation (set "
                       "eval_dataset_name to evaluate on another file)", spec.train.label, n,
                       " is" if n == 1 else "s are", 100 * evals.fraction)
    elif evals.fraction is not None:
        order = list(range(n))
        random.Random(spec.seed).shuffle(order)
        chosen = set(order[: max(1, math.floor(n * evals.fraction))])
        held, from_train = sorted(chosen), True
        train = [i for i in train if i not in chosen]
    elif evals.source is not None:
        held = list(range(len(eval_hashes)))
    plan = SplitPlan(train, held, from_train)
    e_hashes, e_where = (train_hashes, train_where) if from_train else (eval_hashes, eval_where)
    plan.train, seen = _repeats(plan, spec.dedup, plan.train, train_hashes, train_where, "train", "train")
    if plan.eval is not None:
        src = "train" if from_train else "eval"
        plan.eval, _ = _repeats(plan, spec.dedup, plan.eval, e_hashes, e_where, "eval", src)
        keep = []
        for i in plan.eval:
            j = seen.get(e_hashes[i])
            if j is not None:
                plan.repeats["eval_in_train"] += 1
                if spec.dedup != "none":
                    plan.removed.append((src, i, f"eval pair also in train at {train_where[j]} (dedup: none keeps it)"))
                    continue
            keep.append(i)
        plan.eval = keep
        if spec.max_eval_samples is not None:
            plan.eval, plan.unused = plan.eval[: spec.max_eval_samples], plan.eval[spec.max_eval_samples:]
    return plan


def _repeats(plan: SplitPlan, mode: str, indices, hashes, where, kind: str, src: str):
    """(indices kept, hash -> first index): repeats counted under `kind`, and with dedup all removed (the first
    stays)."""
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


def check_eval_left(plan: SplitPlan, evals: EvalSpec) -> None:
    if plan.eval is not None and not plan.eval and plan.repeats["eval_in_train"]:
        raise DataError(f"{evals.source or 'the held-out rows'} [eval]: every eval pair also occurs in train "
                        f"({plan.repeats['eval_in_train']}), so none is left to evaluate on; use other eval rows, "
                        "or pass --dedup none to keep them")


def _digest(obj) -> bytes:
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True)
    return xxhash.xxh3_128_digest(blob.encode("utf-8", "surrogatepass"))


def pair_hash(row: dict) -> bytes:
    """16 bytes identifying a normalised pair (duplicates, eval rows that also occur in train); pairs that differ
    only in their tools or chat template keywords are different pairs."""
    extras = [row.get(k) for k in tokens.EXTRAS]
    return _digest([row["prompt"], row["chosen"], row["rejected"]] + (extras if any(x is not None for x in extras)
                                                                       else []))


def row_hash(row: dict) -> bytes:
    """16 bytes identifying a whole row (SFT rows: messages, or prompt and completion)."""
    return _digest(row)


def shuffle_order(n: int, seed: int) -> np.ndarray:
    """The permutation `datasets.Dataset.shuffle(seed=seed)` draws for n rows, for rows that are not a Dataset."""
    return np.random.default_rng(seed).permutation(n)


def to_dataset(rows: list[dict], what: str) -> Dataset:
    if not rows:
        raise DataError(f"{what}: no usable rows")
    return Dataset.from_list(tokens.storable(rows))  # tools and calls as JSON text (fastdpo.tokens)


@dataclass
class Split:
    """Train and eval datasets in memory, and the rows read that are in neither."""

    train: Dataset
    eval: Dataset | None
    skipped: Skipped
    notes: Notes = field(default_factory=Notes)


def split_rows(spec: DataSpec, evals: EvalSpec, rows: list, where: list, eval_rows: list | None,
               eval_where: list | None, hash_of=pair_hash) -> tuple[Dataset, Dataset | None, SplitPlan]:
    """Rows read in memory -> (train dataset, eval dataset or None, the plan), by `plan_splits`; the train rows
    shuffled once with dataset_shuffle_seed."""
    plan = plan_splits(spec, evals, [hash_of(r) for r in rows],
                       [hash_of(r) for r in eval_rows] if eval_rows is not None else None, where, eval_where)
    check_eval_left(plan, evals)
    pool = rows if plan.eval_from_train or eval_rows is None else eval_rows
    train = to_dataset([rows[i] for i in plan.train], spec.train.label)
    if spec.shuffle_seed is not None:
        train = train.shuffle(seed=spec.shuffle_seed)
    evalset = None
    if plan.eval is not None:
        evalset = to_dataset([pool[i] for i in plan.eval], f"{spec.train.name} [eval]")
    return train, evalset, plan
