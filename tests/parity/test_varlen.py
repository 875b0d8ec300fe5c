"""The varlen packing scheme (fastdpo.segattn: one varlen_attn call per layer over every packed sequence) on CPU.

torch's varlen_attn is CUDA-only, so here the scheme runs through `segattn.reference_varlen` (varlen semantics by
definition: one sdpa per segment, causal aligned bottom-right or top-left, transformers' window): the cumulative
lengths, gathers and alignment the scheme builds are checked against the grouped sdpa path and the padded path on
tiny Llama / OLMo 3 (windows shorter than most sequences) / Qwen3 / Gemma 3 with prefix sharing. The real kernel has
never run here; scripts/gpu_check.py runs it on a GPU.

    .venv/bin/python -m pytest tests/parity/test_varlen.py          # ~30 s on 2 cores
"""

from types import SimpleNamespace

import pytest
import torch

from fastdpo import segattn
from fastdpo.packing import PackedPreferenceCollator
from fastdpo.probe import choose, scheme_name
from fastdpo.trainer import candidate_schemes
from tests import archs
from tests.parity.test_parity_arch import MAX_LENGTH, assert_grads_close, built, dpo_grads, logps, pairs

pytestmark = pytest.mark.parity


def varlen(align, share_prefix=True):
    return PackedPreferenceCollator(pad_token_id=0, max_length=MAX_LENGTH, mode="varlen", share_prefix=share_prefix,
                                    varlen_kernel="reference", varlen_align=align)


def grouped(share_prefix=True):
    return PackedPreferenceCollator(pad_token_id=0, max_length=MAX_LENGTH, mode="segments", share_prefix=share_prefix)


def test_cumulative_lengths_are_the_grouped_paths_segments():
    """For every segment the grouped path runs (specs from the collator: chosen, rejected after a shared prompt,
    row padding), the varlen call gets exactly its keys, and as queries its owned tokens (bottom-right: the causal
    offset K - Q is the shared prompt's length) or all its slots (top-left, outputs of the prompt slots dropped)."""
    batch = grouped()(pairs())
    specs = batch["packed_segments"]
    rows, width = specs.rows, specs.width
    segs = varlen("bottom_right")(pairs())["packed_segments"]
    assert segs.rows == rows and segs.width == width
    cu_q, cu_k = segs.cu_q.tolist(), segs.cu_k.tolist()
    k_rows = segs.k_gather if segs.k_gather is not None else torch.arange(rows * width)
    q_rows = segs.q_gather if segs.q_gather is not None else torch.arange(rows * width)
    shared = 0
    for i, (pieces, own) in enumerate(segs.specs):
        idx = torch.cat([torch.arange(s, s + n) for s, n in pieces])
        assert torch.equal(k_rows[cu_k[i]:cu_k[i + 1]], idx)
        assert torch.equal(q_rows[cu_q[i]:cu_q[i + 1]], idx[own:])
        assert (cu_k[i + 1] - cu_k[i]) - (cu_q[i + 1] - cu_q[i]) == own  # bottom-right offset = prompt keys
        shared += own > 0
    assert shared >= 2  # the pairs share prompts: some segments have fewer queries than keys
    assert segs.max_k == max(cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1))
    # the rejected segments follow their chosen ones in the row: queries are the packed tokens in order, no gather
    assert segs.q_gather is None and segs.inverse is None and segs.k_gather is not None
    top = varlen("top_left")(pairs())["packed_segments"]
    assert top.cu_q.tolist() == top.cu_k.tolist() and top.inverse is not None


@pytest.mark.parametrize("window", [None, 8, 3])
@pytest.mark.parametrize("align", segattn.ALIGNMENTS)
def test_one_call_equals_the_grouped_calls(align, window):
    """Attention outputs and input gradients of the one-call scheme equal the grouped sdpa path's on the same
    packed tokens, with GQA (4 query heads on 2 key/value heads) and windows shorter than most sequences."""
    examples = pairs(3)
    seg, var = grouped()(examples)["packed_segments"], varlen(align)(examples)["packed_segments"]
    t = seg.rows * seg.width
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, t, 16, generator=gen).requires_grad_() for heads in (4, 2, 2))
    want = segattn._grouped_attention(seg, q, k, v, 0.0, None, window)
    got = segattn._varlen_attention(var, q, k, v, 0.0, None, window)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    w = torch.randn(want.shape, generator=gen)
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_wrong_alignment_is_caught():
    """The check can fail: a bottom-right scheme run by a kernel that aligns top-left attends to the wrong keys."""
    examples = pairs(3)
    seg, var = grouped()(examples)["packed_segments"], varlen("bottom_right")(examples)["packed_segments"]
    var.align = "top_left"
    t = seg.rows * seg.width
    q, k, v = (torch.randn(1, 4, t, 16) for _ in range(3))
    gap = (segattn._varlen_attention(var, q, k, v, 0.0, None, None)
           - segattn._grouped_attention(seg, q, k, v, 0.0, None, None)).abs().max()
    assert gap > 0.1


