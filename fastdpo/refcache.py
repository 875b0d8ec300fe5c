"""Reference log-probs computed once, packed and without gradients, cached on disk in chunks, shared by all ranks.

The cache key covers everything the numbers depend on: the reference weights (TRL's hash of the module), the
token ids of every pair (so data and tokenisation), max_length / truncation_mode, ld_alpha, dtype and attention
implementation. Any change makes a new key, never a stale hit.

The pass runs in chunks of about 1% of the pairs (at least 64). Within a chunk the pairs are dealt, longest first,
to the ranks; each computes its share, the shares are exchanged (all-gather), and every node's local main process
writes the chunk (nodes may not share a filesystem) before the next one starts. So a job killed during the pass
resumes from its last complete chunk, and SIGUSR1 (Slurm's time-limit warning) stops every rank at the same chunk
boundary (the flag is all-reduced) with `Preempted`, which train_dpo.py turns into exit 75 and a requeue.
On disk: <cache>/<key>/chunk-NNNNNN.npy (float32 [pairs, 2]), then ref_logps.arrow once all are done, which is
memory-mapped and joined to the dataset as two columns (no Python lists); meta.json holds the key's parts and the
name of the set (train, eval, or an eval set's own name) it was computed for. Each eval set of a dict of named sets
has its own pass and folder (its tokens are in the key), so a rerun or a resume finds every one of them.

A cache never stops training: a truncated or unreadable file is reported with its path, moved aside and
recomputed; a folder that cannot be written gives one warning and the pass runs without saving.

Everything the pass needs comes in a `ReferencePass` (fastdpo.trainer builds it): the model that runs the forwards,
the packing scheme, the token budget, TRL's reference log-prob function; `attach` returns the dataset with the two
columns and the pass's numbers.

The reference is the policy before its first step, so no reference copy is ever loaded (TRL skips it when
precompute_ref_log_probs is on). Under DeepSpeed ZeRO-1/2 the policy still sits unwrapped on the CPU here; it is
moved to this rank's device first, which is where DeepSpeed puts it anyway. Under ZeRO-3 / FSDP2 the weights are
sharded and gathered inside every forward, a collective: with `even_forwards`, a rank with fewer micro-batches in a
chunk than another runs one-token forwards (outputs discarded) until every rank has run the same number.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import trl
import xxhash
from accelerate.utils import gather_object
from datasets import Dataset, concatenate_datasets
from trl.trainer.utils import hash_module

from . import files, frameworks, ranks, watchdog
from .batching import sequence_lengths
from .packing import PackedForward, PackedPreferenceCollator
from .preemption import Preempted, stop_requested

logger = logging.getLogger(__name__)

FORMAT = 2
CHUNKS = 100  # about 1% of the pairs per chunk: what a preemption or a crash can lose
MIN_CHUNK = 64
PROGRESS_SECONDS = 30.0
COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class ReferencePass:
    """What one reference pass runs, and how."""

    model: Any  # runs the forwards: the reference model, the policy, or a DeepSpeed engine around it
    collator: PackedPreferenceCollator  # the packing scheme the start-up probe chose
    token_budget: int  # most tokens of one packed micro-batch
    log_probs: Callable  # (forward, packed inputs) -> (chosen, rejected) sums: TRL's compute_ref_log_probs
    accelerator: Any
    max_length: int | None
    truncation_mode: str = "keep_start"
    ld_alpha: float | None = None
    model_hash: str | None = None  # the weights' hash in the cache key; None: TRL's hash_module of `model`
    even_forwards: bool = False  # sharded weights: every rank runs the same number of forwards


def token_hash(dataset) -> str:
    """Hash of the pairs' token ids straight from Arrow buffers: xxh3 over int32 ids (memory speed: about a second
    per billion tokens from a memory-mapped cache, where int32 buffers are hashed without a copy)."""
    ds = frameworks.flat(dataset)
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
    import deepspeed  # heavy and optional: only under ZeRO-3

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


def cache_key(spec: ReferencePass, dataset) -> tuple[str, dict]:
    model = getattr(spec.model, "module", spec.model)  # a DeepSpeed engine: its dtype and config are the module's
    parts = {
        "format": FORMAT,
        "trl": trl.__version__,
        "model": spec.model_hash or hash_module(model),
        "tokens": token_hash(dataset),
        "max_length": spec.max_length,
        "truncation_mode": spec.truncation_mode,
        "ld_alpha": spec.ld_alpha,
        "dtype": str(next(model.parameters()).dtype),
        "attn": frameworks.attn_implementation(model),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24], parts


def _micro_batches(collator, lengths: np.ndarray, indices: list[int], budget: int) -> list[list[int]]:
    """Pairs longest first, cut into packed micro-batches of at most `budget` tokens."""
    indices = sorted(indices, key=lambda i: -int(lengths[i, :2].sum()))
    batches, cur = [], []
    for i in indices:
        if cur and collator.packed_tokens(lengths[cur + [i]]) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _on(device, inputs: dict) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def _compute_share(spec: ReferencePass, dataset, indices: list[int]) -> tuple[list, dict]:
    """(index, chosen, rejected) for this rank's pairs, in packed micro-batches; with even_forwards, padded with
    one-token forwards to the most micro-batches any rank has."""
    model, collator, device = spec.model, spec.collator, spec.accelerator.device
    lengths = sequence_lengths(dataset, spec.max_length, spec.truncation_mode)
    batches = _micro_batches(collator, lengths, indices, spec.token_budget)
    padding = 0
    if spec.even_forwards:
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
            inputs = _on(device, collator(examples))
            stats["useful"] += int(inputs["attention_mask"].sum())
            stats["computed"] += inputs["packed_input_ids"].numel()
            # TRL's own function: no_grad, autocast, PEFT adapter switching, ld_alpha weighting
            chosen, rejected = spec.log_probs(forward, inputs)
            out.extend(zip(batch, chosen.float().cpu().tolist(), rejected.float().cpu().tolist(), strict=True))
        pad = collator.pad_token_id
        for _ in range(padding):  # the gathers of the other ranks' forwards need this rank's part
            spec.log_probs(forward, _on(device, collator([{"prompt_ids": [pad], "chosen_ids": [pad],
                                                            "rejected_ids": [pad]}])))
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


@dataclass
class _Pass:
    """One pass's place on disk and progress: the values so far, which chunks every rank has, whether to save."""

    name: str
    folder: Path
    pairs: int
    size: int
    values: np.ndarray
    have: np.ndarray
    lead: bool  # this node's local main process: it writes the cache
    save: bool  # the cache folder takes writes (so far)

    @property
    def writes(self) -> bool:
        return self.save and self.lead

    @property
    def chunks(self) -> int:
        return len(self.have)

    def rows(self, c: int) -> int:
        return min(self.size, self.pairs - c * self.size)


