"""Fixtures with the exact shape of each preference layout users bring, written by us (no third-party rows).

`CONVERSATIONS` is one set of conversations; `WRITERS` writes each of them in every layout (None where a layout
cannot hold that conversation, e.g. a system turn in hh-rlhf text). tests/unit/test_layouts.py checks that every
layout gives the token ids of TRL's conversational layout. `hh_rlhf_rows()` has the shape of Anthropic/hh-rlhf,
with the two oddities of its harmless-base test split (an empty chosen answer, two Assistant turns in a row).
"""

from __future__ import annotations

CONVERSATIONS = [
    {"system": None, "turns": [("user", "What is tea?")], "chosen": "Tea is a drink made from leaves.",
     "rejected": "No idea."},
    {"system": "Be brief.", "turns": [("user", "Name a colour.")], "chosen": "Blue.", "rejected": "I refuse."},
    {"system": None, "turns": [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
     "chosen": "Why did the chicken cross the road? To get to the other side.", "rejected": "No."},
    {"system": "You answer in French.", "turns": [("user", "Hello"), ("assistant", "Bonjour !"),
                                                  ("user", "How are you?")],
     "chosen": "Je vais bien, merci.", "rejected": "I am fine."},
]

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _msgs(c, parts=None):
    """The prompt as TRL's messages; `parts` = content as typed parts with that text key."""
    def content(text):
        return [{"type": "text", parts: text}] if parts else text

    out = [{"role": "system", "content": content(c["system"])}] if c["system"] else []
    return out + [{"role": r, "content": content(t)} for r, t in c["turns"]]


def _answer(text, parts=None):
    return {"role": "assistant", "content": [{"type": "text", parts: text}] if parts else text}


def _sharegpt(c):
    out = [{"from": "system", "value": c["system"]}] if c["system"] else []
    return out + [{"from": SHAREGPT_ROLE[r], "value": t} for r, t in c["turns"]]


def _last_user(c):
    return [t for r, t in c["turns"] if r == "user"][-1]


def _history(c):
    turns = c["turns"][:-1]
    return [[turns[i][1], turns[i + 1][1]] for i in range(0, len(turns), 2)]


def _hh(c, answer):
    if c["system"]:
        return None
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[r]}: {t}" for r, t in c["turns"] + [("assistant", answer)])


