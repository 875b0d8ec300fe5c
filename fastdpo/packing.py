"""Padding-free DPO: the chosen and rejected sequences of a micro-batch packed into rows, no padding between them.

How it stays the same math as TRL's padded path:
  * position_ids restart at 0 for every sequence and no attention_mask is passed, so transformers builds a
    block-diagonal causal mask (use_cache=False; TRL's fused LM head sets it): no token sees another sequence.
  * the first token of every sequence gets label -100, so it is never predicted from the previous sequence's last
    token (in the padded layout the first token has no predecessor either).
  * per-token outputs are gathered back into TRL's padded [chosen..., rejected...] layout (`unpack_index`), so
    TRL's own `_compute_loss` turns them into per-sequence log-probs, losses and metrics, unchanged.
The padded view (input_ids, attention_mask, completion_mask) is built by TRL's own DataCollatorForPreference,
so truncation and completion masks are TRL's by construction. tests/test_parity.py checks it numerically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from . import segattn

# Attention implementations that turn restarting position_ids into a block-diagonal mask in transformers 5.23.
# Flash and flex handle one long row natively (varlen); sdpa and eager build a dense row x row mask, so their rows
# are capped (see `row_capacity`).
PACKING_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3", "flex_attention"}
# Losses that couple the pairs of a micro-batch (sorting, or a token mean over the whole batch): token-budget
# micro-batches group pairs differently from TRL's fixed-size ones, so these keep the stock path.
BATCH_COUPLED_LOSSES = {"aot", "aot_unpaired", "sft"}


def plan_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Assign sequences (by index) to rows of at most `capacity` tokens, balancing rows to minimise row padding.

    capacity None = one row (varlen attention pays nothing for a long row). Otherwise the fewest rows that fit,
    filled longest-first into the emptiest row; a row that overflows adds a row and retries.
    """
    if not lengths:
        return []
    if capacity is None or sum(lengths) <= capacity:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n_rows = max(1, math.ceil(sum(lengths) / capacity))
    while True:
        rows: list[list[int]] = [[] for _ in range(n_rows)]
        load = [0] * n_rows
        for i in order:
            r = min(range(n_rows), key=load.__getitem__)
            rows[r].append(i)
            load[r] += lengths[i]
        if max(load) <= max(capacity, lengths[order[0]]):
            return rows
        n_rows += 1


def computed_tokens(lengths: list[int], capacity: int | None) -> int:
    """Tokens the packed forward computes, row padding included: rows x longest row."""
    rows = plan_rows(lengths, capacity)
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows) if rows else 0


def pair_lengths(example: dict, max_length: int | None) -> tuple[int, int]:
    """Lengths of the chosen and rejected sequences after the collator's truncation."""
    p = len(example["prompt_ids"])
    c, r = p + len(example["chosen_ids"]), p + len(example["rejected_ids"])
    return (c, r) if max_length is None else (min(c, max_length), min(r, max_length))


