"""The fast path is the same math as stock TRL 1.16: packed log-probs, token-budget steps, cached reference.

    .venv/bin/python -m pytest tests/parity/test_parity.py            # all, ~3-5 minutes on 2 cores
    .venv/bin/python -m pytest tests/parity/test_parity.py -m "not slow"   # seconds
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from trl import DPOConfig as StockConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from fastdpo import config as cfg
from fastdpo import data, models
from fastdpo.batching import TokenBudgetSampler, sequence_lengths
from fastdpo.packing import (
    BATCH_COUPLED_LOSSES,
    PackedForward,
    PackedPreferenceCollator,
    computed_tokens,
    unit_lengths,
)
from fastdpo.probe import probe
from fastdpo.trainer import DPOTrainer, StockDPOTrainer
from tests.e2e.test_sft_lora_eval import LOSS_EXTRAS, LOSS_TYPES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.parity


def parse(tmp_path, *extra):
    return cfg.parse_args(["--output_dir", str(tmp_path / "out"), "--eval_before_train", "false",
                           "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
                           "--ref_logps_cache_dir", str(tmp_path / "ref_cache"), *extra])


@pytest.fixture(scope="module")
def tiny():
    script_args, args, model_args = cfg.parse_args(["--output_dir", "/tmp/unused"])
    tok = models.load_tokenizer(model_args.model_name_or_path)
    pairs = data.load_pairs(script_args)
    ds, _ = data.tokenize_dataset(pairs.train, tok, args.max_length, script_args.max_prompt_length)
    return tok, ds, model_args


def stock_args(args, **overrides):
    """The same run as stock TRL would do it: TRL's own DPOConfig, padded, reference model every step."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StockConfig) if f.init}
    values.update(padding_free=False, precompute_ref_log_probs=False, **overrides)
    return StockConfig(**values)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def padded_logps(model, examples, pad_id, max_length, per_token=False):
    batch = DataCollatorForPreference(pad_token_id=pad_id, max_length=max_length)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                fused_lm_head=True, use_cache=False)
    return out.log_probs if per_token else out.log_probs.sum(dim=1)


