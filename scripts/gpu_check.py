"""The GPU check, in one command (~5-7 minutes on one H100/H200; --budget_s caps it):

    python3 scripts/gpu_check.py                 # CUDA: writes gpu_check.json + gpu_check.md to --out
    .venv/bin/python scripts/gpu_check.py --cpu  # the same code at tiny shapes on CPU (tests/e2e/test_gpu_check.py, CI)

--out defaults to outputs/gpu_check.

(a) Parity matrix, bf16: tiny Llama, OLMo 3 (3 sliding : 1 full, window 24, so longer than some test sequences and
    shorter than others) and Qwen3 (tests/archs.py), for each attention implementation present (sdpa with every
    packing scheme the trainer would try, the varlen scheme first; flex_attention; flash_attention_2 if flash_attn is
    installed): per-token log-probs and one DPO step's gradients of every parameter, packed vs padded, in bf16; the
    start-up probe's verdict (its float32 twin included, fastdpo/probe.py) per scheme, and the scheme it chooses.
    Each implementation runs in its own process (a CUDA fault or a slow compile cannot take the rest down).
(b) Stock TRL vs the fast path (scripts/benchmark.py's runs) on a ~1.5B OLMo-3-shaped random model (OLMo 2 1B's
    width and depth, OLMo 3's 3:1 sliding windows of 4096, 100k vocabulary), bf16 weights, gradient checkpointing,
    the think profile at max_length 8192, 4 pairs x 8 accumulation = 32 pairs per step (the OLMo 3 recipes' 128
    pairs per step over 4 GPUs, per GPU): tokens/s, pairs/s, MFU against this GPU's measured bf16 matmul peak
    (median of timed 8192^3 products on random data), peak memory, the packing scheme the probe chose.
(c) GPU name, driver, CUDA, torch / transformers / TRL versions, what torch's varlen_attn takes and how it aligns.

--cpu: families at hidden 64, sdpa with two packing schemes (varlen + prefix sharing through its reference kernel, since
torch's is CUDA-only, and the grouped per-sequence path the trainer picks on CPU), flex_attention skipped (no CPU
backward; compiling it on CPU takes minutes), a 4-layer OLMo 3 at lengths / 64.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = {"llama": {}, "olmo3": {"sliding_window": 24}, "qwen3": {}}
MAX_LENGTH = 64
# ~1.5B parameters: OLMo 2 1B's shape (hidden 2048, 16 layers, MLP 8192, 16 heads, 100k vocabulary) with OLMo 3's
# layer pattern (3 sliding-window layers of 4096, then 1 full)
OLMO3_1B = {"model_type": "olmo3", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
            "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 100278, "sliding_window": 4096,
            "max_position_embeddings": 65536, "tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1,
            "eos_token_id": 2}
OLMO3_TINY = {**OLMO3_1B, "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 640, "sliding_window": 32}


def environment(device: str) -> dict:
    import torch
    import transformers
    import trl

    from fastdpo import segattn

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "trl": trl.__version__, "cuda": torch.version.cuda, "device": device,
           "flash_attn": importlib.util.find_spec("flash_attn") is not None}
    api = segattn.torch_varlen_api()
    env["varlen_attn"] = None if api is None else {"window_size": api.window, "enable_gqa": api.gqa,
                                                   "scale": api.scale}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            env["driver"] = f"unknown ({e})"
        align, reason = segattn.check_torch_varlen("cuda", torch.bfloat16)
        env["varlen_check_bf16"] = {"alignment": align, "refused": reason}
    else:
        env["gpu"] = None
        env["cpu_cores"] = os.cpu_count()
    return env


def matmul_peak(device: str) -> float:
    """bf16 FLOP/s of an 8192^3 product on random data (CUDA: median of 10 event-timed runs after 3 warm-ups, as
    the device notes advise); CPU: fp32 at 1024^3, median of 5."""
    import torch

    n, dtype, reps = (8192, torch.bfloat16, 10) if device == "cuda" else (1024, torch.float32, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(3 + reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t
        if i >= 3:
            times.append(seconds)
    return 2 * n**3 / statistics.median(times)


# ---- (a) parity matrix -------------------------------------------------------------------------------------------

def parity_pairs(seed: int = 0, n: int = 6) -> list[dict]:
    """Pairs of 12 to 70 tokens (some cut at MAX_LENGTH), two of them with answers that start alike."""
    from fastdpo.probe import random_pairs

    return random_pairs(640, seed, n)


def _logps(model, examples, scheme):
    """Per-token log-probs in TRL's padded grid, packed by `scheme` (or padded when None), and the scored mask: the
    start-up probe's own two forwards (fastdpo.probe), so the matrix measures what the probe measures."""
    from fastdpo import probe

    padded, mask = probe.padded_logps(model, examples, 0, MAX_LENGTH, "keep_start")
    return (padded if scheme is None else probe.packed_logps(model, examples, scheme)), mask


