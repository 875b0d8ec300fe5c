"""Score a DPO run (or any model or LoRA adapter) on preference pairs: what did DPO change?

    # a finished run: the pairs it held out, with its beta, loss, lengths and reference, all read from the folder
    python scripts/evaluate.py outputs/mine

    # the same run on other pairs (refused if some of them are pairs it trained on, unless --allow_train_pairs)
    python scripts/evaluate.py outputs/mine --dataset_name data/held_out.jsonl --samples 5 \
        --json outputs/mine/eval.json --plot outputs/mine/curves.png

    # a model folder that is not a run's: name the reference and the pairs
    python scripts/evaluate.py path/to/dpo_model --ref path/to/sft_model --dataset_name data/pairs.jsonl --beta 0.1

Given a run's output_dir (or one of its checkpoint-N folders), the run's own settings decide everything a flag does
not: its data and split rule give the held-out pairs, taken through training's pipeline (the token cache), so the
pairs scored are the ones the run evaluated; beta, loss_type, max_length and max_prompt_length are the run's; the
reference is what it started from (model_name_or_path; for a LoRA adapter, its base with the adapter off). A flag
overrides one value, and the report says where each value came from.

Metrics, on each eval set (any format training accepts: file, folder, Hub id, column_map):
  loss                 the run's DPO loss (sigmoid, sigmoid_norm, hinge, ipo, sft), as TRL computes it
  preference_accuracy  share of pairs whose implicit reward beta*log(pi/pi_ref) is higher for chosen (TRL's
                       rewards/accuracies); reward_margin its mean difference chosen - rejected
  kl                   mean per-token KL(policy || reference) over the chosen answers, in nats
  likelihood_accuracy  share of pairs the policy alone prefers by mean per-token log-prob (no reference)
  gen_length           mean greedy answer length in tokens (policy; ref_gen_length for the reference)
Markdown goes to stdout; --json writes the same numbers and the side-by-side generations.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from fastdpo import cli

cli.stop_on_ctrl_c()  # a Ctrl-C during the imports below stops with one line, not a traceback

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from fastdpo import data, evaluation, heldout, hub, splits, tiny, tokcache, tokens  # noqa: E402
from fastdpo.errors import DataError  # noqa: E402

# What a model that is not a run's is scored with, unless a flag says otherwise.
PLAIN = {"dataset_name": tiny.DATASET_ID, "split": "test", "beta": 0.1, "max_length": 1024}


def flag(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run's output_dir or checkpoint-N folder (its settings are read), a model or "
                   "LoRA adapter folder, or embedded:tiny-llama")
    p.add_argument("--ref", help="reference model; default: the run's model_name_or_path, or a LoRA adapter's base "
                   "(adapter off); a model that is not a run's needs it")
    p.add_argument("--dataset_name", help="score these pairs instead of the pairs the run held out (default for a "
                   f"model that is not a run's: {PLAIN['dataset_name']})")
    p.add_argument("--split", help="split of --dataset_name (default test; a single file has one split: any name "
                   "reads it)")
    p.add_argument("--dataset_config", default=None)
    p.add_argument("--column_map", default=None, help="JSON, as in training (default: the run's; layouts are "
                   "detected without it)")
    p.add_argument("--ranked_pairs", choices=["best_vs_worst", "best_vs_rest"], help="ranked replies -> pairs")
    p.add_argument("--judged_pairs", type=flag, nargs="?", const=True, default=None,
                   help="judged answers -> pairs (winner chosen): true or false")
    p.add_argument("--allow_train_pairs", type=flag, nargs="?", const=True, default=False,
                   help="score --dataset_name pairs even when some are pairs the run trained on (the report says how "
                   "many); without it such pairs are refused")
    p.add_argument("--max_pairs", type=int, default=None, help="score only the first N pairs")
    p.add_argument("--beta", type=float, help=f"default: the run's ({PLAIN['beta']} for a model that is not a run's)")
    p.add_argument("--max_length", type=int, help=f"default: the run's ({PLAIN['max_length']} otherwise)")
    p.add_argument("--max_prompt_length", type=int, help="default: the run's (none otherwise)")
    p.add_argument("--samples", type=int, default=3, help="side-by-side generations to show")
    p.add_argument("--gen_prompts", type=int, default=64, help="prompts whose greedy answers give gen_length")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--plot", help="PNG of the training curves from MODEL's trainer_state.json")
    return p.parse_args(argv)


def trainer_state_of(model: str) -> Path | None:
    """A run's trainer_state.json: in the folder, or one up for a merged run's `adapter/` subfolder."""
    for folder in (Path(model), Path(model).parent):
        if (folder / "trainer_state.json").is_file():
            return folder / "trainer_state.json"
    return None


def main(args) -> dict:
    run = heldout.read(args.model)
    if run is not None and not run.is_dpo:
        print(f"{args.model} is an SFT run: scored as a plain model (pass --ref and --dataset_name)", file=sys.stderr)
    report = score_run(args, run) if run is not None and run.is_dpo else score_model(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    if args.plot:
        state = trainer_state_of(args.model)
        if state is None:
            raise SystemExit(f"--plot: no trainer_state.json in {args.model} (or its parent); it is written at the "
                             "end of training, in output_dir")
        print(f"wrote {evaluation.plot_training(state, args.plot)} from {state}")
    return report


def load_models(args, ref_name: str | None):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = evaluation.load(args.model, device, args.dtype)
    if ref_name is None and policy.base is None:
        raise SystemExit(f"{args.model} is a full model: pass --ref with the model DPO started from (the SFT output "
                         "or the recipe's model_name_or_path); a DPO run's output_dir or a LoRA adapter names its own")
    ref = evaluation.load(ref_name, device, args.dtype) if ref_name is not None else None
    if ref is not None and len(ref.tokenizer) != len(policy.tokenizer):
        raise SystemExit(f"reference {ref_name} has a different vocabulary ({len(ref.tokenizer)} vs "
                         f"{len(policy.tokenizer)} tokens): the reference must be the model DPO started from")
    print(f"data: {tokens.layout_note(tokens.templated(policy.tokenizer))}", file=sys.stderr)
    return policy, ref


# ------------------------------------------------------------------------------------- a model that is no run's


def score_model(args) -> dict:
    """A model or adapter folder no run wrote: the pairs, reference and beta come from the flags."""
    for key, value in PLAIN.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    hub.check([hub.Need("model", args.model, hub.MODEL, place="command line"),
               hub.Need("ref", args.ref, hub.MODEL, place="command line (--ref)"),
               hub.Need("dataset_name", args.dataset_name, hub.DATASET, place="command line (--dataset_name)")])
    policy, ref = load_models(args, args.ref)
    pairs = evaluation.load_eval_pairs(args.dataset_name, args.split, args.column_map, args.max_pairs,
                                       args.dataset_config, policy.tokenizer, args.ranked_pairs,
                                       bool(args.judged_pairs))
    tokenized, counts = data.tokenize_dataset(pairs, policy.tokenizer, args.max_length, args.max_prompt_length,
                                              name=args.split)
    report = {"model": args.model, "reference": args.ref or f"{policy.base} (adapter disabled)",
              "dataset": args.dataset_name, "split": args.split, "truncated": counts["truncated"],
              "dropped": counts["dropped"]}
    report.update(scored(args, policy, ref, pairs, tokenized, args.beta, None, args.dataset_name))
    print(f"## {args.model} vs {report['reference']} on {args.dataset_name} [{args.split}]\n")
    print(evaluation.markdown(report))
    return report


def scored(args, policy, ref, pairs, tokenized, beta, objective, dataset_name) -> dict:
    """The metrics, generations and (on the embedded data) the judged share of one set of pairs."""
    out = evaluation.score(policy, ref, tokenized, beta, args.batch_size, objective)
    n_gen = min(max(args.gen_prompts, args.samples), len(tokenized))
    gens = evaluation.side_by_side(policy, ref, pairs, tokenized, n_gen, args.max_new_tokens)
    if dataset_name == tiny.DATASET_ID and n_gen:  # the embedded data has a checkable property: polite, on topic
        out["preferred_share"] = sum(tiny.preferred(s["policy"], s["prompt"]) for s in gens["samples"]) / n_gen
        out["ref_preferred_share"] = sum(tiny.preferred(s["reference"], s["prompt"]) for s in gens["samples"]) / n_gen
    out["gen_length"], out["ref_gen_length"] = gens["gen_length"], gens["ref_gen_length"]
    out["samples"] = gens["samples"][: args.samples]
    return out


# ---------------------------------------------------------------------------------------------------- a run


def run_values(args, run, spec) -> dict:
    """Each setting the scores depend on: {key: (value, where it came from)}."""
    record = run.record.name
    values = {"data": (f"{args.dataset_name} [{args.split or PLAIN['split']}]", "flag") if args.dataset_name else
              (held_out_rule(spec), record)}
    for key in ("beta", "max_length", "max_prompt_length"):
        given = getattr(args, key)
        values[key] = (given, "flag") if given is not None else (run.settings.get(key), record)
    loss = run.settings.get("loss_type") or ["sigmoid"]
    values["loss_type"] = (", ".join([loss] if isinstance(loss, str) else loss), record)
    values["reference"] = (args.ref, "flag") if args.ref else (shown(run.reference), record)
    return values


def shown(name: str) -> str:
    """A path as the user would type it from here (run.json keeps local paths absolute)."""
    path = Path(name)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else name


def held_out_rule(spec) -> str:
    """Which rows the run held out, in words."""
    evals = splits.eval_spec(spec)
    names = ", ".join(shown(s.name) for s in spec.sources)  # a mixture's sources, or the one
    if spec.mixture is not None and spec.eval_sets:
        return f"{names}; eval sets {', '.join(shown(s.name) for s in spec.eval_sets)}"
    if evals.fraction is not None:
        whose = "each source's" if spec.mixture is not None else "its"
        return f"{names}, {evals.fraction:g} of {whose} rows held out (dataset_seed {spec.seed})"
    if evals.source is not None:
        return f"{shown(evals.source)} [{evals.split}]"
    return f"{shown(spec.train.name)}, none held out"


def score_run(args, run) -> dict:
    """A run's folder: the held-out pairs (or --dataset_name's, checked against its training pairs) with the run's
    settings, each overridable by its flag."""
    why = run.unfinished()
    if why:
        raise SystemExit(why)
    spec = run.data_spec(**{k: getattr(args, k) for k in ("max_length", "max_prompt_length")
                            if getattr(args, k) is not None})
    values = run_values(args, run, spec)
    adapter_ref = evaluation.is_adapter(args.model) and not args.ref
    ref_name = None if adapter_ref else (args.ref or run.reference)
    hub.check(run_needs(args, run, spec, ref_name))
    policy, ref = load_models(args, ref_name)
    if adapter_ref:
        values["reference"] = (f"{policy.base} (adapter disabled)", values["reference"][1])
    objective, no_loss = evaluation.Objective.of(run.settings)
    as_trained = run.data_spec()  # the run's pairs at its lengths: which pairs it trained on, token for token
    prepared = tokcache.prepare(as_trained, policy.tokenizer)
    print(f"data: {prepared.report.get('accounting_line', '')}", file=sys.stderr)
    if args.dataset_name:
        sets = [given_pairs(args, run, values, policy.tokenizer, prepared)]
    else:
        scored_rows = prepared if spec == as_trained else tokcache.prepare(spec, policy.tokenizer)
        sets = held_out_pairs(args, run, spec, values, prepared, scored_rows)
    report = {"model": args.model, "run": str(run.record), "reference": values["reference"][0],
              "values": {k: {"value": v, "from": f} for k, (v, f) in values.items()}, "loss_not_computed": no_loss}
    scores = {}
    for one in sets:
        rows, pairs, label = one.pop("rows"), one.pop("pairs"), one.pop("label")
        scores[label or "eval"] = {**one, **scored(args, policy, ref, pairs, rows, values["beta"][0], objective,
                                                   one["dataset"])}
    report.update(next(iter(scores.values())) if len(scores) == 1 else {"sets": scores})
    show_run(report, scores)
    return report


def run_needs(args, run, spec, ref_name) -> list:
    """What a run's evaluation reads: the model, the reference, the run's data (its eval split, or the training pairs
    --dataset_name is checked against) and --dataset_name's."""
    where = str(run.record)
    sources = getattr(spec, "sources", (spec.train,))  # a mixture's sources, or the one
    needs = [hub.Need("model", args.model, hub.MODEL, place="command line"),
             hub.Need("ref" if args.ref else "model_name_or_path", ref_name, hub.MODEL,
                      place="command line (--ref)" if args.ref else where)]
    needs += [hub.Need("dataset_name", s.name, hub.DATASET, place=where) for s in sources]
    needs.append(hub.Need("eval_dataset_name", spec.eval_name, hub.DATASET, place=where))
    if args.dataset_name:
        needs.append(hub.Need("dataset_name", args.dataset_name, hub.DATASET, place="command line (--dataset_name)"))
    return needs


