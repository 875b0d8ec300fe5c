"""The start-up check: run the real model on probe pairs packed (the way training will) and padded (stock TRL's
way), and keep a packing scheme only if per-token log-probs and gradients agree.

The probe pairs are built to reach everything the packed path does: sequences longer than the model's sliding
window (so every layer type's mask matters), several sequences per row, a row filled exactly to capacity, answers
that share their first tokens, and a rejected answer that is a prefix of the chosen one (prefix sharing's edge
cases). Gradients are those of a random weighting of the log-probs with respect to the input embeddings' weight:
the whole backward, without allocating gradients for every parameter.

In float32 the two ways agree to ~1e-6, so any masking mistake stands out. In bfloat16 / float16 they differ by
rounding as much as a subtle mistake would (a dropped sliding window moved the tiny OLMo 3's log-probs by 2e-2 on
average, rounding alone by 4e-4), so a half-precision model is probed twice: itself, loosely (a gross failure, e.g.
a wrapper that ignores position_ids), and through a float32 twin, exactly: the same class and config, with only as
many layers as it takes to include every layer type, randomly initialised. Masks depend on the architecture, not
on the weights, so the twin answers the precise question at a fraction of the cost.

Under parameter sharding (DeepSpeed ZeRO-3, FSDP) the real model's weights are partitioned over the ranks (a ZeRO-3
parameter has 0 elements locally), so only the float32 twin is probed: it is built whole on each rank outside
deepspeed.zero.Init, and nothing gathers the real weights (which would put the full model on every rank).

Every rank acts on one verdict: each scheme's result is all-reduced (rejected anywhere = rejected everywhere), so no
rank packs while another runs the stock path. An out-of-memory during the probe is not a rejected scheme: every rank
raises `ProbeOutOfMemory` with the fix, since training's own micro-batches are larger than the probe's.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from . import frameworks, segattn
from .packing import PackedForward, PackedPreferenceCollator, pair_lengths

logger = logging.getLogger("fastdpo")

# Gradients need the activations of every layer: keep the probe's backward within this many tokens (a 7B model
# holds ~3 MB per token for it). Longer windows are still checked forward, without gradients.
GRAD_TOKENS = 4096
OOM_FIX = ("lower token_budget or per_device_train_batch_size, turn on gradient_checkpointing, or shard the "
           "parameters (DeepSpeed ZeRO-3 / FSDP2)")


class ProbeOutOfMemory(RuntimeError):
    """The probe's small forward/backward did not fit: training's larger micro-batches would not either."""


@dataclass
class ProbeResult:
    logps_gap: float = float("nan")  # largest |per-token log-prob| difference, packed vs padded
    logps_mean_gap: float = float("nan")
    grad_gap: float = float("nan")  # largest gradient difference relative to the largest gradient
    error: str | None = None
    oom: bool = False  # the error is an out-of-memory: says nothing about the scheme

    def ok(self, dtype: torch.dtype) -> bool:
        if self.error is not None:
            return False
        if dtype == torch.float32:
            return self.logps_gap <= 1e-4 and self.grad_gap <= 1e-3
        # half precision, the loose check (the float32 twin is the precise one): rounding moved the tiny models'
        # log-probs by 4e-4 on average; wrong attention moves them by whole nats
        return self.logps_mean_gap <= 5e-2 and self.grad_gap <= 0.2

    def describe(self) -> str:
        if self.error is not None:
            return self.error
        return (f"per-token log-probs differ by up to {self.logps_gap:.2e} (mean {self.logps_mean_gap:.2e}), "
                f"gradients by {self.grad_gap:.2e} of their largest value")


def model_window(model) -> int | None:
    """The longest attention reach any layer is limited to (sliding window or chunk), from the config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    values = [getattr(config, k, None) for k in ("sliding_window", "attention_chunk_size")]
    values = [v for v in values if isinstance(v, int) and v > 0]
    return max(values) if values else None


