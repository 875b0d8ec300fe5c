"""The explicit-pair family: a chosen and a rejected column, with the prompt beside them (standard,
conversational), inside whole conversations (h4), in a conversation column (sharegpt), in OpenAI's `input.messages`
(openai), in a question column (question), or only as the answers' shared start (implicit)."""

from __future__ import annotations

from ..errors import DataError
from .assemble import assemble
from .layout import Layout, has_path
from .messages import is_messages, role_of, starts_with_user

# Column names of the pair, most specific first: (chosen, rejected)
ANSWER_COLUMNS = [("chosen", "rejected"), ("chosen_messages", "rejected_messages"),
                  ("response_chosen", "response_rejected"), ("chosen_response", "rejected_response"),
                  ("preferred_output", "non_preferred_output")]
CONVERSATION_COLUMNS = ("conversations", "messages", "conversation")
QUESTION_COLUMNS = ("question", "instruction", "query")


def detect(row: dict, keys: set, tags, options, where: str) -> Layout | None:
    """The explicit-pair layout of a row with one of ANSWER_COLUMNS' pairs, else None."""
    pair = next(((c, r) for c, r in ANSWER_COLUMNS if c in keys and r in keys), None)
    if pair is None:
        return None
    c, r = pair
    system = "system" if "system" in keys else None
    if c == "preferred_output":
        prompt = next((p for p in ("input.messages", "messages", "prompt") if has_path(row, p)), None)
        return Layout("openai", {"prompt": prompt, "chosen": c, "rejected": r, "system": system}, tags,
                      first_place=where, converter=convert)
    if "prompt" in keys:
        value = row[c]
        name = ("h4" if is_messages(value) and starts_with_user([role_of(m) for m in value]) else
                "conversational" if is_messages(value) or is_messages(row["prompt"]) else "standard")
        return Layout(name, {"prompt": "prompt", "chosen": c, "rejected": r, "system": system}, tags,
                      first_place=where, converter=convert)
    conv = next((k for k in CONVERSATION_COLUMNS if k in keys), None)
    if conv is not None:
        return Layout("sharegpt", {"prompt": conv, "chosen": c, "rejected": r, "system": system}, tags,
                      first_place=where, converter=convert)
    question = next((k for k in QUESTION_COLUMNS if k in keys), None)
    if question is not None:
        return Layout("question", {"question": question, "input": "input" if "input" in keys else None,
                                   "history": "history" if "history" in keys else None, "chosen": c,
                                   "rejected": r, "system": system}, tags, first_place=where, converter=convert)
    return Layout("implicit", {"chosen": c, "rejected": r}, tags, first_place=where, converter=convert)


def convert(layout: Layout, row: dict, templated: bool) -> tuple[list[dict], list[str]]:
    """One row of an explicit-pair layout -> ([pair] or [], notes)."""
    if layout.name == "implicit":
        extra = layout.unused_text(row)
        if extra:
            raise DataError(f"column {extra[0]!r} holds text that this layout does not read: chosen and rejected "
                            "are whole transcripts whose shared start becomes the prompt, so a prompt in "
                            f"{extra[0]!r} would be trained without. If it is the prompt, set column_map "
                            f"'{{\"prompt\": \"{extra[0]}\"}}'; otherwise drop the column from the data")
    chosen = layout.answer(row, "chosen")
    rejected = layout.answer(row, "rejected")
    prompt = layout.prompt(row)
    return assemble(prompt, chosen, rejected, layout.system(row), templated, layout.names())
