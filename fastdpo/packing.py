"""Padding-free DPO: the sequences of a micro-batch packed into rows, no padding between them, the prompt shared.

How it stays the same math as TRL's padded path:
  * every sequence attends to itself only (fastdpo.segattn per sequence, or transformers' block-diagonal mask from
    position_ids that restart at 0 with no attention_mask), with each layer's own masking (sliding windows);
  * the first token of every sequence gets label -100, so it is never predicted from the previous sequence's last
    token (in the padded batch the first token has no predecessor either);
  * per-token outputs are gathered back into TRL's padded [chosen..., rejected...] grid (`unpack_index`), so TRL's
    own `_compute_loss` turns them into per-sequence log-probs, losses and metrics, unchanged.

A packing scheme is one way of laying sequences into rows and running their attention: a `PackedPreferenceCollator`
with its mode ("dense": the model's own mask; "segments": fastdpo.segattn per sequence; "varlen": one varlen kernel
call a layer) and whether the prompt is shared. The trainer tries them fastest first; the start-up probe keeps the
first that is exact on the model (fastdpo.probe).

Prefix sharing (mode "segments" with share_prefix): a pair runs as one unit [chosen sequence | x | rejected tail].
The chosen sequence and the rejected one agree on their first s tokens (the prompt, and any identical start of
the answers); the rejected tail is the rejected sequence from token s on, preceded by x, a copy of token s-1 at
position s-1. x sees the shared tokens and itself, exactly as token s-1 does, so its output is that token's output,
scored against the rejected token s instead of the chosen one. Rejected tokens take positions s, s+1, ... and attend
to the shared tokens and the tail, never to the chosen tokens. Each shared position predicts the same next token in
both sequences, so the padded rejected grid reads those log-probs from the chosen sequence. Token costs: Lc + Lr - s
+ 1 instead of Lc + Lr.

The padded view (input_ids, attention_mask, completion_mask) is built by TRL's own DataCollatorForPreference, so
truncation and completion masks are TRL's by construction. tests/parity/ checks it numerically, per model
family; `probe` checks it on the real model before training.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference

from . import frameworks, segattn

logger = logging.getLogger("fastdpo")

# Attention implementations that turn restarting position_ids into a block-diagonal mask in transformers 5.23.
# Flash and flex handle one long row natively (varlen); sdpa and eager build a dense row x row mask, so their rows
# are capped in "dense" mode (see `row_capacity`). sdpa alone runs fastdpo.segattn ("segments" mode).
PACKING_ATTENTION = {"sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"}
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3", "flex_attention"}
# Losses that couple the pairs of a micro-batch (sorting, or a token mean over the whole batch): token-budget
# micro-batches group pairs differently from TRL's fixed-size ones, so these keep the stock path.
BATCH_COUPLED_LOSSES = {"aot", "aot_unpaired", "sft"}


def plan_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Assign units (by index) to rows of at most `capacity` tokens, balancing rows to minimise row padding.

    capacity None = one row (per-sequence or varlen attention pays nothing for a long row). Otherwise the fewest
    rows that fit, filled longest-first into the emptiest row; a row that overflows adds a row and retries.
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


def unit_lengths(lengths: np.ndarray, share_prefix: bool) -> list[int]:
    """Packed units of pairs given [k, 3] (chosen length, rejected length, shared prefix): one unit per pair when
    sharing (Lc + Lr - s + 1, or Lc when the rejected sequence is a prefix of the chosen one), else two sequences."""
    if not share_prefix:
        return lengths[:, :2].reshape(-1).tolist()
    out = []
    for lc, lr, s in lengths.tolist():
        out.append(lc + lr if s == 0 else lc if s >= lr else lc + lr - s + 1)
    return out


def pair_lengths(example: dict, max_length: int | None) -> tuple[int, int]:
    """Lengths of the chosen and rejected sequences after the collator's truncation."""
    p = len(example["prompt_ids"])
    c, r = p + len(example["chosen_ids"]), p + len(example["rejected_ids"])
    return (c, r) if max_length is None else (min(c, max_length), min(r, max_length))


