"""ms-swift's RLHF layout: `messages` is the conversation ending with the chosen answer, and the other answer is
`rejected_response` (its text) or `rejected_messages` (the whole rejected conversation, whose shared turns with
`messages` are the prompt). Agent rows carry `tools` and tool_call / tool_response turns (fastdpo.layouts.messages)."""

from __future__ import annotations

from ..errors import DataError
from .assemble import assemble
from .layout import Layout

REJECTED = ("rejected_response", "rejected_messages")


def detect(row, keys, tags, options, where) -> Layout | None:
    """`messages` with `rejected_response` or `rejected_messages` and no chosen column."""
    rejected = next((k for k in REJECTED if k in keys), None)
    if rejected is None or not isinstance(row.get("messages"), list) or any(k.startswith("chosen") for k in keys):
        return None
    return Layout("ms-swift", {"messages": "messages", "rejected": rejected,
                               "system": "system" if "system" in keys else None}, tags, first_place=where,
                  converter=convert)


def convert(layout: Layout, row: dict, templated: bool) -> tuple[list[dict], list[str]]:
    msgs = layout.value(layout.get(row, "messages"), "messages")
    col = layout.columns["rejected"]
    rejected = layout.get(row, "rejected")
    names = {"prompt": "messages", "chosen": "messages", "rejected": col}
    if col == "rejected_messages":  # two whole conversations: their shared turns are the prompt
        return assemble(None, msgs, layout.value(rejected, col), layout.system(row), templated, names)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"field 'messages' must end with the chosen answer (an assistant turn) when {col!r} holds "
                        "the other one")
    if not isinstance(rejected, str):
        raise DataError(f"field {col!r} must be the rejected answer's text, got "
                        f"{'null' if rejected is None else type(rejected).__name__}")
    return assemble(msgs[:-1], msgs[-1:], [{"role": "assistant", "content": rejected}], layout.system(row),
                    templated, names)
