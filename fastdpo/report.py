"""Report: what became of every row read, for the people who run training. The accounting (rows read = trained +
eval + skipped + without a pair + dropped + duplicates removed + eval rows over max_eval_samples, checked to add up),
its one-line form for the log, data_report.json, and the listings of rows not trained on (file:line and why) in
output_dir. It works from the counts of each source's token-cache entry (meta.json) and the split plan, so a run of
several sources sums the same numbers: a mixture (fastdpo.mixture) is accounted for per source and as a whole, its
upsampled copies counted apart from the pairs taken (a copy is not a duplicate: it is never removed)."""

from __future__ import annotations

import json
from pathlib import Path

from . import files
from .errors import Notes
from .splits import SplitPlan

LISTINGS = ("skipped_rows.jsonl", "dropped_rows.jsonl", "duplicate_rows.jsonl", "no_pair_rows.jsonl")  # output_dir


def describe_layout(meta: dict) -> str:
    """A cache entry's layout as the log line shows it (meta.json's "layout")."""
    if not meta.get("name"):
        return "none (no readable row)"
    if meta.get("description"):  # Layout.report()'s own words
        return meta["description"]
    cols = ", ".join(f"{k} <- {v}" for k, v in meta["columns"].items())
    unused = f"; not read: {', '.join(meta['unused_columns'])}" if meta.get("unused_columns") else ""
    keys = (f"; message keys not read: {', '.join(meta['unused_message_keys'])}"
            if meta.get("unused_message_keys") else "")
    return f"{meta['name']}{' (column_map)' if meta.get('from_column_map') else ''}: {cols}{unused}{keys}"


def layout_line(meta: dict) -> str:
    """`<source>: layout <layout> (unread columns holding text: ...)` for one source's entry."""
    unread = meta["layout"].get("unused_text_columns")
    return (f"{meta['source']}: layout {describe_layout(meta['layout'])}"
            + ("" if not unread else f" (unread columns holding text: {', '.join(unread)})"))


def listings(skipped: list[dict], no_pair: list[dict], plan: SplitPlan, where_of: dict) -> dict[str, list]:
    """The rows each listing names so far (dropped rows are added as the splits are taken), in LISTINGS order."""
    out: dict[str, list] = {name: [] for name in LISTINGS}
    out["skipped_rows.jsonl"] = skipped
    out["no_pair_rows.jsonl"] = no_pair
    for kind, i, problem in plan.removed:
        out["duplicate_rows.jsonl"].append({"where": where_of[kind][i], "problem": problem})
    return out


def accounting(metas: list[dict], counts: dict, plan: SplitPlan, listed: dict, trained: int, evals: int) -> dict:
    """Where every row read went. Raises RuntimeError when the numbers do not add up: a bug, never the data's fault,
    so it is said rather than reported."""
    read = sum(m["items"] for m in metas)
    with_pairs = sum(m["rows_with_pairs"] for m in metas)
    pairs = sum(m["rows"] for m in metas)
    skipped, no_pair = len(listed["skipped_rows.jsonl"]), len(listed["no_pair_rows.jsonl"])
    out = {"rows_read": read, "pairs": pairs, "trained": trained, "eval": evals, "skipped": skipped,
           "no_pair": no_pair, "dropped": sum(c["dropped"] for c in counts.values()),
           "duplicates_removed": len(plan.removed), "eval_unused": len(plan.unused)}
    made = sum(out[k] for k in ("trained", "eval", "dropped", "duplicates_removed", "eval_unused"))
    if read != with_pairs + skipped + no_pair or made != pairs:
        raise RuntimeError(f"data accounting does not add up: {out}, {with_pairs} rows with pairs")
    return out


def accounting_line(acc: dict, with_pairs: int) -> str:
    """`1,000 rows read = 890 trained + 100 eval + 2 skipped + ...`, with the pairs of ranked rows apart."""
    tail = (f"{acc['dropped']:,} dropped (too long) + {acc['duplicates_removed']:,} duplicates removed"
            + (f" + {acc['eval_unused']:,} eval pairs over max_eval_samples" if acc["eval_unused"] else ""))
    trained = f"{acc['trained']:,} trained + {acc['eval']:,} eval"
    if acc["pairs"] == with_pairs:  # one pair a row
        return (f"{acc['rows_read']:,} rows read = {trained} + {acc['skipped']:,} skipped + {acc['no_pair']:,} "
                f"without a pair + {tail}")
    return (f"{acc['rows_read']:,} rows read = {with_pairs:,} with pairs + {acc['skipped']:,} skipped + "  # ranked
            f"{acc['no_pair']:,} without a pair; their {acc['pairs']:,} pairs = {trained} + {tail}")


