"""DeepSpeed ZeRO-3 with the repo's configs, 2 CPU processes (gloo): sharded checkpoints, a kill -9 during a save,
the backend in the changed-run check, the final model as a plain from_pretrained folder, LoRA.

    accelerate launch --config_file accelerate_config_zero3.yaml --num_processes 2 train_dpo.py --use_cpu true ...

(`accelerate launch --cpu --num_processes 2` would start one process; the DeepSpeed config plus train_dpo.py's
`--use_cpu true` gives two gloo ranks, as in tests/e2e/test_train.py's ZeRO-2 test.) FSDP2 does not train on CPU
(CLAUDE.md, "Sharded training"): only the plugin its accelerate config gives is checked here.
"""

import re
from pathlib import Path

import pytest
import torch

from fastdpo.checkpoints import MARKER
from tests.helpers import PYTHON, read_json, run

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))
CONFIGS = {"zero2": "accelerate_config.yaml", "zero3": "accelerate_config_zero3.yaml"}
# The stock padded path on both backends, so that the ZeRO-2 / ZeRO-3 comparison compares the backends only,
# whichever of them runs the fast path (tests/parity/ compare the paths).
ARGS = ["--use_cpu", "true", "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4",
        "--logging_steps", "2", "--eval_before_train", "false", "--padding_free", "false"]


def launch(backend, out, *extra, fault=None, check=True):
    script = ["tests/faults.py", fault, "train_dpo.py"] if fault else ["train_dpo.py"]
    return run([ACCELERATE, "launch", "--config_file", CONFIGS[backend], "--num_processes", "2", *script,
                "--output_dir", str(out), *ARGS, *extra], check=check, timeout=900)


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def test_zero3_kill_during_a_save_resumes_and_saves_a_plain_model(tmp_path):
    full, killed, zero2 = tmp_path / "full", tmp_path / "killed", tmp_path / "zero2"
    proc = launch("zero3", full)
    assert "x 2 processes x" in proc.stdout and "MULTI_CPU (ZeRO-3)" in (full / "run.json").read_text()
    # the start-up disk check sees the whole model, not this rank's partition (0 elements under zero3_init_flag)
    size = (full / "model.safetensors").stat().st_size / 2**30
    logged = float(re.search(r"disk: the final model takes ([\d.e-]+) GiB", proc.stdout)[1])
    assert logged == pytest.approx(size, rel=0.01), (logged, size)
    # the marker lists every rank's parameter and optimizer shards
    files = read_json(full / "checkpoint-8" / MARKER)["files"]
    for rank in (0, 1):
        for kind in ("model", "optim"):
            assert f"global_step8/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" in files, sorted(files)

    proc = launch("zero3", killed, fault="kill-in-save:8", check=False)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert (killed / "checkpoint-8" / "global_step8").is_dir() and not (killed / "checkpoint-8" / MARKER).exists()
    proc = launch("zero3", killed)  # the rerun (or Slurm's requeue) of the same command
    assert f"skipping {killed}/checkpoint-8: no {MARKER}" in proc.stdout
    assert f"resuming from {killed}/checkpoint-4" in proc.stdout and "step 8/8" in proc.stdout
    a, b = _weights(full), _weights(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name  # the resumed ZeRO-3 run ends bit for bit where the full one does

    # Another backend cannot read these optimizer states: refused at start-up, even with --allow_changed_run.
    proc = launch("zero2", killed, "--max_steps", "12", "--allow_changed_run", "true", check=False)
    assert proc.returncode != 0
    assert (f"{killed}/checkpoint-8 was saved by MULTI_CPU (ZeRO-3), this run trains with MULTI_CPU (ZeRO-2)"
            in proc.stderr), proc.stderr[-3000:]
    assert "Fix: resume with BACKEND=zero3 (accelerate_config_zero3.yaml)" in proc.stderr
    assert "step " not in proc.stdout

    # The final model is a plain folder: from_pretrained reads it, and it equals ZeRO-2's on the same data: the
    # same optimizer math, with gradients reduced in another order (measured: 6e-8 apart at most, weights ~1).
    launch("zero2", zero2)
    assert sorted(p.name for p in full.glob("*.safetensors")) == ["model.safetensors"]
    c = _weights(zero2)
    assert a.keys() == c.keys()
    for name in a:
        torch.testing.assert_close(a[name], c[name], rtol=0, atol=1e-6, msg=name)

    # scripts/evaluate.py reads it as it reads any run's output
    report = tmp_path / "eval.json"
    run([PYTHON, "scripts/evaluate.py", str(full), "--ref", "embedded:tiny-llama", "--max_pairs", "16",
         "--samples", "1", "--gen_prompts", "4", "--max_new_tokens", "8", "--json", str(report)])
    assert read_json(report)["preference_accuracy"] > 0.5


def test_zero3_lora_trains_and_saves_its_adapter_and_the_merged_model(tmp_path):
    """The adapter is gathered from the ranks' partitions; merge_adapter folds it into a full copy of the base (the
    trained model's own weights are shards): the same weights as PEFT's merge in one process."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastdpo import tiny

    out = tmp_path / "lora"
    launch("zero3", out, "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--learning_rate", "1e-2",
           "--lora_target_modules", "q_proj", "v_proj", "--max_steps", "4", "--merge_adapter", "true")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.numel() > 0 for v in adapter.values())  # 2 layers x q, v; no empty shards
    assert all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: trained
    base = AutoModelForCausalLM.from_pretrained(tiny.materialize_model(), dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    merged = _weights(out)
    assert merged.keys() == expected.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           _weights(tiny.materialize_model())["model.layers.0.self_attn.q_proj.weight"])


PLUGIN = """
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM
from fastdpo import tiny
plugin = FullyShardedDataParallelPlugin()  # from the environment accelerate launch sets, as the Trainer builds it
plugin.set_auto_wrap_policy(AutoModelForCausalLM.from_pretrained(tiny.materialize_model()))
layers = sorted(c.__name__ for c in plugin.auto_wrap_policy.keywords["transformer_layer_cls"])
print("plugin:", plugin.fsdp_version, plugin.state_dict_type.name, plugin.reshard_after_forward,
      plugin.cpu_ram_efficient_loading, layers)
"""


def test_fsdp2_config_gives_the_intended_plugin(tmp_path):
    """FSDP2 cannot train on CPU (accelerate selects FSDP on GPUs only, CLAUDE.md), so this checks what the launcher
    makes of accelerate_config_fsdp2.yaml: FSDP2, sharded checkpoints, full shard, rank-0 loading, one unit per
    decoder layer."""
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    proc = run([ACCELERATE, "launch", "--config_file", "accelerate_config_fsdp2.yaml", "--num_processes", "1",
                str(script)], env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert "plugin: 2 SHARDED_STATE_DICT True True ['LlamaDecoderLayer']" in proc.stdout, proc.stdout[-2000:]
