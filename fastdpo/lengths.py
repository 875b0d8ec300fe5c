"""Token lengths of preference pairs -> max_length, max_prompt_length and the batch shape to train with.

`scripts/analyze_dataset.py` is the command; this module is the logic, so tests and other tools can reuse it.
Lengths come from `tokens.tokenize_pairs`, the function training tokenises with, and the truncation rule is
`tokens.truncate_pair`'s applied to lengths, so every count here is what training would see
(tests/unit/test_analyze.py checks it against TRL's collator).

Definitions used throughout:
  total      prompt + the longer of chosen and rejected, untruncated: the max_length that keeps a pair whole.
  percentile nearest rank: pXX is a length of the data with at least XX% of pairs at or below it, so
             "p90 = 2000" means max_length 2000 covers at least 90% of pairs.
  overhead   padding tokens / computed tokens, over the pairs training keeps (dropped pairs are not trained on):
             max_length  every chosen and rejected row padded to max_length (a fixed-shape batch);
             batch       TRL 1.16's DataCollatorForPreference: the B pairs of a micro-batch become one [2B, L]
                         tensor, L = the longest prompt+answer row in it (rounded up to pad_to_multiple_of);
                         micro-batches are seeded random draws of the sample, as the training sampler shuffles;
             packed      rows (prompt+chosen and prompt+rejected, each kept whole) packed into sequences of
                         max_length tokens by best-fit decreasing; the unfilled end of each sequence is padding
                         (except the emptiest one's: the sample's tail, negligible over a whole epoch).
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

import numpy as np
from datasets import Dataset

from . import checks, layouts, splits, tokens
from .dataspec import DataSpec
from .errors import DataError, Notes

LADDER = [1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768]  # x1.5 then x4/3: 1k..32k
PERCENTILES = [50, 90, 95, 99]
ROUND = 128  # tensor-core and kernel tile friendly; also what Neuron's pad_to_multiple_of uses


@dataclass
class Lengths:
    """Untruncated token counts of each pair, in sample order."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.prompt + np.maximum(self.chosen, self.rejected)

    def __len__(self) -> int:
        return len(self.prompt)


# ----------------------------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    """A sample's pairs as training would build them, and what training would refuse or leave out."""

    pairs: list[dict]
    num_rows: int  # rows in the split (max_train_samples applied)
    skipped: list[dict]  # rows training refuses ({"where", "problem"}): counted, not fatal, in the analyzer
    notes: Notes
    layout: object
    refusal: str | None = None  # a dataset-level refusal of training (prompts empty while text columns go unread)


def load_sample(spec, samples: int | None, seed: int = 0, templated: bool = True) -> Sample:
    """Pairs of a seeded random sample of the train split (all rows when samples is None).

    `spec`: a DataSpec (or script arguments). The layout is detected from the split's first rows, as training
    does; the source is streamed once (a seeded reservoir: only `samples` raw rows are held) and only the sampled
    rows are converted, with training's code (`checks.convert_rows`), so a bad row outside the sample goes
    unnoticed: `--samples all` checks every row (and fills training's cache).
    """
    train = DataSpec.of(spec).train
    source = train.open()
    layout, batches = layouts.detect_source(source.batches(train.limit), train.options)
    picked, n_rows = _reservoir(batches, samples, random.Random(seed))  # training only ever sees these rows
    errors: list = []
    got = checks.convert_rows([x[1] for x in picked], [x[2] for x in picked], layout, templated, errors)
    if not got.pairs:
        first = f" (first: {errors[0][0]}: {errors[0][1]})" if errors else ""
        raise DataError(f"{train.label}: no usable rows{first}")
    refusal = checks.check_prompts(layout, len(got.pairs), got.empty_prompts, got.unused_text, source.label)
    return Sample(got.pairs, n_rows, [{"where": w, "problem": p} for w, p in errors], got.notes, layout, refusal)


def _reservoir(batches, samples: int | None, rng: random.Random) -> tuple[list, int]:
    """([(index, raw item, where)] of a seeded uniform sample of `samples` rows, in source order; rows seen)."""
    picked: list[tuple[int, object, str]] = []
    n_rows = 0
    for batch in batches:
        for item, where in zip(batch.items, batch.where, strict=True):
            if samples is None or len(picked) < samples:
                picked.append((n_rows, item, where))
            else:
                j = rng.randint(0, n_rows)
                if j < samples:
                    picked[j] = (n_rows, item, where)
            n_rows += 1
    picked.sort(key=lambda x: x[0])
    return picked, n_rows


