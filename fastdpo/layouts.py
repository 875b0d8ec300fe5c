"""Preference layouts: how a source holds its pairs, detected once from its first row, and every row converted to
TRL's preference form {"prompt", "chosen", "rejected"}: three strings, or three lists of {"role", "content"} messages.

    layout          columns (first row decides)                                  the prompt is
    standard        prompt, chosen, rejected: strings                            `prompt`
    conversational  prompt, chosen, rejected: message lists (answers only)       `prompt`
    h4              prompt (text or messages) + chosen/rejected as whole          the conversations' shared turns;
                    conversations (HuggingFaceH4/ultrafeedback_binarized)         `prompt` must match one user turn
    implicit        chosen, rejected only: whole transcripts, text or messages   their shared prefix (hh-rlhf)
                    (also chosen_messages/rejected_messages)
    sharegpt        conversations or messages ({from, value} or {role,           `conversations`
                    content}) + chosen/rejected as a message, a list or a string
    openai          input.messages + preferred_output / non_preferred_output     `input.messages`
    question        question or instruction (+ input, history, system) +         a user turn (after history/system)
                    chosen/rejected or response_chosen/response_rejected (orca)
    ranked          instruction/prompt + replies ranked best first, or scored    as question; needs ranked_pairs
                    (LLaMA-Factory ranking, Nectar, UltraFeedback completions)
    judged          question + two answers + a winner label (ties)               as question; needs judged_pairs

Message content may be a list of typed parts ([{"type": "text", "text"|"value": ...}]): text parts are joined, any
other part is a row error naming it. Role names of sharegpt (human, gpt, observation, function_call) map to TRL's.
The rule every layout keeps: the same conversation gives the same pair, so the same token ids, whatever layout holds
it (tests/test_layouts.py writes one set of conversations in every layout).

Oddities with a rule (counted, first places listed): two turns of one role in a row merge into one (blank line
between); an empty answer is a pair (the answer is the end of turn alone); chosen identical to rejected gives no
pair. Structural problems (missing fields, wrong types, unknown roles) are row errors with the row's place.
`column_map` reaches what detection cannot: dotted paths (`input.messages`), message keys and role names, with
LLaMA-Factory's dataset_info.json tag names (role_tag, content_tag, user_tag, assistant_tag, system_tag,
observation_tag, function_tag).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

from .errors import DataError, TemplateMissing

DETECT_ROWS = 16  # rows looked at for the layout when the first ones are unreadable or not pairs (row errors later)


class NeedsOption(DataError):
    """Ranked or judged data: a property of the whole source, which a conversion option turns into pairs."""

ROLES = ("system", "developer", "user", "assistant", "tool")
# Role names of the common layouts -> TRL's. LLaMA-Factory's sharegpt: human, gpt, observation (a tool's result),
# function_call (the assistant calling a tool: for a text model, an assistant turn holding the call's text).
ROLE_NAMES = {"system": "system", "developer": "developer", "user": "user", "human": "user", "assistant": "assistant",
              "gpt": "assistant", "bot": "assistant", "model": "assistant", "tool": "tool", "observation": "tool",
              "function": "tool", "ipython": "tool", "function_call": "assistant"}
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = ("content", "value")
PART_TEXT_KEYS = ("text", "value")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag", "observation_tag", "function_tag")
MAP_KEYS = ("prompt", "messages", "chosen", "rejected", "system")
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "system_tag": "system", "observation_tag": "tool",
             "function_tag": "assistant"}

# Column names of the pair, most specific first: (chosen, rejected)
ANSWER_COLUMNS = [("chosen", "rejected"), ("chosen_messages", "rejected_messages"),
                  ("response_chosen", "response_rejected"), ("chosen_response", "rejected_response"),
                  ("preferred_output", "non_preferred_output")]
CONVERSATION_COLUMNS = ("conversations", "messages", "conversation")
QUESTION_COLUMNS = ("question", "instruction", "query")
LABEL_COLUMNS = ("grade", "winner", "preference", "label", "choice", "better")
TIE_LABELS = {"tie", "draw", "equal", "same", "tie (bothbad)", "both_bad", "bothbad", "both bad", "neither"}
RANKED = ("best_vs_worst", "best_vs_rest")
JUDGE_WORDS = {"raw", "judge", "judgment", "judgement", "explanation", "reason", "critique"}  # the judge's own text
MERGE_SEPARATOR = "\n\n"


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class Options:
    """What decides the layout besides the rows: the recipe's column_map and the conversion options."""

    column_map: dict | None = None
    ranked_pairs: str | None = None
    judged_pairs: bool = False

    @classmethod
    def of(cls, args) -> Options:
        return cls(getattr(args, "column_map", None), getattr(args, "ranked_pairs", None),
                   bool(getattr(args, "judged_pairs", False)))

    def key(self) -> dict:
        return {"column_map": self.column_map, "ranked_pairs": self.ranked_pairs, "judged_pairs": self.judged_pairs}


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


