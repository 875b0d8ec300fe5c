r"""Choose max_length, max_prompt_length and the batch shape from the token lengths training will see.

    # your file with the recipe you will train with (tokenizer, chat template, column_map, limits); all pairs
    python scripts/analyze_dataset.py data/my_pairs.jsonl --recipe recipes/olmo3_instruct.yaml --samples all \
        --plot outputs/lengths.png --json outputs/lengths.json

    # OLMo 3 Instruct's data (allenai/Dolci-Instruct-DPO), tokenizer, limits and batch
    python scripts/analyze_dataset.py --recipe recipes/olmo3_instruct.yaml

    # no --recipe: train_dpo.py's default, recipes/tiny.yaml (seconds, offline). Layout, bad rows and counts are
    # training's; the lengths are the embedded tiny tokenizer's, not your model's (a banner says so)
    python scripts/analyze_dataset.py data/my_pairs.jsonl

    # a mixture (datasets: in the recipe): a table per source, then the mixture's (copies counted, amounts
    # applied), whose recommendation is the one to train with
    python scripts/analyze_dataset.py --recipe recipes/olmo3_instruct_mix.yaml

    # the Think recipe's data, tokenizer and limits, 95% coverage, 2 tokenising processes, CPU only
    CUDA_VISIBLE_DEVICES="" python scripts/analyze_dataset.py --recipe recipes/olmo3_think.yaml \
        --coverage 0.95 --num_proc 2

    # another tokenizer and prompt limit than the recipe's
    python scripts/analyze_dataset.py data/my_pairs.jsonl --tokenizer path/to/tokenizer --max_prompt_length 1024

Tokenisation is training's own (`fastdpo.tokens.tokenize_pairs`: chat template, implicit prompts, EOS, the
prompt/answer split), so the lengths are the ones training sees. Markdown tables go to stdout, progress to
stderr. Definitions of every number: fastdpo/lengths.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from anywhere without installing

logger = logging.getLogger("fastdpo.analyze")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", help="Hub id, local file (.jsonl/.json/.parquet/.csv[.gz]) or folder; "
                   "default: the recipe's dataset_name")
    p.add_argument("--recipe", "--config", dest="recipe", default=None,
                   help="YAML recipe for tokenizer, chat template, column_map, limits and batch size (default "
                   "train_dpo.py's, recipes/tiny.yaml: the embedded tiny tokenizer); --config, as train_dpo.py spells "
                   "it, is the same")
    p.add_argument("--tokenizer", help="tokenizer name or folder (default: the recipe's model_name_or_path)")
    p.add_argument("--chat_template_path", help="Jinja chat template or tokenizer folder (default: the recipe's)")
    p.add_argument("--split", help="split to analyze (default: the recipe's dataset_train_split)")
    p.add_argument("--samples", default="1000", help="pairs to sample (seeded), or 'all' (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of the random micro-batches")
    p.add_argument("--coverage", type=float, default=0.9, help="fraction of pairs max_length must hold whole")
    p.add_argument("--num_proc", type=int, help="tokenising processes for --samples all (default: the recipe's "
                   "dataset_num_proc, at most the CPUs); a sample is tokenised in this process")
    p.add_argument("--column_map", help="JSON mapping prompt/chosen/rejected/system to columns (overrides the recipe)")
    p.add_argument("--max_length", type=int, help="max_length to compare (default: the recipe's)")
    p.add_argument("--max_prompt_length", type=int, help="max_prompt_length in effect (default: the recipe's)")
    p.add_argument("--per_device_train_batch_size", type=int, help="pairs per micro-batch (default: the recipe's)")
    p.add_argument("--skip_bad_rows", nargs="?", const=True, type=str_to_bool, help="true: as training's flag, bad "
                   "rows are skipped, not refused (the analyzer reports them either way)")
    p.add_argument("--strict", action="store_true", help="exit 2 when training would refuse the data (a bad row "
                   "without --skip_bad_rows, or prompts that come out empty); default: report it and exit 0")
    p.add_argument("--ranked_pairs", choices=["best_vs_worst", "best_vs_rest"], help="ranked replies -> pairs "
                   "(overrides the recipe; see train_dpo.py --help)")
    p.add_argument("--judged_pairs", nargs="?", const=True, type=str_to_bool, help="true: judged answers -> pairs, "
                   "winner chosen (overrides the recipe)")
    p.add_argument("--annotators", choices=["majority"], help="several annotator columns -> one verdict (overrides "
                   "the recipe)")
    p.add_argument("--judged_label", help="the label column to use where judged data has several (overrides the "
                   "recipe)")
    p.add_argument("--judged_codes", help="JSON: what each value of a number label means, e.g. "
                   "'{\"1\": \"response1\", \"2\": \"response2\", \"0\": \"tie\"}' (overrides the recipe)")
    p.add_argument("--json", help="write the result as JSON here")
    p.add_argument("--plot", help="write a PNG histogram + CDF here")
    args = p.parse_args(argv)
    if args.samples != "all" and not (args.samples.isdigit() and int(args.samples) > 0):
        p.error(f"--samples must be a positive number or 'all', got {args.samples!r}")
    if not 0 < args.coverage <= 1:
        p.error(f"--coverage must lie in (0, 1], e.g. 0.9; got {args.coverage}")
    return args


def str_to_bool(value: str) -> bool:
    """A flag's value as training's parser reads it: --judged_pairs, --judged_pairs true, --judged_pairs false."""
    if value.lower() in ("true", "yes", "1", "t", "y"):
        return True
    if value.lower() in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def settings(args: argparse.Namespace):
    """The recipe through the training parser (same keys, same errors), with this command's overrides on top."""
    from fastdpo import config as cfg

    recipe = args.recipe or str(cfg.DEFAULT_RECIPE)
    overrides = {
        "dataset_name": args.dataset, "dataset_train_split": args.split, "model_name_or_path": args.tokenizer,
        "chat_template_path": args.chat_template_path, "column_map": args.column_map, "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "per_device_train_batch_size": args.per_device_train_batch_size, "annotators": args.annotators,
        "judged_label": args.judged_label, "judged_codes": args.judged_codes,
    }
    argv = ["--config", recipe]
    for key, value in overrides.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    for flag in ("skip_bad_rows", "judged_pairs"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag)).lower()]
    if args.ranked_pairs:
        argv += ["--ranked_pairs", args.ranked_pairs]
    # A GPU recipe (bf16) must still parse on a CPU-only machine; only data settings are used here.
    argv += ["--bf16", "false", "--fp16", "false", "--use_cpu", "true"]
    # a tokenizer folder is not a model folder; a dataset given here replaces the recipe's mixture
    return recipe, *cfg.parse_args(argv, check_paths=False, mixture=args.dataset is None)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from fastdpo import tokens
    from fastdpo.dataspec import DataSpec

    recipe, script_args, training_args, model_args = settings(args)
    spec = DataSpec.of(script_args, max_length=training_args.max_length)
    note = check_sources(args, recipe, script_args, model_args, spec)
    tokenizer = load_tokenizer(model_args, script_args)
    logger.info("data: %s", tokens.layout_note(tokens.templated(tokenizer)))
    run = (recipe, training_args, model_args, note)
    if spec.mixture is not None:
        return analyze_mixture(args, spec, tokenizer, run)
    result, lens = analyze(args, spec, tokenizer, run)
    write(args, result, lens)
    return result