def _shared_prefix(ids: torch.Tensor, comp: torch.Tensor, a: int, b: int, n: int) -> int:
    """Leading tokens sequences a and b have in common (same ids, same completion mask), within their first n."""
    same = (ids[a, :n] == ids[b, :n]) & (comp[a, :n] == comp[b, :n])
    return int(same.cumprod(0).sum())


@dataclass
class PackedPreferenceCollator:
    """Pairs -> one packed micro-batch, plus TRL's padded view of the same pairs (small int tensors) for the loss.

    mode "dense": sequences in rows of at most `row_capacity` tokens, the model builds its own masks (any attention
    implementation in PACKING_ATTENTION). mode "segments" (sdpa only): fastdpo.segattn runs each sequence's attention,
    no dense mask is built, rows are unbounded and, with share_prefix, each pair is one unit. mode "varlen": the same
    units, attention as one varlen kernel call per layer (`varlen_kernel` "torch": torch's varlen_attn, CUDA;
    "reference": its definition in plain sdpa, for CPU tests), causal masks aligned as `varlen_align` (what
    `segattn.check_torch_varlen` measured on this GPU).

    Keys: input_ids / attention_mask / completion_mask (TRL's padded view, never run through the model),
    packed_input_ids / packed_position_ids / packed_labels ([rows, T], what the model runs), packed_segments (where
    each sequence's tokens sit, for its attention), packed_token_weight ([rows, T]: how many padded-path tokens each
    packed token stands for, for the MoE load-balancing loss), unpack_index (padded per-token position -> packed
    position), loss_weight (sum of the pairs' weights in the optimizer step; 1.0 per pair for eval),
    ref_chosen_logps / ref_rejected_logps when the dataset carries them.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    row_capacity: int | None = None
    mode: str = "dense"
    share_prefix: bool = False
    varlen_kernel: str = "torch"
    varlen_align: str = "bottom_right"

    def __post_init__(self):
        if self.mode not in ("dense", "segments", "varlen"):
            raise ValueError(f"mode {self.mode!r}: expected 'dense', 'segments' or 'varlen'")
        if self.share_prefix and self.mode == "dense":
            raise ValueError("prefix sharing needs the per-sequence attention (mode 'segments' or 'varlen')")
        self._padded = DataCollatorForPreference(
            pad_token_id=self.pad_token_id, max_length=self.max_length, truncation_mode=self.truncation_mode
        )

    def packed_tokens(self, lengths: np.ndarray) -> int:
        """Tokens the packed forward computes for pairs with [k, 3] lengths (see batching.sequence_lengths)."""
        return computed_tokens(unit_lengths(lengths, self.share_prefix), self.row_capacity)

    def __call__(self, examples: list[dict], weight: float | None = None) -> dict:
        out = self._padded(examples)  # exactly what stock TRL would build for these pairs
        ids, comp = out["input_ids"], out["completion_mask"]
        n = len(examples)
        lengths = out["attention_mask"].sum(dim=1).tolist()  # [chosen..., rejected...]; right-padded
        # A unit is (sequence, rejected, s): a sequence alone (rejected None), or a chosen sequence with the rejected
        # one of its pair, which shares its first s tokens.
        units = []
        for i in range(n):
            s = _shared_prefix(ids, comp, i, n + i, min(lengths[i], lengths[n + i])) if self.share_prefix else 0
            units += [(i, n + i, s)] if s else [(i, None, 0), (n + i, None, 0)]
        sizes = [lengths[c] + (0 if r is None or s >= lengths[r] else lengths[r] - s + 1) for c, r, s in units]
        rows = plan_rows(sizes, self.row_capacity)
        packed = _Rows.empty(ids, comp, lengths, len(rows), max(sum(sizes[u] for u in row) for row in rows),
                             self.pad_token_id)
        for row_i, row in enumerate(rows):
            start = 0
            for u in row:
                packed.place(units[u], row_i, start)
                start += sizes[u]
            packed.pad(row_i, start)
        R, width = len(rows), packed.width
        out["packed_input_ids"] = packed.ids
        out["packed_position_ids"] = packed.pos
        out["packed_labels"] = packed.labels
        out["packed_segments"] = (
            segattn.build_varlen(packed.specs, R, width, self.varlen_kernel, self.varlen_align)
            if self.mode == "varlen" else segattn.build_segments(packed.specs, R, width, self.mode))
        out["packed_token_weight"] = packed.token_weight
        out["unpack_index"] = packed.unpack
        out["loss_weight"] = torch.tensor(float(n) if weight is None else weight)
        return out


@dataclass
class _Rows:
    """Packed rows being filled from TRL's padded view (`padded` ids, `comp` its completion mask, `lengths` its
    sequence lengths): token ids, positions, labels, token weights, where each padded-grid token went, and the
    segments fastdpo.segattn runs ((pieces, owned_from) each)."""

    padded: torch.Tensor
    comp: torch.Tensor
    lengths: list[int]
    width: int
    ids: torch.Tensor
    pos: torch.Tensor
    labels: torch.Tensor
    token_weight: torch.Tensor
    unpack: torch.Tensor
    specs: list

    @classmethod
    def empty(cls, padded, comp, lengths, rows: int, width: int, pad_id: int) -> _Rows:
        # Packed position of each token of the padded batch's shifted (predicted-token) grid; the sentinel
        # rows*(width-1) points at an appended zero, like the zeros the fused head returns for unscored tokens.
        unpack = torch.full((padded.shape[0], max(padded.shape[1] - 1, 0)), rows * (width - 1), dtype=torch.long)
        return cls(padded, comp, lengths, width, torch.full((rows, width), pad_id, dtype=padded.dtype),
                   torch.zeros((rows, width), dtype=torch.long), torch.full((rows, width), -100, dtype=torch.long),
                   torch.zeros((rows, width), dtype=torch.float32), unpack, [])

    def _label(self, q: int, a: int, b: int) -> torch.Tensor:
        return self.padded[q, a:b].masked_fill(self.comp[q, a:b] == 0, -100)

    def place(self, unit: tuple, row_i: int, start: int) -> None:
        """One unit at `start` of row `row_i`: its chosen (or only) sequence, then the rejected tail it adds."""
        c, r, s = unit
        lc, width = self.lengths[c], self.width
        flat = row_i * width + start  # flat index of the unit's first token
        shifted = row_i * (width - 1) + start  # its index in the shifted (predicted-token) grid
        self.ids[row_i, start:start + lc] = self.padded[c, :lc]
        self.pos[row_i, start:start + lc] = torch.arange(lc)
        lab = self._label(c, 0, lc)
        lab[0] = -100  # never predicted from the previous unit's last token
        self.labels[row_i, start:start + lc] = lab
        self.token_weight[row_i, start:start + lc] = 1.0
        self.unpack[c, : lc - 1] = shifted + torch.arange(lc - 1)
        self.specs.append(([(flat, lc)], 0))
        if r is not None and s >= self.lengths[r]:  # the rejected sequence is a prefix of the chosen one
            lr = self.lengths[r]
            self.token_weight[row_i, start:start + lr] = 2.0  # stock runs these tokens twice
            self.unpack[r, : lr - 1] = shifted + torch.arange(lr - 1)
        elif r is not None:
            lr, t0 = self.lengths[r], start + lc  # at t0: the copy x of token s-1, then rejected tokens s .. lr-1
            self.ids[row_i, t0] = self.padded[r, s - 1]
            self.ids[row_i, t0 + 1:t0 + 1 + lr - s] = self.padded[r, s:lr]
            self.pos[row_i, t0:t0 + 1 + lr - s] = torch.arange(s - 1, lr)
            self.labels[row_i, t0 + 1:t0 + 1 + lr - s] = self._label(r, s, lr)
            self.token_weight[row_i, start:start + s - 1] = 2.0
            self.token_weight[row_i, t0:t0 + 1 + lr - s] = 1.0
            self.unpack[r, : s - 1] = shifted + torch.arange(s - 1)
            self.unpack[r, s - 1: lr - 1] = row_i * (width - 1) + t0 + torch.arange(lr - s)
            # the rejected segment: the shared tokens but the last (keys only), then x and the tail
            self.specs.append(([(flat, s - 1), (flat + lc, 1 + lr - s)], s - 1))

    def pad(self, row_i: int, end: int) -> None:
        """Row padding is its own sequence (positions restart), after every real token: nothing attends to it."""
        if end < self.width:
            self.pos[row_i, end:] = torch.arange(self.width - end)
            self.specs.append(([(row_i * self.width + end, self.width - end)], 0))


def varlen_schemes(common: dict, args) -> list[PackedPreferenceCollator]:
    """The varlen packing schemes to try first (with the prompt shared if `args.prefix_sharing`, then without), or []
    with the reason logged: torch's varlen_attn needs CUDA and half precision (`bf16` / `fp16` in the training
    arguments), and must pass `segattn.check_torch_varlen` on this GPU."""
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    # this rank's device (TrainingArguments.device), so that no rank opens a CUDA context on another rank's GPU
    device = getattr(args, "device", None)
    if dtype is None:
        align, reason = None, "the flash kernels behind torch's varlen_attn take float16/bfloat16: set bf16 or fp16"
    elif not torch.cuda.is_available():
        align, reason = None, "torch's varlen_attn runs on CUDA only (no GPU here)"
    elif isinstance(device, torch.device) and device.type != "cuda":
        align, reason = None, f"torch's varlen_attn runs on CUDA only (training runs on {device})"
    else:
        if not isinstance(device, torch.device):
            device = torch.device("cuda", torch.cuda.current_device())
        align, reason = segattn.check_torch_varlen(device, dtype)
    if align is None:
        logger.info("packing: varlen scheme skipped: %s", reason)
        return []
    shared = [True, False] if getattr(args, "prefix_sharing", False) else [False]
    return [PackedPreferenceCollator(**common, mode="varlen", share_prefix=s, varlen_align=align) for s in shared]


def unpack_outputs(outputs, unpack_index: torch.Tensor) -> SimpleNamespace:
    """Fused-head outputs of a packed forward -> the padded [2n, L-1] grid TRL's loss code indexes."""

    def gather(x):
        if x is None:
            return None
        flat = torch.cat([x.reshape(-1), x.new_zeros(1)])  # differentiable; zero for unscored positions
        return flat[unpack_index.to(flat.device)]

    fields = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    return SimpleNamespace(**{f: gather(getattr(outputs, f, None)) for f in fields},
                           loss=outputs.loss, aux_loss=getattr(outputs, "aux_loss", None))