def probe_pairs(vocab: int, window: int | None, max_length: int | None, capacity: int | None,
                seed: int = 0) -> list[dict]:
    """Token-id pairs that exercise windows, shared answer starts, prefixes and full rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731  (0-2: special tokens)
    limit = max_length or 4 * (window or 16)
    long = min((window or 16) + 8, limit)
    p0 = max(1, long // 3)
    pairs = [
        {"prompt_ids": ids(p0), "chosen_ids": ids(long - p0), "rejected_ids": ids(max(1, long - p0 - 3))},
        {"prompt_ids": ids(5), "chosen_ids": ids(9), "rejected_ids": None},  # answers share their first 3 tokens
        {"prompt_ids": ids(2), "chosen_ids": ids(3), "rejected_ids": ids(6)},
        {"prompt_ids": ids(4), "chosen_ids": ids(6), "rejected_ids": None},  # rejected = the chosen answer's start
    ]
    pairs[1]["rejected_ids"] = pairs[1]["chosen_ids"][:3] + ids(4)
    pairs[3]["rejected_ids"] = pairs[3]["chosen_ids"][:4]
    if capacity is not None:  # one more pair so the sequences add up to whole rows
        used = sum(sum(pair_lengths(p, max_length)) for p in pairs)
        room = -used % capacity
        if room >= 4:
            half = room // 2
            pairs.append({"prompt_ids": ids(1), "chosen_ids": ids(half - 1), "rejected_ids": ids(room - half - 1)})
    return pairs


def random_pairs(vocab: int, seed: int = 0, n: int = 6) -> list[dict]:
    """Token-id pairs of 12 to 70 tokens (prompt 4-20, answers 8-50), ids from 3 (0-2 are special tokens), every
    third with answers that start alike: the parity tests' and scripts/gpu_check.py's matrix pairs."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()  # noqa: E731
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    out = []
    for i in range(n):
        chosen = ids(rnd(8, 50))
        rejected = chosen[:3] + ids(rnd(5, 40)) if i % 3 == 0 else ids(rnd(8, 50))
        out.append({"prompt_ids": ids(rnd(4, 20)), "chosen_ids": chosen, "rejected_ids": rejected})
    return out


def padded_logps(model, pairs, pad_id, max_length, truncation_mode, **kwargs):
    """Per-token log-probs of `pairs` padded, as stock TRL runs them, and which of them are scored."""
    collate = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length, truncation_mode=truncation_mode)
    batch = collate(pairs)
    device = next(model.parameters()).device
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                labels=labels.to(device), fused_lm_head=True, use_cache=False, **kwargs)
    return out.log_probs, batch["completion_mask"][:, 1:].to(device).bool()


def packed_logps(model, pairs, collator, **kwargs):
    """Per-token log-probs of `pairs` packed by `collator`, in the padded grid."""
    batch = collator(pairs)
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = PackedForward(model)(labels=labels, fused_lm_head=True, **kwargs,
                               **{k: v for k, v in batch.items() if k.startswith(("packed_", "unpack"))})
    return out.log_probs


def _gap(model, pairs, collator, with_grad: bool, kwargs: dict) -> tuple[float, float, float]:
    weight = model.get_input_embeddings().weight
    stock, scored = padded_logps(model, pairs, collator.pad_token_id, collator.max_length, collator.truncation_mode,
                                 **kwargs)
    packed = packed_logps(model, pairs, collator, **kwargs)
    diff = (packed - stock).abs()[scored]
    gaps = (diff.max().item(), diff.float().mean().item())
    if not with_grad:
        return *gaps, 0.0
    mix = torch.rand(stock.shape, generator=torch.Generator().manual_seed(1)).to(stock.device) * scored
    (g_stock,) = torch.autograd.grad((stock.float() * mix).sum(), weight)
    (g_packed,) = torch.autograd.grad((packed.float() * mix).sum(), weight)
    rel = ((g_packed - g_stock).abs().max() / g_stock.abs().max().clamp(min=1e-12)).item()
    return *gaps, rel