def analyze(args, spec, tokenizer, run) -> tuple[dict, object]:
    """(the result for one source, its lengths): layout, rows training refuses, skips or changes, the length
    percentiles, candidates and recommendation."""
    from fastdpo import errors, lengths, report, tokens

    recipe, training_args, model_args, note = run
    samples = None if args.samples == "all" else int(args.samples)
    start = time.perf_counter()
    got = measured(args, spec, tokenizer, samples, args.num_proc or training_args.dataset_num_proc)
    got["layout"] = {**got["layout"], "description": report.describe_layout(got["layout"])}  # data_report's shape
    logger.info("layout %s", got["layout"]["description"])
    skipped, refusal = got["skipped"], got["refusal"] or split_refusal(spec, tokens.templated(tokenizer), samples)
    problems = errors.by_problem(skipped)
    for g in problems:
        logger.warning("%d row(s) that training %s: %s (first: %s)", g["count"],
                       "skips (--skip_bad_rows)" if spec.skip_bad_rows else "refuses", g["problem"],
                       ", ".join(g["first"]))
    if got["notes"].counts:
        logger.info("rows changed or left out by rule (training does the same): %s", got["notes"].line())
    if refusal:
        logger.warning("training would refuse this data: %s", refusal)
    refused = refusal or spec.policy.refuses(skipped)
    if refused and args.strict:
        raise errors.DataError(refusal) if refusal else spec.policy.refusal(skipped[0]["where"], skipped[0]["problem"])
    lens, seconds = got["lengths"], got["seconds"]
    pairs_per_s = len(lens) / max(seconds, 1e-9) if seconds else None
    logger.info("%d pairs measured in %.1f s (tokenising %.1f s)", len(lens), time.perf_counter() - start, seconds)

    batch = training_args.per_device_train_batch_size
    result = {
        "dataset": spec.train.name,
        "split": spec.train.split,
        "num_rows": got["num_rows"],
        "num_samples": len(lens),
        "layout": got["layout"],
        "bad_rows": len(skipped),
        "bad_rows_by_problem": problems,
        "training_refuses": bool(refused),
        "refusal": refusal,
        "notes": got["notes"].as_dict(),
        "seed": args.seed,
        "tokenizer": model_args.model_name_or_path,
        "tokenizer_note": note,
        "recipe": recipe,
        "coverage_target": args.coverage,
        "max_length": spec.max_length,
        "max_prompt_length": spec.max_prompt_length,
        "per_device_train_batch_size": batch,
        "pad_to_multiple_of": training_args.pad_to_multiple_of,
        "batching": f"seeded random micro-batches of {batch} pairs, padded to the longest row as TRL's collator",
        "tokenize_seconds": round(seconds, 2),
        "pairs_per_second": round(pairs_per_s, 1) if pairs_per_s else None,
        "from_cache": got["from_cache"],
        **lengths.analyze(lens, coverage=args.coverage, max_length=spec.max_length,
                          max_prompt_length=spec.max_prompt_length, batch_size=batch,
                          pad_to_multiple_of=training_args.pad_to_multiple_of, seed=args.seed),
    }
    return result, lens


