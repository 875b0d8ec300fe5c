"""The judged family: a question, two answers and a judge's label naming the better one or a tie (FastChat's judged
pairs, Chatbot Arena), made into pairs with `judged_pairs`: the winner chosen, the other rejected. Ties and
unlabelled rows give no pair and are counted."""

from __future__ import annotations

import re

from ..errors import DataError
from .assemble import assemble
from .layout import Layout, NeedsOption, get_path
from .messages import is_messages
from .pairs import QUESTION_COLUMNS

LABEL_COLUMNS = ("grade", "winner", "preference", "label", "choice", "better")
TIE_LABELS = {"tie", "draw", "equal", "same", "tie (bothbad)", "both_bad", "bothbad", "both bad", "neither"}
JUDGE_WORDS = {"raw", "judge", "judgment", "judgement", "explanation", "reason", "critique"}  # the judge's own text
ANSWER_WORDS = ("response", "answer", "output", "completion", "conversation")


def answer_columns(row: dict, keys, exclude: set) -> list[str]:
    """The two columns holding the answers a judge compared (response_a / output_1 / conversation_b / ...), in
    name order; [] unless exactly two, told apart by their tags."""
    answers = [k for k in sorted(keys) if k not in exclude and _tag(k) != k.lower() and _tag(k) not in JUDGE_WORDS
               and any(w in k.lower() for w in ANSWER_WORDS) and (isinstance(row[k], str) or is_messages(row[k]))]
    return answers if len(answers) == 2 and _tag(answers[0]) != _tag(answers[1]) else []


def detect(row, keys, tags, options, where) -> Layout | None:
    """Two answers and a judge's label naming the better one (or a tie): FastChat's judged pairs, Chatbot Arena."""
    label = next((k for k in LABEL_COLUMNS if k in keys and (row[k] is None or isinstance(row[k], str))), None)
    if label is None:
        return None
    answers = answer_columns(row, keys, {label})
    if not answers:
        return None
    if not options.judged_pairs:
        raise NeedsOption(f"{where}: judged pairs: columns {answers[0]!r} and {answers[1]!r} with the judge's verdict "
                        f"in {label!r}, not chosen/rejected. Set judged_pairs: true in the recipe (or --judged_pairs "
                        "true): the winner becomes chosen, the other rejected; ties and unlabelled rows give no pair "
                        "and are counted")
    prompt = next((k for k in ("prompt",) + QUESTION_COLUMNS if k in keys and isinstance(row[k], (str, list))), None)
    question = prompt if prompt != "prompt" else None
    cols = {"prompt": prompt if prompt == "prompt" else None, "question": question,
            "input": "input" if question and "input" in keys else None,
            "history": "history" if question and "history" in keys else None,
            "label": label, "a": answers[0], "b": answers[1], "system": "system" if "system" in keys else None}
    return Layout("judged", cols, tags, label_values=((_tag(answers[0]), answers[0]), (_tag(answers[1]), answers[1])),
                  first_place=where, converter=convert)


def convert(layout: Layout, row: dict, templated: bool) -> tuple[list[dict], list[str]]:
    """One judged row -> ([pair] or [], notes): the winner chosen, the other rejected."""
    label = layout.get(row, "label", required=False)
    if label is None or (isinstance(label, str) and not label.strip()):
        return [], ["unlabelled"]
    tag = _tag(str(label))
    if str(label).strip().lower() in TIE_LABELS or tag in TIE_LABELS:
        return [], ["tie"]
    winners = dict(layout.label_values)
    if tag not in winners:
        raise DataError(f"field {layout.columns['label']!r} is {label!r}: expected one of "
                        f"{', '.join(repr(v) for v in winners)} (the answer that won) or a tie "
                        f"({', '.join(sorted(TIE_LABELS)[:3])}, ...)")
    win = winners[tag]
    lose = next(c for c in winners.values() if c != win)
    prompt = layout.prompt(row)
    chosen = layout.value(get_path(row, win), win)
    rejected = layout.value(get_path(row, lose), lose)
    return assemble(prompt, chosen, rejected, layout.system(row), templated,
                    {"prompt": layout.columns.get("prompt") or layout.columns.get("question") or "prompt",
                     "chosen": win, "rejected": lose})


def _tag(name: str) -> str:
    """What names an answer in a judge's label: base_response -> base, response_a / conversation_a / model_a -> a,
    response1 / response_1 / output_1 / response 1 -> 1."""
    words = [w for w in re.split(r"[\W_]+|(?<=[a-z])(?=\d)", name.lower()) if w and w not in
             ("response", "responses", "answer", "output", "completion", "conversation", "model", "reply")]
    return "_".join(words) or name.lower().strip()
