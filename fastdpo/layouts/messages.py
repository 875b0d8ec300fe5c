"""Messages as TRL reads them: role names and message keys of the common layouts mapped to TRL's, typed content
parts joined to text, tool calls in OpenAI's form, same-role runs merged, hh-rlhf transcripts split into turns. Every
layout family converts its messages here, so one conversation gives the same messages whatever layout holds it."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import DataError
from .toolcalls import calls_of, check_tool_calls, is_tools

ROLES = ("system", "developer", "user", "assistant", "tool")
CALL = "tool_call"  # a turn that is the assistant calling tools, its content the call(s) as JSON: not a TRL role
# Role names of the common layouts -> TRL's. LLaMA-Factory's sharegpt: human, gpt, observation (a tool's result),
# function_call (the assistant calling a tool); ms-swift's tool_call and tool_response. A call turn becomes an
# assistant message with tool_calls; consecutive call turns are one message with parallel calls.
ROLE_NAMES = {"system": "system", "developer": "developer", "user": "user", "human": "user", "assistant": "assistant",
              "gpt": "assistant", "bot": "assistant", "model": "assistant", "tool": "tool", "observation": "tool",
              "function": "tool", "ipython": "tool", "tool_response": "tool", "function_call": CALL,
              "tool_call": CALL}
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = ("content", "value")
PART_TEXT_KEYS = ("text", "value")
# Message keys besides role and content that chat templates read, kept as written (a template that ignores them
# renders the same; dropping them would change the ids where one reads them).
KEPT_KEYS = ("tool_calls", "tool_call_id", "name")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool",
             "function_tag": CALL}
MERGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Tags:
    """Message keys and role names: the defaults cover TRL's and sharegpt's; column_map's tags override them."""

    role_keys: tuple = ROLE_KEYS
    content_keys: tuple = CONTENT_KEYS
    names: tuple = tuple(ROLE_NAMES.items())

    @classmethod
    def of(cls, cmap: dict | None) -> Tags:
        if not cmap:
            return cls()
        tags = {**{k: v for k, v in cmap.items() if k in TAG_KEYS}, **cmap.get("tags", {})}
        names = dict(ROLE_NAMES)
        names.update({tags[k].lower(): role for k, role in TAG_ROLES.items() if k in tags})
        return cls((tags["role_tag"],) if "role_tag" in tags else ROLE_KEYS,
                   (tags["content_tag"],) if "content_tag" in tags else CONTENT_KEYS, tuple(names.items()))

    def role(self, name, where: str) -> str:
        names = dict(self.names)
        role = names.get(name.lower()) if isinstance(name, str) else None
        if role is None:
            close = difflib.get_close_matches(str(name).lower(), list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known roles: {', '.join(names)}"
            raise DataError(f"{where} has unknown role {name!r}{hint}; other role names can be mapped with "
                            "column_map tags (user_tag, assistant_tag, ...)")
        return role


def _content(value, where: str) -> str:
    """Message content as text: a string, or typed parts whose text parts are joined (a text model reads text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for k, part in enumerate(value, start=1):
            if isinstance(part, str):
                texts.append(part)
                continue
            kind = part.get("type", "text") if isinstance(part, dict) else None
            text = next((part[key] for key in PART_TEXT_KEYS if key in part), None) if isinstance(part, dict) else None
            if kind != "text" or not isinstance(text, str):
                what = f"of type {kind!r}" if kind not in (None, "text") else "without text"
                raise DataError(f"{where} content part {k} is {what}: a text model trains on text parts only; "
                                "drop the row (--skip_bad_rows) or keep such data for a multimodal trainer")
            texts.append(text)
        return "".join(texts)
    raise DataError(f"{where} content must be a string or a list of text parts, got "
                    f"{'null' if value is None else type(value).__name__}")


def is_message(value) -> bool:
    return isinstance(value, dict) and any(k in value for k in ROLE_KEYS) and (
        any(k in value for k in CONTENT_KEYS) or "tool_calls" in value)


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value) and is_message(value[0])


def to_messages(value, name: str, tags: Tags) -> list[dict]:
    """A message object or a list of them -> [{"role", "content"}] with TRL's role names and text content; tool
    calls in OpenAI's form ({"role": "assistant", "tool_calls": [...]}), the keys templates read kept as written."""
    items = [value] if isinstance(value, dict) else value
    if not items:
        raise DataError(f"field {name!r} is an empty message list")
    out: list[dict] = []
    calling = False  # the previous turn was a call turn: a next one adds its calls to the same message
    for j, m in enumerate(items, start=1):
        where = f"field {name!r} message {j}"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content' (or 'from' and 'value')")
        role_key = next((k for k in tags.role_keys if k in m), None)
        content_key = next((k for k in tags.content_keys if k in m), None)
        if role_key is None or (content_key is None and not m.get("tool_calls")):
            raise DataError(f"{where} must be an object with 'role' and 'content' (or 'from' and 'value'); it has "
                            f"{sorted(m)}; other keys can be mapped with column_map (role_tag, content_tag)")
        role = tags.role(m[role_key], where)
        if role == CALL:
            calls = calls_of(m[content_key] if content_key else None, where)
            if calling:
                out[-1]["tool_calls"] = out[-1]["tool_calls"] + calls
            else:
                out.append({"role": "assistant", "tool_calls": calls})
            calling = True
            continue
        calling = False
        out.append(_message(m, role, content_key, where))
    return out


def _message(m: dict, role: str, content_key: str | None, where: str) -> dict:
    """One message in TRL's form: text content (null or absent only beside tool calls) and the kept keys."""
    msg = {"role": role}
    calls = m.get("tool_calls")
    if content_key is not None:
        value = m[content_key]
        msg["content"] = None if value is None and calls else _content(value, where)
    if calls:
        if role != "assistant":
            raise DataError(f"{where} is a {role} message with tool_calls: only the assistant calls tools")
        msg["tool_calls"] = check_tool_calls(calls, where)
    for key in KEPT_KEYS[1:]:
        if m.get(key) is not None:
            msg[key] = m[key]
    return msg


def message_extras(value, tags: Tags) -> set[str]:
    """Keys of a message list's messages besides role, content and the kept keys (loss_weight, ...): reported as
    unused."""
    items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    used = set(tags.role_keys) | set(tags.content_keys) | set(KEPT_KEYS)
    return {k for m in items if isinstance(m, dict) for k in m if k not in used}


def says_something(m: dict) -> bool:
    """A turn with text or tool calls (an assistant turn with neither is an empty answer)."""
    return bool(m.get("tool_calls")) or (isinstance(m.get("content"), str) and bool(m["content"].strip()))


def merge_runs(msgs: list[dict]) -> tuple[list[dict], int]:
    """Consecutive user (or assistant, or system) turns as one turn, blank line between; returns (messages, merges).
    Tool results in a row stay separate (each is the result of its own call), and so do turns with tool calls or
    other kept keys (a call is not text to join)."""
    out: list[dict] = []
    merges = 0
    for m in msgs:
        if out and m["role"] == out[-1]["role"] and m["role"] != "tool" and _plain(m) and _plain(out[-1]):
            parts = [p for p in (out[-1]["content"], m["content"]) if p.strip()]
            out[-1] = {"role": m["role"], "content": MERGE_SEPARATOR.join(parts)}
            merges += 1
        else:
            out.append(dict(m))
    return out, merges


def _plain(m: dict) -> bool:
    return set(m) <= {"role", "content"} and isinstance(m.get("content"), str)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(text: str) -> list[dict] | None:
    """Anthropic hh-rlhf transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') as messages, else None."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def starts_with_user(roles: list) -> bool:
    """A whole conversation (H4's answers): its first turn after any system turn is the user's. An answer that
    only continues a conversation starts with the assistant."""
    body = [r for r in roles if r not in ("system", "developer")]
    return bool(body) and body[0] == "user"


def role_of(m: dict):
    raw = next((m[k] for k in ROLE_KEYS if k in m), None)
    return ROLE_NAMES.get(raw.lower()) if isinstance(raw, str) else None


def holds_text(value) -> bool:
    """Prose or a conversation (not an id, a tag or a number): what would be a prompt if one were missing."""
    if isinstance(value, str):
        return len(value.split()) >= 3
    return is_messages(value) or is_message(value)


def any_text(value) -> bool:
    """Any text at all (a non-empty string, a message, a conversation, tool schemas): what a dataset-level check
    counts."""
    return ((isinstance(value, str) and bool(value.strip())) or is_messages(value) or is_message(value)
            or is_tools(value))
