"""Tokens: pairs in TRL's preference form -> token ids, exactly as TRL 1.16's DPOTrainer tokenises them, and the
truncation rule (max_prompt_length keeps the prompt's end, answers cut to what max_length leaves, a pair whose
prompt fills max_length dropped). Training's token cache, the in-memory path, the analyzer and evaluation all
tokenise here, so their ids agree by construction (tests/unit/test_data.py and test_real_data_2.py compare them
with TRL's own preprocessing).

A pair's `tools` and `chat_template_kwargs` go to the chat template for the prompt and both answers, as TRL passes
them; a template that would drop them (a probe tool or call missing from what it renders) is refused rather than
trained on. In a datasets.Dataset (Arrow) a pair is stored with those two as JSON strings and each message's
tool_calls as a JSON string (`storable`): Arrow would otherwise keep only the first row's columns and merge the keys
of nested objects across rows (a call's arguments gaining other rows' argument names as nulls, which templates
render). `tokenize_pairs` reads both forms.
"""

from __future__ import annotations

import json

from . import frameworks
from .errors import TemplateMissing

PROBE_TOOL = "fastdpo_probe_tool"
PROBE_CALL = "fastdpo_probe_call"
EXTRAS = ("tools", "chat_template_kwargs")  # a pair's keys besides prompt, chosen and rejected


def templated(tokenizer) -> bool:
    """Whether conversations can be rendered: the tokenizer has a chat template (None: assume it will)."""
    return tokenizer is None or bool(getattr(tokenizer, "chat_template", None))


def layout_note(templated: bool) -> str:
    """How text is read with this tokenizer (logged once per run)."""
    if templated:
        return ("chat template: messages rendered through it, with each row's tools; text prompts and answers become "
                "messages (one user turn, one assistant turn), Human/Assistant transcripts too; only TRL's own text "
                "layout (prompt, chosen, rejected as text) is tokenised raw, as TRL does")
    return ("no chat template: plain-text rows tokenised as raw text (prompt + answer + EOS), as TRL does; "
            "implicit-prompt transcripts split by TRL's extract_prompt (as stock TRL does)")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encoder(tokenizer):
    """texts, add_special_tokens -> ids, the same ids as `tokenizer(texts)["input_ids"]`: the backend's batch call
    without offsets where the tokenizer is a plain fast one (frameworks.fast_encoder), else the ordinary call."""
    fast = frameworks.fast_encoder(tokenizer)
    return fast or (lambda texts, special: tokenizer(texts, add_special_tokens=special)["input_ids"])