@dataclass
class PackedPreferenceCollator:
    """Pairs -> one packed micro-batch, plus TRL's padded view of the same pairs (small int tensors) for the loss.

    Keys: input_ids / attention_mask / completion_mask (TRL's padded view, never run through the model),
    packed_input_ids / packed_position_ids / packed_labels ([rows, T], what the model runs), unpack_index
    (padded per-token position -> packed position), loss_weight (sum of the pairs' weights in the optimizer step;
    1.0 per pair for eval), ref_chosen_logps / ref_rejected_logps when the dataset carries them.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    row_capacity: int | None = None

    def __post_init__(self):
        self._padded = DataCollatorForPreference(
            pad_token_id=self.pad_token_id, max_length=self.max_length, truncation_mode=self.truncation_mode
        )

    def __call__(self, examples: list[dict], weight: float | None = None) -> dict:
        out = self._padded(examples)  # exactly what stock TRL would build for these pairs
        mask = out["attention_mask"]
        lengths = mask.sum(dim=1).tolist()  # [chosen..., rejected...]; right-padded, so a prefix of each row
        rows = plan_rows(lengths, self.row_capacity)
        width = max(sum(lengths[s] for s in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=out["input_ids"].dtype)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        # Packed position of each token of the padded layout's shifted (predicted-token) grid; the sentinel
        # rows*(width-1) points at an appended zero, like the zeros the fused head returns for unscored tokens.
        n_seq, seq_width = out["input_ids"].shape
        sentinel = len(rows) * (width - 1)
        unpack = torch.full((n_seq, max(seq_width - 1, 0)), sentinel, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for s in row:
                n = lengths[s]
                seq = out["input_ids"][s, :n]
                ids[r, start:start + n] = seq
                pos[r, start:start + n] = torch.arange(n)
                lab = seq.masked_fill(out["completion_mask"][s, :n] == 0, -100)
                lab[0] = -100  # never predicted from the previous sequence's last token
                labels[r, start:start + n] = lab
                # token u+1 of sequence s is predicted at shifted packed index r*(width-1) + start + u
                unpack[s, : n - 1] = r * (width - 1) + start + torch.arange(n - 1)
                start += n
            if start < width:
                # Row padding is its own sequence (positions restart), after every real token: nothing attends to it.
                pos[r, start:] = torch.arange(width - start)
        out["packed_input_ids"] = ids
        out["packed_position_ids"] = pos
        out["packed_labels"] = labels
        out["unpack_index"] = unpack
        out["loss_weight"] = torch.tensor(float(len(examples)) if weight is None else weight)
        return out


def unpack_outputs(outputs, unpack_index: torch.Tensor) -> SimpleNamespace:
    """Fused-head outputs of a packed forward -> the padded [2n, L-1] layout TRL's loss code indexes."""

    def gather(x):
        if x is None:
            return None
        flat = torch.cat([x.reshape(-1), x.new_zeros(1)])  # differentiable; zero for unscored positions
        return flat[unpack_index.to(flat.device)]

    fields = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    return SimpleNamespace(**{f: gather(getattr(outputs, f, None)) for f in fields},
                           loss=outputs.loss, aux_loss=getattr(outputs, "aux_loss", None))


def segment_kwargs(model, position_ids: torch.Tensor) -> dict:
    """sdpa only: per-sequence causal attention instead of the dense block mask (fastdpo.segattn, same math)."""
    base = getattr(model, "module", model)  # DDP / DeepSpeed wrappers
    if getattr(getattr(base, "config", None), "_attn_implementation", None) != "sdpa" or not segattn.install():
        return {}
    return {segattn.SEGMENTS_KWARG: segattn.segments_from_position_ids(position_ids).to(position_ids.device)}


class PackedForward:
    """Stands in for the model inside TRL's `_compute_loss` / `compute_ref_log_probs`.

    TRL calls `model(input_ids, attention_mask, ..., labels=..., fused_lm_head=True)` with the padded view; this runs
    the packed rows instead (through the wrapped DDP / DeepSpeed module, so gradient hooks fire as usual) and hands
    back per-token outputs in the padded layout. Non-fused calls (logits for compute_metrics) run the padded view.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, packed_input_ids=None,
                 packed_position_ids=None, packed_labels=None, unpack_index=None, loss_weight=None, use_cache=False,
                 **kwargs):
        if not fused_lm_head:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        kwargs.update(segment_kwargs(self.model, packed_position_ids))
        out = self.model(input_ids=packed_input_ids, position_ids=packed_position_ids, labels=packed_labels,
                         fused_lm_head=True, use_cache=False, **kwargs)
        return unpack_outputs(out, unpack_index)


@torch.no_grad()
def check_packed_attention(model, row_capacity: int | None) -> float:
    """Largest |log-prob| gap between sequences run alone and the same sequences packed.

    Run once on the real model before training: a model whose attention ignores restarting position_ids (or that
    adds its own mask logic) shows a gap here and keeps the stock path.
    """
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 5, 6]
    seqs = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    cap = None if row_capacity is None else min(row_capacity, 12)  # forces two rows when rows are capped
    rows = plan_rows(lengths, cap)
    width = max(sum(lengths[s] for s in row) for row in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros_like(ids)
    where = {}
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            ids[r, start:start + lengths[s]] = seqs[s]
            pos[r, start:start + lengths[s]] = torch.arange(lengths[s])
            where[s] = (r, start)
            start += lengths[s]
        pos[r, start:] = torch.arange(width - start)
    was_training = model.training
    model.eval()
    try:
        pos = pos.to(device)
        packed = model(input_ids=ids.to(device), position_ids=pos, use_cache=False,
                       **segment_kwargs(model, pos)).logits.float()
        packed = packed.log_softmax(-1)
        gap = 0.0
        for s, seq in enumerate(seqs):
            alone = model(input_ids=seq[None].to(device), use_cache=False).logits.float().log_softmax(-1)[0]
            r, start = where[s]
            gap = max(gap, (packed[r, start:start + len(seq)] - alone).abs().max().item())
    finally:
        model.train(was_training)
    return gap
