"""Score a DPO-trained model or LoRA adapter on a preference set: what did DPO change?

    # the demo's DPO model against its SFT reference, on the embedded held-out pairs
    python scripts/evaluate.py outputs/demo/dpo --ref outputs/demo/sft --dataset_name embedded:tiny-prefs

    # a LoRA adapter: the reference defaults to its base model (the adapter switched off, no second copy)
    python scripts/evaluate.py outputs/smollm2_lora --dataset_name data/held_out.jsonl --split train \
        --samples 5 --json outputs/smollm2_lora/eval.json --plot outputs/smollm2_lora/curves.png

Metrics, on the pairs of one split (any format training accepts: file, folder, Hub id, column_map):
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

import torch

from fastdpo import data, evaluation, tiny, tokens
from fastdpo.errors import DataError


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder, LoRA adapter folder, or embedded:tiny-llama")
    p.add_argument("--ref", help="reference model (what DPO started from); default for an adapter: its base")
    p.add_argument("--dataset_name", default=tiny.DATASET_ID, help="preference source, as in training")
    p.add_argument("--split", default="test", help="split to score (a single file has one split: any name works)")
    p.add_argument("--dataset_config", default=None)
    p.add_argument("--column_map", default=None, help="JSON, as in training (layouts are detected without it)")
    p.add_argument("--ranked_pairs", choices=["best_vs_worst", "best_vs_rest"], help="ranked replies -> pairs")
    p.add_argument("--judged_pairs", action="store_true", help="judged answers -> pairs (winner chosen)")
    p.add_argument("--max_pairs", type=int, default=None, help="score only the first N pairs")
    p.add_argument("--beta", type=float, default=0.1, help="the beta the model trained with (scales rewards only)")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--max_prompt_length", type=int, default=None)
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = evaluation.load(args.model, device, args.dtype)
    if args.ref is None and policy.base is None:
        raise SystemExit(f"{args.model} is a full model: pass --ref with the model DPO started from (e.g. the SFT "
                         "output or the recipe's model_name_or_path); only a LoRA adapter implies its reference")
    ref = evaluation.load(args.ref, device, args.dtype) if args.ref else None
    if ref is not None and len(ref.tokenizer) != len(policy.tokenizer):
        raise SystemExit(f"--ref {args.ref} has a different vocabulary ({len(ref.tokenizer)} vs "
                         f"{len(policy.tokenizer)} tokens): the reference must be the model DPO started from")

    print(f"data: {tokens.layout_note(tokens.templated(policy.tokenizer))}", file=sys.stderr)
    pairs = evaluation.load_eval_pairs(args.dataset_name, args.split, args.column_map, args.max_pairs,
                                       args.dataset_config, policy.tokenizer, args.ranked_pairs, args.judged_pairs)
    tokenized, counts = data.tokenize_dataset(pairs, policy.tokenizer, args.max_length, args.max_prompt_length,
                                              name=args.split)
    report = {"model": args.model, "reference": args.ref or f"{policy.base} (adapter disabled)",
              "dataset": args.dataset_name, "split": args.split, "truncated": counts["truncated"],
              "dropped": counts["dropped"]}
    report.update(evaluation.score(policy, ref, tokenized, args.beta, args.batch_size))
    n_gen = min(max(args.gen_prompts, args.samples), len(tokenized))
    gens = evaluation.side_by_side(policy, ref, pairs, tokenized, n_gen, args.max_new_tokens)
    if args.dataset_name == tiny.DATASET_ID:  # the embedded data has a checkable property: polite and on topic
        report["preferred_share"] = sum(tiny.preferred(s["policy"], s["prompt"]) for s in gens["samples"]) / n_gen
        report["ref_preferred_share"] = (sum(tiny.preferred(s["reference"], s["prompt"]) for s in gens["samples"])
                                         / n_gen)
    report["gen_length"], report["ref_gen_length"] = gens["gen_length"], gens["ref_gen_length"]
    report["samples"] = gens["samples"][: args.samples]

    print(f"## {args.model} vs {report['reference']} on {args.dataset_name} [{args.split}]\n")
    print(evaluation.markdown(report))
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


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    try:
        main(parse())
    except DataError as e:
        sys.exit(f"error: {e}")
