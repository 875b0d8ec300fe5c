"""Tiny, seeded causal LMs of every family our users train, for packed-vs-padded parity tests.

Each family is built offline from transformers' own config class with small dims (hidden 64, 4 heads of 16,
intermediate 128) and keeps what makes the family different: its layer pattern, sliding windows (shrunk to
WINDOW tokens so that test sequences of 20-60 tokens exceed them), softcapping, NoPE layers, experts, partial RoPE,
multipliers.

    from tests import archs
    for name in archs.FAMILIES:
        for attn in archs.supported_attn(name):
            model = archs.build(name, attn)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
    SmolLM3Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

WINDOW = 8  # keys a sliding query sees, itself included (transformers: kv_idx > q_idx - sliding_window)
# 640 = the embedded tiny tokenizer's vocabulary (fastdpo.tiny), so real tokenised pairs fit every model.
COMMON = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(num_key_value_heads=2)


def _config(cls, **fixed):
    return lambda **kw: cls(**(COMMON | fixed | kw))


# name -> config builder; keyword overrides replace any setting
FAMILIES: dict[str, Callable[..., PreTrainedConfig]] = {
    # GQA, Llama 3 rope scaling (low frequencies stretched)
    "llama": _config(LlamaConfig, **GQA, max_position_embeddings=131072, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192)),
    # qkv bias, no window (the released Qwen2/2.5 configs have use_sliding_window false)
    "qwen2": _config(Qwen2Config, **GQA),
    # layers >= max_window_layers slide: layers 0-1 full, 2-3 window 8
    "qwen2_sliding": _config(Qwen2Config, **GQA, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    # q/k RMSNorm per head, explicit head_dim
    "qwen3": _config(Qwen3Config, **GQA, head_dim=16),
    # every layer sparse (decoder_sparse_step 1, no mlp_only_layers), 4 experts top-2, as Qwen3-30B-A3B sets
    # output_router_logits false; pass output_router_logits=True to get router_logits and aux_loss
    "qwen3_moe": _config(Qwen3MoeConfig, **GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, norm_topk_prob=True, output_router_logits=False,
                         router_aux_loss_coef=0.001),
    # MHA (as OLMo 2 7B), q/k RMSNorm over all heads, norms after attention and MLP
    "olmo2": _config(Olmo2Config),
    # OLMo 3's default layer_types: 3 sliding layers then 1 full (layers 0-2 window 8, layer 3 full)
    "olmo3": _config(Olmo3Config, sliding_window=WINDOW),
    # one window for every layer
    "mistral": _config(MistralConfig, **GQA, sliding_window=WINDOW),
    # alternating sliding/full (even layers slide), eager only; softcaps shrunk like the window (the real 50 / 30
    # never bend this model's scores ~0.1 and logits ~0.7); query_pre_attn_scalar != head_dim so it is not a no-op
    "gemma2": _config(Gemma2Config, **GQA, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=32,
                      attn_logit_softcapping=0.1, final_logit_softcapping=0.5),
    # 5 local : 1 global, local rope theta 1e4, global 1e6 with linear scaling 8 (Gemma 3 4B and up), q/k norm
    "gemma3": _config(Gemma3TextConfig, **GQA, head_dim=16, num_hidden_layers=6, sliding_window=WINDOW,
                      rope_parameters=dict(sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                           full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6))),
    # NoPE every 4th layer (layer 3 has no RoPE), as SmolLM3-3B
    "smollm3": _config(SmolLM3Config, **GQA, no_rope_layer_interval=4),
    # fused qkv / gate_up, partial rotary 0.75 (Phi-4-mini); sliding_window applies to every layer
    "phi3": _config(Phi3Config, **GQA, sliding_window=WINDOW, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75)),
    # MHA, parallel residual, RoPE on 25% of each head (rotary_pct, as Pythia)
    "gpt_neox": _config(GPTNeoXConfig, rotary_pct=0.25),
    # muP-style multipliers of Granite 3 (attention_multiplier = 1 / head_dim of the real model)
    "granite": _config(GraniteConfig, **GQA, embedding_multiplier=12.0, logits_scaling=8.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625),
}


def build(name: str, attn: str | None = None, dtype=torch.float32, seed: int = 0, **overrides) -> PreTrainedModel:
    """Random weights from `seed`, without touching the caller's RNG state; attn None = transformers' default
    (sdpa, or eager where sdpa is refused)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(FAMILIES[name](**overrides), attn_implementation=attn, dtype=dtype)


def sliding_windows(model) -> dict[int, int | None]:
    """Layer index -> window (None = full attention), by the rule the modeling code applies: layers typed
    "sliding_attention" get config.sliding_window; models without layer_types slide every layer when it is set."""
    c = model.config
    window = getattr(c, "sliding_window", None)
    every = "sliding_attention" if window else "full_attention"
    types = getattr(c, "layer_types", None) or [every] * c.num_hidden_layers
    return {i: window if t == "sliding_attention" else None for i, t in enumerate(types)}


def supported_attn(name: str) -> set[str]:
    """Of sdpa and eager, what from_config accepts: Gemma 2 sets _supports_sdpa = False (sdpa has no softcap)."""
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(FAMILIES[name]())]
    return {"sdpa", "eager"} if cls._supports_sdpa else {"eager"}