# ----------------------------------------------------------------------------------------------- messages


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
    return isinstance(value, dict) and any(k in value for k in ROLE_KEYS) and any(k in value for k in CONTENT_KEYS)


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value) and is_message(value[0])


def to_messages(value, name: str, tags: Tags) -> list[dict]:
    """A message object or a list of them -> [{"role", "content"}] with TRL's role names and text content."""
    items = [value] if isinstance(value, dict) else value
    if not items:
        raise DataError(f"field {name!r} is an empty message list")
    out = []
    for j, m in enumerate(items, start=1):
        where = f"field {name!r} message {j}"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with 'role' and 'content' (or 'from' and 'value')")
        role_key = next((k for k in tags.role_keys if k in m), None)
        content_key = next((k for k in tags.content_keys if k in m), None)
        if role_key is None or content_key is None:
            raise DataError(f"{where} must be an object with 'role' and 'content' (or 'from' and 'value'); it has "
                            f"{sorted(m)}; other keys can be mapped with column_map (role_tag, content_tag)")
        out.append({"role": tags.role(m[role_key], where), "content": _content(m[content_key], where)})
    return out


def message_extras(value, tags: Tags) -> set[str]:
    """Keys of a message list's messages besides role and content (loss_weight, name, ...): reported as unused."""
    items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    used = set(tags.role_keys) | set(tags.content_keys)
    return {k for m in items if isinstance(m, dict) for k in m if k not in used}


