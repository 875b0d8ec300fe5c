"""Stock TRL 1.16 DPOTrainer vs the fast path, same pairs, same pairs per optimizer step, alternating runs in fresh
processes, on two models: the embedded tiny Llama and one shaped like the target (see --model).

    .venv/bin/python scripts/benchmark.py --profile think          # ~5-10 minutes on 2 CPU cores
    .venv/bin/python scripts/benchmark.py --profile multiturn --json outputs/bench_multiturn.json
    .venv/bin/python scripts/benchmark.py --profile think --breakdown   # one fast-path option at a time
    .venv/bin/python scripts/benchmark.py --dataset data/pairs.jsonl --max_length 1024   # real data
    .venv/bin/python scripts/benchmark.py --backends zero2 zero3 --model embedded   # 2 processes, DeepSpeed
    .venv/bin/python scripts/benchmark.py --model config --model_config olmo3_1b.json --dtype bfloat16 \
        --scale 1 --train_args="--bf16 true --gradient_checkpointing true"   # any architecture (scripts/gpu_check.py)

Profiles are synthetic token lengths (log-normal fits of p50 / p95), divided by --scale (default 16):
  think      allenai/Dolci-Think-DPO-7B: prompt p50 114 / p95 793, chosen 1864 / 11903, rejected 1154 / 9518;
             max_length 8192
  instruct   allenai/Dolci-Instruct-DPO: prompt 150 / 1100, chosen 480 / 2600, rejected 420 / 2400; max_length 4096
  multiturn  prompt-heavy conversations: prompt 1500 / 6000, answers 300 / 1200; max_length 8192
Batch: 4 pairs per device x 8 accumulation = 32 pairs per optimizer step, as the OLMo 3 recipes per GPU.

Models (--model, default both):
  embedded   the 2-layer, hidden-64 tiny Llama: attention is most of its compute (attention / linear ~ L / 12d)
  shaped     a Llama with OLMo 3 7B's compute mix at the scaled lengths: width 4096/scale (so L / 12d, the
             attention share, is the 7B's at full length: 0.17 at 8192), 4 layers, MLP 11008/scale, and a vocabulary
             that gives the LM head the 7B's share of a step (100k entries there; ~780 at scale 16)
  config     any transformers config, from a JSON file of its fields (`model_type` included): --model_config
Variants per round: stock (TRL's padded path, a reference forward each step), fast (every option on, fresh reference
cache: the precompute is paid inside the run) and fast-warm (the cache a previous run left: a beta sweep, a requeue).
--breakdown adds the options one at a time instead (shaped model).

Backends (--backends, default single): `single` is one process; `zero2` / `zero3` run every variant as 2 processes
under torchrun (gloo on CPU) with DeepSpeed ZeRO-2 (ds_config.json) or ZeRO-3 (ds_config_zero3.json, the model
loaded partitioned), the same pairs per device, so twice the pairs per optimizer step. Several backends alternate
within each round, so their fast/stock ratios are measured side by side.

Reported per run: useful tokens/s (prompt + answer tokens of chosen and rejected, padding excluded, each prompt
counted twice as TRL's math computes it), pairs/s, padding efficiency (the share of computed tokens that are not
padding), computed / useful tokens (below 1 when prompts are shared), peak memory
(max RSS on CPU, max allocated on GPU), MFU (model FLOPs of the useful tokens, policy forward + backward and the
reference forward, attention included, per second, over this machine's measured dense matmul peak; a path that
skips work, shared prompts or a cached reference, shows it as a higher MFU). Time counts trainer construction (the
probe, the reference precompute) and training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (p50, p95) per field: log-normal lengths, sigma = ln(p95 / p50) / 1.645
PROFILES = {
    "think": {"prompt": (114, 793), "chosen": (1864, 11903), "rejected": (1154, 9518), "max_length": 8192,
              "max_prompt_length": 4096},
    "instruct": {"prompt": (150, 1100), "chosen": (480, 2600), "rejected": (420, 2400), "max_length": 4096,
                 "max_prompt_length": 2048},
    "multiturn": {"prompt": (1500, 6000), "chosen": (300, 1200), "rejected": (300, 1200), "max_length": 8192,
                  "max_prompt_length": 6144},
}
# OLMo 3 7B: the compute mix the shaped model copies
TARGET = {"hidden": 4096, "layers": 32, "intermediate": 11008, "vocab": 100278}
SHAPED_LAYERS = 4
BACKEND_ARGS = {"single": [], "zero2": ["--deepspeed", str(ROOT / "ds_config.json")],
                "zero3": ["--deepspeed", str(ROOT / "ds_config_zero3.json")]}
# cumulative: each adds one option to the one before (shaped model)
BREAKDOWN = {
    "stock": [],
    "padding-free": ["--packed_layout", "dense", "--prefix_sharing", "false", "--precompute_ref_log_probs", "false"],
    "+per-sequence": ["--packed_layout", "segments", "--prefix_sharing", "false",
                      "--precompute_ref_log_probs", "false"],
    "+prefix sharing": ["--packed_layout", "segments", "--prefix_sharing", "true", "--precompute_ref_log_probs",
                        "false"],
    "+precompute": [],
    "+warm cache": [],
}


def shaped_config(scale: int, vocab_floor: int):
    """A Llama with the target's attention share at 1/scale of its lengths and the target's LM-head share."""
    from transformers import LlamaConfig

    hidden = max(64, TARGET["hidden"] // scale // 64 * 64)
    inter = TARGET["intermediate"] * hidden // TARGET["hidden"]
    per_layer = lambda d, ff: 4 * d * d + 3 * d * ff  # noqa: E731  (q, k, v, o + gate, up, down)
    body = TARGET["layers"] * per_layer(TARGET["hidden"], TARGET["intermediate"])
    share = TARGET["hidden"] * TARGET["vocab"] / body
    vocab = max(vocab_floor, round(share * SHAPED_LAYERS * per_layer(hidden, inter) / hidden))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=SHAPED_LAYERS,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                       max_position_embeddings=8192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)


def forward_flops(config, length: int) -> float:
    """Forward FLOPs of one causal sequence: linear layers, attention scores and values (causal half), LM head."""
    d, n = config.hidden_size, config.num_hidden_layers
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, getattr(config, "head_dim", None) or d // \
        config.num_attention_heads
    linear = n * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * config.intermediate_size)
    attention = n * 2 * heads * hd * length * (length + 1) / 2 * 2  # QK^T and AV over the causal triangle
    return 2 * linear * length + attention + 2 * d * config.vocab_size * length


def matmul_peak(device: str = "cpu", size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a large fp32 (CPU) or bf16 (GPU) matmul, the best of `seconds` of repeats (other jobs on a shared
    machine only ever slow a repeat down): the denominator of MFU."""
    import torch

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        rates.append(2 * size**3 / (time.perf_counter() - t))
    return max(rates)


