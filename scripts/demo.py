"""The embedded demo (`make demo`): SFT a tiny model, DPO it toward polite answers, show what DPO changed.

    python scripts/demo.py                       # about 1-2 minutes on 2 idle CPU cores; writes outputs/demo/
    python scripts/demo.py --out /tmp/demo --dpo_args "--use_peft true"      # the DPO stage with LoRA

Stage 1  train_sft.py --config recipes/tiny_sft.yaml: a random-init tiny Llama learns to answer from conversations
         that hold both kinds of answer: polite and naming the subject ("Sure! The red apple ..."), or curt /
         SHOUTED, the latter for two of the four ways of asking. So it is rude to about half the prompts.
Stage 2  train_dpo.py --config recipes/tiny_dpo_after_sft.yaml: DPO from the SFT model on preference pairs
         (polite chosen, curt or shouted rejected); the SFT model is the reference.
Stage 3  greedy answers of both models to the held-out prompts (adjective+subject pairs neither stage trained on),
         judged by `fastdpo.tiny.preferred`; outputs/demo/report.json holds the numbers.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastdpo import cli  # noqa: E402

cli.stop_on_ctrl_c()  # a Ctrl-C during the imports below stops with one line, not a traceback

from fastdpo import data, evaluation, hub, tiny  # noqa: E402
from fastdpo.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE  # noqa: E402

# The flags of --sft_args / --dpo_args that name something to load, checked before the first stage starts.
NAMED = {"--model_name_or_path": hub.MODEL, "--dataset_name": hub.DATASET, "--eval_dataset_name": hub.DATASET}


def stage(name: str, argv: list[str]) -> float:
    """Run one stage's script; its own error (one line) stands, and the demo stops with its exit code."""
    print(f"\n=== {name}: {' '.join(argv)}", flush=True)
    t0 = time.time()
    child = subprocess.Popen([sys.executable, *argv], cwd=ROOT)
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:  # the stage got the Ctrl-C too: it saves a checkpoint and stops; wait for it
            continue
    if code in (INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE):
        print(f"demo: stopped during the {name} stage; the same command resumes it", file=sys.stderr)
        raise SystemExit(code)
    if code != 0:
        print(f"demo: the {name} stage failed (exit code {code}, its error is above); nothing after it ran",
              file=sys.stderr)
        raise SystemExit(code)
    return time.time() - t0


def check_named(flags: dict[str, str]) -> None:
    """What --sft_args and --dpo_args name, found before the first stage runs (a model the DPO stage cannot read
    would otherwise fail after the SFT stage's minute)."""
    needs = []
    for option, text in flags.items():
        argv = shlex.split(text)
        for i, a in enumerate(argv):
            key, _, value = a.partition("=")
            if key in NAMED and (value or i + 1 < len(argv)):
                needs.append(hub.Need(key[2:], value or argv[i + 1], NAMED[key], place=f"--{option}"))
    hub.check(needs)


def share(samples: list[dict], key: str) -> float:
    return sum(tiny.preferred(s[key], s["prompt"]) for s in samples) / len(samples)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="folder for sft/, dpo/ and report.json")
    p.add_argument("--sft_args", default="", help="extra train_sft.py flags, e.g. \"--max_steps 20\"")
    p.add_argument("--dpo_args", default="", help="extra train_dpo.py flags, e.g. \"--use_peft true\"")
    p.add_argument("--show", type=int, default=4, help="side-by-side generations to print")
    p.add_argument("--eval_prompts", type=int, default=None, help="judge only the first N held-out prompts")
    args = p.parse_args()
    check_named({"sft_args": args.sft_args, "dpo_args": args.dpo_args})
    out = Path(args.out)
    sft_dir, dpo_dir = out / "sft", out / "dpo"

    t0 = time.time()
    times = {
        "sft_s": stage("SFT", ["train_sft.py", "--config", "recipes/tiny_sft.yaml", "--output_dir", str(sft_dir),
                               *shlex.split(args.sft_args)]),
        "dpo_s": stage("DPO", ["train_dpo.py", "--config", "recipes/tiny_dpo_after_sft.yaml",
                               "--model_name_or_path", str(sft_dir), "--output_dir", str(dpo_dir),
                               *shlex.split(args.dpo_args)]),
    }

    print("\n=== evaluate: greedy answers of the SFT and DPO models to the held-out prompts", flush=True)
    t1 = time.time()
    policy = evaluation.load(str(dpo_dir))
    ref = None if policy.base else evaluation.load(str(sft_dir))  # a LoRA run's base is the SFT model already
    pairs = evaluation.load_eval_pairs(tiny.DATASET_ID, "test")
    if args.eval_prompts:
        pairs = pairs.select(range(args.eval_prompts))
    tokenized, _ = data.tokenize_dataset(pairs, policy.tokenizer, 128, 64, name="held-out")
    gens = evaluation.side_by_side(policy, ref, pairs, tokenized, len(tokenized))
    scores = evaluation.score(policy, ref, tokenized)
    ref_model = ref or evaluation.Loaded(policy.model, policy.tokenizer, None)
    with evaluation.as_reference(policy, ref):
        likelihood_before = evaluation.likelihood_accuracy(ref_model, tokenized)
    dpo_results = json.loads((dpo_dir / "all_results.json").read_text())
    times["eval_s"] = time.time() - t1

    report = {
        "held_out_prompts": len(tokenized),
        "preferred_share_before": share(gens["samples"], "reference"),
        "preferred_share_after": share(gens["samples"], "policy"),
        # TRL's implicit-reward accuracy on the held-out pairs, from the DPO stage. Before DPO the policy is its
        # own reference, so every reward is 0 and (strictly) nothing is preferred.
        "preference_accuracy_before": dpo_results.get("before_eval_rewards/accuracies"),
        "preference_accuracy_after": dpo_results["eval_rewards/accuracies"],
        # The same question without a reference: does the model itself find the chosen answer likelier per token?
        "likelihood_accuracy_before": likelihood_before,
        "likelihood_accuracy_after": scores["likelihood_accuracy"],
        "reward_margin_after": scores["reward_margin"],
        "kl_to_sft": scores["kl"],
        "gen_length_before": gens["ref_gen_length"],
        "gen_length_after": gens["gen_length"],
        "samples": gens["samples"][: args.show],
        "seconds": {k: round(v, 1) for k, v in times.items()} | {"total_s": round(time.time() - t0, 1)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    print("\n| held-out prompts | after SFT | after DPO |\n|---|---|---|")
    for label, key in [("preferred share (greedy answers)", "preferred_share"),
                       ("preference accuracy (implicit reward)", "preference_accuracy"),
                       ("likelihood accuracy (chosen likelier)", "likelihood_accuracy"),
                       ("answer length (tokens)", "gen_length")]:
        b, a = report[f"{key}_before"], report[f"{key}_after"]
        print(f"| {label} | {'-' if b is None else f'{b:.2f}'} | {a:.2f} |")
    print(f"\nreward margin {report['reward_margin_after']:.2f}, per-token KL to the SFT model "
          f"{report['kl_to_sft']:.3f} nats")
    for s in report["samples"]:
        print(f"\n> {s['prompt']}\n  SFT: {s['reference']}\n  DPO: {s['policy']}")
    print(f"\nwrote {out / 'report.json'}; {report['seconds']}")


if __name__ == "__main__":
    main()