def merge_runs(msgs: list[dict]) -> tuple[list[dict], int]:
    """Consecutive user (or assistant, or system) turns as one turn, blank line between; returns (messages, merges).
    Tool results in a row stay separate: each is the result of its own call."""
    out: list[dict] = []
    merges = 0
    for m in msgs:
        if out and m["role"] == out[-1]["role"] and m["role"] != "tool":
            parts = [p for p in (out[-1]["content"], m["content"]) if p.strip()]
            out[-1] = {"role": m["role"], "content": MERGE_SEPARATOR.join(parts)}
            merges += 1
        else:
            out.append(dict(m))
    return out, merges


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_messages(text: str) -> list[dict] | None:
    """Anthropic hh-rlhf transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') as messages, else None."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def _shared_turns(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The shared prefix of two text transcripts is the prompt, cut as TRL's `extract_prompt` cuts it (at the first
    differing character, a space before it going to the answers). Where one transcript is a prefix of the other
    (an empty answer) TRL's loop ends one character early; here the prompt is the whole shorter transcript."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


# ------------------------------------------------------------------------------------------------ layouts


def get_path(row: dict, path: str):
    """row[path], where a dotted path reaches into nested objects (input.messages); KeyError when absent."""
    if path in row:
        return row[path]
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


@dataclass(frozen=True)
class Layout:
    """How a source holds its pairs. `columns` maps each part (prompt, chosen, rejected, system, ...) to its column
    (a dotted path where nested)."""

    name: str
    columns: dict
    tags: Tags = field(default_factory=Tags)
    ranked_pairs: str | None = None  # ranked: best_vs_worst or best_vs_rest
    label_values: tuple = ()  # judged: (label value tag, answer column) pairs
    mapped: bool = False  # built from column_map
    first_place: str = ""
    row_columns: tuple = ()  # the columns of the row it was detected from
    message_keys: tuple = ()  # keys of its messages besides role and content (loss_weight, name, ...): not read

    def unused(self) -> list[str]:
        return sorted(set(self.row_columns) - self.used())

    def used(self) -> set[str]:
        return {c.split(".")[0] for c in self.columns.values() if c}

    def describe(self) -> str:
        parts = ", ".join(f"{k} <- {v}" for k, v in self.columns.items() if v)
        how = " (column_map)" if self.mapped else ""
        unused = f"; not read: {', '.join(self.unused())}" if self.unused() else ""
        keys = f"; message keys not read: {', '.join(self.message_keys)}" if self.message_keys else ""
        return f"{self.name}{how}: {parts}{unused}{keys}"

    def report(self) -> dict:
        out = {"name": self.name, "columns": {k: v for k, v in self.columns.items() if v},
               "unused_columns": self.unused(), "unused_message_keys": list(self.message_keys),
               "from_column_map": self.mapped, "detected_at": self.first_place}
        if self.ranked_pairs:
            out["ranked_pairs"] = self.ranked_pairs
        return out

    # ---- rows

    def _get(self, row: dict, part: str, required: bool = True):
        col = self.columns.get(part)
        if not col:
            return None
        try:
            return get_path(row, col)
        except KeyError:
            if not required:
                return None
            raise DataError(f"missing column {col!r} ({part}); columns present: {sorted(row)}; the source's layout "
                            f"is {self.name} (detected from {self.first_place or 'its first row'}): every row needs "
                            "its columns") from None

    def unused_text(self, row: dict) -> list[str]:
        """Top-level columns this layout does not read whose value is text or messages."""
        used = self.used()
        return [k for k, v in row.items() if k not in used and holds_text(v)]

    def convert(self, raw, templated: bool = True) -> tuple[list[dict], list[str]]:
        """One raw row -> (pairs, notes). Raises DataError(problem) for a row that cannot be a pair."""
        if not isinstance(raw, dict):
            raise DataError(f"expected an object with the columns of a preference pair, got {type(raw).__name__}")
        if self.name == "ranked":
            return self._ranked(raw, templated)
        if self.name == "judged":
            return self._judged(raw, templated)
        if self.name == "implicit":
            extra = self.unused_text(raw)
            if extra:
                raise DataError(f"column {extra[0]!r} holds text that this layout does not read: chosen and rejected "
                                "are whole transcripts whose shared start becomes the prompt, so a prompt in "
                                f"{extra[0]!r} would be trained without. If it is the prompt, set column_map "
                                f"'{{\"prompt\": \"{extra[0]}\"}}'; otherwise drop the column from the data")
        chosen = self._answer(raw, "chosen")
        rejected = self._answer(raw, "rejected")
        prompt = self._prompt(raw)
        return assemble(prompt, chosen, rejected, self._system(raw), templated, self._names())

    def _names(self) -> dict:
        return {k: (self.columns.get(k) or k) for k in ("prompt", "chosen", "rejected")}

    def _system(self, row):
        value = self._get(row, "system", required=False)
        if value is not None and not isinstance(value, str):
            raise DataError(f"field {self.columns['system']!r} (system) must be a string, got {type(value).__name__}")
        return value

    def _value(self, value, name: str):
        """A column's value as text, or messages (converted with this layout's tags)."""
        if isinstance(value, str):
            return value
        if isinstance(value, dict) or (isinstance(value, list) and value and isinstance(value[0], dict)):
            return to_messages(value, name, self.tags)
        if isinstance(value, list) and not value:
            raise DataError(f"field {name!r} is an empty message list")
        if value is None:
            raise DataError(f"field {name!r} is missing or null")
        raise DataError(f"field {name!r} must be a string or a list of messages, got {type(value).__name__}")

    def _answer(self, row, part: str):
        return self._value(self._get(row, part), self.columns[part])

    def _prompt(self, row):
        """The prompt part: None (implicit), text, or messages (question layouts: history, then the user turn)."""
        if self.columns.get("prompt"):
            return self._value(self._get(row, "prompt"), self.columns["prompt"])
        if not self.columns.get("question"):
            return None
        question = self._get(row, "question")
        if not isinstance(question, str):
            raise DataError(f"field {self.columns['question']!r} must be a string, got {type(question).__name__}")
        extra = self._get(row, "input", required=False)
        if isinstance(extra, str) and extra.strip():
            question = f"{question}\n{extra}"  # alpaca: instruction, then its input on the next line
        turns = []
        history = self._get(row, "history", required=False)
        for k, turn in enumerate(history or [], start=1):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"field {self.columns['history']!r} turn {k} must be [user text, assistant text]")
            turns += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        return turns + [{"role": "user", "content": question}]

    def _ranked(self, row, templated):
        prompt = self._prompt(row)
        if isinstance(prompt, str) and templated:
            hh = hh_messages(prompt)
            if hh is not None:  # Nectar: an hh-style transcript ending with an empty Assistant turn
                prompt = hh[:-1] if hh and hh[-1]["role"] == "assistant" and not hh[-1]["content"] else hh
        replies = self._get(row, "answers")
        if not isinstance(replies, list):
            raise DataError(f"field {self.columns['answers']!r} must be a list of replies")
        scored = []
        for k, reply in enumerate(replies):
            text, score = _scored(reply, k, self.columns["answers"])
            scored.append((self._value(text, self.columns["answers"]), score))
        if len(scored) < 2:
            return [], ["too_few_answers"]
        order = sorted(range(len(scored)), key=lambda i: -scored[i][1])  # stable: equal scores keep their order
        best = order[0]
        rivals = [order[-1]] if self.ranked_pairs == "best_vs_worst" else order[1:]
        pairs, notes = [], []
        for j in rivals:
            if scored[j][1] == scored[best][1] or scored[j][0] == scored[best][0]:
                notes.append("ranked_tie")  # the best reply against one of equal rank, or the same text
                continue
            got, more = assemble(prompt, scored[best][0], scored[j][0], self._system(row), templated, {
                "prompt": self.columns.get("prompt") or "prompt", "chosen": self.columns["answers"],
                "rejected": self.columns["answers"]})
            pairs += got
            notes += more
        if not pairs:  # every rival tied with the best: by rank, or with the same text
            same = all(scored[j][0] == scored[best][0] for j in rivals)
            return [], ["no_preference" if same else "tie"]
        return pairs, notes

    def _judged(self, row, templated):
        label = self._get(row, "label", required=False)
        if label is None or (isinstance(label, str) and not label.strip()):
            return [], ["unlabelled"]
        tag = _tag(str(label))
        if str(label).strip().lower() in TIE_LABELS or tag in TIE_LABELS:
            return [], ["tie"]
        winners = dict(self.label_values)
        if tag not in winners:
            raise DataError(f"field {self.columns['label']!r} is {label!r}: expected one of "
                            f"{', '.join(repr(v) for v in winners)} (the answer that won) or a tie "
                            f"({', '.join(sorted(TIE_LABELS)[:3])}, ...)")
        win = winners[tag]
        lose = next(c for c in winners.values() if c != win)
        prompt = self._prompt(row)
        chosen = self._value(get_path(row, win), win)
        rejected = self._value(get_path(row, lose), lose)
        return assemble(prompt, chosen, rejected, self._system(row), templated,
                        {"prompt": self.columns.get("prompt") or self.columns.get("question") or "prompt",
                         "chosen": win, "rejected": lose})


def holds_text(value) -> bool:
    """Prose or a conversation (not an id, a tag or a number): what would be a prompt if one were missing."""
    if isinstance(value, str):
        return len(value.split()) >= 3
    return is_messages(value) or is_message(value)


def any_text(value) -> bool:
    """Any text at all (a non-empty string, a message or a conversation): what a dataset-level check counts."""
    return (isinstance(value, str) and bool(value.strip())) or is_messages(value) or is_message(value)


def _scored(reply, k: int, name: str):
    """(reply, score) of a ranked reply: a string ranked by position, or an object with a rank or a score."""
    if isinstance(reply, str) or is_message(reply) or is_messages(reply):
        return reply, -k
    if isinstance(reply, dict):
        text = next((reply[key] for key in ("answer", "response", "text", "output", "content") if key in reply), None)
        if "rank" in reply and isinstance(reply["rank"], (int, float)):
            return text, -float(reply["rank"])
        for key in ("overall_score", "score", "rating", "reward"):
            if isinstance(reply.get(key), (int, float)):
                return text, float(reply[key])
        if text is not None:
            return text, -k
    raise DataError(f"field {name!r} reply {k + 1} must be a string, or an object with an answer and a rank or score")


def _tag(name: str) -> str:
    """What names an answer in a judge's label: base_response -> base, response_a / conversation_a / model_a -> a."""
    words = [w for w in re.split(r"[\W_]+", name.lower()) if w and w not in
             ("response", "responses", "answer", "output", "completion", "conversation", "model", "reply")]
    return "_".join(words) or name.lower().strip()


