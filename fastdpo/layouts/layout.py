"""A detected layout: which column holds each part of a pair, the message tags, and the family converter that turns
one raw row into pairs. Detection builds one per source (fastdpo.layouts.detect); every row then goes through
`Layout.convert`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DataError
from .messages import Tags, holds_text, to_messages


class NeedsOption(DataError):
    """Ranked or judged data: a property of the whole source, which a conversion option turns into pairs."""


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
    # the family's row converter: (layout, row, templated) -> (pairs, notes); set by the detector that built it
    converter: Callable | None = field(default=None, compare=False, repr=False)

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

    def unused_text(self, row: dict) -> list[str]:
        """Top-level columns this layout does not read whose value is text or messages."""
        used = self.used()
        return [k for k, v in row.items() if k not in used and holds_text(v)]

    def convert(self, raw, templated: bool = True) -> tuple[list[dict], list[str]]:
        """One raw row -> (pairs, notes) by its family's converter. Raises DataError(problem) for a row that cannot
        be a pair."""
        if not isinstance(raw, dict):
            raise DataError(f"expected an object with the columns of a preference pair, got {type(raw).__name__}")
        return self.converter(self, raw, templated)

    def names(self) -> dict:
        return {k: (self.columns.get(k) or k) for k in ("prompt", "chosen", "rejected")}

    def system(self, row):
        value = self.get(row, "system", required=False)
        if value is not None and not isinstance(value, str):
            raise DataError(f"field {self.columns['system']!r} (system) must be a string, got {type(value).__name__}")
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
        if isinstance(extra, str) and extra.strip():
            question = f"{question}\n{extra}"  # alpaca: instruction, then its input on the next line
        turns = []
        history = self.get(row, "history", required=False)
        for k, turn in enumerate(history or [], start=1):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise DataError(f"field {self.columns['history']!r} turn {k} must be [user text, assistant text]")
            turns += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        return turns + [{"role": "user", "content": question}]
