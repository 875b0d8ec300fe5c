"""A detected layout: which column holds each part of a pair, the message tags, and the family converter that turns
one raw row into pairs. Detection builds one per source (fastdpo.layouts.detect); every row then goes through
`Layout.convert`."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DataError, TemplateMissing
from .assemble import as_messages
from .messages import Tags, holds_text, to_messages
from .toolcalls import absent, kwargs_of, tools_of


class NeedsOption(DataError):
    """Ranked or judged data: a property of the whole source, which a conversion option turns into pairs."""


class NotPairs(DataError):
    """Data that is not preference pairs (KTO rows, unlabelled answer pairs): a property of the whole source, said
    once at detection with what would make pairs of it."""


ANNOTATORS = ("majority",)  # how the verdicts of several annotators make one


@dataclass(frozen=True)
class Options:
    """What decides the layout besides the rows: the recipe's column_map and the conversion options."""

    column_map: dict | None = None
    ranked_pairs: str | None = None
    judged_pairs: bool = False
    annotators: str | None = None  # several annotator columns -> one verdict: majority
    judged_label: str | None = None  # the label column to use where a source has several (PKU-SafeRLHF)
    judged_codes: dict | None = None  # label value -> answer column or "tie", for a layout whose codes are unknown

    @classmethod
    def of(cls, args) -> Options:
        codes = getattr(args, "judged_codes", None)
        return cls(getattr(args, "column_map", None), getattr(args, "ranked_pairs", None),
                   bool(getattr(args, "judged_pairs", False)), getattr(args, "annotators", None),
                   getattr(args, "judged_label", None), parse_codes(codes) if isinstance(codes, str) else codes)

    def key(self) -> dict:
        out = {"column_map": self.column_map, "ranked_pairs": self.ranked_pairs, "judged_pairs": self.judged_pairs}
        for name in ("annotators", "judged_label", "judged_codes"):  # only when set: older cache keys stay valid
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def check_codes(codes) -> str | None:
    """The problem with a judged_codes value, or None: an object from label values to an answer column or tie."""
    if not isinstance(codes, dict) or not codes or not all(isinstance(v, str) and v for v in codes.values()):
        return ("judged_codes must be a JSON object from each label value to the answer column it picks or "
                "\"tie\", e.g. '{\"1\": \"response1\", \"2\": \"response2\", \"0\": \"tie\"}'")
    return None


def parse_codes(text: str) -> dict:
    """judged_codes as a recipe or a flag gives it (JSON text) -> the object; a bad one stops with the problem."""
    try:
        codes = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"judged_codes is not JSON ({e}); {check_codes(None)}") from None
    problem = check_codes(codes)
    if problem:
        raise SystemExit(problem)
    return codes


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


def has_path(row, path) -> bool:
    try:
        get_path(row, path)
        return True
    except KeyError:
        return False


# Parts a row may hold in any layout, read from these columns where the detecting row did not name one (a system
# prompt or tools that only some rows have); a dotted default is read where the layout reads its parent.
OPTIONAL = {"system": ("system",), "tools": ("tools", "input.tools"), "chat_template_kwargs": ("chat_template_kwargs",)}
RAW_TEXT = ("text used raw, as TRL tokenises its own text layout (no chat template); write prompt, chosen and "
            "rejected as messages to have the chat template render them")