def tokenize_pairs(batch: dict, tokenizer, encode=None, where=None, tools_column: str | None = None) -> dict:
    """Untruncated ids for a batch of pairs, exactly as TRL 1.16's DPOTrainer tokenises them.

    Conversational rows go through the chat template (prompt with the generation prompt; prompt + answer), with the
    row's tools and chat_template_kwargs; text rows get the EOS appended and the tokenizer's special tokens. The
    answer starts where prompt and prompt + answer diverge. Templates are rendered to text for a group of rows
    sharing tools and keywords (all rows without them: one group) and encoded in one call, which gives the same ids
    as tokenising inside apply_chat_template (it renders, then encodes without special tokens). `where` (the rows'
    places) and `tools_column` name the data in a refusal.
    """
    encode = encode or encoder(tokenizer)
    prompts, chosens, rejecteds = batch["prompt"], batch["chosen"], batch["rejected"]
    n = len(prompts)
    tools, kwargs = batch.get("tools") or [None] * n, batch.get("chat_template_kwargs") or [None] * n
    conv = [i for i in range(n) if isinstance(prompts[i], list) or isinstance(chosens[i], list)]
    text = [i for i in range(n) if not (isinstance(prompts[i], list) or isinstance(chosens[i], list))]
    ids: list = [None] * n
    groups: dict = {}
    for i in conv:
        groups.setdefault((_json_key(tools[i]), _json_key(kwargs[i])), []).append(i)
    for rows in groups.values():
        t, kw = _parsed(tools[rows[0]]), _parsed(kwargs[rows[0]]) or {}
        convs = [(_plain(prompts[i]), _plain(chosens[i]), _plain(rejecteds[i])) for i in rows]
        called = next((i for i, c in zip(rows, convs, strict=True) if _calls(c)), None)
        check_renders(tokenizer, t, called is not None, where[rows[0] if called is None else called] if where else None,
                      tools_column)
        out = encode(_render(tokenizer, [p for p, _, _ in convs], t, kw, True)
                     + _render(tokenizer, [p + c for p, c, _ in convs], t, kw)
                     + _render(tokenizer, [p + r for p, _, r in convs], t, kw), False)
        k = len(rows)
        for j, i in enumerate(rows):
            ids[i] = (out[j], out[k + j], out[2 * k + j])
    if text:
        eos = tokenizer.eos_token
        p_text = [prompts[i] for i in text]
        c_text = [prompts[i] + (chosens[i] if chosens[i].endswith(eos) else chosens[i] + eos) for i in text]
        r_text = [prompts[i] + (rejecteds[i] if rejecteds[i].endswith(eos) else rejecteds[i] + eos) for i in text]
        out = encode(p_text + c_text + r_text, True)
        k = len(text)
        for j, i in enumerate(text):
            ids[i] = (out[j], out[k + j], out[2 * k + j])
    result = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for p, pc, pr in ids:
        m = min(common_prefix(p, pc), common_prefix(p, pr))
        result["prompt_ids"].append(p[:m])
        result["chosen_ids"].append(pc[m:])
        result["rejected_ids"].append(pr[m:])
    return result


def _render(tokenizer, convs: list, tools, kwargs: dict, generation: bool = False) -> list[str]:
    return tokenizer.apply_chat_template(convs, tokenize=False, add_generation_prompt=generation, tools=tools, **kwargs)


def _json_key(value):
    """A grouping key for tools or keywords in any of their forms (None, JSON text, a list or an object)."""
    return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True)


def _parsed(value):
    """Tools or keywords as the template gets them: JSON text parsed (as TRL parses a tools string)."""
    return json.loads(value) if isinstance(value, str) else value


def _plain(msgs: list) -> list:
    """Messages as the template reads them: tool_calls stored as JSON text (`storable`) parsed back."""
    if not any(isinstance(m.get("tool_calls"), str) for m in msgs):
        return msgs
    return [{**m, "tool_calls": json.loads(m["tool_calls"])} if isinstance(m.get("tool_calls"), str) else m
            for m in msgs]


def _calls(conv) -> bool:
    return any(m.get("tool_calls") for part in conv for m in part)


def storable(rows: list[dict]) -> list[dict]:
    """Pairs for a datasets.Dataset (see the module doc): unchanged when none has tools, keywords or tool calls;
    else every row with the same keys, tools and keywords as JSON text (or None), tool_calls as JSON text."""
    if not any(any(r.get(k) is not None for k in EXTRAS) or _any_calls(r) for r in rows):
        return rows
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = []
    for r in rows:
        row = {}
        for k in keys:
            v = r.get(k)
            if k in EXTRAS:
                v = v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            elif isinstance(v, list):
                v = [{**m, "tool_calls": json.dumps(m["tool_calls"], ensure_ascii=False)}
                     if isinstance(m, dict) and isinstance(m.get("tool_calls"), list) else m for m in v]
            row[k] = v
        out.append(row)
    return out


def _any_calls(row: dict) -> bool:
    return any(isinstance(m, dict) and m.get("tool_calls") for v in row.values() if isinstance(v, list) for m in v)


class ToolsNotRendered(TemplateMissing):
    """Data with tools or tool calls and a chat template that drops them: a setup error, never a bad row."""


_PROBED: dict = {}  # (chat template, what, with tools) -> whether the probe name came out; a template is probed once


