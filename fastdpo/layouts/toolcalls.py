"""Tools as TRL 1.16 passes them to a chat template: a row's tool schemas (`tools`: a JSON string or a list) and
template keywords (`chat_template_kwargs`), and an assistant's tool calls, whether written as OpenAI's `tool_calls`
or as call turns (sharegpt's `function_call`, ms-swift's `tool_call`: the call as JSON in the content). Values are
kept in the source's own form (a JSON string of tools stays that string, arguments stay a string or an object): a
template renders what the data holds, never a re-serialisation of it."""

from __future__ import annotations

import json
import math

from ..errors import DataError

# What one tool schema looks like, for the errors that meet something else in a tools column.
SCHEMA_EXAMPLE = ('{"type": "function", "function": {"name": "get_weather", "description": "...", "parameters": '
                  '{"type": "object", "properties": {...}}}} (or the bare {"name", "description", "parameters"})')
CALL_EXAMPLE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def absent(value) -> bool:
    """No value: null, an empty string (LLaMA-Factory's `tools: ""`, which TRL's json.loads would fail on), NaN."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _json(value, column: str, expected: str):
    """A JSON string parsed (anything else as it is); a string that is not JSON names the column and what was
    expected."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"field {column!r} is a string but not JSON ({e.msg} at column {e.colno}){expected}") from None


def tools_of(value, column: str):
    """A row's tools as TRL will read them (a JSON string of a list, or a list of objects), or None when absent.
    Raises DataError naming the column for anything a chat template cannot take as tool schemas."""
    if absent(value):
        return None
    parsed = _json(value, column, f": tools are a JSON list of tool schemas, each like {SCHEMA_EXAMPLE}")
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        what = type(parsed).__name__ if not isinstance(parsed, list) else "a list with items that are not objects"
        raise DataError(f"field {column!r} holds {what}, not tool schemas: expected a list (or a JSON string of a "
                        f"list) of objects, each like {SCHEMA_EXAMPLE}")
    return value


def parsed_tools(value):
    """The tools a template gets: a JSON string parsed (as TRL does), a list as it is, None as None."""
    return json.loads(value) if isinstance(value, str) else value


def kwargs_of(value, column: str):
    """A row's chat_template_kwargs as an object (a JSON string of an object is parsed), or None when absent."""
    if absent(value):
        return None
    parsed = _json(value, column, '; expected an object of chat template variables, e.g. {"enable_thinking": false}')
    if not isinstance(parsed, dict):
        raise DataError(f"field {column!r} must be an object of chat template variables (e.g. "
                        f'{{"enable_thinking": false}}), got {type(parsed).__name__}')
    return parsed


def is_tools(value) -> bool:
    """Tool schemas as a list of objects (a JSON string of them is text already): what must never be a column left
    unread without a word."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, dict) and ("function" in t or "name" in t) for t in value)


def calls_of(value, where: str) -> list[dict]:
    """A call turn's content (JSON text or an object: one call, or a list of parallel calls) -> OpenAI-style
    tool_calls [{"type": "function", "function": {"name", "arguments"}}], arguments as the data holds them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is a tool call whose content is not JSON ({e.msg} at column {e.colno}); "
                            f"expected {CALL_EXAMPLE}, or a list of them for parallel calls") from None
    items = value if isinstance(value, list) else [value]
    calls = []
    for c in items:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"].strip()):
            raise DataError(f"{where} is a tool call without a function name; expected {CALL_EXAMPLE}, or a list of "
                            "them for parallel calls")
        call = {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
        calls.append({"id": c["id"], **call} if "id" in c else call)
    if not calls:
        raise DataError(f"{where} is a tool call turn with an empty list of calls")
    return calls


def check_tool_calls(value, where: str) -> list:
    """An assistant message's `tool_calls` as written (OpenAI's form), checked to be calls a template can render."""
    if not isinstance(value, list):
        raise DataError(f"{where} 'tool_calls' must be a list of calls, got {type(value).__name__}")
    for k, call in enumerate(value, start=1):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)):
            raise DataError(f"{where} tool call {k} has no function name; expected "
                            '{"type": "function", "function": {"name": ..., "arguments": ...}}')
    return value