# ---------------------------------------------------------------------------------------------- measuring


def _batch_lengths(batch: dict, tokenizer) -> dict:
    ids = tokens.tokenize_pairs(batch, tokenizer)
    return {name: [len(x) for x in ids[f"{name}_ids"]] for name in ("prompt", "chosen", "rejected")}


def measure(rows: list[dict], tokenizer, num_proc: int | None = None, batch_size: int = 256) -> Lengths:
    """Untruncated prompt/chosen/rejected token counts, tokenised by `tokens.tokenize_pairs` in parallel batches."""
    ds = splits.to_dataset(rows, "sample")  # the same Arrow conversion (and error) as the in-memory path
    if num_proc is not None and num_proc > 1:
        num_proc = min(num_proc, math.ceil(len(ds) / batch_size))  # an idle worker only costs a fork
    out = ds.map(
        _batch_lengths, fn_kwargs={"tokenizer": tokenizer}, batched=True, batch_size=batch_size,
        num_proc=num_proc if num_proc and num_proc > 1 else None, remove_columns=ds.column_names,
        # hashing a large tokenizer for the cache fingerprint costs seconds and the result is never cached
        new_fingerprint=f"lengths-{random.getrandbits(64):016x}", desc="Tokenizing",
    )
    assert isinstance(out, Dataset)
    col = lambda name: np.asarray(out[name], dtype=np.int64)  # noqa: E731
    return Lengths(col("prompt"), col("chosen"), col("rejected"))


def truncate(lengths: Lengths, max_length: int | None, max_prompt_length: int | None):
    """`tokens.truncate_pair` on lengths: (prompt, chosen, rejected, status) arrays; status 0 ok, 1 truncated,
    2 dropped.

    A prompt over max_prompt_length keeps max_prompt_length tokens (with or without its BOS); then each answer
    is cut to the room max_length leaves; a prompt that leaves no room drops the pair.
    """
    p, c, r = lengths.prompt, lengths.chosen, lengths.rejected
    cut = p > max_prompt_length if max_prompt_length is not None else np.zeros(len(p), dtype=bool)
    p = np.minimum(p, max_prompt_length) if max_prompt_length is not None else p
    status = cut.astype(np.int8)
    if max_length is None:
        return p, c, r, status
    room = max_length - p
    status = np.where((c > room) | (r > room), 1, status)
    status = np.where(room < 1, 2, status).astype(np.int8)
    return p, np.minimum(c, np.maximum(room, 0)), np.minimum(r, np.maximum(room, 0)), status


# --------------------------------------------------------------------------------------------- statistics


def nearest_rank(values: np.ndarray, q: float) -> int:
    """The smallest value with at least a fraction q of values at or below it."""
    v = np.sort(values)
    return int(v[max(0, math.ceil(q * len(v)) - 1)])


def percentiles(values: np.ndarray) -> dict:
    out = {f"p{q}": nearest_rank(values, q / 100) for q in PERCENTILES}
    out["max"] = int(values.max())
    out["mean"] = round(float(values.mean()), 1)
    return out