def check_renders(tokenizer, tools, calls: bool, where: str | None, tools_column: str | None) -> None:
    """Refuse tools (or tool calls) that the chat template would drop: the model would learn to call tools it never
    saw. Probed once per template with a made-up tool and call; tools=[] has nothing to render."""
    place = f"{where}: " if where else ""
    fix = ("Set chat_template_path to a template that renders tools (the Qwen2.5, Llama 3.1 and Hermes templates "
           "do), or remove them from the data")
    if tools and not _probe(tokenizer, "tools", True):
        raise ToolsNotRendered(
            f"{place}column {tools_column or 'tools'!r} holds tool schemas but the chat template does not render "
            "them: a probe tool given as tools= does not appear in the rendered prompt, so the model would learn to "
            f"call tools it never saw. {fix}")
    if calls and not _probe(tokenizer, "calls", tools is not None):
        raise ToolsNotRendered(
            f"{place}the conversation holds assistant tool calls (tool_calls, or sharegpt function_call / ms-swift "
            "tool_call turns) but the chat template drops them: a probe call does not appear in the rendered "
            f"conversation, so the model would be trained on answers without their calls. {fix}")


def _probe(tokenizer, what: str, with_tools: bool) -> bool:
    key = (repr(tokenizer.chat_template), what, with_tools)
    if key not in _PROBED:
        tool = {"type": "function", "function": {"name": PROBE_TOOL, "description": "a probe",
                                                  "parameters": {"type": "object", "properties": {}}}}
        msgs = [{"role": "user", "content": "hi"}]
        if what == "calls":
            msgs.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": PROBE_CALL, "arguments": {}}}]})
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=what == "tools",
                                                 tools=[tool] if with_tools else None)
        except Exception:  # a template that fails on tools does not render them
            text = ""
        _PROBED[key] = (PROBE_TOOL if what == "tools" else PROBE_CALL) in text
    return _PROBED[key]


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None,
                  max_prompt_length: int | None, bos_id: int | None = None):
    """Fit one pair into max_length. Returns (prompt, chosen, rejected, status).

    An over-long prompt keeps its end (the turn nearest the answer), and its leading BOS if it has one; then
    each answer is cut to what is left of max_length. status is "ok", "truncated" or "dropped" (the prompt
    alone leaves no room for an answer).
    """
    status = "ok"
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and prompt and prompt[0] == bos_id and max_prompt_length > 1
        tail = prompt[len(prompt) - (max_prompt_length - keep_bos):]
        prompt = ([bos_id] if keep_bos else []) + tail
        status = "truncated"
    if max_length is None:
        return prompt, chosen, rejected, status
    room = max_length - len(prompt)
    if room < 1:
        return prompt, chosen, rejected, "dropped"
    if len(chosen) > room or len(rejected) > room:
        chosen, rejected, status = chosen[:room], rejected[:room], "truncated"
    return prompt, chosen, rejected, status


def tokenize_truncated(batch: dict, tokenizer, encode, max_length: int | None, max_prompt_length: int | None,
                       where=None, tools_column: str | None = None) -> tuple[dict, dict, list[str]]:
    """A batch of pairs -> (untruncated ids, truncated ids, status of each pair): the one tokenise-then-truncate
    step of the token cache and the in-memory path. A dropped pair keeps its (untruncated) ids and its status."""
    full = tokenize_pairs(batch, tokenizer, encode, where, tools_column)
    bos = tokenizer.bos_token_id
    cut = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    status = []
    for p, c, r in zip(full["prompt_ids"], full["chosen_ids"], full["rejected_ids"], strict=True):
        p2, c2, r2, s = truncate_pair(p, c, r, max_length, max_prompt_length, bos)
        cut["prompt_ids"].append(p2)
        cut["chosen_ids"].append(c2)
        cut["rejected_ids"].append(r2)
        status.append(s)
    return full, cut, status


def columns(pairs: list[dict]) -> dict:
    """Pairs (Python rows) as the batch of columns tokenize_pairs takes, tools and keywords included."""
    out = {k: [p[k] for p in pairs] for k in ("prompt", "chosen", "rejected")}
    for k in EXTRAS:
        if any(k in p for p in pairs):
            out[k] = [p.get(k) for p in pairs]
    return out