def assemble(prompt, chosen, rejected, system, templated: bool, names: dict) -> tuple[list[dict], list[str]]:
    """The parts of one pair (text or messages; prompt None = implicit) -> ([pair] or [], notes), with the rules
    of the module doc. Raises DataError for a pair no chat template could render."""
    notes: list[str] = []
    pn, cn, rn = names["prompt"], names["chosen"], names["rejected"]
    if prompt is None:  # implicit: whole transcripts
        if isinstance(chosen, str) and isinstance(rejected, str) and templated:
            hc, hr = hh_messages(chosen), hh_messages(rejected)
            if hc is not None and hr is not None:
                chosen, rejected = hc, hr
        if type(chosen) is not type(rejected):
            raise DataError(f"fields {cn!r} and {rn!r} must both be transcripts, both text or both message lists")
    elif isinstance(chosen, list) and _starts_with_user([m["role"] for m in chosen]):
        prompt = _Summary(prompt, pn, cn)  # whole conversations: the prompt column only summarises them
    if isinstance(chosen, list) and prompt is None or isinstance(prompt, _Summary):
        if not isinstance(rejected, list):
            raise DataError(f"field {cn!r} is a whole conversation but {rn!r} is not; give both as message lists")
        chosen, m1 = merge_runs(chosen)
        rejected, m2 = merge_runs(rejected)
        if m1 or m2:
            notes.append("merged_turns")
        if chosen == rejected:
            return [], ["no_preference"]
        k = _shared_turns(chosen, rejected)
        shared, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if isinstance(prompt, _Summary):
            prompt.check(shared)
        prompt = shared
        for name, answer in ((cn, chosen), (rn, rejected)):
            if not answer:
                raise DataError(f"field {name!r} has no turn after the turns both conversations share; "
                                "each needs its own answer")
            if answer[0]["role"] != "assistant":
                raise DataError(f"the conversations first differ in a {answer[0]['role']} turn (field {name!r} "
                                f"message {k + 1}): an answer starts with the assistant")
    elif prompt is None:  # implicit text
        prompt, chosen, rejected = _split_text(chosen, rejected)
    else:
        conversational = any(isinstance(x, list) for x in (prompt, chosen, rejected)) or system is not None
        if conversational:
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            chosen = [{"role": "assistant", "content": chosen}] if isinstance(chosen, str) else chosen
            rejected = [{"role": "assistant", "content": rejected}] if isinstance(rejected, str) else rejected
            merged = 0
            prompt, n = merge_runs(prompt)
            merged += n
            chosen, n = merge_runs(chosen)
            merged += n
            rejected, n = merge_runs(rejected)
            merged += n
            if merged:
                notes.append("merged_turns")
    if isinstance(prompt, list) and system is not None and system.strip():
        if not (prompt and prompt[0]["role"] in ("system", "developer")):
            prompt = [{"role": "system", "content": system}] + prompt
    if chosen == rejected:
        return [], ["no_preference"]
    if isinstance(chosen, list):
        _check_roles(prompt, chosen, pn, cn)
        _check_roles(prompt, rejected, pn, rn)
        empty = any(all(not m["content"].strip() for m in a if m["role"] == "assistant") for a in (chosen, rejected))
    else:
        empty = not chosen.strip() or not rejected.strip()
    if empty:
        notes.append("empty_answer")
    if not templated and isinstance(chosen, list):
        raise TemplateMissing("the row is conversational (message lists) but the tokenizer has no chat template; "
                              "set chat_template_path to a Jinja file or a tokenizer folder that has one")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}], notes


