"""Reference log-probs computed once, packed and without gradients, cached on disk in chunks, shared by all ranks.

The cache key covers everything the numbers depend on: the reference weights (TRL's hash of the module), the
token ids of every pair (so data and tokenisation), max_length / truncation_mode, ld_alpha, dtype and attention
implementation. Any change makes a new key, never a stale hit.

The pass runs in chunks of about 1% of the pairs (at least 64). Within a chunk the pairs are dealt, longest first,
to the ranks; each computes its share, the shares are exchanged (all-gather), and every node's local main process
writes the chunk (nodes may not share a filesystem) before the next one starts. So a job killed during the pass
resumes from its last complete chunk, and SIGUSR1 (Slurm's time-limit warning) stops every rank at the same chunk
boundary (the flag is all-reduced) with `Preempted`, which train_dpo.py turns into exit 75 and a requeue.
Layout: <cache>/<key>/chunk-NNNNNN.npy (float32 [pairs, 2]), then ref_logps.arrow once all are done, which is
memory-mapped and joined to the dataset as two columns (no Python lists).

A cache never stops training: a truncated or unreadable file is reported with its path, moved aside and
recomputed; a folder that cannot be written gives one warning and the pass runs without saving.

The reference is the policy before its first step, so no reference copy is ever loaded (TRL skips it when
precompute_ref_log_probs is on). Under DeepSpeed ZeRO-1/2 the policy still sits unwrapped on the CPU here;
it is moved to this rank's device first, which is where DeepSpeed puts it anyway (older TRL failed on exactly
that cpu-vs-cuda mismatch). Under ZeRO-3 / FSDP2 the weights are sharded and gathered inside every forward, a
collective: the trainer passes the sharded module (`model`) and `even_forwards`, and a rank with fewer micro-batches
in a chunk than another runs one-token forwards (outputs discarded) until every rank has run the same number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import trl
from accelerate.utils import gather_object
from datasets import Dataset, concatenate_datasets
from trl.trainer.utils import hash_module

from . import files, ranks, watchdog
from .batching import sequence_lengths
from .packing import PackedForward
from .preemption import Preempted, stop_requested

logger = logging.getLogger(__name__)

FORMAT = 2
CHUNKS = 100  # about 1% of the pairs per chunk: what a preemption or a crash can lose
MIN_CHUNK = 64
PROGRESS_SECONDS = 30.0
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def token_hash(dataset) -> str:
    """Hash of the pairs' token ids straight from Arrow buffers: xxh3 over int32 ids (memory speed: about a second
    per billion tokens from a memory-mapped cache, where int32 buffers are hashed without a copy)."""
    import xxhash

    ds = dataset.flatten_indices() if getattr(dataset, "_indices", None) is not None else dataset
    h = xxhash.xxh3_128()
    h.update(str(len(ds)).encode())
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for chunk in ds.data.column(name).chunks:
            offsets = chunk.offsets.to_numpy()
            h.update((offsets - offsets[0]).astype(np.int64).tobytes())
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            h.update(values if values.dtype == np.int32 else values.astype(np.int32))
    return h.hexdigest()


def sharded_module_hash(model) -> str:
    """The weights' hash when ZeRO-3 has partitioned them (each parameter has 0 elements on its rank, so TRL's
    `hash_module` would hash nothing and every model of one architecture would share a cache entry): each parameter
    gathered alone (never the whole model on one rank), the same bytes hashed on every rank. Collective."""
    import deepspeed
    import xxhash

    h = xxhash.xxh3_128()
    for name, p in sorted(model.named_parameters()):
        with deepspeed.zero.GatheredParameters([p]):
            h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
            t = p.detach().cpu()
            h.update((t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy().tobytes())
    for name, b in sorted(model.named_buffers()):
        h.update(f"{name}:{b.dtype}".encode())
        h.update(b.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def cache_key(trainer, dataset, model=None) -> tuple[str, dict]:
    model = model or trainer.ref_model or trainer.model
    model = getattr(model, "module", model)  # a DeepSpeed engine: its dtype and config are the module's
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


def _compute_share(trainer, dataset, indices: list[int], budget: int, model,
                   even_forwards: bool = False) -> tuple[list, dict]:
    """(index, chosen, rejected) for this rank's pairs, longest first, packed micro-batches up to `budget` tokens.
    even_forwards (sharded weights): pad with one-token forwards to the most micro-batches any rank has."""
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
    device = trainer.accelerator.device
    padding = 0
    if even_forwards:
        padding = int(_all_ranks(np.array([len(batches)]), device, dist.ReduceOp.MAX)[0]) - len(batches)
    elif next(model.parameters()).device != device:
        model.to(device)
    forward = PackedForward(model)
    out, stats = [], {"useful": 0, "computed": 0, "even_padding": padding}
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
            out.extend(zip(batch, chosen.float().cpu().tolist(), rejected.float().cpu().tolist(), strict=True))
        pad = trainer._packed_collator.pad_token_id
        for _ in range(padding):  # the gathers of the other ranks' forwards need this rank's part
            dummy = collator([{"prompt_ids": [pad], "chosen_ids": [pad], "rejected_ids": [pad]}])
            trainer.compute_ref_log_probs(forward, {k: v.to(device) if torch.is_tensor(v) else v
                                                    for k, v in dummy.items()})
    finally:
        model.train(was_training)
    return out, stats


def chunk_size(pairs: int) -> int:
    return max(MIN_CHUNK, math.ceil(pairs / CHUNKS))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_ranks(flags: np.ndarray, device, op) -> np.ndarray:
    """Elementwise MIN (every rank has it) or MAX (some rank has it) of an int array over the ranks."""
    if not _distributed():
        return flags
    t = torch.tensor(flags.astype(np.int32), device=device)
    dist.all_reduce(t, op=op)
    return t.cpu().numpy()


def _bad(path: Path, problem: str, repair: bool) -> None:
    """Report a cache file that cannot be used, with its path, and (local main process) move it aside."""
    if not repair:
        return
    failed = files.move_aside(path)
    logger.warning("reference cache %s: %s; %s, recomputing", path, problem, failed or "moved aside")


def _read_final(path: Path, pairs: int, repair: bool) -> Dataset | None:
    if not path.exists():
        return None
    try:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        if table.column_names != list(COLUMNS) or table.num_rows != pairs:
            raise ValueError(f"holds {table.num_rows} rows of {table.column_names}, expected {pairs} of "
                             f"{list(COLUMNS)}")
        return Dataset.from_file(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:
        _bad(path, f"unreadable ({type(e).__name__}: {e})", repair)
        return None


def _read_chunk(path: Path, rows: int, repair: bool) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.shape != (rows, 2) or arr.dtype != np.float32:
            raise ValueError(f"shape {arr.shape} {arr.dtype}, expected ({rows}, 2) float32")
        return np.array(arr)
    except (OSError, ValueError, EOFError) as e:
        _bad(path, f"unreadable ({type(e).__name__}: {e})", repair)
        return None


def _with_columns(dataset, ref: Dataset):
    keep = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
    return concatenate_datasets([keep, ref], axis=1)


def attach(trainer, dataset, name: str, cache_dir: str | Path | None = None, model=None,
           even_forwards: bool = False):
    """`dataset` with ref_chosen_logps / ref_rejected_logps columns, from the cache, resumed, or computed now.
    model: what runs the reference forwards (default the trainer's reference model, else the policy);
    even_forwards: every rank must run the same number of forwards (sharded weights)."""
    acc = trainer.accelerator
    model = model or trainer.ref_model or trainer.model
    lead = ranks.writes("node")  # writes, and moves bad files aside, for its node
    key, parts = cache_key(trainer, dataset, model)
    folder = (Path(cache_dir) if cache_dir else files.cache_root() / "ref_logps") / key
    pairs = len(dataset)
    final = folder / "ref_logps.arrow"
    ref = _read_final(final, pairs, lead)
    # Every rank must take the same branch: use the file only if every rank has it.
    if all(gather_object([ref is not None])):
        logger.info("%s: reference log-probs from cache %s", name, final)
        trainer._ref_precompute_stats = {"cached": True, "seconds": 0.0}
        return _with_columns(dataset, ref)

    problem = files.probe_writable(folder) if lead else None
    save = problem is None
    if not save:
        logger.warning("%s: reference cache folder %s cannot be written (%s): computing without saving, so a "
                       "preempted or failed reference pass starts over; set ref_logps_cache_dir or FASTDPO_CACHE "
                       "to a writable folder", name, folder, problem)
    size = chunk_size(pairs)
    n_chunks = math.ceil(pairs / size)
    values = np.zeros((pairs, 2), dtype=np.float32)
    have = np.zeros(n_chunks, dtype=np.int32)
    for c in range(n_chunks):
        rows = min(size, pairs - c * size)
        saved = _read_chunk(folder / f"chunk-{c:06d}.npy", rows, lead) if folder.is_dir() else None
        if saved is not None:
            values[c * size: c * size + rows] = saved
            have[c] = 1
    have = _all_ranks(have, acc.device, dist.ReduceOp.MIN)  # a chunk counts only where every rank has it
    if have.any():
        logger.info("%s: resuming the reference pass: %d of %d chunks saved in %s", name, int(have.sum()), n_chunks,
                    folder)
    if save and lead and not (folder / "meta.json").exists():
        (folder / "meta.json").write_text(json.dumps({"parts": parts, "pairs": pairs, "chunk": size}, indent=1))

    lengths = sequence_lengths(dataset, trainer.args.max_length, trainer.args.truncation_mode)[:, :2].sum(axis=1)
    budget = trainer._ref_token_budget
    start = last = time.perf_counter()
    stats = {"useful": 0, "computed": 0, "even_padding": 0}
    done = 0
    for c in range(n_chunks):
        chunk = np.arange(c * size, min((c + 1) * size, pairs))
        if have[c]:
            continue
        order = chunk[np.argsort(-lengths[chunk], kind="stable")]  # dealt longest first: balanced ranks
        share, st = _compute_share(trainer, dataset, order[acc.process_index:: acc.num_processes].tolist(), budget,
                                   model, even_forwards)
        for k in stats:
            stats[k] += st[k]
        for i, chosen, rejected in gather_object(share):  # every rank gets every (index, chosen, rejected)
            values[i] = (chosen, rejected)
        if save and lead:
            try:
                block = values[chunk[0]: chunk[-1] + 1]
                files.write_atomic(folder / f"chunk-{c:06d}.npy", lambda p, v=block: np.save(p, v))
            except OSError as e:
                save = False
                logger.warning("%s: cannot write the reference cache in %s (%s); going on without saving", name,
                               folder, e)
        done += len(chunk)
        watchdog.beat(f"{name}: reference log-probs chunk {c + 1}/{n_chunks}")
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS:
            last = now
            rate = done / (now - start)
            left = sum(min(size, pairs - j * size) for j in range(c + 1, n_chunks) if not have[j])
            logger.info("%s: reference log-probs %s pairs done (chunk %d/%d), %.1f pairs/s, eta %s", name,
                        f"{done:,}", c + 1, n_chunks, rate, time.strftime("%H:%M:%S", time.gmtime(left / rate)))
        # All ranks stop at the same chunk boundary if any got SIGUSR1; the chunk above is already saved.
        if _all_ranks(np.array([int(stop_requested())]), acc.device, dist.ReduceOp.MAX)[0] and c + 1 < n_chunks:
            saved_pairs = sum(min(size, pairs - j * size) for j in range(c + 1)) if save else 0
            raise Preempted(f"{name}: reference pass stopped after chunk {c + 1}/{n_chunks} ({saved_pairs:,} of "
                            f"{pairs:,} pairs saved in {folder})")
    seconds = time.perf_counter() - start
    trainer._ref_precompute_stats = {"cached": False, "seconds": seconds, "resumed_chunks": int(have.sum()), **stats}
    logger.info("%s: reference log-probs for %d pairs in %.1fs (packed, %d ranks, padding efficiency %.3f%s%s)",
                name, done, seconds, acc.num_processes, stats["useful"] / max(stats["computed"], 1),
                f", {int(have.sum())} chunks resumed" if have.any() else "",
                f", {stats['even_padding']} one-token forwards on this rank to match the other ranks' count"
                if stats["even_padding"] else "")
    table = pa.table({COLUMNS[0]: values[:, 0], COLUMNS[1]: values[:, 1]})
    if save and lead:
        try:
            def write(p):
                with pa.OSFile(str(p), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
                    w.write_table(table)
            files.write_atomic(final, write)
            logger.info("%s: cached reference log-probs at %s", name, final)
        except OSError as e:
            logger.warning("%s: cannot write %s (%s); going on without saving", name, final, e)
    acc.wait_for_everyone()
    ref = _read_final(final, pairs, False)  # memory-mapped where this node has the file
    if ref is None:  # nothing saved on this node: the two columns in memory (8 bytes a pair)
        ref = Dataset.from_dict({COLUMNS[0]: values[:, 0], COLUMNS[1]: values[:, 1]})
    return _with_columns(dataset, ref)
