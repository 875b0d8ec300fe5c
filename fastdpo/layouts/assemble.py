"""One pair from its parts: text or messages, the prompt given, summarised (H4) or implicit (the answers' shared
start), turned into TRL's preference form with the rules every layout keeps (same-role runs merged, an empty answer
counted, chosen = rejected no pair) and the role order a chat template can render checked."""

from __future__ import annotations

from ..errors import DataError, TemplateMissing
from .messages import hh_messages, merge_runs, says_something, starts_with_user


def assemble(prompt, chosen, rejected, system, templated: bool, names: dict) -> tuple[list[dict], list[str]]:
    """The parts of one pair (text or messages; prompt None = implicit) -> ([pair] or [], notes), with the rules
    of the package doc. Raises DataError for a pair no chat template could render."""
    notes: list[str] = []
    cn, rn = names["chosen"], names["rejected"]
    if prompt is None:  # implicit: whole transcripts
        chosen, rejected = _transcripts(chosen, rejected, templated, cn, rn)
    elif isinstance(chosen, list) and starts_with_user([m["role"] for m in chosen]):
        prompt = Summary(prompt, names["prompt"], cn)  # whole conversations: the prompt column only summarises them
    if isinstance(chosen, list) and prompt is None or isinstance(prompt, Summary):
        parts = _whole_conversations(prompt, chosen, rejected, names, notes)
        if parts is None:
            return [], ["no_preference"]
        prompt, chosen, rejected = parts
    elif prompt is None:  # implicit text
        prompt, chosen, rejected = split_text(chosen, rejected)
    elif any(isinstance(x, list) for x in (prompt, chosen, rejected)) or system is not None:
        prompt, chosen, rejected = as_messages(prompt, chosen, rejected, notes)
    return _checked(prompt, chosen, rejected, system, templated, names, notes)


def _transcripts(chosen, rejected, templated: bool, cn: str, rn: str):
    """Implicit-prompt answers: hh-rlhf text transcripts become messages when a chat template will render them."""
    if isinstance(chosen, str) and isinstance(rejected, str) and templated:
        hc, hr = hh_messages(chosen), hh_messages(rejected)
        if hc is not None and hr is not None:
            chosen, rejected = hc, hr
    if type(chosen) is not type(rejected):
        raise DataError(f"fields {cn!r} and {rn!r} must both be transcripts, both text or both message lists")
    return chosen, rejected


def _whole_conversations(prompt, chosen, rejected, names: dict, notes: list):
    """Two whole conversations -> (their shared turns, chosen's own turns, rejected's own turns); None when they are
    the same conversation (no pair)."""
    cn, rn = names["chosen"], names["rejected"]
    if not isinstance(rejected, list):
        raise DataError(f"field {cn!r} is a whole conversation but {rn!r} is not; give both as message lists")
    chosen, m1 = merge_runs(chosen)
    rejected, m2 = merge_runs(rejected)
    if m1 or m2:
        notes.append("merged_turns")
    if chosen == rejected:
        return None
    k = shared_turns(chosen, rejected)
    shared, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if isinstance(prompt, Summary):
        prompt.check(shared)
    for name, answer in ((cn, chosen), (rn, rejected)):
        if not answer:
            raise DataError(f"field {name!r} has no turn after the turns both conversations share; "
                            "each needs its own answer")
        if answer[0]["role"] != "assistant":
            raise DataError(f"the conversations first differ in a {answer[0]['role']} turn (field {name!r} "
                            f"message {k + 1}): an answer starts with the assistant")
    return shared, chosen, rejected


def as_messages(prompt, chosen, rejected, notes: list):
    """A pair with any part in messages (or a system prompt): every part as messages, same-role runs merged."""
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
    return prompt, chosen, rejected


def _checked(prompt, chosen, rejected, system, templated: bool, names: dict, notes: list):
    """The assembled pair with its system turn, checked as a chat template will render it: ([pair] or [], notes)."""
    pn, cn, rn = names["prompt"], names["chosen"], names["rejected"]
    if isinstance(prompt, list) and system is not None and system.strip():
        if not (prompt and prompt[0]["role"] in ("system", "developer")):
            prompt = [{"role": "system", "content": system}] + prompt
    if chosen == rejected:
        return [], ["no_preference"]
    if isinstance(chosen, list):
        check_roles(prompt, chosen, pn, cn)
        check_roles(prompt, rejected, pn, rn)
        empty = any(not any(says_something(m) for m in a if m["role"] == "assistant") for a in (chosen, rejected))
    else:
        if system is not None and system.strip():
            raise DataError(f"a system prompt is given but {cn!r} and {rn!r} are text transcripts, not messages: a "
                            "system turn needs a chat template and a conversation; write the rows as messages")
        empty = not chosen.strip() or not rejected.strip()
    if empty:
        notes.append("empty_answer")
    if not templated and isinstance(chosen, list):
        raise TemplateMissing("the row is conversational (message lists) but the tokenizer has no chat template; "
                              "set chat_template_path to a Jinja file or a tokenizer folder that has one")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected}], notes


class Summary:
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


def check_roles(prompt: list, answer: list, pname: str, aname: str) -> None:
    """Role order a chat template can render: system first, then user/assistant turns (same-role runs were merged;
    tool results follow an assistant turn or another result), the answer starting with the assistant (its text or
    its tool calls)."""
    conv = [(pname, j + 1, m["role"]) for j, m in enumerate(prompt)] + \
           [(aname, j + 1, m["role"]) for j, m in enumerate(answer)]
    head = 0
    while head < len(conv) and conv[head][2] in ("system", "developer"):
        head += 1
    for where, j, role in conv[head:]:
        if role in ("system", "developer"):
            raise DataError(f"field {where!r} message {j} is a {role} message after the conversation started")
    body = conv[head:]
    for (_, _, before), (where, j, role) in zip(body, body[1:], strict=False):
        if role == "tool" and before not in ("assistant", "tool"):
            raise DataError(f"field {where!r} message {j} is a tool result after a {before} turn: a tool result "
                            "follows the assistant turn that called the tool")
    if prompt and body and body[0][0] == pname and body[0][2] == "assistant":
        raise DataError(f"field {pname!r} starts with an assistant message; a conversation starts with the user")
    if answer[0]["role"] != "assistant":
        raise DataError(f"field {aname!r} must start with an assistant message, not {answer[0]['role']!r}")
    if prompt and prompt[-1]["role"] == "assistant":
        raise DataError(f"field {pname!r} ends with an assistant message and {aname!r} starts with one: the answer "
                        "must follow a user (or tool) turn")
    if answer[-1]["role"] != "assistant":
        raise DataError(f"field {aname!r} must end with an assistant message")


def shared_turns(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The shared prefix of two text transcripts is the prompt, cut as TRL's `extract_prompt` cuts it (at the first
    differing character, a space before it going to the answers). Where one transcript is a prefix of the other
    (an empty answer) TRL's loop ends one character early; here the prompt is the whole shorter transcript."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]