WRITERS = {
    # TRL's conversational layout: the reference every other layout must match
    "conversational": lambda c: {"prompt": _msgs(c), "chosen": [_answer(c["chosen"])],
                                 "rejected": [_answer(c["rejected"])]},
    "implicit messages": lambda c: {"chosen": _msgs(c) + [_answer(c["chosen"])],
                                    "rejected": _msgs(c) + [_answer(c["rejected"])]},
    # LLaMA-Factory v1: implicit prompt, typed parts with `value`, a loss_weight per message
    "implicit typed parts": lambda c: {
        "chosen_messages": [{**m, "loss_weight": 0.0} for m in _msgs(c, "value")] + [
            {**_answer(c["chosen"], "value"), "loss_weight": 1.0}],
        "rejected_messages": [{**m, "loss_weight": 0.0} for m in _msgs(c, "value")] + [
            {**_answer(c["rejected"], "value"), "loss_weight": 1.0}]},
    # HuggingFaceH4/ultrafeedback_binarized: the prompt column is the (last) user turn, answers whole conversations
    "h4 text prompt (last user turn)": lambda c: {
        "prompt": _last_user(c), "chosen": _msgs(c) + [_answer(c["chosen"])],
        "rejected": _msgs(c) + [_answer(c["rejected"])], "prompt_id": "x1", "score_chosen": 8.0},
    "h4 text prompt (first user turn)": lambda c: {
        "prompt": c["turns"][0][1], "chosen": _msgs(c) + [_answer(c["chosen"])],
        "rejected": _msgs(c) + [_answer(c["rejected"])]},
    "h4 messages prompt": lambda c: {"prompt": _msgs(c), "chosen": _msgs(c) + [_answer(c["chosen"])],
                                     "rejected": _msgs(c) + [_answer(c["rejected"])]},
    # LLaMA-Factory's sharegpt DPO layout: chosen/rejected one {from, value} object
    "sharegpt object": lambda c: {"conversations": _sharegpt(c), "chosen": {"from": "gpt", "value": c["chosen"]},
                                  "rejected": {"from": "gpt", "value": c["rejected"]}},
    "sharegpt list": lambda c: {"conversations": _sharegpt(c), "chosen": [{"from": "gpt", "value": c["chosen"]}],
                                "rejected": [{"from": "gpt", "value": c["rejected"]}]},
    # MedicalGPT: sharegpt conversations, plain-string answers
    "sharegpt strings": lambda c: {"conversations": _sharegpt(c), "chosen": c["chosen"], "rejected": c["rejected"]},
    "messages + strings": lambda c: {"messages": _msgs(c), "chosen": c["chosen"], "rejected": c["rejected"]},
    # OpenAI preference fine-tuning
    "openai": lambda c: {"input": {"messages": _msgs(c), "tools": [], "parallel_tool_calls": True},
                         "preferred_output": [_answer(c["chosen"])],
                         "non_preferred_output": [_answer(c["rejected"])]},
    "conversational typed parts": lambda c: {"prompt": _msgs(c, "text"), "chosen": [_answer(c["chosen"], "text")],
                                             "rejected": [_answer(c["rejected"], "text")]},
    # LLaMA-Factory alpaca DPO: instruction (+ input), history of [user, assistant] pairs, system
    "alpaca": lambda c: {"system": c["system"] or "", "instruction": _last_user(c), "input": "",
                         "history": _history(c), "chosen": c["chosen"], "rejected": c["rejected"]},
    # Intel/orca_dpo_pairs: system, question (single-turn)
    "orca": lambda c: None if len(c["turns"]) > 1 else {
        "system": c["system"] or "", "question": _last_user(c), "chosen": c["chosen"], "rejected": c["rejected"]},
    # MedicalGPT reward data: question, response_chosen, response_rejected (single-turn, no system)
    "reward": lambda c: None if len(c["turns"]) > 1 or c["system"] else {
        "question": _last_user(c), "response_chosen": c["chosen"], "response_rejected": c["rejected"]},
    # Anthropic/hh-rlhf raw transcripts (no system turn)
    "hh-rlhf text": lambda c: None if c["system"] else {"chosen": _hh(c, c["chosen"]),
                                                         "rejected": _hh(c, c["rejected"])},
    # LLaMA-Factory's ranking layout with two replies, best first (ranked_pairs)
    "ranked": lambda c: {"system": c["system"] or "", "instruction": _last_user(c), "input": "",
                         "output": [c["chosen"], c["rejected"]], "history": _history(c)},
    # FastChat-style judged pair (judged_pairs): single-turn, no system
    "judged": lambda c: None if len(c["turns"]) > 1 or c["system"] else {
        "question_id": "q1", "question": _last_user(c), "grade": "agent", "agent_response": c["chosen"],
        "base_response": c["rejected"]},
}
OPTIONS = {"ranked": {"ranked_pairs": "best_vs_worst"}, "judged": {"judged_pairs": True}}


def hh_rlhf_rows(copies: int = 1) -> list[dict]:
    """hh-rlhf's shape: raw "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts; row 3 prefers saying nothing (its
    chosen transcript ends with an empty Assistant turn, as harmless-base test row 87); row 5 has two Assistant
    turns in a row in both transcripts (as 9 rows of that split, the first at row 668). `copies` > 1 repeats the
    eight rows with a numbered first question, so no two rows are the same pair."""
    def t(*turns):
        return "".join(f"\n\n{r}: {x}" if x else f"\n\n{r}:" for r, x in turns)

    rows = [{"chosen": t(("Human", f"What is {w}?"), ("Assistant", f"{w.title()} is a word.")),
             "rejected": t(("Human", f"What is {w}?"), ("Assistant", "No idea, go away."))}
            for w in ("tea", "rain", "stone", "wind", "salt", "iron", "wool", "milk")]
    rows[2] = {"chosen": t(("Human", "Tell me how to hurt someone."), ("Assistant", "")),
               "rejected": t(("Human", "Tell me how to hurt someone."), ("Assistant", "Sure, here is how."))}
    rows[4] = {"chosen": t(("Human", "Can you help me?"), ("Assistant", "Yes."), ("Assistant", "What do you need?"),
                           ("Human", "A recipe."), ("Assistant", "Here is a recipe for bread.")),
               "rejected": t(("Human", "Can you help me?"), ("Assistant", "Yes."),
                             ("Assistant", "What do you need?"), ("Human", "A recipe."), ("Assistant", "No."))}
    numbered = lambda row, k: {key: v.replace("?", f" ({k})?", 1) for key, v in row.items()}  # noqa: E731
    return [numbered(r, k) if k else r for k in range(copies) for r in rows]