class _Summary:
    """An H4 `prompt` column beside whole conversations: it must agree with one of their shared user turns."""

    def __init__(self, value, name: str, conv_name: str):
        self.value, self.name, self.conv_name = value, name, conv_name

    def texts(self) -> list[str]:
        if isinstance(self.value, str):
            return [self.value]
        return [m["content"] for m in self.value if m["role"] == "user"]

    def check(self, shared: list[dict]) -> None:
        mine = [t.strip() for t in self.texts()]
        if not any(mine):
            return  # an empty summary contradicts nothing
        theirs = [m["content"].strip() for m in shared if m["role"] == "user"]
        if not set(mine) & set(theirs):
            show = lambda t: repr(t[:60] + ("..." if len(t) > 60 else ""))  # noqa: E731
            raise DataError(f"field {self.name!r} ({show(mine[-1])}) matches none of the user turns the "
                            f"{self.conv_name!r} conversations share ({', '.join(show(t) for t in theirs) or 'none'}); "
                            "the prompt column and the conversations disagree: fix the row, or drop the prompt column "
                            "(the conversations' shared turns are the prompt)")


def _check_roles(prompt: list, answer: list, pname: str, aname: str) -> None:
    """Role order a chat template can render: system first, then user/assistant turns (same-role runs were merged;
    tool results may follow an assistant turn), the answer starting with the assistant."""
    conv = [(pname, j + 1, m["role"]) for j, m in enumerate(prompt)] + \
           [(aname, j + 1, m["role"]) for j, m in enumerate(answer)]
    head = 0
    while head < len(conv) and conv[head][2] in ("system", "developer"):
        head += 1
    for where, j, role in conv[head:]:
        if role in ("system", "developer"):
            raise DataError(f"field {where!r} message {j} is a {role} message after the conversation started")
    body = conv[head:]
    if prompt and body and body[0][0] == pname and body[0][2] == "assistant":
        raise DataError(f"field {pname!r} starts with an assistant message; a conversation starts with the user")
    if answer[0]["role"] != "assistant":
        raise DataError(f"field {aname!r} must start with an assistant message, not {answer[0]['role']!r}")
    if prompt and prompt[-1]["role"] == "assistant":
        raise DataError(f"field {pname!r} ends with an assistant message and {aname!r} starts with one: the answer "
                        "must follow a user (or tool) turn")
    if answer[-1]["role"] != "assistant":
        raise DataError(f"field {aname!r} must end with an assistant message")


