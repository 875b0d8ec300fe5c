"""Judged data as it is published, with number labels: a registry of shapes (LLaMA-Factory's dataset_info idea),
each naming its answer columns, its label column(s) and what each label value means, since the same numbers mean
different things in different sources (0 is a draw in alpaca_eval and PandaLM, the first answer in Auto-J, the second
in SHP). Detection matches the exact column names; the codes come from the shape, never from the value's type. A
number label on a shape not listed here needs the codes said (`judged_codes`); several annotators need
`annotators: majority`; two competing labels (PKU-SafeRLHF) need `judged_label`. Ties, splits and unlabelled rows
give no pair and are counted."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..errors import DataError
from .assemble import assemble
from .judged import LABEL_COLUMNS, answer_columns
from .layout import ANNOTATORS, Layout, NeedsOption, check_codes, get_path, has_path
from .toolcalls import absent

ANNOTATOR = re.compile(r"annotator_?\d+$")  # one rater's verdict per column (PandaLM: annotator1..3)


def _number(value):
    """A label value as a number; None for no label (null, NaN, empty). ValueError for anything else."""
    if absent(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    return float(value) if isinstance(value, str) else value


def _alpaca(value):
    """alpaca_eval: 1 or 2 names the better output, 0 a draw; the weighted annotators' float on the 1-2 scale is
    read as alpaca_eval reads it (rounded, 1.5 a draw)."""
    x = _number(value)
    if x is None:
        return None
    if x == 0:
        return "tie"
    if not 1 <= x <= 2:
        raise ValueError(value)
    return "a" if x < 1.5 else "b" if x > 1.5 else "tie"


def _indexed(codes: dict, value):
    x = _number(value)
    if x is None:
        return None
    if x not in codes:
        raise ValueError(value)
    return codes[x]


def _signed(value):
    """HelpSteer: the strength of the preference, negative for the first response, positive for the second."""
    x = _number(value)
    return None if x is None else "a" if x < 0 else "b" if x > 0 else "tie"


@dataclass(frozen=True)
class Shape:
    """One published judged layout: exact column names and the meaning of its label values."""

    name: str
    answers: tuple  # (first answer, second answer)
    labels: tuple  # label columns (several: judged_label picks one); empty for annotator columns
    prompt: dict  # the layout's prompt columns (question, input / prompt), each used if present
    codes: str  # the label values in words, for the log, the report and the errors
    verdict: Callable  # a label value -> "a", "b", "tie" or None (no label); ValueError outside the codes
    annotators: bool = False  # annotator1..N columns, one rater each
    turns: bool = False  # HelpSteer2's prompt: turns joined by its <extra_id_1> markers


SHAPES = (
    Shape("alpaca_eval annotations", ("output_1", "output_2"), ("preference",),
          {"question": "instruction", "input": "input"},
          "1 = output_1, 2 = output_2, 0 = a draw; a float on the 1-2 scale: below 1.5 output_1, above 1.5 "
          "output_2, 1.5 a draw; null = not annotated", _alpaca),
    Shape("PandaLM", ("response1", "response2"), (), {"question": "instruction", "input": "input"},
          "each annotator: 1 = response1, 2 = response2, 0 = similar", partial(_indexed, {1: "a", 2: "b", 0: "tie"}),
          annotators=True),
    Shape("Auto-J pairwise", ("response 1", "response 2"), ("label",), {"question": "prompt"},
          "0 = response 1, 1 = response 2, 2 = a tie", partial(_indexed, {0: "a", 1: "b", 2: "tie"})),
    Shape("SHP", ("human_ref_A", "human_ref_B"), ("labels",), {"question": "history"},
          "1 = human_ref_A, 0 = human_ref_B", partial(_indexed, {1: "a", 0: "b"})),
    Shape("PKU-SafeRLHF", ("response_0", "response_1"), ("better_response_id", "safer_response_id"),
          {"question": "prompt"}, "0 = response_0, 1 = response_1", partial(_indexed, {0: "a", 1: "b"})),
    Shape("HelpSteer2 preference", ("response_1", "response_2"), ("preference_strength",), {"question": "prompt"},
          "below 0 = response_1, above 0 = response_2 (-3..3: how much better), 0 = about the same", _signed,
          turns=True),
    Shape("HelpSteer3 preference", ("response1", "response2"), ("overall_preference",), {"prompt": "context"},
          "below 0 = response1, above 0 = response2 (-3..3: how much better), 0 = about the same", _signed),
)


def annotator_columns(keys) -> list[str]:
    return sorted((k for k in keys if ANNOTATOR.match(k)), key=lambda k: (len(k), k))


def _fits(shape: Shape, keys: set) -> bool:
    labels = len(annotator_columns(keys)) >= 2 if shape.annotators else any(c in keys for c in shape.labels)
    prompt = next(iter(shape.prompt.values()))
    return labels and prompt in keys and all(a in keys for a in shape.answers)


def detect(row, keys, tags, options, where) -> Layout | None:
    """A registered judged shape, or two answers with a number label (or several annotators) whose codes the
    recipe gives in judged_codes; None when neither."""
    shape = next((s for s in SHAPES if _fits(s, keys)), None)
    if shape is not None:
        return _registered(shape, keys, tags, options, where)
    return _coded(row, keys, tags, options, where)


def _registered(shape: Shape, keys: set, tags, options, where: str) -> Layout:
    a, b = shape.answers
    annot = annotator_columns(keys) if shape.annotators else []
    labels = annot or [c for c in shape.labels if c in keys]
    needs = []
    if annot and options.annotators not in ANNOTATORS:
        needs.append(_annotators_needed(annot, a, b, shape.codes))
    if len(labels) > 1 and not annot:
        if options.judged_label in labels:
            labels = [options.judged_label]
        else:
            needs.append(_label_needed(labels, a, b, options.judged_label))
    _ask(needs, options, f"judged pairs ({shape.name}): {a!r} and {b!r}", labels, shape.codes, where)
    cols = {k: v for k, v in shape.prompt.items() if v in keys}
    cols.update({"a": a, "b": b, **_label_parts(labels), "system": "system" if "system" in keys else None})
    how = f"{shape.name}: {shape.codes}" + (f"; {len(annot)} annotators, the majority decides" if annot else "")
    return Layout("judged", cols, tags, judged=how, annotators=options.annotators if annot else None,
                  first_place=where, converter=partial(convert, verdict=shape.verdict, turns=shape.turns))


def _coded(row, keys, tags, options, where: str) -> Layout | None:
    """Two answers and a number label (or annotator columns) of a shape not in SHAPES: the codes must be said."""
    annot = annotator_columns(keys)
    label = next((k for k in LABEL_COLUMNS if k in keys and _is_number(row[k])), None)
    if label is None and len(annot) < 2:
        return None
    labels = annot if len(annot) >= 2 else [label]
    answers = answer_columns(row, keys, set(labels))
    if len(answers) != 2:
        return None
    a, b = answers
    needs = []
    if len(annot) >= 2 and options.annotators not in ANNOTATORS:
        needs.append(_annotators_needed(annot, a, b, "codes not known"))
    if options.judged_codes is None:
        needs.append(_codes_needed(labels, a, b, row))
    _ask(needs, options, f"judged pairs: {a!r} and {b!r}", labels, "codes from judged_codes", where)
    codes = _checked_codes(options.judged_codes, a, b, where)
    cols = {"prompt": None, "question": None}
    prompt = next((k for k in ("prompt", "question", "instruction", "query") if k in keys), None)
    cols["question" if isinstance(row.get(prompt), str) else "prompt"] = prompt  # text: one user turn
    cols.update({"input": "input" if "input" in keys else None, "a": a, "b": b, **_label_parts(labels),
                 "system": "system" if "system" in keys else None})
    words = ", ".join(f"{k} = {v}" for k, v in options.judged_codes.items())
    return Layout("judged", cols, tags, judged=f"codes from judged_codes: {words}",
                  annotators=options.annotators if len(annot) >= 2 else None, first_place=where,
                  converter=partial(convert, verdict=partial(_from_codes, codes)))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label_parts(labels: list) -> dict:
    return {("label" if k == 0 else f"label_{k + 1}"): c for k, c in enumerate(labels)}


def _code(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower()


def _from_codes(codes: dict, value):
    if absent(value):
        return None
    if _code(value) not in codes:
        raise ValueError(value)
    return codes[_code(value)]


def _checked_codes(codes: dict, a: str, b: str, where: str) -> dict:
    problem = check_codes(codes)
    bad = [v for v in codes.values() if v not in (a, b, "tie")]
    if problem or bad:
        raise DataError(f"{where}: {problem or f'judged_codes names {bad[0]!r}'}: each value must be {a!r}, {b!r} "
                        "or \"tie\"")
    return {_code(k): "a" if v == a else "b" if v == b else "tie" for k, v in codes.items()}


def _annotators_needed(annot: list, a: str, b: str, codes: str) -> str:
    return (f"{', '.join(repr(c) for c in annot)} each hold one rater's verdict on {a!r} against {b!r} ({codes}) "
            "and there is no single label. Set annotators: majority in the recipe (or --annotators majority): the "
            "verdict more than half of the raters gave decides; rows where the majority says the answers are "
            "similar, or where no verdict has a majority, give no pair and are counted")


def _label_needed(labels: list, a: str, b: str, given) -> str:
    said = f" (judged_label {given!r} is not one of them)" if given else ""
    return (f"{' and '.join(repr(c) for c in labels)} each pick {a!r} or {b!r} and can disagree{said}. Choose the "
            f"one that makes chosen: {' or '.join(f'judged_label: {c}' for c in labels)}")


def _codes_needed(labels: list, a: str, b: str, row: dict) -> str:
    seen = ", ".join(repr(row.get(c)) for c in labels)
    return (f"{' and '.join(repr(c) for c in labels)} pick between {a!r} and {b!r} with numbers ({seen} in this "
            "row), but this layout's codes are not known, and published data uses 0 for a tie, for the first "
            "answer and for the second. Say what each value means with judged_codes (e.g. "
            f"'{{\"1\": \"{a}\", \"2\": \"{b}\", \"0\": \"tie\"}}')")


def _ask(needs: list, options, what: str, labels: list, codes: str, where: str) -> None:
    """Raise NeedsOption with everything the recipe must say for this judged source (judged_pairs included)."""
    if not options.judged_pairs:
        needs.append(f"the verdict is in {', '.join(repr(c) for c in labels)} ({codes}), not chosen/rejected. Set "
                     "judged_pairs: true in the recipe (or --judged_pairs true): the winner becomes chosen, the "
                     "other rejected; ties and unlabelled rows give no pair and are counted")
    if needs:
        raise NeedsOption(f"{where}: {what}: " + "; and ".join(needs))


def convert(layout: Layout, row: dict, templated: bool, verdict: Callable, turns: bool = False):
    """One judged row -> ([pair] or [], notes): the winner chosen, the other rejected; identical answers, ties,
    splits and unlabelled rows give no pair."""
    labels = [c for k, c in layout.columns.items() if k.startswith("label") and c]
    won = _verdict(layout, row, labels, verdict)
    a, b = layout.answer(row, "a"), layout.answer(row, "b")
    if a == b:
        return [], ["no_preference"]
    if won is None:
        return [], ["unlabelled"]
    if won in ("tie", "split"):
        return [], [won]
    prompt = layout.prompt(row)
    if turns:
        prompt = prompt[:-1] + split_turns(prompt[-1]["content"])
    win, lose = ("a", "b") if won == "a" else ("b", "a")
    chosen, rejected = (a, b) if won == "a" else (b, a)
    return assemble(prompt, chosen, rejected, layout.system(row), templated, {
        "prompt": layout.columns.get("prompt") or layout.columns.get("question") or "prompt",
        "chosen": layout.columns[win], "rejected": layout.columns[lose]})


def _verdict(layout: Layout, row: dict, labels: list, verdict: Callable):
    """"a", "b", "tie", "split" (annotators without a majority) or None (no label)."""
    votes = []
    for col in labels:
        value = get_path(row, col) if has_path(row, col) else None
        try:
            v = verdict(value)
        except (ValueError, TypeError):
            raise DataError(f"field {col!r} is {value!r}: expected {layout.judged}") from None
        if v is not None:
            votes.append(v)
    if not votes:
        return None
    top = max(dict.fromkeys(votes), key=votes.count)
    return top if votes.count(top) * 2 > len(votes) else "split"


_MARKER = re.compile(r"\n<extra_id_1>(Assistant|User)\n")


def split_turns(text: str) -> list[dict]:
    """HelpSteer2's multi-turn prompt ('...\\n<extra_id_1>Assistant\\n...\\n<extra_id_1>User\\n...') as turns."""
    parts = _MARKER.split(text)
    return [{"role": "user", "content": parts[0]}] + [
        {"role": role.lower(), "content": content} for role, content in zip(parts[1::2], parts[2::2], strict=True)]
