"""fastdpo.memory: the parameter count matches real models, the model-state bytes match DeepSpeed's own
estimators, and README's "What fits where" table is the module's output (generated, not typed)."""

import json
import os
import subprocess
import time
from dataclasses import asdict, fields

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
from transformers import AutoModelForCausalLM, LlamaConfig, Olmo3Config

from fastdpo import memory
from tests.helpers import PYTHON, REPO


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
    # 7B at 4 pairs x 8192 (what recipes/olmo3_think.yaml ran before it went to 2 x 16 for 80 GB GPUs) needs a
    # sharded backend on 80 GB GPUs, ZeRO-2 on 180 GB ones
    assert memory.smallest(memory.OLMO3_7B, 4 * 2 * 8192, 4, 80) == "ZeRO-3"
    assert memory.smallest(memory.OLMO3_7B, 2 * 2 * 8192, 4, 80) == "ZeRO-2"
    assert memory.smallest(memory.OLMO3_7B, 4 * 2 * 8192, 4, 180) == "ZeRO-2"
    assert memory.smallest(memory.OLMO3_32B, 2 * 2 * 8192, 16, 80) == "ZeRO-3"


# ------------------------------------------------------------------------------------ the check before a run

H100 = 81559 * 2**20  # what nvidia-smi reports for an "80 GB" H100 (85.5e9 bytes)


def _config_dir(tmp_path, shape: memory.Shape, name="model") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "olmo3", "num_hidden_layers": shape.layers, "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "tie_word_embeddings": shape.tied}))
    return str(folder)


def test_the_pre_check_defaults_are_trls():
    """The sbatch pre-check reads YAML without TRL: its defaults for keys a recipe leaves out must be the configs'."""
    from trl import ModelConfig

    from fastdpo.config import DPOConfig

    defaults = {f.name: f.default for conf in (DPOConfig, ModelConfig) for f in fields(conf)}
    for key, value in memory.DEFAULTS.items():
        assert defaults[key] == value, key


def test_check_refuses_or_accepts_by_gpu_memory():
    think = memory.Run("allenai/olmo-3-7b", "ZeRO-2", gpus=4, per_device=4, accumulation=8, max_length=8192)
    for gpu_bytes in (80e9, H100):
        ok, message = memory.verdict(think, memory.OLMO3_7B, gpu_bytes)
        assert not ok
        first, estimate, found, anyway = message.splitlines()
        assert "~73.7 GB per GPU" in first and f"the GPU has {gpu_bytes / 1e9:.1f} GB" in first
        assert f"runs fit in 85% of it ({0.85 * gpu_bytes / 1e9:.1f} GB)" in first and " over;" in first
        assert "weights 14.6 GB + gradients 10.9 GB + optimizer 21.9 GB + activations 26.3 GB" in estimate
        assert "BACKEND=zero3 (sbatch; accelerate_config_zero3.yaml for accelerate launch): 60.8 GB" in found
        assert ("--per_device_train_batch_size 2 --gradient_accumulation_steps 16 (32 pairs per GPU and optimizer "
                "step, as before): 60.6 GB") in found
        assert "8 GPUs (more nodes" in found and anyway == "  to run it anyway: FASTDPO_SKIP_MEMORY_CHECK=1"
    assert memory.verdict(think, memory.OLMO3_7B, 180e9)[0]
    ok, line = memory.verdict(memory.Run("m", "ZeRO-2", 4, 2, 16, 8192), memory.OLMO3_7B, H100)
    assert ok and line.startswith("memory: ~60.6 GB per GPU for m (7.3B parameters), ZeRO-2 on 4 GPUs, 2 pairs/device")
    # without gradient checkpointing every layer keeps its activations; the fix names it
    ok, message = memory.verdict(memory.Run("m", "ZeRO-3", 4, 2, 16, 8192, checkpointing=False), memory.OLMO3_7B,
                                 H100)
    assert not ok and "--gradient_checkpointing true: 47.6 GB" in message


def test_one_gpu_lora_and_the_stock_reference_copy():
    shape, tokens = memory.OLMO3_7B, 2 * 2 * 1024
    plain = memory.per_gpu(shape, "DDP", 1, tokens, param_bytes=2)  # bf16 weights, bf16 AdamW moments
    assert (plain.weights, plain.gradients, plain.optimizer) == (2 * shape.params, 2 * shape.params,
                                                                 4 * shape.params)
    assert memory.per_gpu(shape, "DDP", 2, tokens, param_bytes=2).gradients == 4 * shape.params  # DDP's buckets
    lora = memory.per_gpu(shape, "DDP", 1, tokens, param_bytes=2, lora=True)
    assert lora.weights == 2 * shape.params and lora.gradients == lora.optimizer == 0
    ref = memory.per_gpu(shape, "ZeRO-3", 4, tokens, reference=True)
    assert ref.weights - memory.per_gpu(shape, "ZeRO-3", 4, tokens).weights == 2 * shape.params / 4