def float32_twin(model, device=None):
    """A float32, randomly initialised copy of the architecture with the fewest leading layers that include every
    layer type (at least two), on the model's device; None if the model is not a plain causal LM we can rebuild."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the real model
    config = copy.deepcopy(base.config)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or config.get_text_config() is not config:
        return None
    types = list(getattr(config, "layer_types", None) or [])
    k = min(n, 2)
    while types and k < n and len(set(types[:k])) < len(set(types)):
        k += 1
    for name, value in vars(config).items():  # per-layer lists (layer_types, no_rope_layers, ...) keep k entries
        if isinstance(value, list) and len(value) == n:
            setattr(config, name, value[:k])
    config.num_hidden_layers = k
    device = device or next(base.parameters()).device
    with torch.device(device):
        twin = frameworks.from_config(type(base), config, dtype=torch.float32,
                                      attn_implementation=frameworks.attn_implementation(base))
    add_fused_lm_head(twin)
    return twin


def probe(model, collator: PackedPreferenceCollator, seed: int = 0, sharded: bool = False, device=None,
          **kwargs) -> ProbeResult:
    """Packed (by `collator`'s scheme) vs padded; the model must carry TRL's fused LM head. kwargs: what training
    passes the model besides the inputs (output_router_logits for MoE). A half-precision model is also checked
    exactly through its float32 twin; the result returned is the twin's when that fails. sharded: the weights are
    partitioned over the ranks, so only the twin (built on `device`) is run."""
    if sharded:
        return _twin_probe(model, collator, seed, kwargs, device)
    result = _probe(model, collator, seed, kwargs)
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32 or not result.ok(dtype):
        return result
    with torch.random.fork_rng(devices=[next(model.parameters()).device] if torch.cuda.is_available() else []):
        try:
            twin = float32_twin(model)
        except Exception as e:  # a config we cannot rebuild: say so and trust the loose check only
            logger.warning("packing probe: no float32 twin of %s (%s: %s); the half-precision check alone decides",
                           type(model).__name__, type(e).__name__, e)
            return result
        if twin is None:
            return result
        exact = _probe(twin, collator, seed, kwargs)
    del twin
    return exact if not exact.ok(torch.float32) else result


def _twin_probe(model, collator, seed: int, kwargs: dict, device) -> ProbeResult:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), frameworks.outside_zero3():
        try:
            twin = float32_twin(model, device)
        except Exception as e:  # a config we cannot rebuild: the run falls back, saying why
            twin, why = None, f"{type(e).__name__}: {e}"
        else:
            why = "not a plain causal LM with num_hidden_layers"
        if twin is None:
            return ProbeResult(error=f"the weights are sharded over the ranks, so only a float32 twin can be "
                                     f"probed, and {type(model).__name__} has none ({why})")
        return _probe(twin, collator, seed, kwargs)


def _probe(model, collator: PackedPreferenceCollator, seed: int, kwargs: dict) -> ProbeResult:
    vocab = model.get_input_embeddings().weight.shape[0]
    pairs = probe_pairs(vocab, model_window(model), collator.max_length, collator.row_capacity, seed)
    small = pairs[1:4]  # short pairs: the backward of a long window on a big model would not fit
    tokens = sum(sum(pair_lengths(p, collator.max_length)) for p in pairs)
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    weight = model.get_input_embeddings().weight
    model.eval()
    result = ProbeResult()
    try:
        for p in model.parameters():
            p.requires_grad_(p is weight)
        if tokens <= GRAD_TOKENS:
            result.logps_gap, result.logps_mean_gap, result.grad_gap = _gap(model, pairs, collator, True, kwargs)
        else:
            with torch.no_grad():
                result.logps_gap, result.logps_mean_gap, _ = _gap(model, pairs, collator, False, kwargs)
            _, _, result.grad_gap = _gap(model, small, collator, True, kwargs)
    except (torch.OutOfMemoryError, MemoryError) as e:
        result.error, result.oom = f"{type(e).__name__}: {e}", True
    except (segattn.Unsupported, RuntimeError, ValueError, TypeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        # the CPU allocator reports a failed allocation as a plain RuntimeError
        result.oom = "can't allocate memory" in str(e) or "not enough memory" in str(e)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return result



def scheme_name(scheme: PackedPreferenceCollator) -> str:
    """`segments + prefix sharing`: how logs, tests and scripts/gpu_check.py name a packing scheme."""
    return scheme.mode + (" + prefix sharing" if scheme.share_prefix else "")


OK, REJECTED, OOM = 0, 1, 2


def _agree(status: int, device) -> int:
    """The worst status over the ranks (rejected or out of memory anywhere counts everywhere)."""
    if not (dist.is_available() and dist.is_initialized()):
        return status
    t = torch.tensor([status], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def choose(model, schemes: list[PackedPreferenceCollator], sharded: bool = False, device=None,
           **kwargs) -> PackedPreferenceCollator | None:
    """The first packing scheme (fastest first) whose probe matches the padded path on this model on every rank,
    each rejection logged with its gap; None = none does, train the stock padded way. Collective under
    torch.distributed: every rank must call it with the same schemes. kwargs: as `probe`."""
    dtype = torch.float32 if sharded else next(model.parameters()).dtype  # sharded: the float32 twin decides
    device = device or next(model.parameters()).device
    for scheme in schemes:
        result = probe(model, scheme, sharded=sharded, device=device, **kwargs)
        mine = OOM if result.oom else OK if result.ok(dtype) else REJECTED
        agreed = _agree(mine, device)
        if agreed == OOM:
            where = result.describe() if mine == OOM else "on another rank"
            raise ProbeOutOfMemory(f"packing probe: out of memory while checking the {scheme_name(scheme)} scheme "
                                   f"({where}); its probe pairs are smaller than any training micro-batch, so "
                                   f"training would not fit either: {OOM_FIX}")
        if agreed == OK:
            logger.info("packing probe: %s scheme matches the padded path (%s)", scheme_name(scheme),
                        result.describe())
            return scheme
        logger.warning("packing probe: %s scheme rejected on this model: %s", scheme_name(scheme),
                       result.describe() if mine == REJECTED else
                       f"matches here ({result.describe()}) but not on another rank; all ranks keep one path")
    return None
