"""Per-sequence causal sdpa for packed rows (the padding-free path only).

Why: with restarting position_ids and no attention mask, transformers 5.23 hands sdpa a dense block-diagonal
[rows, 1, T, T] mask. An arbitrary mask keeps sdpa off its causal kernels (math path on CPU) and every row pays for
the full T x T scores, including the blocks that are masked out. Here the tokens of each packed sequence are gathered
into their own (right-padded) batch entry and run with `is_causal=True`: same softmax over the same keys, so the same
math, at sum(len^2) instead of T^2 per row and on the fast causal kernels.

How it is switched on: `install()` wraps the "sdpa" entry of transformers' attention registry once. The wrapper
delegates to the original function unchanged unless the call carries the `fastdpo_segments` keyword, which only
`PackedForward` (and the packing probe) pass; the model's normal forward and generation never do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SEGMENTS_KWARG = "fastdpo_segments"
# Segments are grouped by length so that one sdpa call runs many of them; a group's padding stays below this
# fraction of its longest member (padding only costs compute: it sits after the real tokens, so causality hides it).
_GROUP_SLACK = 0.25

_original_sdpa = None


@dataclass
class Segments:
    """Where each packed sequence lives, as gather / scatter indices over the flattened [rows * T] tokens."""

    gather: torch.Tensor  # [slots]: flat token index for each slot of the grouped, right-padded segment batches
    inverse: torch.Tensor  # [rows * T]: slot that holds each flat token
    groups: list  # (first slot, number of segments, width) per sdpa call
    rows: int
    width: int

    def to(self, device):
        return Segments(self.gather.to(device), self.inverse.to(device), self.groups, self.rows, self.width)


def segments_from_position_ids(position_ids: torch.Tensor) -> Segments:
    """Sequences = runs where the position restarts at 0 (row padding forms its own run, as in the mask path)."""
    pos = position_ids.detach().to("cpu")
    rows, width = pos.shape
    spans = []  # (length, flat start)
    for r in range(rows):
        starts = (pos[r] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        ends = starts[1:] + [width]
        spans += [(e - s, r * width + s) for s, e in zip(starts, ends)]
    spans.sort(key=lambda x: -x[0])
    gather, inverse = [], torch.empty(rows * width, dtype=torch.long)
    groups, i = [], 0
    while i < len(spans):
        top = spans[i][0]
        j = i
        while j < len(spans) and spans[j][0] >= top * (1 - _GROUP_SLACK):
            j += 1
        first = len(gather)
        for k, (n, start) in enumerate(spans[i:j]):
            slot = first + k * top
            inverse[start:start + n] = torch.arange(slot, slot + n)
            # pad slots repeat the sequence's first token: they only ever see themselves and earlier slots' keys
            gather += list(range(start, start + n)) + [start] * (top - n)
        groups.append((first, j - i, top))
        i = j
    return Segments(torch.tensor(gather, dtype=torch.long), inverse, groups, rows, width)


def _segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    seg = kwargs.pop(SEGMENTS_KWARG, None)
    b, h, t, d = query.shape
    usable = (seg is not None and (b, t) == (seg.rows, seg.width) and key.shape[2] == t
              and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
              and kwargs.get("cache") is None and kwargs.get("position_bias") is None)
    if not usable:
        return _original_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
    hk = key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, h, d)[seg.gather]
    k = key.transpose(1, 2).reshape(b * t, hk, key.shape[-1])[seg.gather]
    v = value.transpose(1, 2).reshape(b * t, hk, value.shape[-1])[seg.gather]
    outs = []
    for first, n, w in seg.groups:
        sl = slice(first, first + n * w)
        qg = q[sl].view(n, w, h, d).transpose(1, 2)
        kg = k[sl].view(n, w, hk, -1).transpose(1, 2)
        vg = v[sl].view(n, w, hk, -1).transpose(1, 2)
        if hk != h:  # GQA: share each key/value head across its query group (what repeat_kv does)
            kg = kg.repeat_interleave(h // hk, dim=1)
            vg = vg.repeat_interleave(h // hk, dim=1)
        o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scaling,
                                                             is_causal=True)
        outs.append(o.transpose(1, 2).reshape(n * w, h, -1))
    out = torch.cat(outs)[seg.inverse].view(b, t, h, -1)
    return out, None


def install() -> bool:
    """Wrap transformers' "sdpa" attention entry once (idempotent). Returns False if the registry is missing."""
    global _original_sdpa
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if current is _segment_sdpa:
        return True
    _original_sdpa = current
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _segment_sdpa
    return True