def data_report(counts: dict, acc: dict, plan: SplitPlan, dedup: str, layouts: list[dict], notes: Notes,
                cache: dict) -> dict:
    """data_report.json: counts per split, duplicates, the accounting, the layouts (train, then eval), the notes,
    the cache entries used."""
    out = dict(counts)
    out.update({
        "skipped_rows": acc["skipped"],
        "duplicates": {**plan.repeats, "removed": len(plan.removed), "dedup": dedup},
        "eval_unused_max_eval_samples": len(plan.unused),
        "accounting": acc,
        "layout": layouts[0],
        "eval_layout": layouts[1] if len(layouts) > 1 else None,
        "notes": notes.as_dict(),
        "cache": cache,
    })
    return out


def write(out: Path, data_report: dict, listed: dict) -> None:
    """data_report.json and the listings in output_dir; a listing left from an earlier run is removed."""
    files.write_json(out / "data_report.json", data_report)
    for name in LISTINGS:
        rows = listed.get(name)
        (out / name).unlink(missing_ok=True)
        if rows:
            with open(out / name, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------------ mixtures

PART_KEYS = ("rows_read", "with_pairs", "skipped", "no_pair", "pairs", "taken", "not_taken", "upsampled", "trained",
             "eval", "eval_unused", "dropped", "duplicates_removed")


def part_accounting(meta: dict, counts: dict, no_pair: int, role: str, amount: str) -> dict:
    """One source's (or named eval set's) accounting from its entry's meta.json, its rows without a pair and the
    plan's counts, checked."""
    out = {"role": role, "amount": amount, "rows_read": meta["items"], "with_pairs": meta["rows_with_pairs"],
           "skipped": meta["skipped"], "no_pair": no_pair, **{k: counts[k] for k in PART_KEYS[4:]}}
    _check_part(out, meta["source"])
    return out


def _check_part(acc: dict, label: str) -> None:
    made = sum(acc[k] for k in ("taken", "not_taken", "eval", "eval_unused", "dropped", "duplicates_removed"))
    read = acc["with_pairs"] + acc["skipped"] + acc["no_pair"]
    if made != acc["pairs"] or acc["trained"] != acc["taken"] + acc["upsampled"] or read != acc["rows_read"]:
        raise RuntimeError(f"data accounting of {label} does not add up: {acc}")


def mixture_line(acc: dict) -> str:
    """`1,000 rows read = 600 taken + 100 eval + 280 not taken (amount) + ...; 900 trained = 600 taken + 300
    upsampled copies`, with the pairs of ranked rows apart as in `accounting_line`."""
    tail = (f"{acc['eval']:,} eval + {acc['not_taken']:,} not taken (amount) + {acc['dropped']:,} dropped (too long) "
            f"+ {acc['duplicates_removed']:,} duplicates removed"
            + (f" + {acc['eval_unused']:,} eval pairs over max_eval_samples" if acc["eval_unused"] else ""))
    bad = f"{acc['skipped']:,} skipped + {acc['no_pair']:,} without a pair"
    if acc["pairs"] == acc["with_pairs"]:
        line = f"{acc['rows_read']:,} rows read = {acc['taken']:,} taken + {tail} + {bad}"
    else:
        line = (f"{acc['rows_read']:,} rows read = {acc['with_pairs']:,} with pairs + {bad}; their {acc['pairs']:,} "
                f"pairs = {acc['taken']:,} taken + {tail}")
    if acc.get("role") == "eval":
        return line
    return line + f"; {acc['trained']:,} trained = {acc['taken']:,} taken + {acc['upsampled']:,} upsampled copies"


def mixture_accounting(parts: dict[str, dict], evals: dict[str, dict]) -> dict:
    """The whole mixture's accounting: the sum of its sources' and named eval sets' (each already checked)."""
    total = {k: sum(a[k] for a in list(parts.values()) + list(evals.values())) for k in PART_KEYS}
    total["role"] = "mixture"
    _check_part(total, "the mixture")
    return total


def mixture_report(train_counts: dict, eval_counts: dict, total: dict, parts: dict, evals: dict, repeats: dict,
                   dedup: str, layouts: list[dict], notes: Notes, cache: dict, plain: dict) -> dict:
    """data_report.json of a mixture: the single-source report's keys (summed), plus `sources` and `eval_sets`
    (each with its accounting, amount, layout and line) and the plan itself (`mixture`)."""
    return {
        "train": train_counts,
        "eval": eval_counts or None,
        "skipped_rows": total["skipped"],
        "duplicates": {**repeats, "removed": total["duplicates_removed"], "dedup": dedup},
        "eval_unused_max_eval_samples": total["eval_unused"],
        "accounting": total,
        "sources": parts,
        "eval_sets": evals,
        "layout": layouts[0],
        "eval_layout": None,
        "notes": notes.as_dict(),
        "cache": cache,
        "mixture": plain,
    }
