"""Per-sequence attention for packed rows: each sequence attends to itself only, exactly as if it ran alone.

Why: with restarting position_ids and no attention mask, transformers hands sdpa a dense block-diagonal
[rows, 1, T, T] mask: every row pays for T x T scores (the masked-out blocks included) on the masked math path.
Here the tokens of each sequence are gathered into their own right-padded batch entry and run through sdpa with
`is_causal=True`: the same softmax over the same keys, at sum(len^2) instead of T^2, on the causal kernels.

What each layer's mask adds is honoured, or the call is refused:
  * sliding windows: a layer passes `sliding_window=W` (transformers' mask: key j is visible to query i when
    i - W < j <= i). A sequence no longer than W never reaches past its window, so it stays on `is_causal`;
    a longer one gets the band as an explicit mask (built once per width and window, shared by every layer).
  * anything else that changes the scores (soft-capping, attention sinks, position bias, a non-causal layer, a
    kv cache) cannot be applied here. In `dense` mode the call goes to transformers' own sdpa with the model's mask
    (exact, slower); in `segments` mode (no dense mask was built, or prefix sharing, which the model's mask cannot
    express) it raises `Unsupported`, which the start-up probe turns into a fallback with the reason logged.

Prefix sharing: a pair runs as [prompt | chosen] plus its rejected tokens, which attend to the prompt's keys and
their own. That is a segment whose first slots gather the prompt's tokens (keys and values only; their outputs
belong to the chosen segment) followed by the rejected tokens: an ordinary causal sequence in slot order, so the
same grouping, `is_causal` and band code serves it. Gradients reach the shared prompt from both segments through
the gather.

On CUDA in half precision the same specs can also run as one `torch.nn.attention.varlen.varlen_attn` call per layer
(`VarlenSegments`, mode "varlen"; see the section below): fewer launches, the same math, tried first by the probe.

How it is switched on: `install()` wraps the "sdpa" entry of transformers' attention registry once. The wrapper
delegates to the original function unchanged unless the call carries the `fastdpo_segments` keyword, which only
`fastdpo.packing.PackedForward` (and the start-up probe) pass; normal forwards and generation never do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from . import frameworks

SEGMENTS_KWARG = "fastdpo_segments"
# Segments are grouped by length so that one sdpa call runs many of them; a group's padding stays below this
# fraction of its longest member (padding only costs compute: it sits after the real tokens, so causality hides it).
_GROUP_SLACK = 0.25
# Keyword arguments models pass to the attention function that do not change the scores (or are off when None/False).
_NEUTRAL = {"position_ids", "use_cache", "output_attentions", "cache_position", "past_key_values", "past_key_value",
            "position_embeddings", "sliding_window", "dropout", "scaling", "is_causal", "output_router_logits"}

_original_sdpa = None


class Unsupported(RuntimeError):
    """An attention call whose masking the per-sequence path cannot reproduce (and may not hand to the dense mask)."""


@dataclass
class Group:
    """One sdpa call: n segments, right-padded to a common width, as consecutive blocks of the gathered queries and
    keys (n x q_width and n x k_width rows, in group order).

    Plain segments have queries = keys and run `is_causal` (a rejected answer after a short shared prompt is one too:
    the prompt slots' outputs are dropped). Continuations (a rejected answer after a longer prompt) query only from
    their owned slots on: query j of member i sits at key slot offset[i] + j and sees the keys up to it, so the
    prompt's queries are not computed twice.
    """

    n: int
    q_width: int
    k_width: int
    offset: torch.Tensor | None  # [n] key slot of each member's first query; None: plain, queries = keys
    slots: torch.Tensor  # query slots (within the group) that own a token ...
    tokens: torch.Tensor  # ... and those tokens' flat indices

    def to(self, device):
        offset = None if self.offset is None else self.offset.to(device)
        return Group(self.n, self.q_width, self.k_width, offset, self.slots.to(device), self.tokens.to(device))


@dataclass
class Segments:
    """Where each sequence's tokens live, as gather / scatter indices over the flattened [rows * T] tokens.

    mode "dense": the model's own dense mask was built, so calls this path cannot honour go to it unchanged.
    mode "segments": no usable dense mask (a placeholder, or prefix sharing): such calls raise `Unsupported`.
    """

    q_gather: torch.Tensor  # flat token index of every query slot of every group
    k_gather: torch.Tensor  # flat token index of every key slot of every group
    groups: list[Group]
    rows: int
    width: int
    inverse: torch.Tensor  # flat token -> its row in the groups' owned outputs, concatenated (each token owned once)
    mode: str = "dense"
    _masks: dict = field(default_factory=dict, repr=False)

    def to(self, device):
        return Segments(self.q_gather.to(device), self.k_gather.to(device), [g.to(device) for g in self.groups],
                        self.rows, self.width, self.inverse.to(device), self.mode)

    def mask(self, i: int, window: int | None, device) -> torch.Tensor | None:
        """Group i's boolean mask (None: plain `is_causal` does it): causal in slot coordinates, within the window,
        built once per group and window and shared by every layer."""
        g = self.groups[i]
        if g.offset is None and (window is None or g.k_width <= window):
            return None
        key = (i, window, str(device))
        if key not in self._masks:
            q = torch.arange(g.q_width, device=device)[None, :, None]
            if g.offset is not None:
                q = q + g.offset.to(device)[:, None, None]
            k = torch.arange(g.k_width, device=device)[None, None, :]
            visible = k <= q
            if window is not None:
                visible &= k > q - window
            self._masks[key] = visible[:, None]  # [n or 1, 1, q_width, k_width]
        return self._masks[key]


def build_segments(specs: list[tuple[list[tuple[int, int]], int]], rows: int, width: int,
                   mode: str = "dense") -> Segments:
    """Segments from explicit specs: (pieces, owned_from) per segment.

    pieces: (flat start, length) ranges whose tokens, concatenated, form one causal sequence (slot k is position k);
    owned_from: slots before it only supply keys/values (a shared prompt); the tokens from there on take this
    segment's outputs. Every flat token must be owned by exactly one segment.
    """
    segs = []
    for pieces, own in specs:
        idx = torch.cat([torch.arange(s, s + n) for s, n in pieces]) if pieces else torch.empty(0, dtype=torch.long)
        if len(idx):
            segs.append((idx, own))
    owner = torch.zeros(rows * width, dtype=torch.long)
    q_gather, k_gather, groups = [], [], []
    # A segment after a shared prompt either queries from every slot (plain: `is_causal`, the prompt's queries
    # computed again and their outputs dropped, ~K^2/2 scores) or from its own slots only (a continuation: an explicit
    # offset mask, which the kernels cannot skip blocks of, ~Q x K). The continuation is cheaper only when the
    # prompt is longer than the segment's own tokens. Both are the same math.
    continuation = lambda x: 2 * x[1] > len(x[0])  # noqa: E731
    for plain in (True, False):
        size = (lambda x: len(x[0])) if plain else (lambda x: len(x[0]) - x[1])  # query slots
        members = sorted((x for x in segs if continuation(x) != plain), key=lambda x: -size(x))
        i = 0
        while i < len(members):
            # grouped by query length; a group's padding stays within _GROUP_SLACK of its longest member
            top = size(members[i])
            j = i
            while j < len(members) and size(members[j]) >= top * (1 - _GROUP_SLACK):
                j += 1
            batch = members[i:j]
            k_width = max(len(idx) for idx, _ in batch)
            q_width = k_width if plain else top
            slots, tokens = [], []
            for m, (idx, own) in enumerate(batch):
                # pad slots repeat the segment's first key / query: no real query ever sees them (causal, and the
                # continuation mask ends at each query's own slot)
                k_gather.append(torch.cat([idx, idx[:1].expand(k_width - len(idx))]))
                q = idx if plain else idx[own:]
                q_gather.append(torch.cat([q, q[:1].expand(q_width - len(q))]))
                first = own if plain else 0  # a plain segment's slots before `own` are the prompt's: not its outputs
                slots.append(m * q_width + torch.arange(first, len(q)))
                tokens.append(idx[own:])
                owner[idx[own:]] += 1
            offset = None if plain else torch.tensor([own for _, own in batch])
            groups.append(Group(len(batch), q_width, k_width, offset, torch.cat(slots), torch.cat(tokens)))
            i = j
    if (owner != 1).any():
        raise ValueError("packed rows: every token must belong to exactly one segment")
    empty = torch.empty(0, dtype=torch.long)
    inverse = torch.empty(rows * width, dtype=torch.long)
    if groups:
        inverse[torch.cat([g.tokens for g in groups])] = torch.arange(rows * width)
    return Segments(torch.cat(q_gather) if q_gather else empty, torch.cat(k_gather) if k_gather else empty, groups,
                    rows, width, inverse, mode)


def segments_from_position_ids(position_ids: torch.Tensor, mode: str = "dense") -> Segments:
    """Sequences = runs where the position restarts at 0 (row padding forms its own run, as in the mask path)."""
    pos = position_ids.detach().to("cpu")
    rows, width = pos.shape
    specs = []
    for r in range(rows):
        starts = (pos[r] == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        ends = starts[1:] + [width]
        specs += [([(r * width + s, e - s)], 0) for s, e in zip(starts, ends, strict=True)]
    return build_segments(specs, rows, width, mode)


# --- one varlen kernel call per layer (CUDA) ------------------------------------------------------------------------
#
# The grouped path above launches sdpa once per length group per layer (~8 groups per multiturn micro-batch, twice
# that in the backward). torch's `varlen_attn` takes every sequence in one call: queries and keys concatenated,
# cumulative lengths `cu_seq_q` / `cu_seq_k`. A rejected segment's keys are the shared prompt's keys followed by its
# own, its queries only its own tokens, so cu_seq_q != cu_seq_k for it. How the kernel lines the causal mask up
# when a segment has fewer queries than keys decides whether that is right: flash attention 2 (what torch 2.13's
# varlen_attn calls) aligns it bottom-right (query i of Q sees keys up to i + K - Q: exactly a continuation after
# the prompt); sdpa's `is_causal` aligns it top-left (query i sees keys up to i). `check_torch_varlen` measures
# which one the installed kernel does, on random inputs, before any scheme uses it; under top-left alignment every
# segment re-queries its prompt slots (queries = keys) and drops their outputs, as the grouped path's plain form.
#
# Only half precision reaches the kernel (flash takes fp16/bf16): float32 queries, the start-up probe's float32
# twin, run the same cumulative lengths, windows and alignment through `reference_varlen` (a loop of sdpa per
# segment), so the twin still checks this scheme's bookkeeping exactly. CPU tests run the whole scheme through that
# reference (kernel="reference").

HALF = (torch.float16, torch.bfloat16)
ALIGNMENTS = ("bottom_right", "top_left")


@dataclass
class VarlenSegments:
    """Gather indices and cumulative lengths for one varlen call over every packed sequence.

    q_gather / k_gather: flat token index of every query / key row (None: the packed tokens in order, no gather);
    inverse: flat token -> its row of the kernel's output (None: the same order). specs: what the indices were built
    from, for the grouped sdpa path where this torch's kernel lacks a feature (a window, a custom scale, dropout).
    """

    q_gather: torch.Tensor | None
    k_gather: torch.Tensor | None
    inverse: torch.Tensor | None
    cu_q: torch.Tensor  # int32 [segments + 1]
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    rows: int
    width: int
    specs: list
    kernel: str = "torch"  # or "reference"
    align: str = "bottom_right"
    mode: str = "varlen"
    _grouped: dict = field(default_factory=dict, repr=False)

    def to(self, device):
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return VarlenSegments(move(self.q_gather), move(self.k_gather), move(self.inverse), self.cu_q.to(device),
                              self.cu_k.to(device), self.max_q, self.max_k, self.rows, self.width, self.specs,
                              self.kernel, self.align, self.mode, self._grouped)

    def grouped(self, device) -> Segments:
        """The same sequences as grouped sdpa calls (built once per micro-batch, on first need)."""
        key = str(device)
        if key not in self._grouped:
            self._grouped[key] = build_segments(self.specs, self.rows, self.width, "segments").to(device)
        return self._grouped[key]


def build_varlen(specs: list[tuple[list[tuple[int, int]], int]], rows: int, width: int, kernel: str = "torch",
                 align: str = "bottom_right") -> VarlenSegments:
    """The varlen form of the same specs `build_segments` takes ((pieces, owned_from) per segment)."""
    if kernel not in ("torch", "reference"):
        raise ValueError(f"varlen kernel {kernel!r}: expected 'torch' or 'reference'")
    if align not in ALIGNMENTS:
        raise ValueError(f"varlen alignment {align!r}: expected one of {ALIGNMENTS}")
    qs, ks, cu_q, cu_k, owned_rows, owned_tokens = [], [], [0], [0], [], []
    owner = torch.zeros(rows * width, dtype=torch.long)
    for pieces, own in specs:
        idx = torch.cat([torch.arange(s, s + n) for s, n in pieces]) if pieces else torch.empty(0, dtype=torch.long)
        if not len(idx):
            continue
        # bottom-right: queries from the owned slots on, the prompt's keys before them; top-left: every slot queries
        first = own if align == "bottom_right" else 0
        q = idx[first:]
        owned_rows.append(cu_q[-1] + torch.arange(own - first, len(q)))
        owned_tokens.append(idx[own:])
        owner[idx[own:]] += 1
        qs.append(q)
        ks.append(idx)
        cu_q.append(cu_q[-1] + len(q))
        cu_k.append(cu_k[-1] + len(idx))
    if (owner != 1).any():
        raise ValueError("packed rows: every token must belong to exactly one segment")
    q_all, k_all = torch.cat(qs), torch.cat(ks)
    inverse = torch.empty(rows * width, dtype=torch.long)
    inverse[torch.cat(owned_tokens)] = torch.cat(owned_rows)
    order = torch.arange(rows * width)
    same = lambda x: len(x) == len(order) and bool((x == order).all())  # noqa: E731
    lengths_q, lengths_k = torch.diff(torch.tensor(cu_q)), torch.diff(torch.tensor(cu_k))
    return VarlenSegments(None if same(q_all) else q_all, None if same(k_all) else k_all,
                          None if same(inverse) else inverse, torch.tensor(cu_q, dtype=torch.int32),
                          torch.tensor(cu_k, dtype=torch.int32), int(lengths_q.max()), int(lengths_k.max()), rows,
                          width, specs, kernel, align)


def reference_varlen(q, k, v, cu_q, cu_k, *, scale=None, window=None, align="bottom_right"):
    """varlen attention by definition, one sdpa per segment: [Tq, H, D] queries, [Tk, Hk, D] keys/values; causal
    with the given alignment; `window` as transformers' sliding_window (key j visible to query i when
    i - window < j <= i, positions counted in key slots)."""
    out = []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        qs = q[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)[None]
        ks, vs = (x[bounds_k[i]:bounds_k[i + 1]].transpose(0, 1)[None] for x in (k, v))
        n_q, n_k = qs.shape[2], ks.shape[2]
        pos = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q if align == "bottom_right" else 0)
        key_pos = torch.arange(n_k, device=q.device)[None, :]
        visible = key_pos <= pos
        if window is not None:
            visible &= key_pos > pos - window
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=visible, scale=scale,
                                                             enable_gqa=ks.shape[1] != qs.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


@dataclass(frozen=True)
class VarlenAPI:
    """What the installed torch's varlen_attn takes (its signature changed between 2.10 and 2.12)."""

    fn: object
    window: bool  # window_size=(left, right); (-1, 0) = causal (2.11+); else is_causal=True
    gqa: bool  # enable_gqa (2.12+); else key/value heads are repeated, which is the same math
    scale: bool


