"""Data stage at scale: this repo's tokenised-pair cache vs stock TRL 1.16, on Think-shaped pairs, fresh processes.

    .venv/bin/python scripts/benchmark_data.py                          # 2,000 pairs, 1 round (~3 minutes, 2 cores)
    .venv/bin/python scripts/benchmark_data.py --pairs 10000 --rounds 2 --json outputs/bench_data_10000.json
    .venv/bin/python scripts/benchmark_data.py --pairs 10000 --rounds 5 --launches second   # cached launches only
    .venv/bin/python scripts/benchmark_data.py --mixture --rounds 3 --json outputs/bench_mix.json   # 260k pairs
    .venv/bin/python scripts/benchmark_data.py --mixture --rows 3000 --procs 1         # the same, small

What it builds, offline, once (cached under --work, default outputs/bench_data):
  tokenizer  a 50k byte-level BPE trained with `tokenizers` on ~19 MB of English prose found on this machine (the
             comments and docs of the installed Python packages), wrapped as a PreTrainedTokenizerFast with a
             ChatML chat template (<|im_start|>role ... <|im_end|>; EOS <|im_end|>).
  pairs      conversational pairs (prompt [user], chosen/rejected [assistant] with a <think> block) made of real
             lines of that prose, with token lengths drawn from log-normal fits of Dolci-Think-DPO-7B's
             percentiles: prompt p50 114 / p95 793, chosen p50 1864 / p95 11903, rejected p50 1154 / p95 9518.
What it measures, per launch, in a fresh process (or `torchrun --nproc_per_node 2` for 2 processes):
  ours   fastdpo.tokcache.prepare, the call train_dpo.py makes (read, validate, tokenise, truncate, cache)
  trl    load_dataset("json") + trl.DPOTrainer._prepare_dataset (TRL's own tokenisation, its datasets cache)
  first launch = empty caches; second = the same command again (a requeue, a resume, a new run on the same data).
Data-stage wall and CPU seconds (this process and its workers; all ranks summed), pairs/s, peak RSS (the largest
single process: a rank or a worker), and the whole process's wall time. The runs alternate ours / trl.

--mixture: a mixture of --rows pairs (default 260,000, Dolci-Instruct-DPO's size) from three sources of
Instruct-shaped pairs (no <think> block; assumed lengths: prompt p50 150 / p95 1200, chosen p50 320 / p95 1600,
rejected p50 260 / p95 1400 tokens, a median pair near the ~680 tokens recipes/olmo3_instruct.yaml states):
60% of the rows taken whole, 35% by a seeded count of 30%, 5% upsampled by weight 2.0 (docs/mixtures.md), measured
side by side with one source of the same --rows pairs: `mix` against `ours`, first launch and requeue.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
T_START = time.time()  # whole-process wall time starts at interpreter start-up (close enough: imports follow)

# Dolci-Think-DPO-7B token-length percentiles (p50, p95); sigma of the log-normal = ln(p95 / p50) / 1.645
THINK = {"prompt": (114, 793), "chosen": (1864, 11903), "rejected": (1154, 9518)}
INSTRUCT = {"prompt": (150, 1200), "chosen": (320, 1600), "rejected": (260, 1400)}  # assumed (module doc)
# --mixture's sources: (name, share of --rows in the file, amount); the amounts train --rows pairs in all
MIX = [("general", 0.60, None), ("code", 0.35, ("count", 0.30)), ("safety", 0.05, ("weight", 2.0))]
MAX_LENGTH, MAX_PROMPT_LENGTH = 8192, 4096  # recipes/olmo3_think.yaml
VOCAB = 50_000
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------------------------------------ the data


def prose_lines(folder: str | None = None) -> list[str]:
    """Distinct lines of English prose on this machine: comments and docs of the installed packages (or of
    `folder`)."""
    import site

    roots = [Path(folder)] if folder else [Path(p) for p in site.getsitepackages() if Path(p).is_dir()]
    comment = re.compile(r"^\s*#\s?(.*)$")
    lines: set[str] = set()
    for root in roots:
        for path in sorted(root.rglob("*")):
            name = path.name
            try:
                if name.endswith(".py"):
                    text = [m.group(1) for m in map(comment.match, path.read_text(errors="ignore").splitlines()) if m]
                elif name == "METADATA" or name.endswith((".md", ".rst", ".txt")):
                    text = path.read_text(errors="ignore").splitlines()
                else:
                    continue
            except OSError:
                continue
            lines.update(t.strip() for t in text if len(t.split()) >= 4)
    return sorted(lines)


def build_tokenizer(folder: Path, lines: list[str]) -> Path:
    """A 50k byte-level BPE trained on the prose, saved as a transformers tokenizer folder with ChatML."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return folder


