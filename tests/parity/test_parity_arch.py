"""The packed fast path on every model family users train (tests/archs.py), sdpa and eager: exact, or a fallback the
test names. Sliding windows shrunk to 8 tokens, pairs of 20 to 60 tokens, so every window matters.

    .venv/bin/python -m pytest tests/parity/test_parity_arch.py          # ~1-2 minutes on 2 cores

Per family and attention implementation: the packing scheme the start-up probe picks (per-sequence attention with the
prompt shared for sdpa, the model's own packed mask for eager); per-token log-probs and one step's gradients of
every parameter, packed vs padded; the same with gradient checkpointing; in bfloat16; the MoE load-balancing loss;
and the trainer's losses step for step against stock TRL on sliding-window models.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from fastdpo import data, frameworks, models
from fastdpo.packing import PackedForward
from fastdpo.probe import choose, random_pairs, scheme_name
from fastdpo.trainer import DPOTrainer, StockDPOTrainer, candidate_schemes
from tests import archs
from tests.parity.test_parity import losses, parse, stock_args

pytestmark = pytest.mark.parity

MAX_LENGTH = 64  # some pairs below are longer: truncation is part of what must match
CASES = [(name, attn) for name in archs.FAMILIES for attn in sorted(archs.supported_attn(name))]
# What the probe must pick: sdpa runs fastdpo.segattn with the prompt shared; eager keeps the model's own packed
# mask. Anything else (a silent difference the probe missed, or a needless fallback) fails.
EXPECTED = {"sdpa": "segments + prefix sharing", "eager": "dense"}


def schemes(attn):
    args = SimpleNamespace(max_length=MAX_LENGTH, truncation_mode="keep_start", prefix_sharing=True)
    return candidate_schemes(attn, 0, args)


def pairs(seed=0, n=6):
    return random_pairs(archs.COMMON["vocab_size"], seed, n)


def logps(model, examples, scheme=None, **kwargs):
    """Per-token log-probs in TRL's padded [2n, L-1] grid, and the completion mask: padded when scheme is None."""
    padded = DataCollatorForPreference(pad_token_id=0, max_length=MAX_LENGTH)(examples)
    labels = padded["input_ids"].masked_fill(padded["completion_mask"] == 0, -100)
    mask = padded["completion_mask"][:, 1:].bool()
    if scheme is None:
        out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False, **kwargs)
    else:
        batch = scheme(examples)
        out = PackedForward(model)(labels=labels, fused_lm_head=True, **kwargs,
                                   **{k: v for k, v in batch.items() if k.startswith(("packed_", "unpack"))})
    return out, mask


def dpo_grads(model, examples, scheme):
    """Gradients of every parameter for a sigmoid DPO loss on summed log-probs (reference 0): one optimizer step."""
    model.zero_grad()
    out, mask = logps(model, examples, scheme)
    seq = (out.log_probs * mask).sum(1)
    chosen, rejected = seq.chunk(2)
    (-F.logsigmoid(0.1 * (chosen - rejected))).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, rtol):
    assert got.keys() == want.keys()
    scale = max(g.abs().max().item() for g in want.values())
    worst = max(((got[n] - want[n]).abs().max().item(), n) for n in want)
    assert worst[0] <= rtol * scale, f"{worst[1]}: {worst[0]:.2e} vs largest gradient {scale:.2e}"


def built(name, attn, dtype=torch.float32, **overrides):
    model = archs.build(name, attn, dtype=dtype, **overrides)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("name,attn", CASES)
def test_family_parity(name, attn, checkpointing):
    """The probe picks the expected scheme; per-token log-probs (1e-5) and one step's gradients equal the padded
    path's, with and without gradient checkpointing (the OLMo recipes turn it on)."""
    model = built(name, attn)
    scheme = choose(model, schemes(attn))
    assert scheme is not None and scheme_name(scheme) == EXPECTED[attn]
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # transformers checkpoints only in training mode; these configs have no dropout
    examples = pairs()
    with torch.no_grad():
        (packed, mask), (padded, _) = logps(model, examples, scheme), logps(model, examples)
    gap = (packed.log_probs - padded.log_probs).abs()[mask].max().item()
    assert gap <= 1e-5, f"{name}/{attn}: per-token log-probs differ by {gap:.2e}"
    assert_grads_close(dpo_grads(model, examples, scheme), dpo_grads(model, examples, None), rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in archs.FAMILIES if "sdpa" in archs.supported_attn(n)] + ["gemma2"])
def test_family_parity_bf16(name):
    """bfloat16: the probe (exact through its float32 twin) picks the same scheme, and packed log-probs stay within
    bfloat16 rounding of the padded ones."""
    attn = "eager" if name == "gemma2" else "sdpa"
    model = built(name, attn, dtype=torch.bfloat16)
    scheme = choose(model, schemes(attn))
    assert scheme is not None and scheme_name(scheme) == EXPECTED[attn]
    with torch.no_grad():
        (packed, mask), (padded, _) = logps(model, pairs(1), scheme), logps(model, pairs(1))
    diff = (packed.log_probs.float() - padded.log_probs.float()).abs()[mask]
    assert diff.mean() <= 5e-3 and diff.max() <= 5e-2, (diff.mean().item(), diff.max().item())


