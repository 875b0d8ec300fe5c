"""Token-budget micro-batches that keep TRL's optimisation exactly: same pairs per step, same weight per pair.

Stock TRL + Trainer, per optimizer step on one rank: `m` micro-batches (m = gradient_accumulation_steps, fewer
in an epoch's last step) of `per_device_train_batch_size` pairs; each micro-batch's loss is the mean over its
pairs, and the Trainer divides it by m. So pair i of micro-batch b carries weight w_i = 1 / (m * |b|) in the
step's loss (1 / pairs-per-step when batches are full), and DDP / ZeRO average the ranks.

Here the same pairs reach the same (rank, step) as in the stock path (same sampler order, same round-robin over
ranks, same tail handling), then each step's pairs are re-cut, longest first, into micro-batches that fill a
token budget. Each micro-batch's mean loss is multiplied by the sum of its pairs' weights (`loss_weight`), and
the trainer does not divide by m again: the step's gradient is sum_i w_i * grad loss_i, identical to stock.

The dataloader yields m "slots" per step (the Trainer counts m per step for its accumulation, logging and
scheduler); a slot holds zero or more packed micro-batches, the last slot at least one.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from . import frameworks
from .packing import computed_tokens, unit_lengths

# transformers' group_by_length and batch_rebalance are refused when the recipe is parsed (fastdpo.settings,
# UNSUPPORTED_ORDERS says why); here too, so no caller gets another order than it asked for.
ORDERS = ("random", "sequential")


def sequence_lengths(dataset, max_length: int | None, truncation_mode: str = "keep_start") -> np.ndarray:
    """[pairs, 3]: lengths of the chosen and rejected sequences after truncation, and the prefix they share at
    least (the prompt, when truncation keeps it whole in both). Read from Arrow (no Python lists)."""
    table = frameworks.flat(dataset).data
    p = pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    c = pc.list_value_length(table.column("chosen_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    r = pc.list_value_length(table.column("rejected_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
    lc, lr, shared = p + c, p + r, p
    if max_length is not None:
        if truncation_mode != "keep_start":  # keep_end cuts the prompt's start by different amounts
            shared = np.where(np.maximum(lc, lr) > max_length, 0, p)
        lc, lr = np.minimum(lc, max_length), np.minimum(lr, max_length)
    return np.stack([lc, lr, np.minimum(shared, np.minimum(lc, lr))], axis=1)


class TokenBudgetSampler(Sampler):
    """Yields this rank's slots: each a tuple of micro-batches, each (pair indices, sum of their step weights).

    lengths: [pairs, 3] from `sequence_lengths`; share_prefix: pairs run as one unit (fastdpo.packing)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 token_budget: int | None = None, row_capacity: int | None = None, order: str = "random",
                 seed: int = 0, drop_last: bool = False, share_prefix: bool = False):
        if order not in ORDERS:
            raise ValueError(f"train_sampling_strategy {order!r}: the packed path orders pairs {' or '.join(ORDERS)}")
        self.share_prefix = share_prefix
        # the costliest single pair (the largest pair is not always the longest unit: rows are capped)
        longest = max((self._pair_tokens(row, share_prefix, row_capacity) for row in np.unique(lengths, axis=0)),
                      default=0)
        if token_budget is not None and token_budget < longest:
            raise ValueError(f"token_budget={token_budget} is below the longest pair ({longest} tokens, chosen + "
                             f"rejected): set token_budget to at least 2 x max_length")
        self.lengths, self.B, self.GA, self.W, self.rank = lengths, batch_size, grad_accum, world_size, rank
        self.budget, self.capacity, self.order, self.seed, self.drop_last = (token_budget, row_capacity, order,
                                                                             seed, drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # --- which pairs the stock path gives this rank, batch by batch

    def _order(self) -> list[int]:
        n = len(self.lengths)
        if self.order == "sequential":
            return list(range(n))
        # accelerate swaps the Trainer's RandomSampler for this one, seeded with data_seed or seed, + epoch
        base = SeedableRandomSampler(data_source=range(n), data_seed=self.seed)
        base.set_epoch(self.epoch)
        return list(base)

    def _rank_batches(self) -> list[list[list[int]]]:
        """Batches of every rank (each rank plans all ranks' steps, so they agree without communicating)."""
        order = self._order()
        if self.W > 1:
            # accelerate's BatchSamplerShard(even_batches=True): every rank gets full batches, the tail cycles back
            # to the start of the epoch; drop_last drops the incomplete round instead.
            per_round = self.B * self.W
            if self.drop_last:
                order = order[: len(order) // per_round * per_round]
            elif len(order) % per_round:
                need = per_round - len(order) % per_round
                order = order + (order * (need // len(order) + 1))[:need]
        elif self.drop_last:
            order = order[: len(order) // self.B * self.B]
        batches = [order[k:k + self.B] for k in range(0, len(order), self.B)]
        return [batches[q::self.W] for q in range(self.W)]

    def __len__(self) -> int:
        n = len(self.lengths)
        if self.W > 1:
            rounds = n // (self.B * self.W) if self.drop_last else math.ceil(n / (self.B * self.W))
            return rounds
        return n // self.B if self.drop_last else math.ceil(n / self.B)

    # --- re-cutting each step into token-budget micro-batches

    @staticmethod
    def _pair_tokens(row: np.ndarray, share_prefix: bool, capacity: int | None) -> int:
        return computed_tokens(unit_lengths(row[None], share_prefix), capacity)

    def _tokens(self, pairs: list[int]) -> int:
        return computed_tokens(unit_lengths(self.lengths[pairs], self.share_prefix), self.capacity)

    def _micro_batches(self, pairs: list[int]) -> list[list[int]]:
        pairs = sorted(pairs, key=lambda i: -int(self.lengths[i, :2].sum()))
        if self.budget is None:
            return [pairs]
        # First fit, longest first: a pair goes into the first micro-batch it fits, so short pairs fill the room
        # long ones leave.
        out: list[list[int]] = []
        for i in pairs:
            for mb in out:
                if self._tokens(mb + [i]) <= self.budget:
                    mb.append(i)
                    break
            else:
                out.append([i])
        return out

    def _plan(self, step_batches: list[list[int]]) -> tuple[list[list[int]], dict]:
        m = len(step_batches)
        weight = {i: 1.0 / (m * len(b)) for b in step_batches for i in b}
        # A tail step can hold a short batch whose pairs weigh more; never mix weights in one micro-batch, so
        # each micro-batch's mean loss times (count x weight) is exactly sum_i w_i loss_i.
        groups: dict[float, list[int]] = {}
        for b in step_batches:
            for i in b:
                groups.setdefault(weight[i], []).append(i)
        return [mb for pairs in groups.values() for mb in self._micro_batches(pairs)], weight

    @staticmethod
    def _split_to(micro: list[list[int]], count: int) -> list[list[int]]:
        """Halve the micro-batch with the most pairs until there are `count` (fewer tokens each: still in budget)."""
        micro = list(micro)
        while len(micro) < count:
            big = max(range(len(micro)), key=lambda k: len(micro[k]))
            mb = micro.pop(big)
            micro[big:big] = [mb[: len(mb) // 2], mb[len(mb) // 2:]]
        return micro

    def __iter__(self):
        per_rank = self._rank_batches()
        for s in range(0, len(per_rank[self.rank]), self.GA):
            plans = [self._plan(batches[s:s + self.GA]) for batches in per_rank]
            m = len(per_rank[self.rank][s:s + self.GA])
            # DDP (buffer broadcast per forward) and ZeRO-2 (gradient reduction per backward) communicate on every
            # micro-batch, so every rank runs the same count: the most any rank needs. Every rank has the same
            # pairs per step, so halving always reaches it.
            count = max(len(micro) for micro, _ in plans)
            micro, weight = plans[self.rank]
            specs = [(tuple(mb), sum(weight[i] for i in mb)) for mb in self._split_to(micro, count)]
            # Fewer micro-batches than the Trainer's m slots: the first slots stay empty (no forward, no
            # backward), so the step's last slot, where gradients sync, always runs one.
            parts = np.array_split(np.arange(len(specs)), min(m, len(specs)))
            for part in [[]] * (m - len(parts)) + parts:
                yield tuple(specs[k] for k in part)


class SlotDataset(Dataset):
    """Map a slot spec to its pairs: dataset rows fetched once per micro-batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, slot):
        out = []
        for indices, weight in slot:
            rows = self.dataset[list(indices)]
            out.append(([{k: rows[k][j] for k in rows} for j in range(len(indices))], weight))
        return out


class SlotCollator:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, items):
        (slot,) = items  # one slot per DataLoader batch (SlotBatches)
        return {"micro_batches": [self.collator(examples, weight) for examples, weight in slot]}


class SlotBatches(Sampler):
    """Each slot as a one-item batch. As the DataLoader's batch_sampler, it lets accelerate's skip_first_batches
    (what the Trainer calls to resume mid-epoch) skip whole slots; with a plain sampler there is none to wrap."""

    def __init__(self, sampler: TokenBudgetSampler):
        self.sampler = sampler

    def __iter__(self):
        return ([slot] for slot in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class SlotDataLoader(DataLoader):
    """A DataLoader whose epoch reaches the sampler (the Trainer calls set_epoch on the loader)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def slot_dataloader(dataset, sampler: TokenBudgetSampler, collator, num_workers: int = 0, pin_memory: bool = False,
                    **kwargs) -> SlotDataLoader:
    return SlotDataLoader(SlotDataset(dataset), batch_sampler=SlotBatches(sampler), collate_fn=SlotCollator(collator),
                          num_workers=num_workers, pin_memory=pin_memory, **kwargs)
