"""train_dpo.py end to end on CPU: the embedded default, resume, 2-process DDP, DeepSpeed ZeRO-2, secrets."""

import json
import os
from pathlib import Path

import pytest

from .conftest import PYTHON, REPO, read_json, run

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))


def test_embedded_default_learns_the_preference(tmp_path):
    out = tmp_path / "tiny"
    proc = run([PYTHON, "train_dpo.py", "--output_dir", str(out)])
    results = read_json(out / "all_results.json")
    assert results["eval_rewards/accuracies"] >= 0.90
    assert results["before_eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # ln 2: policy == reference
    assert results["eval_loss"] < 0.3 and "train_loss" in results
    for name in ("model.safetensors", "config.json", "tokenizer.json", "data_report.json", "trainer_state.json"):
        assert (out / name).exists(), name
    assert read_json(out / "data_report.json")["train"] == {"pairs": 1024, "truncated": 0, "dropped": 0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert lines and lines[-1].startswith("step 128/128 | loss ")
    assert "\r" not in proc.stdout + proc.stderr  # no progress bars in a log file
    # the before/after table: before training policy == reference, so rewards tie (TRL counts a tie as wrong);
    # packed reference log-probs can differ from the policy's in the last float bits, flipping a rare tie
    assert results["before_eval_rewards/accuracies"] < 0.05
    assert "| eval_rewards/accuracies | 0.0" in proc.stdout


def test_resume_ends_with_the_same_weights(tmp_path):
    """A run resumed from its step-4 checkpoint ends bit-for-bit where the uninterrupted run ends."""
    import shutil

    import torch
    from safetensors.torch import load_file

    def train(out):
        return run([PYTHON, "train_dpo.py", "--output_dir", str(out), "--max_steps", "8", "--save_strategy", "steps",
                    "--save_steps", "4", "--logging_steps", "2", "--eval_before_train", "false"])

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(full)
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    proc = train(resumed)
    assert f"resuming from {resumed}/checkpoint-4" in proc.stdout
    assert "step 8/8" in proc.stdout and "step 2/8" not in proc.stdout
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_data_fails_before_training_with_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    proc = run([PYTHON, "train_dpo.py", "--dataset_name", str(bad), "--dataset_test_split", "0.5",
                "--output_dir", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    assert f"{bad}:2: missing column 'rejected'" in proc.stdout + proc.stderr
    assert "step " not in proc.stdout


def test_own_data_file_with_skipped_rows(tmp_path):
    from fastdpo import tiny

    rows = [json.dumps(r) for r in tiny.preference_rows("train", 40)]
    rows.insert(5, "{not json")
    rows.insert(9, json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}))
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    proc = run([PYTHON, "train_dpo.py", "--dataset_name", str(path), "--dataset_test_split", "0.25",
                "--skip_bad_rows", "true", "--output_dir", str(out), "--max_steps", "2"], check=False)
    # malformed JSON cannot be skipped row-wise safely: it fails with the line number either way
    assert proc.returncode == 2 and f"{path}:6: malformed JSON" in proc.stdout
    rows.pop(5)
    path.write_text("\n".join(rows) + "\n")
    run([PYTHON, "train_dpo.py", "--dataset_name", str(path), "--dataset_test_split", "0.25",
         "--skip_bad_rows", "true", "--output_dir", str(out), "--max_steps", "2"])
    skipped = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert skipped == [{"where": f"{path}:9", "problem": "chosen is identical to rejected (no preference to learn)"}]
    report = read_json(out / "data_report.json")
    assert report["skipped_rows"] == 1 and report["train"]["pairs"] + report["eval"]["pairs"] == 40


def _two_ranks(stdout: str) -> None:
    assert "x 2 processes x" in stdout, stdout[-3000:]
    assert "x 1 processes x" not in stdout  # not two independent single-process trainings


def test_two_process_ddp_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    proc = run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "train_dpo.py", "--use_cpu", "true",
                "--max_steps", "6", "--logging_steps", "2", "--eval_before_train", "false", "--output_dir", str(out)])
    _two_ranks(proc.stdout)
    assert read_json(out / "trainer_state.json")["global_step"] == 6
    assert (out / "model.safetensors").exists()


def test_deepspeed_zero2_with_the_repo_configs(tmp_path):
    out = tmp_path / "zero2"
    proc = run([ACCELERATE, "launch", "--config_file", "accelerate_config.yaml", "--num_processes", "2",
                "train_dpo.py", "--use_cpu", "true", "--max_steps", "6", "--logging_steps", "2",
                "--output_dir", str(out)], timeout=900)
    _two_ranks(proc.stdout)
    assert "zero_optimization" in proc.stdout + proc.stderr or "DeepSpeed" in proc.stdout + proc.stderr
    assert read_json(out / "trainer_state.json")["global_step"] == 6
    assert (out / "model.safetensors").exists()
    assert "before_eval_loss" in read_json(out / "all_results.json")  # eval before training works under ZeRO-2


def test_secrets_never_reach_outputs_or_logs(tmp_path):
    token, wandb_key = "hf_PLANTEDsecret1234567890abcdef", "0123456789abcdefPLANTEDwandbkey0123456789"
    (tmp_path / ".env").write_text(f"HF_TOKEN={token}\nWANDB_API_KEY={wandb_key}\n")
    out, logs = tmp_path / "outputs" / "run", tmp_path / "logs"
    logs.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "outputs"), "HF_TOKEN": "", "WANDB_API_KEY": ""}
    env = {k: v for k, v in env.items() if v}
    os.environ.pop("HF_TOKEN", None), os.environ.pop("WANDB_API_KEY", None)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("report_to: none",
                                                                          "report_to: [tensorboard, wandb]"))
    proc = run([PYTHON, str(REPO / "train_dpo.py"), "--config", str(recipe), "--output_dir", str(out),
                "--max_steps", "4", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "2"],
               cwd=tmp_path, env=env)
    (logs / "run.out").write_text(proc.stdout + proc.stderr)
    assert (out / "checkpoint-4" / "training_args.bin").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    assert any("tfevents" in p.name for p in files) and any(p.suffix == ".wandb" for p in files)
    for path in files:
        blob = path.read_bytes()
        assert token.encode() not in blob and wandb_key.encode() not in blob, path


def test_push_to_hub_fails_fast_without_the_hub(tmp_path):
    # The real huggingface_hub path runs up to the network: offline, it stops before loading any data.
    base = [PYTHON, "train_dpo.py", "--push_to_hub", "true", "--hub_model_id", "me/tiny-dpo",
            "--output_dir", str(tmp_path / "o")]
    proc = run(base, env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode != 0 and "HF_HUB_OFFLINE=1" in proc.stdout + proc.stderr
    # a Hub endpoint that refuses connections: the same client code, answered at once
    proc = run(base, env={"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token_123456",
                          "HF_ENDPOINT": "http://127.0.0.1:9"}, check=False)
    assert proc.returncode != 0 and "Hub check failed" in proc.stdout + proc.stderr
    assert "hf_not_a_real_token_123456" not in proc.stdout + proc.stderr
    assert not (tmp_path / "o" / "data_report.json").exists()