# ---------------------------------------------------------------------------------------------- detection


def detect(row, options: Options = Options(), where: str = "") -> Layout:
    """The layout of a source from one row (its first readable one). Raises DataError naming what is missing."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with the columns of a preference pair, got "
                        f"{type(row).__name__}")
    layout = _detect(row, options, where)
    extras = set()
    for col in layout.columns.values():
        if col and _has(row, col):
            extras |= message_extras(get_path(row, col), layout.tags)
    return dataclasses.replace(layout, row_columns=tuple(sorted(row)), message_keys=tuple(sorted(extras)))


def _detect(row: dict, options: Options, where: str) -> Layout:
    cmap = options.column_map
    tags = Tags.of(cmap)
    if cmap:
        return _mapped(row, cmap, tags, where)
    keys = set(row)
    pair = next(((c, r) for c, r in ANSWER_COLUMNS if c in keys and r in keys), None)
    if pair is not None:
        c, r = pair
        system = "system" if "system" in keys else None
        if c == "preferred_output":
            prompt = next((p for p in ("input.messages", "messages", "prompt") if _has(row, p)), None)
            return Layout("openai", {"prompt": prompt, "chosen": c, "rejected": r, "system": system}, tags,
                          first_place=where)
        if "prompt" in keys:
            value = row[c]
            name = ("h4" if is_messages(value) and _starts_with_user([_role_of(m) for m in value]) else
                    "conversational" if is_messages(value) or is_messages(row["prompt"]) else "standard")
            return Layout(name, {"prompt": "prompt", "chosen": c, "rejected": r, "system": system}, tags,
                          first_place=where)
        conv = next((k for k in CONVERSATION_COLUMNS if k in keys), None)
        if conv is not None:
            return Layout("sharegpt", {"prompt": conv, "chosen": c, "rejected": r, "system": system}, tags,
                          first_place=where)
        question = next((k for k in QUESTION_COLUMNS if k in keys), None)
        if question is not None:
            return Layout("question", {"question": question, "input": "input" if "input" in keys else None,
                                       "history": "history" if "history" in keys else None, "chosen": c,
                                       "rejected": r, "system": system}, tags, first_place=where)
        return Layout("implicit", {"chosen": c, "rejected": r}, tags, first_place=where)
    ranked = _ranked_layout(row, keys, tags, options, where)
    if ranked is not None:
        return ranked
    judged = _judged_layout(row, keys, tags, options, where)
    if judged is not None:
        return judged
    for c, r in ANSWER_COLUMNS:
        if (c in keys) != (r in keys):
            raise DataError(f"{where}: missing column {r if c in keys else c!r}; columns present: {sorted(keys)}. "
                            "Rename the columns or set column_map (e.g. '{\"chosen\": \"good\", \"rejected\": "
                            "\"bad\"}')")
    raise DataError(f"{where}: no preference layout found in columns {sorted(keys)}: a pair needs chosen and "
                    "rejected (or preferred_output/non_preferred_output, response_chosen/response_rejected), with a "
                    "prompt, question or conversations column, or whole transcripts. Rename the columns or set "
                    "column_map (e.g. '{\"prompt\": \"question\", \"chosen\": \"good\", \"rejected\": \"bad\"}'; "
                    "dotted paths reach nested fields: input.messages)")


def _starts_with_user(roles: list) -> bool:
    """A whole conversation (H4's answers): its first turn after any system turn is the user's. An answer that
    only continues a conversation starts with the assistant."""
    body = [r for r in roles if r not in ("system", "developer")]
    return bool(body) and body[0] == "user"


def _has(row, path) -> bool:
    try:
        get_path(row, path)
        return True
    except KeyError:
        return False


def _role_of(m: dict):
    raw = next((m[k] for k in ROLE_KEYS if k in m), None)
    return ROLE_NAMES.get(raw.lower()) if isinstance(raw, str) else None


def _mapped(row: dict, cmap: dict, tags: Tags, where: str) -> Layout:
    cols = {k: v for k, v in cmap.items() if k in MAP_KEYS}
    prompt = cols.get("prompt") or cols.get("messages")
    chosen, rejected = cols.get("chosen", "chosen"), cols.get("rejected", "rejected")
    missing = [p for p in (prompt, chosen, rejected, cols.get("system")) if p and not _has(row, p)]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} named in column_map; columns present: {sorted(row)}")
    system = cols.get("system")
    if prompt is None:
        return Layout("implicit", {"chosen": chosen, "rejected": rejected, "system": system}, tags, mapped=True,
                      first_place=where)
    value = get_path(row, chosen)
    name = ("h4" if is_messages(value) and _starts_with_user([_role_of(m) for m in value]) else
            "sharegpt" if cols.get("messages") else
            "conversational" if isinstance(value, (list, dict)) else "standard")
    return Layout(name, {"prompt": prompt, "chosen": chosen, "rejected": rejected, "system": system}, tags,
                  mapped=True, first_place=where)


def _ranked_layout(row, keys, tags, options, where) -> Layout | None:
    """LLaMA-Factory's ranking layout (instruction + output: replies best first), Nectar (prompt + answers with
    ranks), UltraFeedback's raw completions (instruction + completions with scores)."""
    answers = next((k for k in ("output", "answers", "completions", "responses") if isinstance(row.get(k), list)
                    and len(row[k]) >= 1), None)
    prompt_col = next((k for k in ("prompt",) + QUESTION_COLUMNS if k in keys and isinstance(row[k], str)), None)
    if answers is None or prompt_col is None:
        return None
    what = {"output": "replies ranked best first (LLaMA-Factory's ranking layout)",
            "answers": "answers with ranks (Nectar)", "completions": "completions with scores (UltraFeedback)",
            "responses": "ranked responses"}[answers]
    if options.ranked_pairs not in RANKED:
        raise NeedsOption(f"{where}: ranked data: column {answers!r} holds {what}, not a pair. DPO trains on pairs: "
                        "set ranked_pairs: best_vs_worst (one pair a row: the best reply against the worst) or "
                        "best_vs_rest (the best against each other reply) in the recipe, or --ranked_pairs "
                        "best_vs_worst; replies of equal rank give no pair and are counted")
    cols = {"prompt": prompt_col if prompt_col == "prompt" else None,
            "question": prompt_col if prompt_col != "prompt" else None,
            "input": "input" if prompt_col != "prompt" and "input" in keys else None,
            "history": "history" if "history" in keys else None, "answers": answers,
            "system": "system" if "system" in keys else None}
    return Layout("ranked", cols, tags, ranked_pairs=options.ranked_pairs, first_place=where)