def held_out_pairs(args, run, spec, values, prepared, scored_rows) -> list[dict]:
    """The run's eval set(s), from training's token cache, with whether they are the rows the run evaluated
    (`prepared`: the data at the run's lengths; `scored_rows`: at the lengths the flags give)."""
    as_trained = dict(heldout.eval_sets(prepared.eval))
    found = heldout.eval_sets(scored_rows.eval)
    if not found:
        raise SystemExit(f"{run.folder}: the run held out no pairs ({values['data'][0]}); score other pairs with "
                         "--dataset_name FILE [--split NAME] (they are checked against the run's training pairs)")
    as_run = args.max_pairs is None and all(values[k][1] != "flag" for k in ("max_length", "max_prompt_length"))
    out = []
    for label, rows in found:
        if args.max_pairs is not None:
            rows = rows.select(range(min(args.max_pairs, len(rows))))
        differs = heldout.same_as_run(run, label, rows) if as_run else None
        if differs:
            print(f"warning: {run.folder}: these are not the pairs the run evaluated ({differs}): its data changed "
                  "since it trained", file=sys.stderr)
        out.append({"label": label, "dataset": spec.train.name if label is None else label, "held_out": True,
                    "rows": rows, "pairs": None,
                    "training_pairs": heldout.training_pairs(prepared.train, as_trained[label]),
                    "as_run": "not checked (lengths or --max_pairs given)" if not as_run else
                    f"no: {differs}" if differs else f"yes (fingerprint as in {run.record.name})"})
    return out