@pytest.mark.parametrize("align", segattn.ALIGNMENTS)
@pytest.mark.parametrize("name", ["llama", "olmo3", "qwen3", "gemma3"])
def test_family_parity_varlen(name, align):
    """Tiny Llama (GQA), OLMo 3 (3 sliding : 1 full, window 8), Qwen3 (q/k norm), Gemma 3 (5 local : 1 global):
    the probe accepts the varlen scheme; per-token log-probs (1e-5) and one step's gradients of every parameter
    (1e-4) equal the padded path's, with the prompt shared."""
    model = built(name, "sdpa")
    scheme = choose(model, [varlen(align)])
    assert scheme is not None and scheme_name(scheme) == "varlen + prefix sharing"
    examples = pairs()
    assert max(len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples) > 3 * archs.WINDOW
    with torch.no_grad():
        (packed, mask), (padded, _) = logps(model, examples, scheme), logps(model, examples)
    gap = (packed.log_probs - padded.log_probs).abs()[mask].max().item()
    assert gap <= 1e-5, f"{name}/{align}: per-token log-probs differ by {gap:.2e}"
    assert_grads_close(dpo_grads(model, examples, scheme), dpo_grads(model, examples, None), rtol=1e-4)


def test_float32_twin_runs_the_reference():
    """A bfloat16 model picks the varlen scheme through its float32 twin: float32 queries never reach the flash
    kernel (it takes half precision only) and run the same cumulative lengths through the reference."""
    model = built("olmo3", "sdpa", dtype=torch.bfloat16)
    scheme = PackedPreferenceCollator(pad_token_id=0, max_length=MAX_LENGTH, mode="varlen", share_prefix=True,
                                      varlen_kernel="reference")
    assert scheme_name(choose(model, [scheme])) == "varlen + prefix sharing"