LAYOUTS = {"dense, one row": dict(mode="dense"), "dense, capped rows": dict(mode="dense", row_capacity=48),
           "segments": dict(mode="segments"), "segments, shared prefix": dict(mode="segments", share_prefix=True)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_logps_parity(tiny, layout):
    """Per-sequence log-probs of every packed layout (one row, several capped rows, per-sequence attention, prompts
    shared by chosen and rejected) equal the padded batch's; the start-up probe agrees."""
    tok, ds, model_args = tiny
    model = models.load_model(model_args, cfg.parse_args(["--output_dir", "/tmp/unused"])[1])
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    examples = [ds[i] for i in range(0, 80, 10)]
    max_length = 40  # truncates some pairs: the packed path must cut exactly where the collator does
    collator = PackedPreferenceCollator(tok.pad_token_id, max_length, "keep_start", **LAYOUTS[layout])
    batch = collator(examples)
    if collator.row_capacity:
        assert batch["packed_input_ids"].shape[0] > 1
    assert batch["packed_input_ids"].numel() <= batch["input_ids"].numel()
    if collator.share_prefix:  # each pair's prompt once: fewer tokens than its two sequences
        assert batch["packed_input_ids"].numel() < batch["attention_mask"].sum()
    with torch.no_grad():
        stock = padded_logps(model, examples, tok.pad_token_id, max_length, per_token=True)
        packed = PackedForward(model)(**{k: v for k, v in batch.items() if k != "completion_mask"},
                                      fused_lm_head=True).log_probs
    assert torch.allclose(packed, stock, atol=1e-5, rtol=0), (packed - stock).abs().max()  # per token
    result = probe(model, collator)
    assert result.ok(torch.float32) and result.logps_gap < 1e-5, result.describe()


def test_shared_prompt_both_attention_forms_parity(tiny):
    """A rejected answer after its shared prompt runs in one of two forms, picked by length: after a short prompt
    it re-queries the prompt's slots under plain causal attention; after a long one it queries from its own tokens
    under an offset mask. A batch with both forms gives the padded batch's per-token log-probs and gradients."""
    tok, ds, model_args = tiny
    model = models.load_model(model_args, cfg.parse_args(["--output_dir", "/tmp/unused"])[1])
    add_fused_lm_head(model)
    examples = [dict(ds[i]) for i in range(0, 80, 10)]
    for ex in examples[::2]:  # every other prompt made longer than its answers
        ex["prompt_ids"] = (ex["prompt_ids"] * 8)[:60]
    max_length = 96
    collator = PackedPreferenceCollator(tok.pad_token_id, max_length, "keep_start", mode="segments",
                                        share_prefix=True)
    batch = collator(examples)
    forms = [g.offset is not None for g in batch["packed_segments"].groups]
    assert any(forms) and not all(forms), forms  # both forms present
    stock = padded_logps(model, examples, tok.pad_token_id, max_length, per_token=True)
    packed = PackedForward(model)(**{k: v for k, v in batch.items() if k != "completion_mask"},
                                  fused_lm_head=True).log_probs
    assert torch.allclose(packed, stock, atol=1e-5, rtol=0), (packed - stock).abs().max()
    weights = torch.randn_like(stock)
    grads = []
    for logps in (stock, packed):
        model.zero_grad()
        (logps * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[1], grads[0], atol=1e-5, rtol=1e-4), (grads[1] - grads[0]).abs().max()


@pytest.mark.parametrize("share_prefix", [False, True])
def test_token_budget_sampler_parity(tiny, share_prefix):
    """Same pairs per (rank, optimizer step) as the stock sampler, weights summing to 1 per step, micro-batches
    within the budget, and the same number of micro-batches on every rank."""
    _, ds, _ = tiny
    lengths = sequence_lengths(ds.select(range(46)), 128)
    B, GA, budget = 3, 2, 300
    for W in (1, 2):
        order = list(TokenBudgetSampler(lengths, B, GA, W, 0, seed=0)._order())
        if W > 1 and len(order) % (B * W):
            order += order[: B * W - len(order) % (B * W)]  # accelerate's even_batches: the tail cycles back
        batches = [order[k:k + B] for k in range(0, len(order), B)]
        counts = []
        for rank in range(W):
            sampler = TokenBudgetSampler(lengths, B, GA, W, rank, token_budget=budget, row_capacity=128, seed=0,
                                         share_prefix=share_prefix)
            slots = list(sampler)
            assert len(slots) == len(sampler) == len(batches[rank::W])
            mine = batches[rank::W]
            for s in range(0, len(mine), GA):
                step_slots = slots[s:s + GA]
                pairs = [i for slot in step_slots for mb, _ in slot for i in mb]
                assert sorted(pairs) == sorted(i for b in mine[s:s + GA] for i in b)
                assert math.isclose(sum(w for slot in step_slots for _, w in slot), 1.0)
                for slot in step_slots:
                    for mb, _ in slot:
                        assert computed_tokens(unit_lengths(lengths[list(mb)], share_prefix), 128) <= budget
            counts.append([len(slot) for slot in slots])
        assert all(c == counts[0] for c in counts)


def test_reference_cache_parity(tiny, tmp_path, caplog):
    """Precomputed (packed, cached) reference log-probs equal the stock padded reference forward; a second run
    loads them from disk."""
    tok, ds, model_args = tiny
    small = ds.select(range(24))
    _, args, _ = parse(tmp_path, "--max_steps", "1")
    with caplog.at_level("INFO", logger="fastdpo"):
        trainer = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=small,
                             processing_class=tok)
    assert "fast path: " in caplog.text and "train: reference log-probs for 24 pairs in" in caplog.text
    assert "reference log-probs from cache" not in caplog.text
    caplog.clear()
    ref = models.load_model(model_args, args)
    add_fused_lm_head(ref)
    with torch.no_grad():
        stock = padded_logps(ref, [small[i] for i in range(len(small))], tok.pad_token_id, args.max_length)
    train = trainer.train_dataset
    cached = torch.tensor(list(train["ref_chosen_logps"]) + list(train["ref_rejected_logps"]))
    # sums of ~50 per-token log-probs (each within 1e-6, test_packed_logps_parity): float32 rounding adds up
    assert torch.allclose(cached, stock, atol=1e-5, rtol=1e-6)
    with caplog.at_level("INFO", logger="fastdpo"):
        again = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=small,
                           processing_class=tok)
    assert "train: reference log-probs from cache" in caplog.text and "reference log-probs for" not in caplog.text
    assert list(again.train_dataset["ref_chosen_logps"]) == list(trainer.train_dataset["ref_chosen_logps"])