class PackedForward:
    """Stands in for the model inside TRL's `_compute_loss` / `compute_ref_log_probs`.

    TRL calls `model(input_ids, attention_mask, ..., labels=..., fused_lm_head=True)` with the padded view; this runs
    the packed rows instead (through the wrapped DDP / DeepSpeed module, so gradient hooks fire as usual) and hands
    back per-token outputs in the padded grid. Non-fused calls (logits for compute_metrics) run the padded view.
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, packed_input_ids=None,
                 packed_position_ids=None, packed_labels=None, packed_segments=None, packed_token_weight=None,
                 unpack_index=None, loss_weight=None, use_cache=False, **kwargs):
        if not fused_lm_head:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        device = packed_input_ids.device
        seg = packed_segments.to(device)
        base = getattr(self.model, "module", self.model)  # DDP / DeepSpeed wrappers
        sdpa = frameworks.attn_implementation(base) == "sdpa"
        mask = None
        if seg.mode in ("segments", "varlen"):
            if not (sdpa and segattn.install()):
                raise segattn.Unsupported("the per-sequence attention needs attn_implementation='sdpa'")
            # A 4-D mask is taken as already built, so transformers skips its dense [rows, 1, T, T] masks; nothing
            # reads it (fastdpo.segattn refuses rather than fall back to it in this mode).
            mask = torch.ones((packed_input_ids.shape[0], 1, 1, 1), dtype=torch.bool, device=device)
        if sdpa and segattn.install():
            kwargs[segattn.SEGMENTS_KWARG] = seg
        # TRL's fused head computes the MoE load-balancing loss with `attention_mask`, which a packed forward does
        # not have (every token, row padding included, would count): each packed token is weighted by the
        # padded-path tokens it stands for (0 for row padding, 2 for a shared prompt token), so the loss is the
        # padded path's over the same pairs.
        weight = packed_token_weight.to(device) if kwargs.get("output_router_logits") else None
        with frameworks.weighted_load_balancing(weight):
            out = self.model(input_ids=packed_input_ids, attention_mask=mask, position_ids=packed_position_ids,
                             labels=packed_labels, fused_lm_head=True, use_cache=False, **kwargs)
        return unpack_outputs(out, unpack_index)