def torch_varlen_api() -> VarlenAPI | None:
    try:
        from torch.nn.attention.varlen import varlen_attn  # optional: newer torch only
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return VarlenAPI(varlen_attn, "window_size" in params, "enable_gqa" in params, "scale" in params)


def _torch_kernel(api: VarlenAPI, q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    """One varlen_attn call (None: this torch cannot express the call; the caller uses the grouped path)."""
    if (window is not None and not api.window) or (scale is not None and not api.scale):
        return None
    if k.shape[1] != q.shape[1] and not api.gqa:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    extra = {"scale": scale} if scale is not None else {}
    if api.gqa and k.shape[1] != q.shape[1]:
        extra["enable_gqa"] = True
    if api.window:
        # a tuple: varlen_attn decides causality by `window_size == (-1, 0)`, which a list never equals.
        # transformers' window W (i - W < j <= i) is flash's left reach W - 1 with no right reach.
        extra["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        extra["is_causal"] = True
    q, k, v = (x.contiguous() for x in (q, k, v))
    return api.fn(q, k, v, cu_q, cu_k, max_q, max_k, **extra)


def _varlen_attention(seg: VarlenSegments, query, key, value, dropout, scaling, window):
    """One kernel call for every sequence of the micro-batch; None where this torch's kernel cannot take the call."""
    b, h, t, _ = query.shape
    if dropout:  # varlen_attn has no dropout
        return None
    q = _flat(query) if seg.q_gather is None else torch.index_select(_flat(query), 0, seg.q_gather)
    k, v = (_flat(x) if seg.k_gather is None else torch.index_select(_flat(x), 0, seg.k_gather)
            for x in (key, value))
    if seg.kernel == "torch" and query.dtype in HALF:
        api = torch_varlen_api()
        if api is None:
            raise Unsupported("torch.nn.attention.varlen is missing in this torch")
        out = _torch_kernel(api, q, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, scaling, window)
        if out is None:
            return None
    else:
        out = reference_varlen(q, k, v, seg.cu_q, seg.cu_k, scale=scaling, window=window, align=seg.align)
    if seg.inverse is not None:
        out = torch.index_select(out, 0, seg.inverse)
    return out.reshape(b, t, h, -1)


_checked: dict = {}


def check_torch_varlen(device, dtype) -> tuple[str | None, str | None]:
    """(alignment, None) if torch's varlen_attn computes per-segment causal attention on this device and dtype
    (windows and GQA too, where this torch takes them), found by comparing it with `reference_varlen` in float32 on
    random inputs, forward and backward; (None, why not) otherwise. Cached per device and dtype."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _checked:
        return _checked[key]
    if device.type != "cuda":
        result = (None, f"torch's varlen_attn runs on CUDA only (device {device})")
    elif dtype not in HALF:
        result = (None, f"the flash kernels behind varlen_attn take float16/bfloat16, not {dtype}")
    elif (api := torch_varlen_api()) is None:
        result = (None, f"torch {torch.__version__} has no torch.nn.attention.varlen")
    else:
        try:
            result = _measure_alignment(api, device, dtype)
        except Exception as e:  # an unsupported GPU or build: the message says which
            result = (None, f"varlen_attn failed on {device} ({type(e).__name__}: {e})")
    _checked[key] = result
    return result


def _measure_alignment(api, device, dtype) -> tuple[str | None, str | None]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    # three segments: equal lengths, fewer queries than keys (a continuation after a prompt), a short one
    n_q, n_k = [37, 20, 5], [37, 53, 5]
    heads, kv_heads, dim = 4, 2, 64
    cu_q = torch.tensor([0] + torch.tensor(n_q).cumsum(0).tolist(), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + torch.tensor(n_k).cumsum(0).tolist(), dtype=torch.int32, device=device)
    # scores of std ~2: peaked enough that one key too many or too few moves some row by well over bf16 rounding,
    # not so peaked that the backward's cancellation (dP - rowsum(dO * O) at a near one-hot row) dominates the error
    rnd = lambda n, hh: (1.5 * torch.randn(n, hh, dim, generator=gen)).to(device, dtype)  # noqa: E731
    q, k, v = rnd(sum(n_q), heads), rnd(sum(n_k), kv_heads), rnd(sum(n_k), kv_heads)
    grad = rnd(sum(n_q), heads)
    windows = [None, 16] if api.window else [None]
    errors = {}
    for align in ALIGNMENTS:
        worst = 0.0
        for window in windows:
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = _torch_kernel(api, *leaves, cu_q, cu_k, max(n_q), max(n_k), None, window)
            out.backward(grad)
            ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
            ref = reference_varlen(*ref_leaves, cu_q, cu_k, window=window, align=align)
            ref.backward(grad.float())
            for got, want in [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves, strict=True)]:
                worst = max(worst, ((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-6)).item())
        errors[align] = worst
        if worst <= 2e-2:  # bf16 rounding of peaked attention: ~1e-2 at most; a wrong mask moves whole rows
            return align, None
    return None, ("varlen_attn matches neither causal alignment (largest error relative to the reference: "
                  + ", ".join(f"{a} {e:.2e}" for a, e in errors.items()) + ")")


def _refusal(module, query, key, is_causal, kwargs) -> str | None:
    """Why this call's masking cannot be reproduced per sequence (None = it can)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        return "a bidirectional (non-causal) attention layer"
    if key.shape[2] != query.shape[2]:
        return "queries and keys of different lengths (a kv cache)"
    extra = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL and v is not None and v is not False)
    if extra:
        return f"attention arguments {extra}"
    window = kwargs.get("sliding_window")
    if window is not None and not (isinstance(window, int) and window > 0):
        return f"sliding_window={window!r}"
    return None


def _segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    seg = kwargs.pop(SEGMENTS_KWARG, None)
    if seg is None:
        return _original_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              is_causal=is_causal, **kwargs)
    b, t = query.shape[0], query.shape[2]
    reason = _refusal(module, query, key, is_causal, kwargs)
    if reason is None and (b, t) != (seg.rows, seg.width):
        reason = f"packed rows of {seg.rows}x{seg.width} tokens for queries of {b}x{t}"
    if reason is not None:
        if seg.mode == "dense":  # the model's own mask is exact: use it
            return _original_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)
        raise Unsupported(f"{type(module).__name__}: {reason}")
    window = kwargs.get("sliding_window")
    if isinstance(seg, VarlenSegments):
        out = _varlen_attention(seg, query, key, value, dropout, scaling, window)
        if out is not None:
            return out, None
        seg = seg.grouped(query.device)  # what this torch's kernel cannot do: the grouped sdpa calls, same math
    return _grouped_attention(seg, query, key, value, dropout, scaling, window), None