def synthetic_pairs(profile: str, n: int, scale: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    from fastdpo.tokens import truncate_pair

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


def distributed_setup(opts) -> int:
    """World size of this run; under ZeRO-3 on CPU also starts deepspeed.comm, which accelerate skips with use_cpu
    (zero.Init would otherwise check the batch size for one process)."""
    if opts.backend == "single":
        return 1
    if opts.backend == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return int(os.environ["WORLD_SIZE"])


def worker(opts) -> dict:
    """One timed run in this process (one rank of it under a distributed backend); returns the measurements."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig as StockConfig

    from fastdpo import config as cfg
    from fastdpo import data, models
    from fastdpo.packing import pair_lengths
    from fastdpo.probe import scheme_name
    from fastdpo.trainer import DPOTrainer, StockDPOTrainer

    scale = opts.scale
    max_length = opts.max_length or PROFILES[opts.profile]["max_length"] // scale
    world = distributed_setup(opts)
    pairs_needed = opts.steps * opts.pairs_per_device * opts.grad_accum * world
    stock = opts.variant == "stock"
    extra = ([] if stock else BREAKDOWN.get(opts.variant, [])) + shlex.split(opts.train_args or "")
    common = ["--output_dir", str(Path(opts.tmp) / "run"), "--max_length", str(max_length),
              "--per_device_train_batch_size", str(opts.pairs_per_device),
              "--gradient_accumulation_steps", str(opts.grad_accum), "--max_steps", str(opts.steps),
              "--logging_steps", str(opts.steps), "--eval_before_train", "false", "--save_strategy", "no",
              "--report_to", "none", "--ref_logps_cache_dir", str(Path(opts.cache)), "--disable_tqdm", "true",
              *extra, *BACKEND_ARGS[opts.backend]]
    if opts.dataset:
        common += ["--dataset_name", opts.dataset, "--max_train_samples", str(pairs_needed)]
    script_args, args, model_args = cfg.parse_args(common)
    tok = models.load_tokenizer(model_args.model_name_or_path)
    if opts.model == "shaped" and opts.backend != "single":
        # the folder main() saved: from_pretrained loads it partitioned under ZeRO-3 (load_state_dict could not)
        def load(_args):
            return AutoModelForCausalLM.from_pretrained(shaped_folder(opts.tmp), attn_implementation="sdpa")
    elif opts.model in ("shaped", "config"):
        if opts.model == "shaped":
            config = shaped_config(scale, len(tok))
        else:
            from transformers import AutoConfig

            fields = json.loads(Path(opts.model_config).read_text())
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        dtype = getattr(torch, opts.dtype)
        # built where it trains: a 1B model's random init takes seconds on a GPU, a minute on CPU
        device = "cuda" if torch.cuda.is_available() else "cpu"

        def build():
            with torch.device(device):
                return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            weights = build().state_dict()

        def load(_args):
            model = build()
            model.load_state_dict(weights)
            return model
    else:
        def load(_args):
            return models.load_model(model_args, _args)
    if opts.dataset:
        ds, _ = data.tokenize_dataset(data.load_pairs(script_args).train, tok, max_length,
                                      script_args.max_prompt_length)
    else:
        ds = Dataset.from_list(synthetic_pairs(opts.profile, pairs_needed, scale, len(tok), seed=opts.seed))
    lengths = [pair_lengths(ds[i], max_length) for i in range(len(ds))]
    useful = sum(sum(x) for x in lengths)
    computed, real = [0], [0]

    class Counting:
        """The run's own collator, counting the tokens the model computes, and how many of them are not padding."""

        def __init__(self, collate, key, real_key):
            self.collate, self.key, self.real_key = collate, key, real_key

        def __getattr__(self, name):  # row_capacity, packed_tokens, ... still read by the trainer
            return getattr(self.collate, name)

        def __call__(self, *a, **k):
            out = self.collate(*a, **k)
            computed[0] += out[self.key].numel()
            real[0] += int((out[self.real_key] > 0).sum())
            return out

    start = time.perf_counter()
    if stock:
        import dataclasses
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StockConfig) if f.init}
        values.update(padding_free=False, precompute_ref_log_probs=False)
        args = StockConfig(**values)
        trainer = StockDPOTrainer(model=load(args), ref_model=load(args) if opts.model != "embedded" else None,
                                  args=args, train_dataset=ds, processing_class=tok)
        trainer.data_collator = Counting(trainer.data_collator, "input_ids", "attention_mask")
    else:
        ref = load(args) if not args.precompute_ref_log_probs and opts.model != "embedded" else None
        trainer = DPOTrainer(model=load(args), ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        if trainer.scheme is None:
            raise SystemExit("fast path fell back to stock (see the warning above)")
        trainer.scheme = Counting(trainer.scheme, "packed_input_ids", "packed_token_weight")
    built = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if world > 1:  # each rank counted its own micro-batches
        totals = torch.tensor([computed[0], real[0]], dtype=torch.float64)
        torch.distributed.all_reduce(totals)
        computed[0], real[0] = int(totals[0]), int(totals[1])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss_mb
    stats = {} if stock else trainer.reference_stats
    model_config = trainer.accelerator.unwrap_model(trainer.model).config
    flops = 4 * sum(forward_flops(model_config, c) + forward_flops(model_config, r) for c, r in lengths)
    scheme = None if stock else trainer.scheme.collate
    return {"tokens_per_s": useful / seconds, "pairs_per_s": len(ds) / seconds,
            "padding_efficiency": real[0] / max(computed[0], 1), "computed_per_useful": computed[0] / useful,
            "peak_mem_mb": peak, "seconds": seconds,
            "model_flops_per_s": flops / seconds, "setup_seconds": built - start,
            "ref_precompute_seconds": stats.get("seconds", 0.0), "ref_cached": bool(stats.get("cached")),
            "scheme": None if scheme is None else scheme_name(scheme),
            "pairs": len(ds), "useful_tokens": useful, "computed_tokens": computed[0],
            "model": {"hidden": model_config.hidden_size, "layers": model_config.num_hidden_layers,
                      "vocab": model_config.vocab_size}}


def shaped_folder(tmp: str) -> Path:
    return Path(tmp) / "shaped-model"


def save_shaped(opts, tmp: str) -> None:
    """The shaped model's seeded weights as a model folder, for the ranks of a distributed backend to load."""
    import torch
    from transformers import AutoModelForCausalLM

    from fastdpo import models, tiny

    if shaped_folder(tmp).exists():
        return
    tok = models.load_tokenizer(tiny.MODEL_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(shaped_config(opts.scale, len(tok)), attn_implementation="sdpa")
    model.save_pretrained(shaped_folder(tmp))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(opts, argv, model, variant, tmp, cache, backend="single") -> dict:
    launch = [sys.executable]
    if backend != "single":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(free_port())]
    cmd = [*launch, __file__, *argv, "--model", model, "--worker", variant, "--tmp", tmp, "--cache", cache,
           "--backend", backend]
    # .venv/bin first on PATH: DeepSpeed rebuilds its CPU op whenever the ninja it finds changes (CLAUDE.md)
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "PATH": path})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{model} {variant} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[6:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="think")
    parser.add_argument("--dataset", help="real preference data (any source fastdpo.data reads) instead of a profile")
    parser.add_argument("--model", choices=["embedded", "shaped", "both", "config"], default="both")
    parser.add_argument("--model_config", help="--model config: a JSON file of a transformers config's fields")
    parser.add_argument("--dtype", default="float32", help="weights of the shaped / config model (bfloat16: as the "
                        "OLMo recipes load them)")
    parser.add_argument("--train_args", help="more training arguments for both paths, one string "
                        "(--train_args=\"--bf16 true --gradient_checkpointing true\": with =, as it starts with --)")
    parser.add_argument("--scale", type=int, default=16, help="divide every length (and max_length) by this")
    parser.add_argument("--max_length", type=int, help="override the profile's max_length / scale")
    parser.add_argument("--pairs_per_device", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=8)
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: think 3, instruct 6, multiturn "
                        "4: long enough that one-off costs, the probe and trainer construction, are a small share)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating runs")
    parser.add_argument("--breakdown", action="store_true", help="add the fast path's options one at a time "
                        "(shaped model) instead of stock / fast / fast-warm on both models")
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKEND_ARGS), default=["single"],
                        help="single (one process), zero2 / zero3 (2 processes, DeepSpeed); several alternate in a "
                        "round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="single", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.model == "config" and not opts.model_config:
        parser.error("--model config needs --model_config FILE.json")
    if opts.steps is None:
        opts.steps = {"think": 3, "instruct": 6, "multiturn": 4}[opts.profile]

    if opts.worker:
        import logging
        logging.basicConfig(level=logging.WARNING)
        opts.variant = opts.worker
        result = worker(opts)
        if int(os.environ.get("RANK", "0")) == 0:
            print("BENCH " + json.dumps(result), flush=True)
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak(device)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    dtype = "bf16" if device == "cuda" else "fp32"
    print(f"machine: {machine}; measured matmul peak {peak / 1e9:.1f} GFLOP/s ({dtype})")
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    argv = [a for a in sys.argv[1:] if a not in ("--breakdown", "--json", opts.json or "--json")]
    argv = [a for i, a in enumerate(argv) if not (a == "--model" or (i and argv[i - 1] == "--model"))]
    if "--backends" in argv:  # the workers get one --backend each
        k = argv.index("--backends")
        argv = argv[:k] + argv[k + 1 + len(opts.backends):]
    models_ = ["shaped"] if opts.breakdown else (["embedded", "shaped"] if opts.model == "both" else [opts.model])
    variants = list(BREAKDOWN) if opts.breakdown else ["stock", "fast", "fast-warm"]
    backends = opts.backends
    runs = {(b, m, v): [] for b in backends for m in models_ for v in variants}
    for rnd in range(opts.rounds):
        for model in models_:
            for backend in backends if rnd % 2 == 0 else backends[::-1]:
                with tempfile.TemporaryDirectory() as tmp:
                    run_round(opts, argv, runs, rnd, backend, model, variants, tmp, peak)
    summarize(opts, runs, backends, models_, variants, machine, peak)