def test_moe_load_balancing_loss_parity():
    """Qwen3-MoE: the router's auxiliary loss of a packed micro-batch (prompt shared, so each shared token counts
    twice, as in the padded batch; row padding not at all) equals the padded micro-batch's over the same pairs.
    Token-budget micro-batches group a step's pairs differently from stock's fixed-size ones, so over a step the
    auxiliary loss (a per-micro-batch statistic, not part of the DPO objective) is computed on other groups; see
    CLAUDE.md."""
    model = built("qwen3_moe", "sdpa", output_router_logits=True)
    scheme = choose(model, schemes("sdpa"), output_router_logits=True)  # what the trainer passes for this model
    assert scheme_name(scheme) == "segments + prefix sharing"
    examples = pairs(2)
    (packed, _), (padded, _) = (logps(model, examples, scheme, output_router_logits=True),
                                logps(model, examples, output_router_logits=True))
    assert padded.aux_loss is not None and packed.aux_loss is not None
    torch.testing.assert_close(packed.aux_loss, padded.aux_loss, rtol=1e-6, atol=1e-7)
    # without the weighting, every packed token counts once: a different number (the test can fail)
    plain = schemes("sdpa")[1]  # segments, no sharing: same tokens as padded, so it also matches
    (unshared, _) = logps(model, examples, plain, output_router_logits=True)
    torch.testing.assert_close(unshared.aux_loss, padded.aux_loss, rtol=1e-6, atol=1e-7)


def test_unpackable_architecture_falls_back_with_the_gap(caplog):
    """A state-space model (Mamba) carries state from one packed sequence into the next: every scheme is rejected,
    with its gap in the log, and training keeps the stock padded path."""
    from transformers import AutoModelForCausalLM, MambaConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=640, hidden_size=32, num_hidden_layers=2,
                                                             state_size=4))
    add_fused_lm_head(model)
    with caplog.at_level("WARNING", logger="fastdpo"):
        assert choose(model, schemes(frameworks.attn_implementation(model))) is None
    assert "dense scheme rejected on this model: per-token log-probs differ by" in caplog.text


def test_non_causal_layer_keeps_the_models_mask(caplog):
    """A layer fastdpo.segattn cannot reproduce per sequence (here Gemma 3 with bidirectional attention) is refused
    by the per-sequence schemes, with the reason logged; the model's own packed mask is still exact."""
    model = built("gemma3", "sdpa", use_bidirectional_attention=True)
    with caplog.at_level("WARNING", logger="fastdpo"):
        scheme = choose(model, schemes("sdpa"))
    assert scheme_name(scheme) == "dense"
    assert "segments + prefix sharing scheme rejected on this model: Unsupported" in caplog.text
    assert "bidirectional" in caplog.text
    with torch.no_grad():
        (packed, mask), (padded, _) = logps(model, pairs(), scheme), logps(model, pairs())
    assert (packed.log_probs - padded.log_probs).abs()[mask].max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["olmo3", "mistral", "qwen2_sliding"])
def test_sliding_window_training_parity(name, tmp_path, caplog):
    """Sliding-window models on the default attention (sdpa) train with stock TRL's losses, step for step: 8
    optimizer steps of 2 x 2 pairs, the embedded pairs (30-45 tokens) far longer than the 8-token window."""
    script_args, args, model_args = parse(tmp_path, "--max_steps", "8", "--per_device_train_batch_size", "2",
                                          "--gradient_accumulation_steps", "2", "--max_train_samples", "64",
                                          "--learning_rate", "1e-3")
    tok = models.load_tokenizer(model_args.model_name_or_path)
    train, _ = data.tokenize_dataset(data.load_pairs(script_args).train, tok, args.max_length,
                                     script_args.max_prompt_length)
    assert min(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in train) > 3 * archs.WINDOW
    with caplog.at_level("INFO", logger="fastdpo"):
        fast = DPOTrainer(model=archs.build(name), args=args, train_dataset=train, processing_class=tok)
    assert "packing probe: segments + prefix sharing scheme matches the padded path" in caplog.text
    assert "fast path: per-sequence attention, prompt shared by chosen and rejected" in caplog.text
    fast.train()
    s_args = stock_args(args)
    # the reference: a second copy of the same seeded weights (stock TRL would load it from the model's path)
    stock = StockDPOTrainer(model=archs.build(name), ref_model=archs.build(name), args=s_args, train_dataset=train,
                            processing_class=tok)
    stock.train()
    got, want = losses(fast), losses(stock)
    assert len(got) == len(want) == 8
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