def _flat(x):
    """[rows, heads, T, dim] -> [rows * T, heads, dim]: a view where rows == 1 (no copy before a gather), else a
    copy."""
    b, _, t, _ = x.shape
    return x[0].transpose(0, 1) if b == 1 else x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[-1])


def _grouped_attention(seg: Segments, query, key, value, dropout, scaling, window):
    b, h, t, d = query.shape
    hk = key.shape[1]
    # index_select, not x[idx]: its backward is index_add_ (indices repeat: pad slots, shared prompts), which is
    # several times faster than the accumulating index_put_ of advanced indexing
    q = torch.index_select(_flat(query), 0, seg.q_gather)
    k, v = (torch.index_select(_flat(x), 0, seg.k_gather) for x in (key, value))
    # split, not slices: a slice's backward writes its gradient into a zeroed copy of the whole tensor, once per
    # group (a full-size fill and add per group, per layer); split's backward is one concatenation
    qs = torch.split(q, [g.n * g.q_width for g in seg.groups])
    ks, vs = (torch.split(x, [g.n * g.k_width for g in seg.groups]) for x in (k, v))
    owned = []
    # GQA: each key/value head serves its group of query heads (what repeat_kv does, without the copies)
    gqa = {"enable_gqa": True} if hk != h else {}
    for i, g in enumerate(seg.groups):
        qg = qs[i].view(g.n, g.q_width, h, d).transpose(1, 2)
        kg = ks[i].view(g.n, g.k_width, hk, -1).transpose(1, 2)
        vg = vs[i].view(g.n, g.k_width, hk, -1).transpose(1, 2)
        mask = seg.mask(i, window, qg.device)
        if mask is None:
            o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scaling,
                                                                 is_causal=True, **gqa)
        else:  # a window some member reaches past, or queries that start after a shared prompt
            o = torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout,
                                                                 scale=scaling, **gqa)
        owned.append(torch.index_select(o.transpose(1, 2).reshape(g.n * g.q_width, h, -1), 0, g.slots))
    # one gather puts every token's output in place (in-place writes per group would clone the whole gradient once
    # per group in the backward)
    out = torch.index_select(torch.cat(owned), 0, seg.inverse)
    return out.view(b, t, h, -1)


def install() -> bool:
    """Wrap transformers' "sdpa" attention entry once (idempotent). Returns False if the registry is missing."""
    global _original_sdpa
    current = frameworks.wrap_attention("sdpa", _segment_sdpa)
    if current is None:
        return False
    if current is not _segment_sdpa:
        _original_sdpa = current
    return True