def analyze_mixture(args, spec, tokenizer, run) -> dict:
    """A table per source, then the mixture's: each source's measured lengths drawn as often as its amount takes
    its pairs (copies counted), so the recommendation is for what trains."""
    import dataclasses

    import numpy as np

    from fastdpo import lengths, mixture

    per = {}
    for src in spec.sources:
        result, lens = analyze(args, dataclasses.replace(spec, train=src, mixture=None), tokenizer, run)
        result.update(dataset=src.display, path=result["dataset"], amount=mixture.describe_amount(src.amount))
        per[src.display] = (result, lens)
    names = list(per)
    wants = mixture.resolve_amounts([s.amount for s in spec.sources], [per[n][0]["num_rows"] for n in names], names)
    picked = []
    for name, want in zip(names, wants, strict=True):
        result, lens = per[name]
        share = max(1, round(want * len(lens) / max(result["num_rows"], 1)))  # the sample stands for the source
        rows, _ = mixture.take(np.arange(len(lens)), share, mixture.rng(args.seed, name, "analyze"))
        picked.append(lengths.Lengths(lens.prompt[rows], lens.chosen[rows], lens.rejected[rows]))
    mixed = lengths.Lengths(*(np.concatenate([getattr(x, k) for x in picked]) for k in ("prompt", "chosen",
                                                                                        "rejected")))
    first = per[names[0]][0]
    out = {**first, "dataset": "mixture", "split": "; ".join(f"{n}: {per[n][0]['amount']}" for n in names),
           "num_rows": sum(wants), "num_samples": len(mixed), "layout": None, "bad_rows": 0, "bad_rows_by_problem": [],
           "training_refuses": any(per[n][0]["training_refuses"] for n in names), "refusal": None, "notes": {},
           "pairs_per_source": dict(zip(names, wants, strict=True)), "tokenizer_note": None,
           **lengths.analyze(mixed, coverage=args.coverage, max_length=spec.max_length,
                             max_prompt_length=spec.max_prompt_length, batch_size=first["per_device_train_batch_size"],
                             pad_to_multiple_of=first["pad_to_multiple_of"], seed=args.seed)}
    for name in names:
        write(args, per[name][0], per[name][1], files=False)
    out["sources"] = {n: per[n][0] for n in names}
    write(args, out, mixed)
    return out


