"""Reference log-probs computed once, packed and without gradients, cached on disk, shared by all ranks.

The cache key covers everything the numbers depend on: the reference weights (TRL's hash of the module), the
token ids of every pair (so data and tokenisation), max_length / truncation_mode, ld_alpha, dtype and attention
implementation. A later run with the same key loads the file instead of running the reference model; any change
makes a new key, never a stale hit. Ranks split the pairs, compute their share, and exchange results
(all-gather); every node's local main process writes the file (nodes may not share a filesystem).

The reference is the policy before its first step, so no reference copy is ever loaded (TRL skips it when
precompute_ref_log_probs is on). Under DeepSpeed ZeRO-1/2 the policy still sits unwrapped on the CPU here;
it is moved to this rank's device first, which is where DeepSpeed puts it anyway (older TRL failed on exactly
that cpu-vs-cuda mismatch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import trl
from accelerate.utils import gather_object
from trl.trainer.utils import hash_module

from .batching import sequence_lengths
from .packing import PackedForward

logger = logging.getLogger(__name__)

DEFAULT_DIR = Path(os.environ.get("FASTDPO_CACHE", Path.home() / ".cache" / "fastdpo")) / "ref_logps"
FORMAT = 1


def token_hash(dataset) -> str:
    """Hash of the pairs' token ids straight from Arrow buffers (seconds for millions of tokens)."""
    ds = dataset.flatten_indices() if getattr(dataset, "_indices", None) is not None else dataset
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(ds)).encode())
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for chunk in ds.data.column(name).chunks:
            offsets = chunk.offsets.to_numpy()
            h.update((offsets - offsets[0]).tobytes())
            h.update(chunk.flatten().to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def cache_key(trainer, dataset) -> tuple[str, dict]:
    model = trainer.ref_model or trainer.model
    args = trainer.args
    parts = {
        "format": FORMAT,
        "trl": trl.__version__,
        "model": trainer._precompute_model_hash or hash_module(model),
        "tokens": token_hash(dataset),
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "ld_alpha": args.ld_alpha,
        "dtype": str(next(model.parameters()).dtype),
        "attn": getattr(model.config, "_attn_implementation", None),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], parts


def _compute_share(trainer, dataset, indices: list[int], budget: int) -> tuple[list, dict]:
    """(index, chosen, rejected) for this rank's pairs, longest first, packed micro-batches up to `budget` tokens."""
    collator = trainer._packed_collator
    lengths = sequence_lengths(dataset, trainer.args.max_length, trainer.args.truncation_mode)
    indices = sorted(indices, key=lambda i: -int(lengths[i, :2].sum()))
    batches, cur = [], []
    for i in indices:
        if cur and collator.packed_tokens(lengths[cur + [i]]) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    model = trainer.ref_model or trainer.model
    device = trainer.accelerator.device
    if next(model.parameters()).device != device:
        model.to(device)
    forward = PackedForward(model)
    out, stats = [], {"useful": 0, "computed": 0}
    was_training = model.training
    model.eval()  # dropout is off either way (TRL disables it); eval keeps any other train-only behaviour out
    try:
        for batch in batches:
            rows = dataset[batch]
            examples = [{k: rows[k][j] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                        for j in range(len(batch))]
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(examples).items()}
            stats["useful"] += int(inputs["attention_mask"].sum())
            stats["computed"] += inputs["packed_input_ids"].numel()
            # TRL's own function: no_grad, autocast, PEFT adapter switching, ld_alpha weighting
            chosen, rejected = trainer.compute_ref_log_probs(forward, inputs)
            out.extend(zip(batch, chosen.float().cpu().tolist(), rejected.float().cpu().tolist()))
    finally:
        model.train(was_training)
    return out, stats


def attach(trainer, dataset, name: str, cache_dir: str | Path | None = None):
    """`dataset` with ref_chosen_logps / ref_rejected_logps columns, from the cache or computed now."""
    acc = trainer.accelerator
    key, parts = cache_key(trainer, dataset)
    cache_dir = Path(cache_dir or DEFAULT_DIR)
    path = cache_dir / f"{key}.pt"
    # Every rank must take the same branch: load only if every rank sees the file.
    if all(gather_object([path.is_file()])):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if len(saved["chosen"]) == len(dataset):
            logger.info("%s: reference log-probs from cache %s", name, path)
            trainer._ref_precompute_stats = {"cached": True, "seconds": 0.0}
            return _with_columns(dataset, saved["chosen"], saved["rejected"])
        logger.warning("%s: cache %s has %d pairs, dataset %d; recomputing", name, path, len(saved["chosen"]),
                       len(dataset))
    start = time.perf_counter()
    mine = list(range(acc.process_index, len(dataset), acc.num_processes))
    budget = trainer._ref_token_budget
    share, stats = _compute_share(trainer, dataset, mine, budget)
    rows = gather_object(share)  # every rank gets every (index, chosen, rejected)
    chosen = torch.empty(len(dataset), dtype=torch.float32)
    rejected = torch.empty(len(dataset), dtype=torch.float32)
    seen = torch.zeros(len(dataset), dtype=torch.bool)
    for i, c, r in rows:
        chosen[i], rejected[i], seen[i] = c, r, True
    if not bool(seen.all()):
        raise RuntimeError(f"{name}: reference log-probs missing for {int((~seen).sum())} pairs after all-gather")
    seconds = time.perf_counter() - start
    trainer._ref_precompute_stats = {"cached": False, "seconds": seconds, **stats}
    logger.info("%s: reference log-probs for %d pairs in %.1fs (packed, %d ranks, padding efficiency %.3f)",
                name, len(dataset), seconds, acc.num_processes, stats["useful"] / max(stats["computed"], 1))
    if acc.is_local_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"chosen": chosen, "rejected": rejected, "key": parts}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        logger.info("%s: cached reference log-probs at %s", name, path)
    acc.wait_for_everyone()
    return _with_columns(dataset, chosen, rejected)


def _with_columns(dataset, chosen: torch.Tensor, rejected: torch.Tensor):
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        if col in dataset.column_names:
            dataset = dataset.remove_columns(col)
    dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
    return dataset.add_column("ref_rejected_logps", rejected.tolist())