def make_pairs(path: Path, n: int, lines: list[str], tokenizer_folder: Path, seed: int = 0, shape=None) -> Path:
    """n Think-shaped (or `shape`d, INSTRUCT: no <think> block) conversational pairs as JSON lines (lengths in
    tokens of the benchmark tokenizer)."""
    shape = shape or THINK
    if path.is_file():
        return path
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    sample = " ".join(pick.choice(lines) for _ in range(2000))
    chars_per_token = len(sample) / len(tok(sample, add_special_tokens=False)["input_ids"])

    def text(tokens: int) -> str:
        out, size, want = [], 0, tokens * chars_per_token
        while size < want:
            line = pick.choice(lines)
            out.append(line)
            size += len(line) + 1
        return (" " if pick.random() < 0.8 else "\n\n").join(out)

    def lengths(key):
        p50, p95 = shape[key]
        return np.maximum(4, rng.lognormal(np.log(p50), np.log(p95 / p50) / 1.645, n)).astype(int)

    lp, lc, lr = lengths("prompt"), lengths("chosen"), lengths("rejected")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            think = lambda k: f"<think>\n{text(int(k * 0.7))}\n</think>\n\n{text(int(k * 0.3))}"  # noqa: E731
            answer = think if shape is THINK else text
            row = {"prompt": [{"role": "user", "content": text(lp[i])}],
                   "chosen": [{"role": "assistant", "content": answer(lc[i])}],
                   "rejected": [{"role": "assistant", "content": answer(lr[i])}]}
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- one launch


def _usage() -> dict:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "rss_mb": me.ru_maxrss / 1024, "child_rss_mb": kids.ru_maxrss / 1024}


def child(opts) -> None:
    """One launch's data stage in this process (a torchrun rank or a plain process); prints one JSON line."""
    import torch  # noqa: F401  (both sides pay the imports a training launch pays)
    import trl  # noqa: F401
    from transformers import AutoTokenizer

    rank = int(os.environ.get("RANK", "0"))
    if opts.child in ("ours", "mix"):
        import dataclasses

        from fastdpo import mixture, models, tokcache
        from fastdpo.dataspec import DataSpec, SourceSpec
        from fastdpo.trainer import DPOTrainer  # train_dpo.py imports it before the data stage
    else:
        import types

        from accelerate import PartialState
        from datasets import load_dataset
        from trl import DPOTrainer

        PartialState(cpu=True)  # under torchrun: the gloo group TRL's main-process-first needs (no GPU here)
    before = _usage()
    start = time.perf_counter()  # the data stage: tokenizer, reading, tokenising, caching (imports are before)
    if opts.child in ("ours", "mix"):
        tok = models.load_tokenizer(opts.tokenizer)
        spec = DataSpec(SourceSpec(opts.data), test_split="none", max_length=MAX_LENGTH,
                        max_prompt_length=MAX_PROMPT_LENGTH)
        if opts.child == "mix":  # --data is the mixture's plan (mixture.Mixture's plain form)
            plan = mixture.Mixture.from_plain(json.loads(Path(opts.data).read_text()))
            spec = dataclasses.replace(spec, train=SourceSpec.of_entry(plan.sources[0]), mixture=plan)
        prep = tokcache.prepare(spec, tok, opts.num_proc)
        pairs, cache = len(prep.train), prep.report["cache"]
    else:
        tok = AutoTokenizer.from_pretrained(opts.tokenizer)
        ds = load_dataset("json", data_files=opts.data, split="train")
        trl_args = types.SimpleNamespace(dataset_num_proc=opts.num_proc, max_length=MAX_LENGTH,
                                         truncation_mode="keep_start")
        ds = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), ds, tok, trl_args, "train")
        pairs, cache = len(ds), {"built": None, "train": ds.cache_files[0]["filename"] if ds.cache_files else None}
    after = _usage()
    print("RESULT " + json.dumps({
        "rank": rank, "pairs": pairs, "wall": time.perf_counter() - start, "cpu": after["cpu"] - before["cpu"],
        "rss_mb": after["rss_mb"], "rss_before_mb": before["rss_mb"], "child_rss_mb": after["child_rss_mb"],
        "process_wall": time.time() - T_START, "built": cache["built"], "cache": cache["train"]}), flush=True)


# ---------------------------------------------------------------------------------------------- the table