def _judged_layout(row, keys, tags, options, where) -> Layout | None:
    """Two answers and a judge's label naming the better one (or a tie): FastChat's judged pairs, Chatbot Arena."""
    label = next((k for k in LABEL_COLUMNS if k in keys and (row[k] is None or isinstance(row[k], str))), None)
    if label is None:
        return None
    answers = [k for k in sorted(keys) if k != label and _tag(k) != k.lower() and _tag(k) not in JUDGE_WORDS and
               any(w in k.lower() for w in ("response", "answer", "output", "completion", "conversation"))
               and (isinstance(row[k], str) or is_messages(row[k]))]
    if len(answers) != 2 or _tag(answers[0]) == _tag(answers[1]):
        return None
    if not options.judged_pairs:
        raise NeedsOption(f"{where}: judged pairs: columns {answers[0]!r} and {answers[1]!r} with the judge's verdict "
                        f"in {label!r}, not chosen/rejected. Set judged_pairs: true in the recipe (or --judged_pairs "
                        "true): the winner becomes chosen, the other rejected; ties and unlabelled rows give no pair "
                        "and are counted")
    prompt = next((k for k in ("prompt",) + QUESTION_COLUMNS if k in keys and isinstance(row[k], (str, list))), None)
    cols = {"prompt": prompt if prompt == "prompt" else None, "question": prompt if prompt != "prompt" else None,
            "label": label, "a": answers[0], "b": answers[1], "system": "system" if "system" in keys else None}
    return Layout("judged", cols, tags, label_values=((_tag(answers[0]), answers[0]), (_tag(answers[1]), answers[1])),
                  first_place=where)


def detect_rows(items, places, options: Options = Options()) -> Layout | None:
    """The layout from the first row that decodes to an object and fits one (at most DETECT_ROWS rows are tried, so
    a bad first row stays a row error); None when no row decodes. Ranked/judged data without its option fails."""
    from .sources import decode

    first_error, tried = None, 0
    for item, where in zip(items, places, strict=True):
        try:
            row = decode(item)
        except DataError:
            continue
        if not isinstance(row, dict):
            continue
        try:
            return detect(row, options, where)
        except NeedsOption:
            raise
        except DataError as e:
            first_error = first_error or e
        tried += 1
        if tried >= DETECT_ROWS:
            break
    if first_error is not None:
        raise first_error
    return None


def detect_source(batches, options: Options = Options()):
    """(layout, batches): the layout of a stream of RawBatch, and the same stream from its start."""
    batches = iter(batches)
    seen, rows = [], 0
    layout = None
    for batch in batches:
        seen.append(batch)
        layout = detect_rows(batch.items, batch.where, options)
        rows += len(batch.items)
        if layout is not None or rows >= DETECT_ROWS:
            break

    def chained():
        yield from seen
        yield from batches

    return layout, chained()