@dataclass(frozen=True)
class Layout:
    """How a source holds its pairs. `columns` maps each part (prompt, chosen, rejected, system, tools, ...) to its
    column (a dotted path where nested)."""

    name: str
    columns: dict
    tags: Tags = field(default_factory=Tags)
    ranked_pairs: str | None = None  # ranked: best_vs_worst or best_vs_rest
    label_values: tuple = ()  # judged: (label value or tag, answer column or "tie") pairs
    judged: str = ""  # judged data: the shape and what its labels mean, in words (log, report, errors)
    annotators: str | None = None  # judged data with several annotators: how their verdicts make one
    mapped: bool = False  # built from column_map
    first_place: str = ""
    row_columns: tuple = ()  # the columns of the row it was detected from (nested keys of a read parent: a.b)
    message_keys: tuple = ()  # keys of its messages besides role and content (loss_weight, ...): not read
    # the family's row converter: (layout, row, templated) -> (pairs, notes); set by the detector that built it
    converter: Callable | None = field(default=None, compare=False, repr=False)

    def unused(self) -> list[str]:
        """Columns of the detecting row this layout does not read; under a parent it reads part of (OpenAI's
        `input`), the parent's other keys (input.parallel_tool_calls)."""
        paths = {c for c in self.columns.values() if c} | {d for names in OPTIONAL.values() for d in names}
        parents = {c.split(".")[0] for c in self.row_columns if "." in c}
        return sorted(c for c in self.row_columns if c not in parents and c not in paths)

    def used(self) -> set[str]:
        return {c.split(".")[0] for c in self.columns.values() if c} | {names[0] for names in OPTIONAL.values()}

    def describe(self) -> str:
        parts = ", ".join(f"{k} <- {v}" for k, v in self.columns.items() if v)
        how = " (column_map)" if self.mapped else ""
        judged = f" ({self.judged})" if self.judged else ""
        raw = f"; {RAW_TEXT}" if self.name == "standard" else ""
        unused = f"; not read: {', '.join(self.unused())}" if self.unused() else ""
        keys = f"; message keys not read: {', '.join(self.message_keys)}" if self.message_keys else ""
        return f"{self.name}{how}{judged}: {parts}{raw}{unused}{keys}"

    def report(self) -> dict:
        out = {"name": self.name, "description": self.describe(), "columns": {k: v for k, v in self.columns.items()
                                                                               if v},
               "unused_columns": self.unused(), "unused_message_keys": list(self.message_keys),
               "from_column_map": self.mapped, "detected_at": self.first_place}
        if self.ranked_pairs:
            out["ranked_pairs"] = self.ranked_pairs
        if self.judged:
            out["judged"] = self.judged
        return out

    # ---- rows

    def get(self, row: dict, part: str, required: bool = True):
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

    def column_of(self, row: dict, part: str) -> str | None:
        """The column a row holds an optional part in (OPTIONAL): the layout's, else the first default it has."""
        if self.columns.get(part):
            return self.columns[part]
        roots = {c.split(".")[0] for c in self.columns.values() if c}
        return next((c for c in OPTIONAL[part] if ("." not in c or c.split(".")[0] in roots) and has_path(row, c)),
                    None)

    def optional(self, row: dict, part: str):
        col = self.column_of(row, part)
        return get_path(row, col) if col and has_path(row, col) else None

    def unused_text(self, row: dict) -> list[str]:
        """Top-level columns this layout does not read whose value is text or messages."""
        used = self.used()
        return [k for k, v in row.items() if k not in used and holds_text(v)]

    def convert(self, raw, templated: bool = True) -> tuple[list[dict], list[str]]:
        """One raw row -> (pairs, notes) by its family's converter, each pair with the row's tools and chat template
        keywords (as TRL passes them to the template). Raises DataError(problem) for a row that cannot be a pair."""
        if not isinstance(raw, dict):
            raise DataError(f"expected an object with the columns of a preference pair, got {type(raw).__name__}")
        extras = self.extras(raw)
        pairs, notes = self.converter(self, raw, templated)
        if extras and pairs:
            pairs = [with_extras(p, extras, templated) for p in pairs]
        return pairs, notes

    def extras(self, row: dict) -> dict:
        """The row's tools and chat_template_kwargs, checked, in the source's form; absent ones left out."""
        out = {}
        for part, check in (("tools", tools_of), ("chat_template_kwargs", kwargs_of)):
            col = self.column_of(row, part)
            value = check(get_path(row, col), col) if col and has_path(row, col) else None
            if value is not None:
                out[part] = value
        return out

    def names(self) -> dict:
        return {k: (self.columns.get(k) or k) for k in ("prompt", "chosen", "rejected")}

    def system(self, row):
        value = self.optional(row, "system")
        if value is not None and not isinstance(value, str):
            raise DataError(f"field {self.column_of(row, 'system')!r} (system) must be a string, got "
                            f"{type(value).__name__}")
        return value

    def value(self, value, name: str):
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

    def answer(self, row, part: str):
        return self.value(self.get(row, part), self.columns[part])

    def prompt(self, row):
        """The prompt part: None (implicit), text, or messages (question layouts: history, then the user turn)."""
        if self.columns.get("prompt"):
            return self.value(self.get(row, "prompt"), self.columns["prompt"])
        if not self.columns.get("question"):
            return None
        question = self.get(row, "question")
        if not isinstance(question, str):
            raise DataError(f"field {self.columns['question']!r} must be a string, got {type(question).__name__}")
        extra = self.get(row, "input", required=False)
        if not absent(extra):
            if not isinstance(extra, str):
                raise DataError(f"field {self.columns['input']!r} (the instruction's input) must be a string, got "
                                f"{type(extra).__name__}")
            if extra.strip():
                question = f"{question}\n{extra}"  # alpaca: instruction, then its input on the next line
        return self.history(row) + [{"role": "user", "content": question}]

    def history(self, row) -> list[dict]:
        """Earlier turns of a question layout: LLaMA-Factory's [[user text, assistant text], ...]."""
        history = self.get(row, "history", required=False)
        if absent(history):
            return []
        if not isinstance(history, list):
            raise DataError(f"field {self.columns['history']!r} must be a list of [user text, assistant text] "
                            f"turns, got {type(history).__name__}")
        turns = []
        for k, turn in enumerate(history, start=1):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"field {self.columns['history']!r} turn {k} must be [user text, assistant text]")
            turns += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        return turns


def with_extras(pair: dict, extras: dict, templated: bool) -> dict:
    """A pair with the row's tools and template keywords. Tools are rendered by a chat template only, so a text
    pair becomes messages (TRL would tokenise a text pair raw and drop its tools without a word)."""
    if not isinstance(pair["chosen"], list):
        if not templated:
            raise TemplateMissing("the row has tools or chat_template_kwargs, which only a chat template renders, but "
                                  "the tokenizer has no chat template; set chat_template_path to a template that "
                                  "renders tools")
        prompt, chosen, rejected = as_messages(pair["prompt"], pair["chosen"], pair["rejected"], [])
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {**pair, **extras}
