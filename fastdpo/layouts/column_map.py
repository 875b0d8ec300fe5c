"""column_map: what detection cannot know, named by the recipe. Columns (dotted paths reach nested fields:
input.messages), message keys and role names with LLaMA-Factory's dataset_info.json tag names (role_tag,
content_tag, user_tag, assistant_tag, system_tag, observation_tag, function_tag)."""

from __future__ import annotations

import json

from ..errors import DataError
from . import pairs
from .layout import Layout, get_path, has_path
from .messages import TAG_KEYS, Tags, is_messages, role_of, starts_with_user

MAP_KEYS = ("prompt", "messages", "chosen", "rejected", "system", "tools", "chat_template_kwargs")
IDENTITY = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}  # TRL's own text layout, named as it is


def check_column_map(cmap) -> str | None:
    """The problem with a column_map value, or None (checked when the recipe is parsed)."""
    if not isinstance(cmap, dict):
        return f"column_map must be a JSON object, got {type(cmap).__name__}"
    bad = sorted(set(cmap) - set(MAP_KEYS) - set(TAG_KEYS) - {"tags"})
    if bad:
        return (f"column_map keys must be among {', '.join(MAP_KEYS)} (columns; dotted paths like input.messages "
                f"reach nested fields) and {', '.join(TAG_KEYS)} (message keys and role names); got {bad}")
    tags = cmap.get("tags", {})
    if not isinstance(tags, dict) or set(tags) - set(TAG_KEYS):
        return f"column_map tags must be an object with keys among {', '.join(TAG_KEYS)}"
    for k, v in {**{k: cmap[k] for k in cmap if k != "tags"}, **tags}.items():
        if not isinstance(v, str) or not v:
            return f"column_map {k!r}: expected a column name (or a tag) as a string, got {v!r}"
    return None


def parse(value) -> dict | None:
    """column_map as a recipe or a flag gives it (JSON text, or the object itself) -> the object, or None. A bad one
    stops with the problem and an example, as the recipe parser does."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SystemExit(f"column_map is not a JSON object ({e}); example: "
                             '\'{"prompt": "question", "chosen": "good", "rejected": "bad"}\'') from None
    if value is not None:
        problem = check_column_map(value)
        if problem:
            raise SystemExit(problem)
    return value


def detect(row: dict, cmap: dict, tags: Tags, where: str) -> Layout:
    """The layout column_map names (an explicit-pair layout), checked against the row it was detected from.

    column_map says where the parts are; how they are rendered is the rule of the detected layouts: text parts get
    the chat template as a question layout's do (the prompt one user turn, each answer one assistant turn), so a
    conversation gives the same tokens mapped or detected. Only a map naming TRL's own text layout (prompt,
    chosen, rejected as they are) keeps it raw, as TRL tokenises it."""
    cols = {k: v for k, v in cmap.items() if k in MAP_KEYS}
    prompt = cols.get("prompt") or cols.get("messages")
    chosen, rejected = cols.get("chosen", "chosen"), cols.get("rejected", "rejected")
    missing = [p for p in (prompt, chosen, rejected, cols.get("system")) if p and not has_path(row, p)]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} named in column_map; columns present: {sorted(row)}")
    extra = {k: cols.get(k) for k in ("system", "tools", "chat_template_kwargs")}
    if prompt is None:
        return Layout("implicit", {"chosen": chosen, "rejected": rejected, **extra}, tags, mapped=True,
                      first_place=where, converter=pairs.convert)
    value = get_path(row, chosen)
    name = ("h4" if is_messages(value) and starts_with_user([role_of(m) for m in value]) else
            "sharegpt" if cols.get("messages") else
            "conversational" if isinstance(value, (list, dict)) or not isinstance(get_path(row, prompt), str) else
            "standard" if {k: cols.get(k, k) for k in IDENTITY} == IDENTITY else "question")
    part = "question" if name == "question" else "prompt"
    return Layout(name, {part: prompt, "chosen": chosen, "rejected": rejected, **extra}, tags,
                  mapped=True, first_place=where, converter=pairs.convert)
