"""The data pipeline in memory: pairs and tokenised datasets for evaluation sets, tests and small tools.

The stages are training's own, run without the disk: the source read and checked (fastdpo.checks.read_pairs), the
split (fastdpo.splits), then tokenised and truncated (fastdpo.tokens). Training reads the same stages through its
token cache (fastdpo.tokcache.prepare), so a pair has the same ids here as in training.

    pairs = data.load_pairs(spec, tokenizer)         # a DataSpec (or script arguments)
    ds, counts = data.tokenize_dataset(pairs.train, tokenizer, max_length, max_prompt_length)
"""

from __future__ import annotations

import logging

from datasets import Dataset

from . import checks, splits, tokens
from .dataspec import DataSpec
from .errors import DataError, Skipped

logger = logging.getLogger(__name__)


def load_pairs(spec, tokenizer=None) -> splits.Split:
    """Train (and eval) pairs in TRL's preference form, in memory.

    `spec`: a DataSpec, or script arguments (read by DataSpec.of). `tokenizer` decides how implicit-prompt
    transcripts are read (fastdpo.checks.normalize_row); None = with a template.
    """
    spec = DataSpec.of(spec)
    if spec.mixture is not None:  # its plan needs every source's pairs: fastdpo.tokcache.prepare reads it
        raise DataError("a mixture (datasets:) is read through the token cache (tokcache.prepare), not in memory")
    templated, skipped = tokens.templated(tokenizer), Skipped()
    source = spec.train.open()
    evals = splits.eval_spec(spec, source)
    logger.info("%s: %s", spec.train.name, evals.note)
    train, layout = checks.read_pairs(spec.train, templated, spec.policy, skipped)
    if layout is not None:
        logger.info("%s: layout %s", spec.train.name, layout.describe())
    held = None
    if evals.source is not None:
        held, _ = checks.read_pairs(spec.eval_source(evals.source, evals.split), templated, spec.policy, skipped)
    trainset, evalset, _ = splits.split_rows(spec, evals, train.pairs, train.where, held.pairs if held else None,
                                             held.where if held else None)
    return splits.Split(trainset, evalset, skipped, train.notes.merge(held.notes) if held else train.notes)


def tokenize_dataset(ds: Dataset, tokenizer, max_length: int | None, max_prompt_length: int | None,
                     num_proc: int | None = None, name: str = "train") -> tuple[Dataset, dict]:
    """Tokenise, truncate and drop what cannot fit, in memory; return the dataset TRL trains on and the counts."""
    encode = tokens.encoder(tokenizer)

    def fn(batch):
        _, out, status = tokens.tokenize_truncated(batch, tokenizer, encode, max_length, max_prompt_length)
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