def _dpo_grads(model, examples, scheme) -> dict:
    import torch.nn.functional as F

    model.zero_grad()
    logps, mask = _logps(model, examples, scheme)
    chosen, rejected = (logps.float() * mask).sum(1).chunk(2)
    (-F.logsigmoid(0.1 * (chosen - rejected))).mean().backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def parity_cell(model, scheme, dtype) -> dict:
    """One packing scheme on one model: its own numbers, packed vs padded, and the start-up probe's verdict."""
    import torch

    from fastdpo import probe

    examples = parity_pairs()
    row = {}
    try:
        with torch.no_grad():
            (packed, mask), (padded, _) = _logps(model, examples, scheme), _logps(model, examples, None)
        diff = (packed.float() - padded.float()).abs()[mask]
        row["logps_max"], row["logps_mean"] = diff.max().item(), diff.mean().item()
        got, want = _dpo_grads(model, examples, scheme), _dpo_grads(model, examples, None)
        scale = max(g.abs().max().item() for g in want.values())
        row["grad_rel"] = max((got[n] - want[n]).abs().max().item() for n in want) / max(scale, 1e-12)
        model.zero_grad(set_to_none=True)
    except Exception as e:  # recorded, not raised: the rest of the matrix still runs
        row["error"] = f"{type(e).__name__}: {e}"
    result = probe.probe(model, scheme)  # a half-precision model is also checked exactly through its float32 twin
    row["probe_ok"], row["probe"] = result.ok(dtype), result.describe()
    return row


def scheme_label(scheme) -> str:
    from fastdpo.probe import scheme_name

    name = scheme_name(scheme)
    return name + (" [reference kernel]" if scheme.mode == "varlen" and scheme.varlen_kernel == "reference" else "")


