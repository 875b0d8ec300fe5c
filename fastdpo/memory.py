"""Per-GPU memory of DPO training under ZeRO-2, ZeRO-3 and FSDP2, from published formulas: what fits where.

    python -m fastdpo.memory            # the README table ("What fits where"); tests/unit/test_memory.py checks

Model states, mixed-precision Adam, Psi parameters on N GPUs. The ZeRO paper (Rajbhandari et al. 2020,
arXiv:1910.02054, section 3.1 and Figure 1) counts 2 Psi bf16 weights + 2 Psi bf16 gradients + K Psi optimizer
states, K = 12 (fp32 master weights, momentum, variance), sharded by stage; DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs` / `estimate_zero3_...`, cpu_offload=False; tests/unit/test_memory.py checks
these numbers against them) count the fp32 gradient partition the optimizer steps on as well:
    ZeRO-2  2 Psi  +  (2 + 4 + 12) Psi / N        weights whole on every GPU; 16-bit and fp32 gradient
                                                  partitions and the optimizer sharded
    ZeRO-3  (2 + 4 + 12) Psi / N                  everything sharded (DeepSpeed's estimate: 18 bytes per parameter
                                                  and GPU, gradients 4 of them)
    FSDP2   (4 + 4 + 8) Psi / N                   everything sharded; FSDP2's mixed precision keeps the sharded
                                                  parameters in fp32 (they are the master copy) and their
                                                  gradients in the same dtype (Zhao et al. 2023,
                                                  arXiv:2304.11277; torch's MixedPrecisionPolicy).
A sharded backend also holds the weights it has gathered for the layers in flight: counted as two units
(the current one and the prefetched next, FSDP2's default; ZeRO-3 prefetches by bucket) of the largest of a
decoder layer and the embedding matrix, in bf16.

Activations with gradient checkpointing, T tokens in one micro-batch, L layers, hidden size h: each layer's
input is kept (L x T x h x 2 bytes, bf16), and during the backward one layer's activations are recomputed in
full: 34 x T x h bytes (Korthikanti et al. 2022, arXiv:2205.05198, section 4.1: s b h (34 + 5 a s / h) per layer,
whose attention-score term flash/sdpa attention does not store). The LM head's logits are not counted: the
fused head (TRL's add_fused_lm_head) scores tokens in tiles. The reference model is not counted: the fast path
precomputes its log-probs (the stock path under ZeRO-3 holds a sharded copy, 2 Psi / N more).

T is the token budget: by default per_device_train_batch_size x 2 x max_length (fastdpo.config, token_budget).
Without gradient checkpointing every layer keeps its 34 x T x h bytes. Without DeepSpeed or FSDP (one GPU, or
plain DDP) each GPU holds the whole model in its loading dtype (p bytes a parameter): weights p, gradients p (and
DDP's bucket copy, p more, on 2+ GPUs), AdamW's two moments 2p. LoRA trains an adapter too small to count: the
frozen weights and the activations remain. The stock path (precompute_ref_log_probs false, no LoRA) loads a
reference copy of the weights.

Not counted: the CUDA context and kernel workspaces (about 1 GB), NCCL buffers (about 1 GB per communicator at
NCCL's default buffer sizes), the caching allocator's fragmentation (packed micro-batches change shape every step)
and what the formulas leave out (logit tiles, DeepSpeed's buckets). A configuration "fits" when its total is at
most FIT = 85% of the GPU's memory; the 15% left is for those. On an "80 GB" H100, which reports about 85 GB
(81,559 MiB in nvidia-smi), that is 72.7 GB: OLMo 3 7B with ZeRO-2 on 4 GPUs at 4 x 8192 tokens (73.7 GB) does
not fit, at 2 x 8192 (60.6 GB) it does. The table takes 80 and 180 GB as the cards' sizes (less than they report).

The check (`python -m fastdpo.memory --check`, scripts/_launch.sh's pre-check before srun; `check_at_start` in
train_dpo.py on CUDA before anything loads) refuses a run that does not fit with the fixes that would, and says
why it skipped where it cannot estimate (no GPU, a config.json it cannot read, an unknown backend).
FASTDPO_SKIP_MEMORY_CHECK=1 turns it off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import yaml

logger = logging.getLogger("fastdpo")

GB = 1e9
FIT = 0.85  # share of a GPU's memory the counted terms may use (the rest: CUDA context, NCCL, fragmentation)
BACKENDS = ("ZeRO-2", "ZeRO-3", "FSDP2")
SKIP = "FASTDPO_SKIP_MEMORY_CHECK"


@dataclass(frozen=True)
class Shape:
    """A dense decoder, as its config.json describes it."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, name: str, config) -> Shape:
        return cls(name, config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def layer_params(self) -> int:
        """Attention (q and o: h x h; k and v: h x kv_heads x head_dim) + gated MLP (3 x h x intermediate); the
        norms' few x h weights are left out (under 0.01% at 7B)."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings


# The OLMo 3 shapes (OLMo 3 report, arXiv:2512.13961: 7B 32 layers x 4096, 32 heads; 32B 64 layers x 5120, 40
# query and 8 key/value heads; intermediate sizes and the 100,278-token vocabulary as in their config.json).
OLMO3_7B = Shape("OLMo 3 7B", layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=100278)
OLMO3_32B = Shape("OLMo 3 32B", layers=64, hidden=5120, intermediate=27648, heads=40, kv_heads=8, vocab=100278)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def per_gpu(shape: Shape, backend: str, gpus: int, tokens: int, checkpointing: bool = True, param_bytes: float = 2,
            lora: bool = False, reference: bool = False) -> Memory:
    """Per-GPU memory of training `shape` with `backend` (BACKENDS, or DDP: nothing sharded) on `gpus` GPUs, `tokens`
    tokens per micro-batch. param_bytes (DDP and LoRA): the loading dtype's size (0.5 for 4-bit)."""
    psi, n = shape.params, gpus
    gathered = 2 * max(shape.layer_params, shape.vocab * shape.hidden) * 2  # two units in flight, bf16
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * 2 + 34 * tokens * shape.hidden
    else:
        activations = shape.layers * 34 * tokens * shape.hidden
    sharded = backend in ("ZeRO-3", "FSDP2")
    if backend not in (*BACKENDS, "DDP"):
        raise ValueError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
    if lora:  # frozen weights, a negligible adapter
        weights = (2 * psi / n + gathered) if sharded else param_bytes * psi
        return Memory(weights, 0, 0, activations)
    if backend == "ZeRO-2":
        m = Memory(2 * psi, 6 * psi / n, 12 * psi / n, activations)
    elif backend == "ZeRO-3":
        m = Memory(2 * psi / n + gathered, 4 * psi / n, 12 * psi / n, activations)
    elif backend == "FSDP2":
        m = Memory(4 * psi / n + gathered, 4 * psi / n, 8 * psi / n, activations)
    else:
        m = Memory(param_bytes * psi, param_bytes * psi * (2 if n > 1 else 1), 2 * param_bytes * psi, activations)
    if reference:  # the stock path's frozen reference copy, in bf16 (sharded like the policy under ZeRO-3/FSDP2)
        m = replace(m, weights=m.weights + (2 * psi / n if sharded else 2 * psi))
    return m


def fits(memory: Memory, gpu_gb: float) -> bool:
    return memory.total <= FIT * gpu_gb * GB


# What the README table shows: the OLMo 3 Think length (analyze_dataset.py chose max_length 8192), pairs per GPU as
# in recipes/olmo3_think.yaml (4 GPUs) and recipes/olmo3_32b_think.yaml (16 GPUs; 8 for comparison).
ROWS = ((OLMO3_7B, 4, 8192, 4), (OLMO3_32B, 2, 8192, 8), (OLMO3_32B, 2, 8192, 16))
GPU_GB = (80, 180)


def table() -> str:
    lines = ["| model | pairs/GPU x max_length = tokens | GPUs | backend | weights | gradients | optimizer | "
             "activations | total GB | 80 GB GPU | 180 GB GPU |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for shape, pairs, max_length, gpus in ROWS:
        tokens = pairs * 2 * max_length
        for backend in BACKENDS:
            m = per_gpu(shape, backend, gpus, tokens)
            cells = [f"{x / GB:.1f}" for x in (m.weights, m.gradients, m.optimizer, m.activations, m.total)]
            marks = ["fits" if fits(m, gb) else "no" for gb in GPU_GB]
            lines.append(f"| {shape.name} ({shape.params / 1e9:.1f}B) | {pairs} x {max_length} = {tokens} | {gpus} | "
                         f"{backend} | " + " | ".join(cells + marks) + " |")
    return "\n".join(lines)


def smallest(shape: Shape, tokens: int, gpus: int, gpu_gb: float) -> str | None:
    """The first backend (ZeRO-2, then the sharded ones) whose per-GPU total fits, or None."""
    return next((b for b in BACKENDS if fits(per_gpu(shape, b, gpus, tokens), gpu_gb)), None)


# ------------------------------------------------------------------------------------ the check before a run


# What a run is, for the estimate: from a recipe and flags (the sbatch pre-check) or from the parsed arguments.
# Defaults where a recipe leaves a key out: fastdpo's DPOConfig, TRL 1.16's ModelConfig (test_memory.py checks
# they still agree); the pre-check reads YAML only, without TRL, to stay quick in the batch shell.
DEFAULTS = {"model_name_or_path": None, "model_revision": "main", "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1, "max_length": 1024, "token_budget": None,
            "gradient_checkpointing": True, "dtype": "float32", "use_peft": False, "load_in_4bit": False,
            "precompute_ref_log_probs": True}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
SHELL_BACKENDS = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp2": "FSDP2", "ddp": "DDP"}
ACCELERATE_CONFIGS = {"zero2": "accelerate_config.yaml", "zero3": "accelerate_config_zero3.yaml",
                      "fsdp2": "accelerate_config_fsdp2.yaml"}


@dataclass(frozen=True)
class Run:
    model: str
    backend: str  # ZeRO-2, ZeRO-3, FSDP2 or DDP
    gpus: int
    per_device: int
    accumulation: int
    max_length: int | None
    token_budget: int | None = None
    checkpointing: bool = True
    dtype: str = "float32"
    lora: bool = False
    four_bit: bool = False
    reference: bool = False  # the stock path with a reference copy
    sequences: int = 2  # per example: chosen and rejected (DPO), one (SFT)
    revision: str | None = None

    @property
    def tokens(self) -> int:
        return self.token_budget or self.per_device * self.sequences * self.max_length

    def memory(self, shape: Shape) -> Memory:
        param_bytes = 0.5 if self.four_bit else DTYPE_BYTES.get(self.dtype, 2)
        return per_gpu(shape, self.backend, self.gpus, self.tokens, self.checkpointing, param_bytes, self.lora,
                       self.reference)

    def describe(self) -> str:
        unit = "pairs" if self.sequences == 2 else "sequences"
        batch = (f"token_budget {self.token_budget}" if self.token_budget else
                 f"{self.per_device} {unit}/device x {self.max_length} tokens")
        return (f"{self.backend} on {self.gpus} GPU{'s' * (self.gpus > 1)}, {batch}, gradient checkpointing "
                f"{'on' if self.checkpointing else 'off'}{', LoRA' if self.lora else ''}")


def _gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


def fixes(run: Run, shape: Shape, gpu_bytes: float) -> list[str]:
    """Changes that would fit, each with its estimate: another backend, fewer examples per device (the same
    examples per optimizer step), gradient checkpointing, more GPUs."""
    limit, out = FIT * gpu_bytes, []
    for name, backend in SHELL_BACKENDS.items():
        m = replace(run, backend=backend).memory(shape)
        if backend not in (run.backend, "DDP") and m.total <= limit:
            out.append(f"BACKEND={name} (sbatch; {ACCELERATE_CONFIGS[name]} for accelerate launch): {_gb(m.total)}")
    per = run.per_device
    while per > 1 and not run.token_budget:
        per //= 2
        acc = -(-run.accumulation * run.per_device // per)  # rounded up: at least the same examples per step
        m = replace(run, per_device=per, accumulation=acc).memory(shape)
        if m.total <= limit:
            unit, before = "pairs" if run.sequences == 2 else "sequences", run.per_device * run.accumulation
            note = "as before" if per * acc == before else f"was {before}"
            out.append(f"--per_device_train_batch_size {per} --gradient_accumulation_steps {acc} ({per * acc} {unit} "
                       f"per GPU and optimizer step, {note}): {_gb(m.total)}")
            break
    if not run.checkpointing and replace(run, checkpointing=True).memory(shape).total <= limit:
        out.append(f"--gradient_checkpointing true: {_gb(replace(run, checkpointing=True).memory(shape).total)}")
    for gpus in (run.gpus * 2, run.gpus * 4, run.gpus * 8):
        m = replace(run, gpus=gpus).memory(shape)
        if run.backend != "DDP" and m.total <= limit:
            out.append(f"{gpus} GPUs (more nodes; divide gradient_accumulation_steps by {gpus // run.gpus} to keep "
                       f"the batch): {_gb(m.total)}")
            break
    return out


def verdict(run: Run, shape: Shape, gpu_bytes: float) -> tuple[bool, str]:
    """(fits, the message): one line when it fits; the estimate, the margin and the fixes when it does not."""
    m, limit = run.memory(shape), FIT * gpu_bytes
    line = (f"memory: ~{_gb(m.total)} per GPU for {run.model} ({shape.params / 1e9:.1f}B parameters), "
            f"{run.describe()}; the GPU has {_gb(gpu_bytes)}, runs fit in {FIT:.0%} of it ({_gb(limit)})")
    if m.total <= limit:
        return True, line
    found = fixes(run, shape, gpu_bytes)
    return False, "\n".join([
        f"{line}: {_gb(m.total - limit)} over; the run would stop with CUDA out of memory after loading the model",
        f"  estimate: weights {_gb(m.weights)} + gradients {_gb(m.gradients)} + optimizer {_gb(m.optimizer)} + "
        f"activations {_gb(m.activations)} (fastdpo/memory.py says how each is counted; the {1 - FIT:.0%} left is for "
        "the CUDA context, NCCL buffers and fragmentation)",
        *(["  fixes that fit: " + "; ".join(found)] if found else
          ["  no single change fits: combine them (BACKEND=zero3 with fewer examples per device), or use LoRA"]),
        f"  to run it anyway: {SKIP}=1"])


# ----------------------------------------------------------------------------- where the numbers come from


def read_shape(model: str | None, revision: str | None = None) -> tuple[Shape | None, str]:
    """The model's shape from its config.json alone (no weights), or None and why not."""
    if not model or model.startswith("embedded:"):
        return None, "the embedded tiny model needs no check"
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            adapter = path / "adapter_config.json"
            if adapter.is_file() and not (path / "config.json").is_file():
                return read_shape(json.loads(adapter.read_text())["base_model_name_or_path"])
            config = json.loads((path / "config.json").read_text())
        else:
            config = _hub_config(model, revision)
    except Exception as e:  # offline, no network, no such repo, a folder without config.json: say so, go on
        return None, f"cannot read {model}'s config.json ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    config = config.get("text_config", config)  # a multimodal model's language part
    if any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return None, f"{model} is a mixture of experts, which the formulas do not cover"
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        return None, f"{model}'s config.json has no {', '.join(missing)}"
    ns = SimpleNamespace(**{"num_key_value_heads": None, "tie_word_embeddings": False, **config})
    return Shape.from_config(model, ns), ""


def _hub_config(model: str, revision: str | None) -> dict:
    """config.json of a Hub model: from the Hub cache, else one request (no retries: a check must not spend a minute
    on a network that is down; the training that follows reports that properly)."""
    from huggingface_hub import constants, get_session, hf_hub_url, try_to_load_from_cache  # only Hub ids need it
    from huggingface_hub.utils import build_hf_headers  # only Hub ids need it

    cached = try_to_load_from_cache(model, "config.json", revision=revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if constants.HF_HUB_OFFLINE:
        raise LookupError("HF_HUB_OFFLINE=1 and it is not in the Hub cache")
    response = get_session().get(hf_hub_url(model, "config.json", revision=revision), headers=build_hf_headers(),
                                 timeout=10, follow_redirects=True)
    response.raise_for_status()
    return response.json()


def backend_from_env(env=os.environ) -> str | None:
    """What accelerate launched: DeepSpeed's stage from its JSON, FSDP2, else DDP (one GPU included)."""
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            try:
                stage = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())[
                    "zero_optimization"]["stage"]
            except (OSError, KeyError, ValueError):
                return None
        return {"2": "ZeRO-2", "3": "ZeRO-3"}.get(str(stage))
    if env.get("ACCELERATE_USE_FSDP") == "true":
        return "FSDP2" if env.get("FSDP_VERSION") == "2" else None
    return "DDP"


def run_from_args(training_args, model_args, env=os.environ) -> Run | None:
    """The Run parsed arguments describe, under the launcher's environment; None for a backend it cannot tell."""
    backend = backend_from_env(env)
    if backend is None:
        return None
    dpo, t, m = hasattr(training_args, "beta"), training_args, model_args
    return Run(m.model_name_or_path, backend, gpus=int(env.get("WORLD_SIZE", "1")),
               per_device=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps,
               max_length=t.max_length, token_budget=getattr(t, "token_budget", None),
               checkpointing=bool(t.gradient_checkpointing), dtype=m.dtype or "float32", lora=bool(m.use_peft),
               four_bit=bool(m.load_in_4bit), reference=dpo and not m.use_peft and not t.precompute_ref_log_probs,
               sequences=2 if dpo else 1, revision=m.model_revision)


def check_at_start(training_args, model_args) -> None:
    """train_dpo.py's check, before anything is read or loaded; on CUDA only. A run that cannot fit stops here."""
    if os.environ.get(SKIP) == "1":
        logger.info("memory check skipped (%s=1)", SKIP)
        return
    import torch  # imported here: the sbatch pre-check (python -m fastdpo.memory --check) runs without torch

    if training_args.use_cpu or not torch.cuda.is_available():
        return
    run = run_from_args(training_args, model_args)
    shape, why = read_shape(model_args.model_name_or_path, model_args.model_revision)
    if run is None or shape is None:
        logger.info("memory check skipped: %s", why or "a DeepSpeed stage or FSDP version it does not know")
        return
    gpu_bytes = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    ok, message = verdict(run, shape, gpu_bytes)
    if ok:
        logger.info("%s", message)
    elif os.environ.get("RANK", "0") == "0":
        raise SystemExit(message)
    else:
        raise SystemExit("memory check: the run does not fit (rank 0 says why)")


def run_from_recipe(recipe: str, flags: list[str], backend: str, gpus: int, sft: bool = False) -> Run:
    """The Run a recipe plus train_dpo.py flags describe (flags win), read without TRL."""
    values = dict(DEFAULTS)
    values.update({k: v for k, v in (yaml.safe_load(Path(recipe).read_text()) or {}).items() if k in DEFAULTS})
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # only these keys, spelled out
    for key in DEFAULTS:
        parser.add_argument(f"--{key}")
    given, _ = parser.parse_known_args(flags)
    values.update({k: v for k, v in vars(given).items() if v is not None})

    def flag(key):  # recipe booleans are YAML booleans, flags are text
        return str(values[key]).lower() in ("true", "1", "yes", "y", "t")

    def number(key):
        return None if values[key] in (None, "None", "null") else int(values[key])

    return Run(values["model_name_or_path"], SHELL_BACKENDS[backend], gpus=gpus,
               per_device=number("per_device_train_batch_size"), accumulation=number("gradient_accumulation_steps"),
               max_length=number("max_length"), token_budget=number("token_budget"),
               checkpointing=flag("gradient_checkpointing"), dtype=str(values["dtype"]), lora=flag("use_peft"),
               four_bit=flag("load_in_4bit"),
               reference=not sft and not flag("use_peft") and not flag("precompute_ref_log_probs"),
               sequences=1 if sft else 2, revision=values["model_revision"])


def gpu_memory() -> float | None:
    """Bytes of the first GPU, from nvidia-smi (no CUDA context in the batch shell); None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return float(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # train_dpo.py's flags pass through: no prefix may match ours
    p.add_argument("--check", action="store_true", help="check one run instead of printing the table")
    p.add_argument("--recipe", help="the run's recipe (with --check)")
    p.add_argument("--backend", default="zero2", choices=list(SHELL_BACKENDS), help="as scripts/_launch.sh's BACKEND")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in all (nodes x GPUs per node)")
    p.add_argument("--gpu-memory-gb", type=float, help="the GPU's memory in GB (default: nvidia-smi's, GPU 0)")
    p.add_argument("--sft", action="store_true", help="train_sft.py's run (one sequence per example)")
    args, flags = p.parse_known_args(argv)
    if not args.check:
        print(table())
        return 0
    if os.environ.get(SKIP) == "1":
        print(f"memory check skipped ({SKIP}=1)")
        return 0
    gpu_bytes = args.gpu_memory_gb * GB if args.gpu_memory_gb else gpu_memory()
    if gpu_bytes is None:
        print("memory check skipped: no GPU seen here (nvidia-smi); training checks again on its GPUs")
        return 0
    run = run_from_recipe(args.recipe, flags, args.backend, args.gpus, args.sft)
    shape, why = read_shape(run.model, run.revision)
    if shape is None:
        print(f"memory check skipped: {why}")
        return 0
    ok, message = verdict(run, shape, gpu_bytes)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