def round_up(n: int, multiple: int = ROUND) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def _batch_sizes(longest: np.ndarray, batch_size: int, seed: int, pad_to_multiple_of: int | None) -> np.ndarray:
    """Padded length L of each micro-batch: seeded random order, batches of batch_size, last one partial."""
    order = np.random.default_rng(seed).permutation(len(longest))
    starts = np.arange(0, len(order), batch_size)
    widths = np.maximum.reduceat(longest[order], starts)
    if pad_to_multiple_of:
        widths = -(-widths // pad_to_multiple_of) * pad_to_multiple_of
    return widths


def _packed_tokens(rows: np.ndarray, capacity: int) -> int:
    """Tokens computed when best-fit decreasing packs these rows, each whole, into sequences of `capacity`.

    The least-filled sequence counts only its own tokens: it is the tail of this sample, and over a whole
    epoch one part-filled tail is negligible, whereas here it would dominate large capacities on small samples.
    """
    count = 0
    free: list[int] = []  # sorted room left in each sequence that still has room
    for n in np.sort(rows)[::-1].tolist():
        i = bisect.bisect_left(free, n)
        if i < len(free):
            left = free.pop(i) - n
        else:
            count += 1
            left = capacity - n
        if left > 0:  # a full sequence can take nothing more: forget it
            bisect.insort(free, left)
    return count * capacity - (free[-1] if free else 0)


def candidate(lengths: Lengths, max_length: int, max_prompt_length: int | None, batch_size: int,
              pad_to_multiple_of: int | None = None, seed: int = 0, source: str = "") -> dict:
    """Every number the candidate table and the JSON show for one max_length."""
    n = len(lengths)
    p, c, r, status = truncate(lengths, max_length, max_prompt_length)
    kept = status != 2
    row_c, row_r = (p + c)[kept], (p + r)[kept]
    real = int(row_c.sum() + row_r.sum())
    rows = int(2 * kept.sum())
    if rows:
        widths = _batch_sizes(np.maximum(row_c, row_r), batch_size, seed, pad_to_multiple_of)
        pairs_per_batch = np.minimum(batch_size, kept.sum() - np.arange(len(widths)) * batch_size)
        batch_tokens = int((2 * pairs_per_batch * widths).sum())
        packed_tokens = _packed_tokens(np.concatenate([row_c, row_r]), max_length)
        over = lambda computed: round(1 - real / computed, 4)  # noqa: E731
        overheads = (over(rows * max_length), over(batch_tokens), over(packed_tokens))
        widths_stats = {"p50": nearest_rank(widths, 0.5), "p95": nearest_rank(widths, 0.95), "max": int(widths.max())}
    else:
        batch_tokens, overheads, widths_stats = 0, (0.0, 0.0, 0.0), {"p50": 0, "p95": 0, "max": 0}
    covered = int((lengths.total <= max_length).sum())
    truncated, dropped = int((status == 1).sum()), int((status == 2).sum())
    over_prompt = int((lengths.prompt > max_prompt_length).sum()) if max_prompt_length is not None else 0
    return {
        "max_length": int(max_length),
        "source": source,
        "max_prompt_length": max_prompt_length,
        "coverage": round(covered / n, 4),
        "truncated": round(truncated / n, 4),
        "dropped": round(dropped / n, 4),
        "prompt_truncated": round(over_prompt / n, 4),
        "covered_pairs": covered,
        "truncated_pairs": truncated,
        "dropped_pairs": dropped,
        "prompts_over_max_prompt_length": over_prompt,
        "padding_overhead_max_length": overheads[0],
        "padding_overhead_batch": overheads[1],
        "padding_overhead_packed": overheads[2],
        "real_tokens": real,
        "computed_tokens_batch": batch_tokens,
        "batch_length": widths_stats,
    }


def fit(lengths: Lengths, coverage: float) -> int:
    """The smallest multiple of ROUND that keeps at least `coverage` of the pairs whole."""
    return round_up(nearest_rank(lengths.total, coverage))


def recommend_prompt_length(lengths: Lengths, max_length: int) -> int:
    """p99 of prompts rounded up, but at most half of max_length so every answer keeps at least the other half
    (the answers are what DPO compares; a long prompt keeps its end, the turn nearest the answer)."""
    return min(round_up(nearest_rank(lengths.prompt, 0.99)), max_length // 2)


def analyze(lengths: Lengths, *, coverage: float = 0.9, max_length: int | None = None,
            max_prompt_length: int | None = None, batch_size: int = 8, pad_to_multiple_of: int | None = None,
            seed: int = 0) -> dict:
    """Percentiles, the candidate table and the recommendation (the JSON result without the run's metadata).

    max_length / max_prompt_length are the recipe's (or the command line's): the recipe's max_length joins the
    candidates and the table applies that max_prompt_length to every candidate, as training would.
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    best = fit(lengths, coverage)
    sources = {m: "" for m in LADDER}
    sources[best] = (sources.get(best, "") + f" p{coverage * 100:g} fit").strip()
    if max_length is not None:
        sources[max_length] = (sources.get(max_length, "") + " recipe").strip()
    args = dict(max_prompt_length=max_prompt_length, batch_size=batch_size, pad_to_multiple_of=pad_to_multiple_of,
                seed=seed)
    rows = [candidate(lengths, m, source=sources[m], **args) for m in sorted(sources)]

    rec_prompt = recommend_prompt_length(lengths, best)
    rec = candidate(lengths, best, rec_prompt, batch_size, pad_to_multiple_of, seed, "recommended")
    for row in rows:
        if row["max_length"] == best:
            row["source"] = (row["source"] + " recommended").strip()
    here = next(r for r in rows if r["max_length"] == best)
    nxt = next((r for r in rows if r["max_length"] > best and r["coverage"] > here["coverage"]), None)
    rationale = (f"max_length {best} keeps {rec['coverage']:.1%} of pairs whole (asked {coverage:.0%})")
    if nxt and here["computed_tokens_batch"]:
        ratio = nxt["computed_tokens_batch"] / here["computed_tokens_batch"]
        rationale += (f"; {nxt['max_length']} would keep {nxt['coverage']:.1%} for {ratio:.2f}x the computed "
                      "tokens per batch")
    rationale += (f"; max_prompt_length {rec_prompt} keeps {1 - rec['prompt_truncated']:.1%} of prompts whole "
                  f"and leaves answers at least {best - rec_prompt} tokens.")
    width = rec["batch_length"]
    yaml = "\n".join([
        f"max_length: {best}".ljust(34) + f"# {rec['coverage']:.1%} of pairs fit whole (scripts/analyze_dataset.py)",
        f"max_prompt_length: {rec_prompt}".ljust(34) + "# longer prompts keep their last tokens",
        f"per_device_train_batch_size: {batch_size}".ljust(34)
        + f"# [{2 * batch_size}, L] per micro-batch, L p50 {width['p50']}, max {width['max']}",
    ])
    return {
        "percentiles": {
            "total": percentiles(lengths.total),
            "prompt": percentiles(lengths.prompt),
            "chosen": percentiles(lengths.chosen),
            "rejected": percentiles(lengths.rejected),
        },
        "candidates": rows,
        "recommended": {
            "max_length": best,
            "max_prompt_length": rec_prompt,
            **{k: rec[k] for k in ("coverage", "truncated", "dropped", "prompt_truncated",
                                   "padding_overhead_max_length", "padding_overhead_batch", "padding_overhead_packed")},
            "batch_shape": {"rows": 2 * batch_size, "length": width, "max_tokens": 2 * batch_size * width["max"]},
            "rationale": rationale,
            "yaml": yaml,
        },
    }


# ---------------------------------------------------------------------------------------------- reporting


def _pct(x: float) -> str:
    return f"{x:.1%}"


def markdown(result: dict) -> str:
    """The report as markdown tables (stdout of analyze_dataset.py)."""
    lines = _data_lines(result) + _lengths_table(result) + _candidates_table(result) + _recommendation(result)
    return "\n".join(lines) + "\n"


def _data_lines(result: dict) -> list[str]:
    """The title, the layout, and the rows training would refuse, skip or change."""
    n = result["num_samples"]
    lines = [
        f"## {result['dataset']} [{result['split']}]: {n} of {result['num_rows']} pairs, tokenizer "
        f"{result['tokenizer']}",
        "",
    ]
    if result.get("layout"):
        lines += [f"Layout {result['layout']['description']}.", ""]
    if result.get("bad_rows_by_problem"):
        verb = "refuses (the first stops it)" if result.get("training_refuses") else "skips (--skip_bad_rows)"
        lines += [f"Rows training {verb}, by problem:", "", "| rows | problem | first places |", "|---:|---|---|"]
        lines += [f"| {g['count']} | {g['problem']} | {', '.join(g['first'])} |" for g in result["bad_rows_by_problem"]]
        lines.append("")
    if result.get("notes"):
        lines += ["Rows changed or left out by rule, as training does:", "", "| rows | rule | first places |",
                  "|---:|---|---|"]
        lines += [f"| {n['count']} | {n['what']} | {', '.join(n['first'])} |" for n in result["notes"].values()]
        lines.append("")
    if result.get("refusal"):
        lines += [f"**Training would refuse this data**: {result['refusal']}", ""]
    return lines


def _lengths_table(result: dict) -> list[str]:
    lines = [
        "Untruncated token lengths (total = prompt + the longer answer; nearest-rank percentiles):",
        "",
        "| | p50 | p90 | p95 | p99 | max | mean |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in result["percentiles"].items():
        lines.append(f"| {name} | {p['p50']} | {p['p90']} | {p['p95']} | {p['p99']} | {p['max']} | {p['mean']} |")
    return lines


def _candidates_table(result: dict) -> list[str]:
    mpl = result["max_prompt_length"]
    b = result["per_device_train_batch_size"]
    lines = [
        "",
        f"Candidates with max_prompt_length {mpl} (recipe or flag); padding overhead = padding / computed tokens, "
        f"batch = TRL's collator on {b} pairs per device:",
        "",
        "| max_length | covered | truncated | prompts cut | dropped | pad to max_length | pad per batch | packed | |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in result["candidates"]:
        mark = f"**{c['max_length']}**" if "recommended" in c["source"] else str(c["max_length"])
        lines.append(
            f"| {mark} | {_pct(c['coverage'])} | {c['truncated_pairs']} | {c['prompts_over_max_prompt_length']} | "
            f"{c['dropped_pairs']} | {_pct(c['padding_overhead_max_length'])} | "
            f"{_pct(c['padding_overhead_batch'])} | {_pct(c['padding_overhead_packed'])} | {c['source']} |")
    return lines


def _recommendation(result: dict) -> list[str]:
    rec = result["recommended"]
    shape = rec["batch_shape"]
    return [
        "",
        f"**Recommended: max_length {rec['max_length']}, max_prompt_length {rec['max_prompt_length']}** "
        f"(truncates {_pct(rec['truncated'])}, drops {_pct(rec['dropped'])}; "
        f"padding {_pct(rec['padding_overhead_batch'])} "
        f"per batch, {_pct(rec['padding_overhead_packed'])} packed). A micro-batch is a [{shape['rows']}, L] tensor, "
        f"L p50 {shape['length']['p50']}, p95 {shape['length']['p95']}, max {shape['length']['max']} "
        f"(at most {shape['max_tokens']} tokens).",
        "",
        rec["rationale"],
        "",
        "```yaml",
        rec["yaml"],
        "```",
    ]


def plot(result: dict, totals: np.ndarray, path: str) -> None:
    """Histogram and CDF of total lengths, candidates dotted, the recipe's dashed, the recommendation solid."""
    import matplotlib  # heavy, and only for --plot: the analyzer's tables do without it

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt  # after use("Agg"), which must come first
    from matplotlib.lines import Line2D  # with the rest of matplotlib, only for --plot

    fig, (hist, cdf) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    lo, hi = max(1, int(totals.min())), int(totals.max())
    log = hi / lo > 50  # long-tailed lengths: a log axis shows both the bulk and the tail
    bins = np.geomspace(lo, hi + 1, 60) if log else np.linspace(lo, hi + 1, min(60, hi - lo + 1) + 1)
    hist.hist(totals, bins=bins, color="#4c72b0")
    hist.set_ylabel("pairs")
    hist.set_title(f"{result['dataset']}: total tokens per pair ({result['num_samples']} pairs, "
                   f"{result['tokenizer']})", fontsize=10)
    xs = np.sort(totals)
    cdf.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", color="#4c72b0")
    cdf.axhline(result["coverage_target"], color="gray", lw=0.8)
    cdf.set_ylabel("fraction of pairs <= length")
    cdf.set_xlabel("prompt + longer answer (tokens)")
    cdf.set_ylim(0, 1.02)
    rec = result["recommended"]["max_length"]
    right = max(hi, rec) * 1.3
    for c in result["candidates"]:
        m = c["max_length"]
        if m > right:
            continue
        style = (dict(color="red", ls="-", lw=2) if m == rec else dict(color="green", ls="--", lw=1.5)
                 if "recipe" in c["source"] else dict(color="gray", ls=":", lw=1))
        for ax in (hist, cdf):
            ax.axvline(m, **style)
        if m == rec:  # higher up and in red, clear of a neighbouring candidate's label
            cdf.annotate(f" {m}: {c['coverage']:.1%}", (m, 0.45), fontsize=8, color="red", ha="left")
        else:
            cdf.annotate(f"{m}\n{c['coverage']:.0%}", (m, 0.02), fontsize=7, rotation=90, va="bottom", ha="right")
    if log:
        cdf.set_xscale("log")
    cdf.set_xlim(lo * 0.9, right)
    hist.legend(handles=[Line2D([], [], color="red", lw=2, label=f"recommended {rec}"),
                         Line2D([], [], color="green", ls="--", label="recipe"),
                         Line2D([], [], color="gray", ls=":", label="candidates")], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