def test_torch_kernel_arguments():
    """What `_torch_kernel` hands varlen_attn, against a stand-in with varlen_attn's documented semantics (window_size
    (left, right) in key slots, bottom-right aligned, causal iff (-1, 0)): transformers' window W becomes (W - 1, 0),
    the causal call is exactly the tuple (-1, 0), GQA is passed as enable_gqa or expanded where the signature has
    none, and a window this torch cannot take goes back to the grouped path (None)."""
    calls = []

    def documented(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append((window_size, enable_gqa, k.shape[1]))
        assert window_size[1] == 0 and (window_size == (-1, 0)) == (window_size[0] == -1)
        left = None if window_size[0] == -1 else window_size[0] + 1
        return segattn.reference_varlen(q, k, v, cu_q, cu_k, scale=scale, window=left)

    var = varlen("bottom_right")(pairs(3))["packed_segments"]
    t = var.rows * var.width
    q, k, v = torch.randn(t, 4, 16), torch.randn(int(var.cu_k[-1]), 2, 16), torch.randn(int(var.cu_k[-1]), 2, 16)
    for window in (None, 8):
        api = segattn.VarlenAPI(documented, window=True, gqa=True, scale=True)
        got = segattn._torch_kernel(api, q, k, v, var.cu_q, var.cu_k, var.max_q, var.max_k, None, window)
        want = segattn.reference_varlen(q, k, v, var.cu_q, var.cu_k, window=window)
        torch.testing.assert_close(got, want)
    assert calls == [((-1, 0), True, 2), ((7, 0), True, 2)]
    no_gqa = segattn.VarlenAPI(documented, window=True, gqa=False, scale=True)
    segattn._torch_kernel(no_gqa, q, k, v, var.cu_q, var.cu_k, var.max_q, var.max_k, None, None)
    assert calls[-1] == ((-1, 0), False, 4)  # key/value heads repeated for the query heads
    old = segattn.VarlenAPI(documented, window=False, gqa=False, scale=True)
    assert segattn._torch_kernel(old, q, k, v, var.cu_q, var.cu_k, var.max_q, var.max_k, None, 8) is None


def test_skipped_on_cpu_with_the_reason(caplog):
    """On CPU the candidate list leaves the varlen scheme out and says why; the probe then picks the grouped
    per-sequence path (the schemes tests/parity/test_parity_arch.py asserts)."""
    with caplog.at_level("INFO", logger="fastdpo"):
        bf16 = candidate_schemes("sdpa", 0, SimpleNamespace(
            max_length=MAX_LENGTH, truncation_mode="keep_start", prefix_sharing=True, bf16=True))
        fp32 = candidate_schemes("sdpa", 0, SimpleNamespace(
            max_length=MAX_LENGTH, truncation_mode="keep_start", prefix_sharing=True))
    assert [scheme_name(x) for x in bf16] == [scheme_name(x) for x in fp32] == [
        "segments + prefix sharing", "segments", "dense"]
    assert "varlen scheme skipped: torch's varlen_attn runs on CUDA only" in caplog.text
    assert "varlen scheme skipped: the flash kernels behind torch's varlen_attn take float16/bfloat16" in caplog.text
    assert segattn.check_torch_varlen("cpu", torch.bfloat16) == (
        None, "torch's varlen_attn runs on CUDA only (device cpu)")


def _stand_in(align=None, window_shift=1):
    """A kernel with varlen_attn's signature: causal aligned as `align` (None: ignores causality altogether); its
    window reaches window_size[0] + window_shift keys (1: flash's convention)."""
    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        if align is None:
            out = []
            for i in range(len(cu_q) - 1):
                qs, ks, vs = (x[a:b].transpose(0, 1)[None] for x, a, b in
                              ((q, cu_q[i], cu_q[i + 1]), (k, cu_k[i], cu_k[i + 1]), (v, cu_k[i], cu_k[i + 1])))
                out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)[0]
                           .transpose(0, 1))
            return torch.cat(out)
        window = None if window_size[0] == -1 else window_size[0] + window_shift
        return segattn.reference_varlen(q, k, v, cu_q, cu_k, scale=scale, window=window, align=align)
    return segattn.VarlenAPI(kernel, window=True, gqa=True, scale=True)


@pytest.mark.parametrize("align,shift,expected", [("bottom_right", 1, "bottom_right"), ("top_left", 1, "top_left"),
                                                  (None, 1, None), ("bottom_right", 0, None)],
                         ids=["bottom_right", "top_left", "not_causal", "window_one_short"])
def test_alignment_check_tells_kernels_apart(align, shift, expected):
    """`check_torch_varlen`'s measurement (bf16 against the float32 reference, forward and backward, a segment with
    fewer queries than keys, window 16) names a bottom-right kernel and a top-left one, and refuses one that is not
    causal at all or whose window is one key short, saying so."""
    got, reason = segattn._measure_alignment(_stand_in(align, shift), torch.device("cpu"), torch.bfloat16)
    assert got == expected
    assert (reason is None) == (expected is not None)
    if expected is None:
        assert "matches neither causal alignment" in reason


def test_torch_without_window_size_runs_windowed_layers_grouped(monkeypatch):
    """A torch whose varlen_attn has no window_size (2.10: `is_causal=` only), stood in for on CPU: the full-attention
    layer of a bf16 OLMo 3 takes the one-call kernel, its three sliding layers the grouped sdpa calls, and the
    log-probs stay within bf16 rounding of the padded path's."""
    calls = []

    def old_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, scale=None):
        assert is_causal
        calls.append(len(cu_q) - 1)
        return segattn.reference_varlen(q, k, v, cu_q, cu_k, scale=scale)

    monkeypatch.setattr(segattn, "torch_varlen_api",
                        lambda: segattn.VarlenAPI(old_kernel, window=False, gqa=False, scale=True))
    model = built("olmo3", "sdpa", dtype=torch.bfloat16)
    scheme = PackedPreferenceCollator(pad_token_id=0, max_length=MAX_LENGTH, mode="varlen", share_prefix=True)
    examples = pairs(1)
    with torch.no_grad():
        (packed, mask), (padded, _) = logps(model, examples, scheme), logps(model, examples)
    windows = archs.sliding_windows(model)
    assert len(calls) == sum(w is None for w in windows.values()) == 1
    diff = (packed.log_probs.float() - padded.log_probs.float()).abs()[mask]
    assert diff.mean() <= 5e-3 and diff.max() <= 5e-2, (diff.mean().item(), diff.max().item())