def launch(impl: str, procs: int, opts, cache: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTDPO_CACHE": str(cache / "fastdpo"),
           "HF_DATASETS_CACHE": str(cache / "hf"), "TQDM_DISABLE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    data = opts.plan_path if impl == "mix" else opts.data_path
    script = [str(Path(__file__).resolve()), "--child", impl, "--data", str(data), "--tokenizer",
              str(opts.tokenizer_path), "--num_proc", str(opts.num_proc)]
    if procs == 1:
        cmd = [sys.executable] + script
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(procs), "--master_port",
               str(29500 + random.randint(1, 2000))] + script
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    whole = time.perf_counter() - start
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(results) != procs:
        raise SystemExit(f"{impl} x{procs} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    wall = max(r["wall"] for r in results)  # the data stage ends when the last rank has its data
    return {"impl": impl, "procs": procs, "pairs": results[0]["pairs"], "wall": wall,
            "cpu": sum(r["cpu"] for r in results), "pairs_per_s": results[0]["pairs"] / wall,
            "pairs_per_cpu_s": results[0]["pairs"] / sum(r["cpu"] for r in results),
            "peak_rss_mb": max(max(r["rss_mb"], r["child_rss_mb"]) for r in results),
            "import_rss_mb": max(r["rss_before_mb"] for r in results), "whole_s": whole, "load": load}


def verify(opts, cache: Path, n: int = 64) -> str:
    """Our cached ids equal TRL's own tokenisation of the same rows (every row the cache did not truncate)."""
    code = f"""
import json, types, sys
sys.path.insert(0, {str(ROOT)!r})
from datasets import Dataset
from trl import DPOTrainer
from fastdpo import models, tokcache
from fastdpo.dataspec import DataSpec, SourceSpec
tok = models.load_tokenizer({str(opts.tokenizer_path)!r})
spec = DataSpec(SourceSpec({str(opts.data_path)!r}), test_split="none", max_length={MAX_LENGTH},
                max_prompt_length={MAX_PROMPT_LENGTH})
entry = tokcache.train_entry(spec, tok, build=False)
status = entry.rows().column("status").to_pylist()[:{n}]
ours = entry.tokens().select(range({n}))
rows = [json.loads(l) for _, l in zip(range({n}), open({str(opts.data_path)!r}))]
theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), Dataset.from_list(rows), tok,
    types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start"), "check")
same = sum(all(ours[i][k] == theirs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
           for i in range({n}) if status[i] == 0)
print(f"{{same}}/{{status.count(0)}}")
"""
    env = {**os.environ, "FASTDPO_CACHE": str(cache / "fastdpo")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stdout.strip().splitlines()[-1]


def inputs(opts, work: Path) -> list[str]:
    """Build (once) the tokenizer and the pairs the launches read; the implementations to compare."""
    tok_dir = Path(opts.tokenizer_dir) if opts.tokenizer_dir else work / "tokenizer"
    lines = None
    if opts.mixture:
        rows = opts.rows
        opts.data_path = work / f"instruct-{rows}.jsonl"
        files = {name: work / f"mix-{rows}-{name}.jsonl" for name, _, _ in MIX}
        opts.plan_path = work / f"mix-{rows}.json"
        needed = [opts.data_path, *files.values()]
    else:
        opts.data_path = work / f"think-{opts.pairs}.jsonl"
        needed = [opts.data_path]
    if not (tok_dir / "tokenizer.json").is_file() or not all(p.is_file() for p in needed):
        print("building the offline tokenizer and pairs (once) ...", flush=True)
        lines = prose_lines(opts.prose)
        build_tokenizer(tok_dir, lines)
    opts.tokenizer_path = tok_dir
    if not opts.mixture:
        make_pairs(opts.data_path, opts.pairs, lines or [], tok_dir)
        return ["ours", "trl"]
    make_pairs(opts.data_path, opts.rows, lines or [], tok_dir, seed=0, shape=INSTRUCT)
    sources = []
    for i, (name, share, amount) in enumerate(MIX, start=1):
        make_pairs(files[name], max(1, round(share * opts.rows)), lines or [], tok_dir, seed=i, shape=INSTRUCT)
        value = None if amount is None else {amount[0]: round(amount[1] * opts.rows) if amount[0] == "count"
                                             else amount[1]}
        sources.append({"label": name, "path": str(files[name]), "config": None, "split": "train", "data_dir": None,
                        "data_files": None, "columns": None, "options": {}, "amount": value})
    opts.plan_path.write_text(json.dumps({"sources": sources, "eval": None}, indent=1) + "\n")
    opts.pairs = opts.rows
    return ["mix", "ours"]


NAMES = {"ours": "this repo", "trl": "stock TRL 1.16", "mix": "mixture, 3 sources"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=2000, help="Think-shaped pairs to generate (the table uses 10000)")
    p.add_argument("--mixture", action="store_true", help="a 3-source mixture against one source of the same size "
                   "(module doc)")
    p.add_argument("--rows", type=int, default=260_000, help="--mixture: pairs the mixture trains, and the one "
                   "source's size (default 260,000)")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported")
    p.add_argument("--procs", default="1,2", help="process counts to measure (2 = torchrun --nproc_per_node 2)")
    p.add_argument("--num_proc", type=int, default=2, help="dataset_num_proc for both (default 2, as the figures "
                   "in docs/engineering/data-pipeline.md; 0 = each one's default: TRL one process, ours one worker "
                   "per CPU)")
    p.add_argument("--launches", default="first,second", help="first,second (default), or second: repeat only "
                   "the cached launch, on caches kept from an earlier run (built once, untimed, if missing)")
    p.add_argument("--work", default=str(ROOT / "outputs" / "bench_data"), help="tokenizer, data and caches")
    p.add_argument("--tokenizer_dir", help="an existing tokenizer folder with a chat template (default: trained "
                   "once on the prose)")
    p.add_argument("--prose", help="a folder whose comments and docs make the text (default: site-packages)")
    p.add_argument("--json", help="write every run and the medians here")
    p.add_argument("--child", choices=["ours", "trl", "mix"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        opts.num_proc = opts.num_proc or None
        return child(opts)

    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    impls = inputs(opts, work)
    data_path = opts.data_path
    shape = "Instruct-shaped" if opts.mixture else "Think-shaped"
    print(f"{opts.pairs} {shape} pairs ({data_path.stat().st_size / 1e6:.0f} MB), {len(os.sched_getaffinity(0))} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    import shutil

    runs = []
    procs = [int(x) for x in opts.procs.split(",")]
    launches = opts.launches.split(",")
    for rnd in range(opts.rounds):
        order = impls if rnd % 2 == 0 else impls[::-1]
        for n in procs:
            for impl in order:
                cache = work / f"cache-{impl}-{opts.pairs}"
                if "first" in launches:
                    shutil.rmtree(cache, ignore_errors=True)
                elif not cache.is_dir():
                    launch(impl, n, opts, cache)  # builds the cache; not timed
                for launch_kind in launches:
                    r = launch(impl, n, opts, cache)
                    r.update(round=rnd, launch=launch_kind)
                    runs.append(r)
                    print(f"round {rnd + 1} {impl:4s} x{n} {launch_kind:6s}: data stage {r['wall']:6.1f} s, "
                          f"{r['cpu']:6.1f} CPU-s, {r['pairs_per_cpu_s']:6.1f} pairs/CPU-s, peak RSS "
                          f"{r['peak_rss_mb']:5.0f} MB, whole process {r['whole_s']:5.1f} s (load {r['load']:.1f})",
                          flush=True)
                if impl == "ours" and rnd == 0 and n == procs[0] and "first" in launches and not opts.mixture:
                    print(f"check: cached ids equal TRL's on untruncated rows: {verify(opts, cache)}", flush=True)

    def med(impl, n, kind, key):
        vals = [r[key] for r in runs if (r["impl"], r["procs"], r["launch"]) == (impl, n, kind)]
        return statistics.median(vals) if vals else float("nan")

    print(f"\n| {opts.pairs} {shape} pairs | launch | processes | data stage wall s | CPU s | pairs/s | "
          "pairs/CPU-s | peak RSS MB | whole process s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for kind in launches:
        for n in procs:
            for impl in impls:
                row = {k: med(impl, n, kind, k) for k in ("wall", "cpu", "pairs_per_s", "pairs_per_cpu_s",
                                                            "peak_rss_mb", "whole_s")}
                table.append({"impl": impl, "procs": n, "launch": kind, **row})
                name = NAMES[impl] if opts.mixture or impl != "ours" else NAMES["ours"]
                name = "one source" if opts.mixture and impl == "ours" else name
                print(f"| {name} | {kind} | {n} | {row['wall']:.2f} | {row['cpu']:.1f} | {row['pairs_per_s']:.0f} | "
                      f"{row['pairs_per_cpu_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['whole_s']:.1f} |")
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps({"pairs": opts.pairs, "mixture": opts.mixture, "runs": runs,
                                               "medians": table}, indent=1) + "\n")
        print(f"\nwrote {opts.json}")


if __name__ == "__main__":
    main()
