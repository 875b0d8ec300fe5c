"""Bad input and where it was found: the ground floor of the data pipeline (sources -> layouts -> checks -> tokens
-> splits -> tokcache -> report): every stage imports it; it imports nothing from the package.

A `DataError` carries the place (`file:line`, `file row N`, `id [split] row N`) and the fix in its message. A row
that cannot be used goes through the one skip-or-fail rule, `RowPolicy`: it fails the run, or, with --skip_bad_rows,
it is listed in output_dir/skipped_rows.jsonl. `Notes` counts what was done to rows that train anyway (merged turns,
empty answers) or that give no pair (chosen = rejected, ties), each with its first few places, for the accounting
line and data_report.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FIX_SKIP = "fix the row, or pass --skip_bad_rows true to skip bad rows (they are counted and listed in output_dir)"
FIRST_PLACES = 5  # places kept per note kind or problem: enough to find the rows, short enough for a log line


class DataError(ValueError):
    """Bad input, with the place it was found and what to do about it."""


class TemplateMissing(DataError):
    """Conversational rows and a tokenizer without a chat template: a setup error, never skipped row by row."""


@dataclass
class Skipped:
    rows: list[dict] = field(default_factory=list)

    def add(self, where: str, problem: str) -> None:
        self.rows.append({"where": where, "problem": problem})


@dataclass(frozen=True)
class RowPolicy:
    """What happens to a row that cannot be used, at every place one is met: without `skip` the run fails with the
    row's place, its problem and the fix; with it (--skip_bad_rows) the row is listed and counted, and the run goes
    on."""

    skip: bool = False

    def refusal(self, where: str, problem) -> DataError:
        return DataError(f"{where}: {problem}; {FIX_SKIP}")

    def row(self, where: str, problem, skipped: Skipped | None = None) -> None:
        """A bad row met while reading: fail now, or list it in `skipped`."""
        if not self.skip:
            raise self.refusal(where, problem)
        if skipped is not None:
            skipped.add(where, str(problem))

    def refuses(self, rows: list[dict]) -> bool:
        """Whether bad rows listed earlier ({"where", "problem"}) stop the run."""
        return bool(rows) and not self.skip

    def settle(self, rows: list[dict]) -> None:
        """Bad rows listed earlier (a token-cache entry lists every one it met, whatever the policy it was built
        under): fail on the first, as a fresh read would, unless skipping."""
        if self.refuses(rows):
            raise self.refusal(rows[0]["where"], rows[0]["problem"])


# What a row's note means, in the words of the accounting line. The first group still trains; the second gives
# no pair and is counted among the rows read.
NOTE_TEXT = {
    "merged_turns": "two turns of one role in a row merged into one (blank line between)",
    "empty_answer": "an empty answer (trained as the end of the turn alone)",
    "no_preference": "chosen identical to rejected: no preference, no pair",
    "tie": "a tie (judged, or replies of equal rank): no pair",
    "unlabelled": "no winner label: no pair",
    "split": "annotators without a majority verdict: no pair",
    "too_few_answers": "fewer than two ranked answers: no pair",
    "ranked_tie": "a ranked reply tied with the best (same rank or text): that pair left out",
}
NO_PAIR = ("no_preference", "tie", "unlabelled", "split", "too_few_answers")


@dataclass
class Notes:
    """kind -> count and the first places, over all rows of a source (or several: `merge`)."""

    counts: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        places = self.first.setdefault(kind, [])
        if len(places) < FIRST_PLACES:
            places.append(where)

    def merge(self, other: Notes) -> Notes:
        for kind, n in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + n
            places = self.first.setdefault(kind, [])
            places.extend(other.first.get(kind, [])[: FIRST_PLACES - len(places)])
        return self

    def no_pair(self) -> int:
        return sum(self.counts.get(k, 0) for k in NO_PAIR)

    def as_dict(self) -> dict:
        return {k: {"count": self.counts[k], "what": NOTE_TEXT.get(k, k), "first": self.first.get(k, [])}
                for k in sorted(self.counts)}

    @classmethod
    def from_dict(cls, d: dict | None) -> Notes:
        notes = cls()
        for k, v in (d or {}).items():
            notes.counts[k], notes.first[k] = v["count"], list(v["first"])
        return notes

    def line(self) -> str:
        """`9 rows: two turns of one role ... (file:668, ...)`; "" when nothing happened."""
        parts = []
        for k in sorted(self.counts):
            places = ", ".join(self.first.get(k, []))
            more = ", ..." if self.counts[k] > len(self.first.get(k, [])) else ""
            parts.append(f"{self.counts[k]:,} x {NOTE_TEXT.get(k, k)} ({places}{more})")
        return "; ".join(parts)


_SPECIFIC = re.compile(r"'[^']*'|\"[^\"]*\"|\b\d+\b")


def problem_kind(problem: str) -> str:
    """A row problem with its specifics (quoted values, numbers) blanked, to count problems by kind."""
    return _SPECIFIC.sub("_", problem.split(";")[0])


def by_problem(rows: list[dict]) -> list[dict]:
    """Skipped rows grouped by kind of problem, most frequent first: count, an example message, first places."""
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(problem_kind(r["problem"]), {"count": 0, "problem": r["problem"], "first": []})
        g["count"] += 1
        if len(g["first"]) < FIRST_PLACES:
            g["first"].append(r["where"])
    return sorted(groups.values(), key=lambda g: -g["count"])