# Said when no --recipe and no --tokenizer chose the tokenizer: the lengths are then not the user's model's.
TINY_NOTE = ("no --recipe: token lengths counted with the embedded tiny tokenizer (recipes/tiny.yaml, train_dpo.py's "
             "default), not your model's; for your model's lengths pass --recipe <the recipe you train with> or "
             "--tokenizer <its folder or Hub id>")
# Said after the fix for a tokenizer that cannot be read: the analyzer's flags, and the recipe that works offline.
TOKENIZER_ALSO = ("with --tokenizer, or --recipe recipes/tiny.yaml for the embedded tiny tokenizer (seconds, offline; "
                  "its lengths are not your model's)")


def check_sources(args, recipe: str, script_args, model_args, spec) -> str | None:
    """Exit in seconds, one line each, when the data or the tokenizer cannot be read (fastdpo.hub); the note to show
    when the tokenizer is the embedded one by default."""
    from fastdpo import cli, errors, hub, recipes

    def place(flag: str | None, key: str) -> str:
        if flag is not None:
            return f"command line ({flag})" if flag else "command line"
        return recipes.Where(recipe, [])(key)

    data = [hub.Need("dataset" if args.dataset else "dataset_name", script_args.dataset_name, hub.DATASET,
                     place=place("" if args.dataset else None, "dataset_name"))]
    if spec.mixture is not None:
        data = cli.mixture_needs(recipe)
    problems = hub.problems(data + [
        hub.Need("tokenizer" if args.tokenizer else "model_name_or_path", model_args.model_name_or_path, hub.TOKENIZER,
                 model_args.model_revision, place("--tokenizer" if args.tokenizer else None, "model_name_or_path"),
                 TOKENIZER_ALSO)])
    if problems:  # reported as the analyzer reports unreadable data: `error: ...`, exit 2
        raise errors.DataError("\n".join(problems))
    if args.recipe is None and args.tokenizer is None:
        logger.warning("%s", TINY_NOTE)
        return TINY_NOTE
    return None


def load_tokenizer(model_args, script_args):
    """The recipe's tokenizer with its chat template, or an exit naming the fix."""
    from fastdpo import models

    name = model_args.model_name_or_path
    try:
        tokenizer = models.load_tokenizer(name, script_args.chat_template_path, model_args.model_revision)
    except OSError as e:
        raise SystemExit(f"cannot load tokenizer {name!r} ({type(e).__name__}: {e}); give a tokenizer folder "
                         f"{TOKENIZER_ALSO}") from None
    if not tokenizer.is_fast:
        logger.warning("%s is a slow (Python) tokenizer: expect tens of pairs/s, not thousands", name)
    return tokenizer


