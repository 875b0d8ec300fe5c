"""Data that is not preference pairs, named for what it is once every layout has declined, with what would make
pairs of it: KTO rows (one answer and a true/false verdict) and answer pairs no judge has labelled yet."""

from __future__ import annotations

from .judged import answer_columns
from .layout import Layout, NotPairs
from .messages import is_messages
from .pairs import CONVERSATION_COLUMNS, QUESTION_COLUMNS


def detect(row, keys, tags, options, where) -> Layout | None:
    """Raises NotPairs for KTO rows or unlabelled answer pairs; None for anything else."""
    if isinstance(row.get("label"), bool):
        answer = "completion" if "completion" in keys else next(
            (k for k in CONVERSATION_COLUMNS if k in keys and is_messages(row[k])), None)
        if answer is not None:
            held = "'completion'" if answer == "completion" else f"the last turn of {answer!r}"
            raise NotPairs(
                f"{where}: KTO data, not preference pairs: each row holds one answer ({held}) with a true/false "
                "verdict in 'label' (the unpaired layout TRL's KTOTrainer trains on). DPO learns from two answers to "
                "the same prompt, one preferred over the other. Train this data with a KTO trainer, or build pairs "
                "first: a preferred and a dispreferred answer to the same prompt in one row as chosen and rejected "
                "(rows with the same prompt and opposite labels can be paired that way)")
    answers = answer_columns(row, keys, set())
    prompt = next((k for k in ("prompt",) + QUESTION_COLUMNS if k in keys), None)
    if answers and prompt is not None:
        a, b = answers
        raise NotPairs(
            f"{where}: unlabelled answer pairs: {a!r} and {b!r} hold two answers to {prompt!r} but no column says "
            "which is better (no label, preference or score). Training them as preferences would teach an arbitrary "
            "direction. Judge the pairs first (human raters, or an LLM judge such as alpaca_eval's annotate_pairs), "
            "add the verdict as a label column (e.g. preference: 1 or 2, 0 for a tie), then set judged_pairs: true")
    return None