def _start(name: str, folder: Path, pairs: int, lead: bool, device) -> _Pass:
    """The chunks saved by an earlier attempt (where every rank has them), or none; warns if nothing can be saved."""
    problem = files.probe_writable(folder) if lead else None
    if problem is not None:
        logger.warning("%s: reference cache folder %s cannot be written (%s): computing without saving, so a "
                       "preempted or failed reference pass starts over; set ref_logps_cache_dir or FASTDPO_CACHE "
                       "to a writable folder", name, folder, problem)
    size = chunk_size(pairs)
    run = _Pass(name, folder, pairs, size, np.zeros((pairs, 2), dtype=np.float32),
                np.zeros(math.ceil(pairs / size), dtype=np.int32), lead, problem is None)
    for c in range(run.chunks):
        saved = _read_chunk(folder / f"chunk-{c:06d}.npy", run.rows(c), lead) if folder.is_dir() else None
        if saved is not None:
            run.values[c * size: c * size + run.rows(c)] = saved
            run.have[c] = 1
    run.have = _all_ranks(run.have, device, dist.ReduceOp.MIN)  # a chunk counts only where every rank has it
    if run.have.any():
        logger.info("%s: resuming the reference pass: %d of %d chunks saved in %s", name, int(run.have.sum()),
                    run.chunks, folder)
    return run


def _save_chunk(run: _Pass, c: int, chunk: np.ndarray) -> None:
    try:
        block = run.values[chunk[0]: chunk[-1] + 1]
        files.write_atomic(run.folder / f"chunk-{c:06d}.npy", lambda p, v=block: np.save(p, v))
    except OSError as e:
        run.save = False
        logger.warning("%s: cannot write the reference cache in %s (%s); going on without saving", run.name,
                       run.folder, e)


def _progress(run: _Pass, c: int, done: int, seconds: float) -> None:
    rate = done / seconds
    left = sum(run.rows(j) for j in range(c + 1, run.chunks) if not run.have[j])
    logger.info("%s: reference log-probs %s pairs done (chunk %d/%d), %.1f pairs/s, eta %s", run.name, f"{done:,}",
                c + 1, run.chunks, rate, time.strftime("%H:%M:%S", time.gmtime(left / rate)))