def run_round(opts, argv, runs, rnd, backend, model, variants, tmp, peak) -> None:
    """Every variant once, in fresh processes; the reference cache is fresh per round (the first fast run pays
    the precompute, fast-warm reuses it)."""
    cache = str(Path(tmp) / "ref_cache")
    if backend != "single" and model == "shaped":
        save_shaped(opts, tmp)
    # Stock runs first in even rounds and last in odd ones, so that no variant always takes the same
    # place in a round: a shared machine's speed drifts over a burst of runs
    order = variants if rnd % 2 == 0 else variants[1:] + variants[:1]
    label = "" if backend == "single" else f"{backend} "
    for variant in order:
        worker_variant = {"fast": "fast", "fast-warm": "fast", "+precompute": "fast",
                          "+warm cache": "fast"}.get(variant, variant)
        res = run(opts, argv, model, worker_variant, tmp, cache, backend)
        if variant in ("fast-warm", "+warm cache") and not res["ref_cached"]:
            sys.exit(f"{variant}: the reference cache was not reused")
        res["mfu"] = res["model_flops_per_s"] / peak
        runs[(backend, model, variant)].append(res)
        print(f"round {rnd + 1}/{opts.rounds} {label}{model:8s} {variant:16s} {res['tokens_per_s']:9.0f} useful "
              f"tok/s {res['pairs_per_s']:6.2f} pairs/s  padding eff {res['padding_efficiency']:.3f}  "
              f"computed/useful {res['computed_per_useful']:.2f}  "
              f"peak {res['peak_mem_mb']:6.0f} MB  MFU {res['mfu']:.1%}  ({res['seconds']:.1f}s, "
              f"ref precompute {res['ref_precompute_seconds']:.1f}s"
              f"{', ' + res['scheme'] if res['scheme'] else ''})",
              flush=True)