@pytest.mark.slow
def test_loss_trajectory_parity(tiny, tmp_path, caplog):
    """20 steps with accumulation and a small token budget (several variable micro-batches per step): the loss
    starts at ln 2 and follows stock TRL's padded run step for step."""
    tok, ds, model_args = tiny
    small = ds.select(range(160))
    _, args, _ = parse(tmp_path, "--max_steps", "20", "--per_device_train_batch_size", "4",
                       "--gradient_accumulation_steps", "2", "--token_budget", "256")
    with caplog.at_level("INFO", logger="fastdpo"):
        fast = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=small,
                          processing_class=tok)
    # the default packing scheme: per-sequence attention, prompt shared
    assert "fast path: per-sequence attention, prompt shared by chosen and rejected" in caplog.text
    fast.train()
    s_args = stock_args(args)
    stock = StockDPOTrainer(model=models.load_model(model_args, s_args), args=s_args, train_dataset=small,
                            processing_class=tok)
    stock.train()
    got, want = losses(fast), losses(stock)
    assert len(got) == len(want) == 20
    assert abs(got[0] - math.log(2)) < 1e-6
    assert np.allclose(got, want, atol=1e-5, rtol=0), list(zip(got, want, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddp", "zero2"])
def test_distributed_parity(tiny, tmp_path, launcher):
    """2 CPU processes (gloo): ranks end with identical weights, and the loss equals a single-process stock run
    over the same 16 pairs per step (4 pairs x 2 accumulation x 2 ranks)."""
    tok, ds, model_args = tiny
    launch = [str(ROOT / ".venv/bin/accelerate"), "launch", "--num_processes", "2"]
    if launcher == "zero2":
        launch += ["--config_file", str(ROOT / "accelerate_config.yaml")]
    else:
        launch += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = tmp_path / launcher
    # .venv/bin first on PATH: DeepSpeed rebuilds its CPU comm op whenever the ninja it finds changes (CLAUDE.md)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run([*launch, str(ROOT / "tests/distributed/dist_ranks.py"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    dist_losses = json.loads((out / "rank0.json").read_text())["losses"]

    script_args, args, _ = parse(tmp_path, "--max_steps", "4", "--per_device_train_batch_size", "4",
                                 "--gradient_accumulation_steps", "4", "--max_train_samples", "64")
    pairs = data.load_pairs(script_args)
    small, _ = data.tokenize_dataset(pairs.train, tok, args.max_length, script_args.max_prompt_length)
    s_args = stock_args(args)
    stock = StockDPOTrainer(model=models.load_model(model_args, s_args), args=s_args, train_dataset=small,
                            processing_class=tok)
    stock.train()
    assert np.allclose(dist_losses, losses(stock), atol=1e-5, rtol=0), (dist_losses, losses(stock))


@pytest.mark.slow
def test_loss_types_parity(tiny, tmp_path, caplog):
    """Every loss TRL computes per pair, and its per-token options (ld_alpha, WPO weighting), follows stock TRL step
    for step on the default fast path (per-sequence attention, prompt shared, precomputed reference)."""
    tok, ds, model_args = tiny
    small = ds.select(range(48))
    cases = [([t], LOSS_EXTRAS.get(t, {})) for t in LOSS_TYPES if t not in BATCH_COUPLED_LOSSES]
    cases += [(["sigmoid"], {"ld_alpha": 0.5}), (["sigmoid"], {"use_weighting": True})]
    for types, extra in cases:
        flags = [f"--{k}={v}" for k, v in extra.items()]
        _, args, _ = parse(tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "4",
                           "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2", "--loss_type", *types,
                           *flags, "--ref_logps_cache_dir", str(tmp_path / "_".join(types + flags)))
        caplog.clear()
        with caplog.at_level("INFO", logger="fastdpo"):
            fast = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=small,
                              processing_class=tok)
        assert "fast path: per-sequence attention, prompt shared by chosen and rejected" in caplog.text, types
        fast.train()
        s_args = stock_args(args)
        stock = StockDPOTrainer(model=models.load_model(model_args, s_args), args=s_args, train_dataset=small,
                                processing_class=tok)
        stock.train()
        got, want = losses(fast), losses(stock)
        assert len(got) == 3 and np.allclose(got, want, atol=1e-5, rtol=1e-5), (types, extra, got, want)


def test_fallback_is_logged(tiny, tmp_path, caplog):
    """A loss that couples the pairs of a micro-batch keeps the stock path, and says why."""
    tok, ds, model_args = tiny
    _, args, _ = parse(tmp_path, "--max_steps", "1", "--loss_type", "aot", "--precompute_ref_log_probs", "false")
    with caplog.at_level("WARNING", logger="fastdpo"):
        trainer = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=ds.select(range(8)),
                             processing_class=tok)
    assert trainer.scheme is None and "padding_free: using the stock padded path because" in caplog.text
    assert "couples the pairs" in caplog.text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