def _compute(run: _Pass, spec: ReferencePass, dataset) -> tuple[dict, int]:
    """Every chunk no rank had saved, dealt longest first over the ranks, saved as it completes; (numbers, pairs
    computed). Raises Preempted at a chunk boundary when any rank got a signal."""
    acc = spec.accelerator
    lengths = sequence_lengths(dataset, spec.max_length, spec.truncation_mode)[:, :2].sum(axis=1)
    start = last = time.perf_counter()
    stats = {"useful": 0, "computed": 0, "even_padding": 0}
    done = 0
    for c in range(run.chunks):
        chunk = np.arange(c * run.size, min((c + 1) * run.size, run.pairs))
        if run.have[c]:
            continue
        order = chunk[np.argsort(-lengths[chunk], kind="stable")]  # dealt longest first: balanced ranks
        share, st = _compute_share(spec, dataset, order[acc.process_index:: acc.num_processes].tolist())
        for k in stats:
            stats[k] += st[k]
        for i, chosen, rejected in gather_object(share):  # every rank gets every (index, chosen, rejected)
            run.values[i] = (chosen, rejected)
        if run.writes:
            _save_chunk(run, c, chunk)
        done += len(chunk)
        watchdog.beat(f"{run.name}: reference log-probs chunk {c + 1}/{run.chunks}")
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS:
            last = now
            _progress(run, c, done, now - start)
        # All ranks stop at the same chunk boundary if any got SIGUSR1; the chunk above is already saved.
        if _all_ranks(np.array([int(stop_requested())]), acc.device, dist.ReduceOp.MAX)[0] and c + 1 < run.chunks:
            saved_pairs = sum(run.rows(j) for j in range(c + 1)) if run.save else 0
            raise Preempted(f"{run.name}: reference pass stopped after chunk {c + 1}/{run.chunks} ({saved_pairs:,} "
                            f"of {run.pairs:,} pairs saved in {run.folder})")
    return {"seconds": time.perf_counter() - start, **stats}, done


def _write_final(run: _Pass, final: Path) -> None:
    table = pa.table({COLUMNS[0]: run.values[:, 0], COLUMNS[1]: run.values[:, 1]})

    def write(p):
        with pa.OSFile(str(p), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table)

    try:
        files.write_atomic(final, write)
        logger.info("%s: cached reference log-probs at %s", run.name, final)
    except OSError as e:
        logger.warning("%s: cannot write %s (%s); going on without saving", run.name, final, e)


def attach(dataset, name: str, spec: ReferencePass, cache_dir: str | Path | None = None) -> tuple[Dataset, dict]:
    """(`dataset` with ref_chosen_logps / ref_rejected_logps columns, the pass's numbers), from the cache, resumed,
    or computed now. Numbers: cached, seconds; for a computed pass also resumed_chunks, useful and computed tokens,
    even_padding (one-token forwards this rank ran to match the others)."""
    acc = spec.accelerator
    lead = ranks.writes("node")  # writes, and moves bad files aside, for its node
    key, parts = cache_key(spec, dataset)
    folder = (Path(cache_dir) if cache_dir else files.cache_root() / "ref_logps") / key
    pairs, final = len(dataset), folder / "ref_logps.arrow"
    ref = _read_final(final, pairs, lead)
    # Every rank must take the same branch: use the file only if every rank has it.
    if all(gather_object([ref is not None])):
        logger.info("%s: reference log-probs from cache %s", name, final)
        return _with_columns(dataset, ref), {"cached": True, "seconds": 0.0}
    run = _start(name, folder, pairs, lead, acc.device)
    if run.writes and not (folder / "meta.json").exists():
        # `name`: the set it was first computed for, for someone reading the cache (the key is the content)
        (folder / "meta.json").write_text(json.dumps({"name": name, "parts": parts, "pairs": pairs,
                                                      "chunk": run.size}, indent=1))
    numbers, done = _compute(run, spec, dataset)
    stats = {"cached": False, "seconds": numbers.pop("seconds"), "resumed_chunks": int(run.have.sum()), **numbers}
    logger.info("%s: reference log-probs for %d pairs in %.1fs (packed, %d ranks, padding efficiency %.3f%s%s)",
                name, done, stats["seconds"], acc.num_processes, stats["useful"] / max(stats["computed"], 1),
                f", {int(run.have.sum())} chunks resumed" if run.have.any() else "",
                f", {stats['even_padding']} one-token forwards on this rank to match the other ranks' count"
                if stats["even_padding"] else "")
    if run.writes:
        _write_final(run, final)
    acc.wait_for_everyone()
    ref = _read_final(final, pairs, False)  # memory-mapped where this node has the file
    if ref is None:  # nothing saved on this node: the two columns in memory (8 bytes a pair)
        ref = Dataset.from_dict({COLUMNS[0]: run.values[:, 0], COLUMNS[1]: run.values[:, 1]})
    return _with_columns(dataset, ref), stats
