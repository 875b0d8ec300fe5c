"""Stock TRL 1.16 DPOTrainer vs the fast path (padding-free, token budget, precomputed reference), same model,
same pairs, same pairs per optimizer step, alternating runs in fresh processes.

    .venv/bin/python scripts/benchmark.py --profile think                 # ~5-8 minutes on 2 CPU cores
    .venv/bin/python scripts/benchmark.py --profile instruct --json outputs/bench_instruct.json
    .venv/bin/python scripts/benchmark.py --dataset data/pairs.jsonl --max_length 1024   # real data

Profiles are synthetic token lengths shaped like the OLMo 3 DPO sets (log-normal fits of their quantiles):
  think     allenai/Dolci-Think-DPO-7B: prompt p50 114 / p95 793, chosen p50 1864 / p95 11903,
            rejected p50 1154 / p95 9518 (prompt+chosen p50 ~2.1k, p99 ~25k), max_length 8192
  instruct  allenai/Dolci-Instruct-DPO: prompt+chosen median ~680, ~96% within 4096, max_length 4096
--scale divides every length and max_length (default 8, so a CPU run keeps the shape at 1/8 the size).
Batch: 4 pairs per device x 8 accumulation = 32 pairs per optimizer step, as the OLMo 3 recipes.

Each run is its own process, so peak memory (max RSS on CPU, max allocated on GPU) is that run's alone. Time
counts trainer construction (the fast path's reference precompute happens there, uncached) and training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (median, sigma) of log-normal lengths, fitted to p50 and p95 (sigma = ln(p95/p50) / 1.645)
PROFILES = {
    "think": {"prompt": (114, 793), "chosen": (1864, 11903), "rejected": (1154, 9518), "max_length": 8192,
              "max_prompt_length": 4096},
    "instruct": {"prompt": (150, 1100), "chosen": (480, 2600), "rejected": (420, 2400), "max_length": 4096,
                 "max_prompt_length": 2048},
}


def synthetic_pairs(profile: str, n: int, scale: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    from fastdpo.data import truncate_pair

    spec = PROFILES[profile]
    rng = np.random.default_rng(seed)

    def lengths(key):
        p50, p95 = spec[key]
        sigma = np.log(p95 / p50) / 1.645
        return np.maximum(1, (rng.lognormal(np.log(p50), sigma, n) / scale).astype(int))

    lp, lc, lr = lengths("prompt"), lengths("chosen"), lengths("rejected")
    max_length, max_prompt = spec["max_length"] // scale, spec["max_prompt_length"] // scale
    rows = []
    for i in range(n):
        tok = lambda k: rng.integers(3, vocab, k).tolist()  # noqa: E731  (ids 0-2 are special tokens)
        p, c, r, status = truncate_pair(tok(lp[i]), tok(lc[i]), tok(lr[i]), max_length, max_prompt)
        if status != "dropped":
            rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return rows


def worker(opts) -> dict:
    """One timed run (stock or fast) in this process; prints a JSON line."""
    import torch
    from datasets import Dataset

    from fastdpo import config as cfg
    from fastdpo import data, models
    from fastdpo.packing import pair_lengths
    from fastdpo.trainer import DPOTrainer, StockDPOTrainer
    from trl import DPOConfig as StockConfig

    scale = opts.scale
    max_length = opts.max_length or PROFILES[opts.profile]["max_length"] // scale
    pairs_needed = opts.steps * opts.pairs_per_device * opts.grad_accum
    common = ["--output_dir", str(Path(opts.tmp) / opts.worker), "--max_length", str(max_length),
              "--per_device_train_batch_size", str(opts.pairs_per_device),
              "--gradient_accumulation_steps", str(opts.grad_accum), "--max_steps", str(opts.steps),
              "--logging_steps", str(opts.steps), "--eval_before_train", "false", "--save_strategy", "no",
              "--report_to", "none", "--ref_logps_cache_dir", str(Path(opts.tmp) / "ref_cache"),
              "--disable_tqdm", "true"]
    if opts.dataset:
        common += ["--dataset_name", opts.dataset, "--max_train_samples", str(pairs_needed)]
    script_args, args, model_args = cfg.parse_args(common)
    tok = models.load_tokenizer(model_args.model_name_or_path)
    if opts.dataset:
        ds, _ = data.tokenize_dataset(data.load_pairs(script_args).train, tok, max_length,
                                      script_args.max_prompt_length)
    else:
        ds = Dataset.from_list(synthetic_pairs(opts.profile, pairs_needed, scale, len(tok), seed=opts.seed))
    useful = sum(sum(pair_lengths(ds[i], max_length)) for i in range(len(ds)))
    computed = [0]

    class Counting:
        """The run's own collator, counting the tokens the model computes (padding included)."""

        def __init__(self, collate, key):
            self.collate, self.key = collate, key

        def __getattr__(self, name):  # row_capacity etc. still read by the trainer
            return getattr(self.collate, name)

        def __call__(self, *a, **k):
            out = self.collate(*a, **k)
            computed[0] += out[self.key].numel()
            return out

    if opts.worker == "stock":
        import dataclasses
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StockConfig) if f.init}
        values.update(padding_free=False, precompute_ref_log_probs=False)
        args = StockConfig(**values)
        start = time.perf_counter()
        trainer = StockDPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=ds,
                                  processing_class=tok)
        trainer.data_collator = Counting(trainer.data_collator, "input_ids")
    else:
        start = time.perf_counter()
        trainer = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=ds,
                             processing_class=tok)
        if not trainer._fast:
            raise SystemExit("fast path fell back to stock (see the warning above)")
        trainer._packed_collator = Counting(trainer._packed_collator, "packed_input_ids")
    built = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    seconds = end - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb
    stats = getattr(trainer, "_ref_precompute_stats", {})
    return {"tokens_per_s": useful / seconds, "pairs_per_s": len(ds) / seconds,
            "padding_efficiency": useful / max(computed[0], 1), "peak_mem_mb": peak, "seconds": seconds,
            "setup_seconds": built - start, "ref_precompute_seconds": stats.get("seconds", 0.0),
            "pairs": len(ds), "useful_tokens": useful, "computed_tokens": computed[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="think")
    parser.add_argument("--dataset", help="real preference data (any source fastdpo.data reads) instead of a profile")
    parser.add_argument("--scale", type=int, default=8, help="divide every length (and max_length) by this")
    parser.add_argument("--max_length", type=int, help="override the profile's max_length / scale")
    parser.add_argument("--pairs_per_device", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=8)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: think 2, instruct 8, so a "
                        "run is tens of seconds and fixed costs do not dominate)")
    parser.add_argument("--rounds", type=int, default=3, help="stock/fast pairs of runs, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--worker", choices=["stock", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.steps is None:
        opts.steps = {"think": 2, "instruct": 8}[opts.profile]

    if opts.worker:
        import logging
        logging.basicConfig(level=logging.WARNING)
        print("BENCH " + json.dumps(worker(opts)), flush=True)
        return

    runs = {"stock": [], "fast": []}
    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if opts.json:
        argv = [a for a in argv if a != opts.json]
    for rnd in range(opts.rounds):
        for kind in ("stock", "fast"):
            with tempfile.TemporaryDirectory() as tmp:  # fresh reference cache: the fast path pays its precompute
                cmd = [sys.executable, __file__, *argv, "--worker", kind, "--tmp", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{kind} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(line[6:])
            runs[kind].append(res)
            print(f"round {rnd + 1}/{opts.rounds} {kind:5s} {res['tokens_per_s']:9.0f} useful tok/s "
                  f"{res['pairs_per_s']:6.2f} pairs/s  padding eff {res['padding_efficiency']:.3f}  "
                  f"peak {res['peak_mem_mb']:6.0f} MB  ({res['seconds']:.1f}s, ref precompute "
                  f"{res['ref_precompute_seconds']:.1f}s)", flush=True)

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    keys = ("tokens_per_s", "pairs_per_s", "padding_efficiency", "peak_mem_mb")
    summary = {"profile": "dataset" if opts.dataset else opts.profile, "scale": opts.scale,
               "stock": {k: med("stock", k) for k in keys}, "fast": {k: med("fast", k) for k in keys}}
    summary["speedup"] = summary["fast"]["tokens_per_s"] / summary["stock"]["tokens_per_s"]
    # each round's stock and fast runs are adjacent in time: their ratio is robust to a shared machine's load
    summary["round_speedups"] = [f["tokens_per_s"] / s["tokens_per_s"] for s, f in zip(runs["stock"], runs["fast"])]
    summary["setup"] = {"pairs_per_step": opts.pairs_per_device * opts.grad_accum, "steps": opts.steps,
                        "rounds": opts.rounds, "pairs": runs["fast"][0]["pairs"],
                        "useful_tokens": runs["fast"][0]["useful_tokens"]}
    print(f"\n| {summary['profile']} (scale 1/{opts.scale}) | useful tok/s | pairs/s | padding eff | peak MB |")
    print("|---|---|---|---|---|")
    for kind in ("stock", "fast"):
        s = summary[kind]
        print(f"| {kind} | {s['tokens_per_s']:.0f} | {s['pairs_per_s']:.2f} | {s['padding_efficiency']:.3f} | "
              f"{s['peak_mem_mb']:.0f} |")
    print(f"| ratio | {summary['speedup']:.2f}x | "
          f"{summary['fast']['pairs_per_s'] / summary['stock']['pairs_per_s']:.2f}x | | "
          f"{summary['fast']['peak_mem_mb'] / summary['stock']['peak_mem_mb']:.2f}x |")
    print(f"per-round speedups (adjacent runs): {', '.join(f'{r:.2f}x' for r in summary['round_speedups'])}")
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