def parity_worker(attn: str, device: str) -> list[dict]:
    """Every family on one attention implementation; the rows of the matrix."""
    from types import SimpleNamespace

    import torch
    from trl.trainer.utils import add_fused_lm_head

    from fastdpo.packing import PackedPreferenceCollator
    from fastdpo.probe import choose, scheme_name
    from fastdpo.trainer import candidate_schemes
    from tests import archs

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # what the trainer would try for a bf16 recipe (on CPU, bf16 training is refused: float32, and the varlen scheme
    # through its reference kernel so that its code path still runs)
    args = SimpleNamespace(max_length=MAX_LENGTH, truncation_mode="keep_start", prefix_sharing=True,
                           bf16=device == "cuda")
    rows = []
    for name, overrides in FAMILIES.items():
        model = archs.build(name, attn, dtype=dtype, **overrides).to(device)
        add_fused_lm_head(model)
        schemes = candidate_schemes(attn, 0, args)
        if device != "cuda" and attn == "sdpa":
            # CI's dry run: the varlen scheme through its reference kernel, then the trainer's first choice here
            # (every scheme on every family is tests/parity/test_parity_arch.py's and tests/parity/test_varlen.py's job)
            schemes = [PackedPreferenceCollator(pad_token_id=0, max_length=MAX_LENGTH, mode="varlen",
                                                share_prefix=True, varlen_kernel="reference"), schemes[0]]
        chosen = choose(model, schemes)
        for scheme in schemes:
            t = time.perf_counter()
            row = {"family": name, "attn": attn, "scheme": scheme_label(scheme), **parity_cell(model, scheme, dtype)}
            row["chosen"] = chosen is scheme
            row["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(row)
        if chosen is None:
            rows.append({"family": name, "attn": attn, "scheme": "stock (no packing scheme exact)", "chosen": True})
        print(f"parity {name}/{attn}: chosen {scheme_name(chosen) if chosen else 'stock'}", file=sys.stderr,
              flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def attention_implementations(device: str) -> tuple[list[str], dict]:
    """What to run, and why the rest is not."""
    run, skipped = ["sdpa"], {}
    if device == "cuda":
        run.append("flex_attention")
    else:
        skipped["flex_attention"] = "CPU: FlexAttention has no CPU backward, and compiling it on CPU takes minutes"
    if importlib.util.find_spec("flash_attn") is not None and device == "cuda":
        run.append("flash_attention_2")
    else:
        skipped["flash_attention_2"] = "flash_attn is not installed" if device == "cuda" else "CPU"
    return run, skipped


def run_child(script: Path, argv: list[str], timeout: float, tag: str) -> tuple[object, str | None]:
    """Run a script of this repo in a child process; (the json after its `tag` line, None) or (None, why not)."""
    try:
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                              timeout=max(timeout, 1), env={**os.environ, "TQDM_DISABLE": "1"})
    except subprocess.TimeoutExpired:
        return None, f"stopped after {timeout:.0f} s (the check's time budget)"
    line = next((x for x in proc.stdout.splitlines() if x.startswith(tag + " ")), None)
    if proc.returncode or line is None:
        return None, f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"
    return json.loads(line[len(tag) + 1:]), None


# ---- (b) stock vs fast -------------------------------------------------------------------------------------------

def bench(device: str, steps: int, peak: float, budget: float) -> dict:
    """Fast, then stock, through scripts/benchmark.py's worker (each in a fresh process, fresh reference cache: the
    fast run pays its reference precompute). Fast first: if the budget runs out, the number lost is stock's."""
    config = OLMO3_1B if device == "cuda" else OLMO3_TINY
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model_config.json"
        path.write_text(json.dumps(config))
        argv = ["--profile", "think", "--model", "config", "--model_config", str(path), "--steps", str(steps)]
        if device == "cuda":
            argv += ["--scale", "1", "--dtype", "bfloat16", "--pairs_per_device", "4", "--grad_accum", "8",
                     "--train_args=--bf16 true --gradient_checkpointing true"]
        else:
            argv += ["--scale", "64", "--pairs_per_device", "2", "--grad_accum", "2",
                     "--train_args=--gradient_checkpointing true"]
        out = {"model": config, "profile": "think", "scale": 1 if device == "cuda" else 64, "steps": steps,
               "pairs_per_step": 32 if device == "cuda" else 4, "runs": {}}
        start = time.perf_counter()
        for variant in ("fast", "stock"):
            left = budget - (time.perf_counter() - start)
            res, err = run_child(ROOT / "scripts" / "benchmark.py", [*argv, "--worker", variant, "--tmp", tmp,
                                 "--cache", str(Path(tmp) / "ref_cache")], left, "BENCH")
            if err is not None:
                out["runs"][variant] = {"error": err}
                continue
            res["mfu"] = res["model_flops_per_s"] / peak
            out["runs"][variant] = res
            print(f"bench {variant}: {res['tokens_per_s']:.0f} tok/s, MFU {res['mfu']:.1%}, "
                  f"{res['seconds']:.1f}s", file=sys.stderr, flush=True)
        s, f = out["runs"].get("stock", {}), out["runs"].get("fast", {})
        if "tokens_per_s" in s and "tokens_per_s" in f:
            out["speedup"] = f["tokens_per_s"] / s["tokens_per_s"]
    return out


# ---- report ------------------------------------------------------------------------------------------------------

def _cell(text, limit: int = 300) -> str:
    """An error message as one table cell: its last `limit` characters, one line, no column separators."""
    return " ".join(str(text)[-limit:].split()).replace("|", "/")


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({'CPU dry run' if env['device'] == 'cpu' else env['gpu']})", "",
             (f"GPU {env.get('gpu')}, driver {env.get('driver', '-')}, CUDA {env.get('cuda')}, torch {env['torch']}, "
              f"transformers {env['transformers']}, TRL {env['trl']}, Python {env['python']}; varlen_attn "
              f"{env['varlen_attn']}; varlen check (bf16) {env.get('varlen_check_bf16', 'not run (CPU)')}; "
              f"measured matmul peak {report['matmul_peak_flops'] / 1e12:.1f} TFLOP/s "
              f"({'bf16' if env['device'] == 'cuda' else 'fp32'}); {report['seconds']:.0f} s in all."), "",
             "## Parity, packed vs padded", "",
             ("| family | attention | packing scheme | log-prob gap max / mean | grad gap (rel.) "
              "| probe (float32 twin incl.) | chosen |"), "|---|---|---|---|---|---|---|"]
    for r in report["parity"]:
        if "logps_max" in r:
            gaps, grad = f"{r['logps_max']:.1e} / {r['logps_mean']:.1e}", f"{r['grad_rel']:.1e}"
        else:
            gaps, grad = _cell(r.get("error", "-")), "-"
        verdict = "-" if "probe_ok" not in r else ("exact" if r["probe_ok"] else "rejected: " + _cell(r["probe"]))
        lines.append(f"| {r['family']} | {r['attn']} | {r['scheme']} | {gaps} | {grad} | {verdict} | "
                     f"{'**yes**' if r.get('chosen') else ''} |")
    for attn, why in report["parity_skipped"].items():
        lines.append(f"| all | {attn} | not run: {_cell(why)} | | | | |")
    b = report.get("bench")
    if b:
        m = b["model"]
        lines += ["", (f"## Stock vs fast: OLMo-3-shaped random model (hidden {m['hidden_size']}, "
                       f"{m['num_hidden_layers']} layers, vocab {m['vocab_size']}), think profile / {b['scale']}, "
                       f"{b['pairs_per_step']} pairs per step, {b['steps']} steps, one run each"), "",
                  "| path | useful tok/s | pairs/s | MFU | peak memory GiB | padding eff | packing scheme | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for v, r in b["runs"].items():
            if "error" in r:
                lines.append(f"| {v} | failed: {_cell(r['error'])} | | | | | | |")
                continue
            lines.append(f"| {v} | {r['tokens_per_s']:.0f} | {r['pairs_per_s']:.2f} | {r['mfu']:.1%} | "
                         f"{r['peak_mem_mb'] / 1024:.1f} | {r['padding_efficiency']:.3f} | {r['scheme'] or '-'} | "
                         f"{r['seconds']:.0f} |")
        if "speedup" in b:
            lines.append(f"\nfast / stock: **{b['speedup']:.2f}x** useful tokens/s")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI's dry run)")
    parser.add_argument("--out", help="folder for gpu_check.json and gpu_check.md (default "
                        "outputs/gpu_check)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per benchmark run (default 2)")
    parser.add_argument("--budget_s", type=float, default=420, help="stop starting work after this many seconds "
                        "(default 420: the check and its set-up fit a 10-minute job)")
    parser.add_argument("--skip_bench", action="store_true", help="parity matrix only")
    parser.add_argument("--parity_worker", help=argparse.SUPPRESS)
    opts = parser.parse_args()

    import torch

    if not opts.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; run with --cpu for the dry run (CI does)")
    device = "cpu" if opts.cpu else "cuda"
    if opts.parity_worker:
        print("PARITY " + json.dumps(parity_worker(opts.parity_worker, device)), flush=True)
        return

    start = time.perf_counter()
    out = Path(opts.out or ROOT / "outputs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "matmul_peak_flops": matmul_peak(device), "parity": []}
    print(f"gpu_check: {report['environment'].get('gpu') or 'CPU'}, matmul peak "
          f"{report['matmul_peak_flops'] / 1e12:.1f} TFLOP/s", file=sys.stderr, flush=True)
    attns, report["parity_skipped"] = attention_implementations(device)
    # the parity matrix takes at most half the budget, sdpa first (flex compiles: it may use what is left of it)
    parity_budget = opts.budget_s / 2
    for attn in attns:
        left = parity_budget - (time.perf_counter() - start)
        if left < 20:
            report["parity_skipped"][attn] = "the check's time budget ran out"
            continue
        rows, err = run_child(Path(__file__), ["--parity_worker", attn] + (["--cpu"] if opts.cpu else []), left,
                              "PARITY")
        if err is not None:
            report["parity_skipped"][attn] = err
        else:
            report["parity"] += rows
    if not opts.skip_bench:
        report["bench"] = bench(device, 1 if opts.cpu else opts.steps, report["matmul_peak_flops"],
                                opts.budget_s - (time.perf_counter() - start))
    report["seconds"] = time.perf_counter() - start
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = markdown(report)
    (out / "gpu_check.md").write_text(summary)
    print(summary)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