def test_config_json_is_read_without_weights(tmp_path, monkeypatch):
    path = _config_dir(tmp_path, memory.OLMO3_7B)
    shape, why = memory.read_shape(path)
    assert why == "" and shape.params == memory.OLMO3_7B.params
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": path}))
    assert memory.read_shape(str(adapter))[0].params == shape.params
    assert memory.read_shape("embedded:tiny-llama") == (None, "the embedded tiny model needs no check")
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text(json.dumps({"num_experts": 64}))
    assert "mixture of experts" in memory.read_shape(str(moe))[1]
    # a Hub id offline, or with the Hub unreachable (a closed local port): one line at once, no retries
    from huggingface_hub import constants

    t0 = time.monotonic()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert memory.read_shape("allenai/Olmo-3-7B-Think-SFT") == (None, "cannot read allenai/Olmo-3-7B-Think-SFT's "
                                                                "config.json (LookupError: HF_HUB_OFFLINE=1 and it is "
                                                                "not in the Hub cache)")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    shape, why = memory.read_shape("allenai/Olmo-3-7B-Think-SFT")
    assert shape is None and why.startswith("cannot read allenai/Olmo-3-7B-Think-SFT's config.json (Connect"), why
    assert time.monotonic() - t0 < 10


def test_backend_and_run_from_the_launch(tmp_path):
    from fastdpo.config import parse_args

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert memory.backend_from_env({}) == "DDP"
    assert memory.backend_from_env({"ACCELERATE_USE_DEEPSPEED": "true",
                                    "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_config.json")}) == "ZeRO-2"
    assert memory.backend_from_env({"ACCELERATE_USE_DEEPSPEED": "true",
                                    "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}) == "ZeRO-3"
    assert memory.backend_from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "FSDP2"
    assert memory.backend_from_env({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}) is None
    # train_dpo.py's parsed arguments and the sbatch pre-check's YAML reading describe the same run
    flags = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps=8"]
    _, t, m = parse_args(["--config", str(REPO / "recipes" / "olmo3_think.yaml"), "--use_cpu", "true", "--bf16",
                          "false", *flags], check_paths=False)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "ds_config.json"),
           "WORLD_SIZE": "4"}
    parsed = memory.run_from_args(t, m, env)
    assert parsed == memory.run_from_recipe(str(REPO / "recipes" / "olmo3_think.yaml"), flags, "zero2", 4)
    assert asdict(parsed) | {"model": "-"} == asdict(memory.Run("-", "ZeRO-2", 4, 4, 8, 8192, dtype="bfloat16",
                                                                revision="main"))


@pytest.mark.parametrize("recipe, backend, gpus, shape", [
    ("olmo3_think.yaml", "zero2", 4, memory.OLMO3_7B),
    ("olmo3_instruct.yaml", "zero2", 4, memory.OLMO3_7B),
    ("olmo3_32b_think.yaml", "zero3", 16, memory.OLMO3_32B),
])
def test_the_shipped_recipes_fit_80_gb_gpus(tmp_path, recipe, backend, gpus, shape):
    run = memory.run_from_recipe(str(REPO / "recipes" / recipe), [], backend, gpus)
    ok, message = memory.verdict(run, shape, 80e9)
    assert ok, message


def _precheck(tmp_path, *args, entry="train_dpo.py", **env):
    """scripts/_launch.sh's memory_check function, as the batch shell runs it before srun."""
    body = subprocess.run(["sed", "-n", "/^memory_check() {/,/^}/p", "scripts/_launch.sh"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert body.count("\n") >= 3, body
    script = f"set -euo pipefail\n{body}\nmemory_check \"$@\" || exit 1\n"
    environ = {**os.environ, "PATH": f"{os.path.dirname(PYTHON)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
               "RECIPE": "recipes/olmo3_think.yaml", "BACKEND": "zero2", "NNODES": "1", "GPUS_PER_NODE": "4",
               "ENTRY": entry, **env}
    return subprocess.run(["bash", "-c", script, "launch", *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_the_sbatch_pre_check(tmp_path):
    model = _config_dir(tmp_path, memory.OLMO3_7B)
    proc = _precheck(tmp_path, "--model_name_or_path", model, "--gpu-memory-gb", "80")
    assert proc.returncode == 0 and proc.stdout.startswith("memory: ~60.6 GB per GPU"), proc.stdout + proc.stderr
    over = ["--model_name_or_path", model, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "8",
            "--gpu-memory-gb", "80"]
    proc = _precheck(tmp_path, *over)
    assert proc.returncode == 1 and "~73.7 GB per GPU" in proc.stderr and "BACKEND=zero3" in proc.stderr
    proc = _precheck(tmp_path, *over, BACKEND="zero3")
    assert proc.returncode == 0 and "ZeRO-3 on 4 GPUs" in proc.stdout
    proc = _precheck(tmp_path, *over, NNODES="4")
    assert proc.returncode == 0 and "ZeRO-2 on 16 GPUs" in proc.stdout
    proc = _precheck(tmp_path, *over, FASTDPO_SKIP_MEMORY_CHECK="1")
    assert proc.returncode == 0 and proc.stdout == "memory check skipped (FASTDPO_SKIP_MEMORY_CHECK=1)\n"
    proc = _precheck(tmp_path, *over, entry="train_sft.py")  # one sequence per example: half the activations
    assert proc.returncode == 0 and "4 sequences/device x 8192 tokens" in proc.stdout
    proc = _precheck(tmp_path, "--model_name_or_path", model, PATH=f"{os.path.dirname(PYTHON)}:/usr/bin:/bin")
    assert proc.returncode == 0 and "skipped: no GPU seen here" in proc.stdout  # no nvidia-smi on this machine
