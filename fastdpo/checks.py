"""Checks: a source's rows through its layout into TRL's preference form, every row accounted for, and the source
judged as a whole before anything trains on it.

Row by row (`convert_rows`): a row that cannot be read or made into a pair is a row error for the skip-or-fail
policy (fastdpo.errors.RowPolicy); rows that give no pair (chosen = rejected, ties) are listed with why; what the
rules changed (merged turns, empty answers) is counted in Notes; unread columns that hold text are remembered. Per
source (`check_prompts`): prompts that come out empty while text columns go unread are refused, since the answers
would train without their questions. `read_pairs` is this stage for one source in memory; the token cache runs
the same `convert_rows` on each batch in its workers and merges the results the same way (`Converted.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import layouts
from .dataspec import SourceSpec
from .errors import NOTE_TEXT, DataError, Notes, RowPolicy, Skipped, TemplateMissing
from .sources import decode


@dataclass
class Converted:
    """Pairs of a run of raw rows, with their places, and what happened to the rows on the way."""

    pairs: list = field(default_factory=list)
    where: list = field(default_factory=list)
    notes: Notes = field(default_factory=Notes)
    unused_text: set = field(default_factory=set)  # unread columns that held text in some row
    empty_prompts: int = 0
    rows_with_pairs: int = 0
    no_pair: list = field(default_factory=list)  # {"where", "problem"} of every row that gave no pair

    def merge(self, other: Converted) -> Converted:
        """The rows of `other` after these (a source read batch by batch)."""
        self.pairs += other.pairs
        self.where += other.where
        self.notes.merge(other.notes)
        self.unused_text |= other.unused_text
        self.empty_prompts += other.empty_prompts
        self.rows_with_pairs += other.rows_with_pairs
        self.no_pair += other.no_pair
        return self


def convert_rows(items, places, layout: layouts.Layout | None, templated: bool, errors: list) -> Converted:
    """Raw items of a batch -> pairs through `layout`; row errors (unreadable, not a pair) go to `errors` as
    (where, problem). A row that gives several pairs (ranked data) has places `where (pair k of n)`."""
    out = Converted()
    used = layout.used() if layout is not None else set()
    for item, where in zip(items, places, strict=True):
        try:
            row = decode(item)
            if layout is None:
                raise DataError(f"expected an object with the columns of a preference pair, got {type(row).__name__}")
            pairs, notes = layout.convert(row, templated)
        except TemplateMissing as e:
            raise TemplateMissing(f"{where}: {e}") from None
        except DataError as e:
            errors.append((where, str(e)))
            continue
        for kind in notes:
            out.notes.add(kind, where)
        if not pairs:
            out.no_pair.append({"where": where, "problem": NOTE_TEXT.get(notes[0], notes[0]) if notes else "no pair"})
        if isinstance(row, dict):
            out.unused_text.update(k for k, v in row.items() if k not in used and layouts.any_text(v))
        out.rows_with_pairs += bool(pairs)
        for k, pair in enumerate(pairs, start=1):
            out.pairs.append(pair)
            out.where.append(where if len(pairs) == 1 else f"{where} (pair {k} of {len(pairs)})")
            out.empty_prompts += not pair["prompt"]
    return out


def check_prompts(layout: layouts.Layout | None, pairs: int, empty_prompts: int, unused_text, label: str) -> str | None:
    """A source whose prompts come out empty for most pairs while it has unread text columns (any non-empty string
    or messages) trains answers without their questions: the refusal, or None."""
    if layout is None or not pairs or empty_prompts * 2 <= pairs or not unused_text:
        return None
    cols = sorted(unused_text)
    return (f"{label}: {empty_prompts:,} of {pairs:,} pairs have an empty prompt (layout {layout.describe()}) while "
            f"column(s) {cols} hold text that is not read; if {cols[0]!r} is the prompt, set column_map "
            f"'{{\"prompt\": \"{cols[0]}\"}}', otherwise drop the column(s) from the data")


def read_pairs(source: SourceSpec, templated: bool, policy: RowPolicy | None = None,
               skipped: Skipped | None = None) -> tuple[Converted, layouts.Layout | None]:
    """The pairs of one source in memory (evaluation sets, the in-memory path, tests): detect its layout, convert
    and check every row, account for each. Row errors go through `policy` (default: fail; listed in `skipped`
    when skipping)."""
    policy = policy or RowPolicy()
    src = source.open()
    layout, batches = layouts.detect_source(src.batches(source.limit), source.options)
    out = Converted()
    for batch in batches:
        errors: list = []
        got = convert_rows(batch.items, batch.where, layout, templated, errors)
        for where, problem in errors:
            policy.row(where, problem, skipped)
        out.merge(got)
    refusal = check_prompts(layout, len(out.pairs), out.empty_prompts, out.unused_text, src.label)
    if refusal:
        raise DataError(refusal)
    return out, layout


def normalize_row(raw, column_map: dict[str, str] | None = None, templated: bool = True,
                  layout: layouts.Layout | None = None) -> dict:
    """One raw row -> {"prompt", "chosen", "rejected"} (strings, or message lists), its layout detected from the row
    itself unless given. Raises DataError(problem), also for a row that gives no pair (chosen = rejected).

    `templated`: the tokenizer has a chat template. Without one, implicit-prompt transcripts stay raw text, and a
    conversational row raises TemplateMissing (a setup error, not a bad row).
    """
    layout = layout or layouts.detect(raw, layouts.Options(column_map))
    pairs, notes = layout.convert(raw, templated)
    if not pairs:
        raise DataError(NOTE_TEXT.get(notes[0], notes[0]) if notes else "no pair in this row")
    return pairs[0]
