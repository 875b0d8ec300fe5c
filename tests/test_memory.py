"""fastdpo.memory: the parameter count matches real models, the model-state bytes match DeepSpeed's own
estimators, and README's "What fits where" table is the module's output (generated, not typed)."""

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import AutoModelForCausalLM, LlamaConfig, Olmo3Config

from fastdpo import memory

from .conftest import REPO


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, tie_word_embeddings=True),
    Olmo3Config(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, sliding_window=16),
], ids=["llama-gqa-tied", "olmo3"])
def test_parameter_count_matches_the_real_model(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(p.numel() for p in model.parameters())
    shape = memory.Shape.from_config("tiny", config)
    assert shape.params == pytest.approx(real, rel=0.01)  # the norms are left out: a few x hidden per layer
    assert shape.params <= real


def test_model_states_equal_deepspeeds_estimators():
    shape, gpus = memory.OLMO3_32B, 16
    psi = shape.params
    largest = max(shape.layer_params, shape.vocab * shape.hidden)
    for backend, expected in (  # (cpu bytes, gpu bytes[, largest layer]): the GPU's
        ("ZeRO-2", estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=4, num_nodes=4, cpu_offload=False)[1]),
        ("ZeRO-3", estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=4, num_nodes=4,
                                                         cpu_offload=False)[1]),
    ):
        m = memory.per_gpu(shape, backend, gpus, tokens=0)
        assert m.activations == 0
        assert m.total == pytest.approx(expected, rel=1e-6), backend
    # FSDP2 holds the same 16 bytes per parameter as the ZeRO paper's count, sharded; plus the gathered layers
    fsdp, zero3 = memory.per_gpu(shape, "FSDP2", gpus, 0), memory.per_gpu(shape, "ZeRO-3", gpus, 0)
    assert fsdp.total == pytest.approx(16 * psi / gpus + 4 * largest)
    assert zero3.total - fsdp.total == pytest.approx(2 * psi / gpus)  # DeepSpeed's 18 bytes per parameter


def test_activations_follow_the_token_budget():
    shape = memory.OLMO3_7B
    one, two = (memory.per_gpu(shape, "ZeRO-2", 4, t).activations for t in (16384, 32768))
    assert two == pytest.approx(2 * one)
    # 32 layers x 16384 tokens x 4096 x 2 bytes of checkpoints + one layer's 34 bytes per token and hidden unit
    assert one == 32 * 16384 * 4096 * 2 + 34 * 16384 * 4096
    with pytest.raises(ValueError, match="one of ZeRO-2, ZeRO-3, FSDP2"):
        memory.per_gpu(shape, "ZeRO-4", 4, 0)


def test_readme_table_is_generated():
    assert memory.table() in (REPO / "README.md").read_text(), "regenerate it: python -m fastdpo.memory"
    assert memory.OLMO3_7B.params == pytest.approx(7.3e9, rel=0.01)
    assert memory.OLMO3_32B.params == pytest.approx(32.2e9, rel=0.01)
    # the recipes' settings: the 7B Think recipe needs a sharded backend on 80 GB GPUs, ZeRO-2 on 180 GB ones
    assert memory.smallest(memory.OLMO3_7B, 4 * 2 * 8192, 4, 80) == "ZeRO-3"
    assert memory.smallest(memory.OLMO3_7B, 4 * 2 * 8192, 4, 180) == "ZeRO-2"
    assert memory.smallest(memory.OLMO3_32B, 2 * 2 * 8192, 16, 80) == "ZeRO-3"