def given_pairs(args, run, values, tokenizer, prepared) -> dict:
    """--dataset_name's pairs at the effective lengths; refused when some are pairs the run trained on, unless
    --allow_train_pairs (the count is reported either way)."""
    args.split = args.split or PLAIN["split"]
    spec = run.other_data(args.dataset_name, args.split, args.dataset_config, args.max_pairs,
                          column_map=args.column_map, ranked_pairs=args.ranked_pairs, judged_pairs=args.judged_pairs)
    pairs = data.load_pairs(spec, tokenizer).train
    rows, counts = data.tokenize_dataset(pairs, tokenizer, values["max_length"][0], values["max_prompt_length"][0],
                                         name=args.split)
    check = rows
    if any(values[k][1] == "flag" for k in ("max_length", "max_prompt_length")):  # compare at the run's lengths
        check, _ = data.tokenize_dataset(pairs, tokenizer, run.settings.get("max_length"),
                                         run.settings.get("max_prompt_length"), name=args.split)
    trained = heldout.training_pairs(prepared.train, check)
    if trained and not args.allow_train_pairs:
        raise SystemExit(f"{args.dataset_name} [{args.split}]: {trained} of {len(check)} pairs are pairs {run.folder} "
                         "trained on: their scores would measure memorisation, not what the run learnt. Score the "
                         f"pairs it held out with `scripts/evaluate.py {args.model}` alone, or pass "
                         "--allow_train_pairs true to score these anyway (the report counts them)")
    return {"label": None, "dataset": args.dataset_name, "split": args.split, "held_out": False, "rows": rows,
            "pairs": pairs, "training_pairs": trained, "truncated": counts["truncated"], "dropped": counts["dropped"]}


def show_run(report: dict, scores: dict) -> None:
    print(f"## {report['model']} vs {report['reference']}\n")
    print("| setting | value | from |\n|---|---|---|")
    for key, v in report["values"].items():
        print(f"| {key} | {v['value']} | {v['from']} |")
    if report["loss_not_computed"]:
        print(f"| loss | not computed: {report['loss_not_computed']} | |")
    for name, s in scores.items():
        if len(scores) > 1:
            print(f"\n### {name}")
        what = "pairs the run held out" if s["held_out"] else f"pairs of {s['dataset']} [{s['split']}]"
        line = f"{s['num_pairs']} {what}; {s['training_pairs']} of them were training pairs"
        print(f"\n{line}" + (f"; the pairs the run evaluated: {s['as_run']}" if "as_run" in s else "") + "\n")
        print(evaluation.markdown(s))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # The report's data row says which rows were held out; the split's own warning would say it twice more.
    logging.getLogger("fastdpo.splits").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()  # a bar per model load: noise around the report
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()  # no carriage-return bars in log files
    try:
        main(parse())
    except DataError as e:
        sys.exit(f"error: {e}")