def summarize(opts, runs, backends, models_, variants, machine, peak) -> None:
    """One table per backend and model (medians, and the median of each round's fast/stock ratio); with several
    backends, each one's ratio over the first's, round by round."""
    keys = ("tokens_per_s", "pairs_per_s", "padding_efficiency", "computed_per_useful", "peak_mem_mb", "mfu")
    summary = {"profile": "dataset" if opts.dataset else opts.profile, "scale": opts.scale, "machine": machine,
               "matmul_peak_flops": peak, "setup": {"pairs_per_step": opts.pairs_per_device * opts.grad_accum,
                                                    "steps": opts.steps, "rounds": opts.rounds}, "models": {}}
    for backend in backends:
        for model in models_:
            got = {v: runs[(backend, model, v)] for v in variants}
            first = got[variants[0]][0]
            med = {v: {k: statistics.median(r[k] for r in got[v]) for k in keys} for v in variants}
            # each round's runs are adjacent in time: their ratio is robust to a shared machine's load
            ratios = {v: [f["tokens_per_s"] / s["tokens_per_s"] for s, f in zip(got["stock"], got[v], strict=True)]
                      for v in variants if v != "stock"}
            entry = {"shape": first["model"], "pairs": first["pairs"], "useful_tokens": first["useful_tokens"],
                     "median": med, "round_speedups": ratios,
                     "speedup": {v: statistics.median(r) for v, r in ratios.items()}}
            if backend == "single":
                summary["models"][model] = entry
            else:
                summary.setdefault("backends", {}).setdefault(backend, {})[model] = entry
            shape = first["model"]
            where = "" if backend == "single" else f", {backend} x 2 processes"
            print(f"\n| {summary['profile']} (1/{opts.scale}), {model} model (hidden {shape['hidden']}, "
                  f"{shape['layers']} layers, vocab {shape['vocab']}){where} | useful tok/s | pairs/s | padding eff "
                  "| computed / useful | peak MB | MFU | vs stock |")
            print("|---|---|---|---|---|---|---|---|")
            for v in variants:
                m = med[v]
                ratio = "1.00x" if v == "stock" else f"{statistics.median(ratios[v]):.2f}x"
                print(f"| {v} | {m['tokens_per_s']:.0f} | {m['pairs_per_s']:.2f} | {m['padding_efficiency']:.3f} | "
                      f"{m['computed_per_useful']:.2f} | {m['peak_mem_mb']:.0f} | {m['mfu']:.1%} | {ratio} |")
            for v, r in ratios.items():
                print(f"{backend + ' ' if backend != 'single' else ''}{model} {v}: per-round speedups "
                      f"{', '.join(f'{x:.2f}x' for x in r)}")
    for backend in backends[1:]:
        for model in models_:
            for v in variants[1:]:
                base = summary_speedups(runs, backends[0], model, v)
                mine = summary_speedups(runs, backend, model, v)
                rel = [b / a for a, b in zip(base, mine, strict=True)]
                print(f"{model} {v}: speedup under {backend} / under {backends[0]}, per round "
                      f"{', '.join(f'{x:.2f}' for x in rel)}; median {statistics.median(rel):.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(summary, indent=2) + "\n")


def summary_speedups(runs, backend, model, variant) -> list[float]:
    return [f["tokens_per_s"] / s["tokens_per_s"]
            for s, f in zip(runs[(backend, model, "stock")], runs[(backend, model, variant)], strict=True)]


if __name__ == "__main__":
    main()
