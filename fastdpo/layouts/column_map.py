"""column_map: what detection cannot know, named by the recipe. Columns (dotted paths reach nested fields:
input.messages), message keys and role names with LLaMA-Factory's dataset_info.json tag names (role_tag,
content_tag, user_tag, assistant_tag, system_tag, observation_tag, function_tag)."""

from __future__ import annotations

from ..errors import DataError
from . import pairs
from .layout import Layout, get_path, has_path
from .messages import TAG_KEYS, Tags, is_messages, role_of, starts_with_user

MAP_KEYS = ("prompt", "messages", "chosen", "rejected", "system")


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


def detect(row: dict, cmap: dict, tags: Tags, where: str) -> Layout:
    """The layout column_map names (an explicit-pair layout), checked against the row it was detected from."""
    cols = {k: v for k, v in cmap.items() if k in MAP_KEYS}
    prompt = cols.get("prompt") or cols.get("messages")
    chosen, rejected = cols.get("chosen", "chosen"), cols.get("rejected", "rejected")
    missing = [p for p in (prompt, chosen, rejected, cols.get("system")) if p and not has_path(row, p)]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} named in column_map; columns present: {sorted(row)}")
    system = cols.get("system")
    if prompt is None:
        return Layout("implicit", {"chosen": chosen, "rejected": rejected, "system": system}, tags, mapped=True,
                      first_place=where, converter=pairs.convert)
    value = get_path(row, chosen)
    name = ("h4" if is_messages(value) and starts_with_user([role_of(m) for m in value]) else
            "sharegpt" if cols.get("messages") else
            "conversational" if isinstance(value, (list, dict)) else "standard")
    return Layout(name, {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system}, tags,
                  mapped=True, first_place=where, converter=pairs.convert)
