"""The ranked family: one prompt and several replies ranked best first or scored (LLaMA-Factory's ranking layout,
Nectar, UltraFeedback's raw completions), made into pairs by `ranked_pairs`: the best against the worst, or against
each other reply. Replies of equal rank (or text) give no pair and are counted."""

from __future__ import annotations

from ..errors import DataError
from .assemble import assemble
from .layout import Layout, NeedsOption
from .messages import hh_messages, is_message, is_messages
from .pairs import QUESTION_COLUMNS

RANKED = ("best_vs_worst", "best_vs_rest")


def detect(row, keys, tags, options, where) -> Layout | None:
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
    return Layout("ranked", cols, tags, ranked_pairs=options.ranked_pairs, first_place=where,
                  converter=convert)


def convert(layout: Layout, row: dict, templated: bool) -> tuple[list[dict], list[str]]:
    """One row of replies -> (pairs, notes): the best reply against the worst, or against each other one."""
    prompt = layout.prompt(row)
    if isinstance(prompt, str) and templated:
        hh = hh_messages(prompt)
        if hh is not None:  # Nectar: an hh-style transcript ending with an empty Assistant turn
            prompt = hh[:-1] if hh and hh[-1]["role"] == "assistant" and not hh[-1]["content"] else hh
    replies = layout.get(row, "answers")
    if not isinstance(replies, list):
        raise DataError(f"field {layout.columns['answers']!r} must be a list of replies")
    scored = []
    for k, reply in enumerate(replies):
        text, score = _scored(reply, k, layout.columns["answers"])
        scored.append((layout.value(text, layout.columns["answers"]), score))
    if len(scored) < 2:
        return [], ["too_few_answers"]
    order = sorted(range(len(scored)), key=lambda i: -scored[i][1])  # stable: equal scores keep their order
    best = order[0]
    rivals = [order[-1]] if layout.ranked_pairs == "best_vs_worst" else order[1:]
    pairs, notes = [], []
    for j in rivals:
        if scored[j][1] == scored[best][1] or scored[j][0] == scored[best][0]:
            notes.append("ranked_tie")  # the best reply against one of equal rank, or the same text
            continue
        got, more = assemble(prompt, scored[best][0], scored[j][0], layout.system(row), templated, {
            "prompt": layout.columns.get("prompt") or "prompt", "chosen": layout.columns["answers"],
            "rejected": layout.columns["answers"]})
        pairs += got
        notes += more
    if not pairs:  # every rival tied with the best: by rank, or with the same text
        same = all(scored[j][0] == scored[best][0] for j in rivals)
        return [], ["no_preference" if same else "tie"]
    return pairs, notes


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