def measured(args, spec, tokenizer, samples: int | None, num_proc: int | None) -> dict:
    """Token lengths of the train split and what training would make of its rows: from training's token cache when
    it holds these settings (with --samples all, filled now: the training run then starts from it), else from a
    seeded sample read with training's code."""
    import random

    import numpy as np

    from fastdpo import errors, lengths, tokcache, tokens

    def unreadable(e):
        return errors.DataError(f"cannot read {spec.train.name!r}: {e}; use a local file, or set HF_HUB_OFFLINE=1 "
                                "with a cached copy")

    try:
        entry = tokcache.train_entry(spec, tokenizer, num_proc, build=samples is None)
    except OSError as e:  # the Hub unreachable, or a folder datasets cannot read
        raise unreadable(e) from None
    if entry is None:
        try:
            sample = lengths.load_sample(spec, samples, args.seed, tokens.templated(tokenizer))
        except OSError as e:
            raise unreadable(e) from None
        loaded = time.perf_counter()
        # A sample is small: one process, whose fast tokenizer already encodes a batch on every core.
        lens = lengths.measure(sample.pairs, tokenizer, args.num_proc)
        return {"lengths": lens, "seconds": time.perf_counter() - loaded, "skipped": sample.skipped,
                "notes": sample.notes, "refusal": sample.refusal, "num_rows": sample.num_rows,
                "layout": sample.layout.report() if sample.layout is not None else {"name": None},
                "from_cache": False}
    table = entry.rows()
    keep = np.arange(table.num_rows)
    if samples is not None and samples < table.num_rows:
        keep = np.sort(np.asarray(random.Random(args.seed).sample(range(table.num_rows), samples)))
    col = lambda name: table.column(name).to_numpy()[keep].astype(np.int64)  # noqa: E731
    lens = lengths.Lengths(col("prompt_len"), col("chosen_len"), col("rejected_len"))
    logger.info("%s %d pairs (%s)", "tokenised" if entry.built else "lengths from training's token cache:",
                len(lens), entry.path)
    return {"lengths": lens, "seconds": entry.meta["seconds"] if entry.built else 0.0, "skipped": entry.skipped(),
            "notes": entry.notes(), "refusal": entry.meta.get("refusal"), "num_rows": entry.meta["items"],
            "layout": entry.meta["layout"], "from_cache": not entry.built}


def split_refusal(spec, templated: bool, samples: int | None) -> str | None:
    """What training's split stage would refuse (every eval pair also in train), found before training would: the
    pairs of the train and eval sources hashed as training hashes them (converted, not tokenised). A held-out
    fraction too small to leave a train pair is training's warning (it trains without eval), logged here too."""
    from fastdpo import errors, sources, splits

    evals = splits.eval_spec(spec)
    named = [spec.train] + ([spec.eval_source(evals.source, evals.split)] if evals.source is not None else [])
    if samples is not None and (evals.source is None or any(isinstance(s.open(), sources.HubSource) for s in named)):
        return None  # a sample says nothing of the split, and reading a Hub dataset whole is --samples all's choice
    try:
        train = _hashes(named[0], templated)
        held = _hashes(named[1], templated) if evals.source is not None else None
    except OSError as e:
        logger.warning("split not checked: cannot read %s (%s)", evals.source or spec.train.name, e)
        return None
    plan = splits.plan_splits(spec, evals, train[0], held[0] if held else None, train[1], held[1] if held else None)
    try:
        splits.check_eval_left(plan, evals)
    except errors.DataError as e:
        return str(e)
    return None


def _hashes(source, templated: bool) -> tuple[list, list]:
    """(pair hashes, places) of every pair of a source, as training's split sees them (bad rows left out)."""
    from fastdpo import checks, layouts, splits

    layout, batches = layouts.detect_source(source.open().batches(source.limit), source.options)
    hashes, where = [], []
    for batch in batches:
        got = checks.convert_rows(batch.items, batch.where, layout, templated, [])
        hashes += [splits.pair_hash(p) for p in got.pairs]
        where += got.where
    return hashes, where


def write(args, result: dict, lens, files: bool = True) -> None:
    """The markdown tables to stdout; the JSON and the plot where asked (`files`: a mixture's sources only print)."""
    from fastdpo import lengths

    if result.get("tokenizer_note"):
        print(f"> {result['tokenizer_note']}\n")
    print(lengths.markdown(result), end="")
    if not files:
        print()
        return
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        lengths.plot(result, lens.total, args.plot)
        logger.info("wrote %s", args.plot)


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr)
    warnings.filterwarnings("ignore", category=FutureWarning)  # TrainingArguments' renames, irrelevant here
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()  # no carriage-return bars in log files
    from fastdpo.errors import DataError

    try:
        main()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
