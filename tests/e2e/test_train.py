"""train_dpo.py end to end on CPU: the embedded default, resume, 2-process DDP, DeepSpeed ZeRO-2, secrets."""

import json
import os
from pathlib import Path

import pytest

from fastdpo.checkpoints import MARKER
from tests.helpers import PYTHON, REPO, read_json, run

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
    assert "optimizer steps: 128 (1 epochs of 128 steps)" in proc.stdout  # counted, not the num_train_epochs key
    assert "gemm_4bit" not in proc.stdout + proc.stderr  # bitsandbytes' import-time noise is gone
    assert "is deprecated" not in proc.stderr  # TRL's own gradient_checkpointing default warned on every run
    assert "\r" not in proc.stdout + proc.stderr  # no progress bars in a log file
    # the before/after table: before training policy == reference, so rewards tie (TRL counts a tie as wrong);
    # packed reference log-probs can differ from the policy's in the last float bits, flipping a rare tie
    assert results["before_eval_rewards/accuracies"] < 0.05
    assert "| eval_rewards/accuracies | 0.0" in proc.stdout


def _same_weights(a_dir, b_dir):
    import torch
    from safetensors.torch import load_file

    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_kill_during_a_save_and_sigterm_both_resume_to_the_same_weights(tmp_path):
    """kill -9 while checkpoint-8 is being written, and SIGTERM mid-run: each rerun of the same command resumes
    (from checkpoint-4, the last complete one; from the checkpoint SIGTERM saved) and ends bit-for-bit where the
    uninterrupted run ends."""
    args = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "2",
            "--eval_before_train", "false"]

    def train(out, fault=None, check=True):
        cmd = [PYTHON, "tests/faults.py", fault, "train_dpo.py"] if fault else [PYTHON, "train_dpo.py"]
        return run(cmd + ["--output_dir", str(out), *args], check=check)

    full, killed, termed = tmp_path / "full", tmp_path / "killed", tmp_path / "termed"
    train(full)

    proc = train(killed, "kill-in-save:8", check=False)
    assert proc.returncode == -9, proc.stdout[-3000:]  # SIGKILL: nothing of ours ran after it
    assert (killed / "checkpoint-8" / "optimizer.pt").exists() and not (killed / "checkpoint-8" / MARKER).exists()
    assert (killed / "checkpoint-4" / MARKER).exists()
    proc = train(killed)  # the rerun (or Slurm's requeue) of the same command
    assert f"skipping {killed}/checkpoint-8: no {MARKER}" in proc.stdout
    assert f"resuming from {killed}/checkpoint-4" in proc.stdout and "step 8/8" in proc.stdout
    assert (killed / "checkpoint-8" / MARKER).exists()  # written again, completely
    _same_weights(full, killed)

    proc = train(termed, "term-at-step:3", check=False)
    assert proc.returncode == 75, proc.stdout[-3000:]  # EX_TEMPFAIL: saved, run again to continue
    assert "preempted (SIGTERM): saving a checkpoint at step 3/8" in proc.stdout
    proc = train(termed)
    assert f"resuming from {termed}/checkpoint-3" in proc.stdout and "step 2/8" not in proc.stdout
    _same_weights(full, termed)


def test_a_checkpoint_at_max_steps_resumes_without_another_step(tmp_path):
    """A run cut off after its last checkpoint (checkpoint-2 of max_steps 2) but before it recorded itself
    finished: the rerun resumes that checkpoint and trains no further step (transformers alone would train one),
    so the model it saves is the checkpoint's."""
    out = tmp_path / "out"
    cmd = [PYTHON, "train_dpo.py", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps",
           "--save_steps", "2", "--logging_steps", "1", "--eval_before_train", "false", "--dataset_test_split", "none"]
    run(cmd)
    record = read_json(out / "run.json")
    (out / "run.json").write_text(json.dumps({**record, "status": "running"}))  # what a kill before the end leaves
    proc = run(cmd)
    assert f"{out}/checkpoint-2 is at step 2 of max_steps 2: resuming it without a training step" in proc.stdout
    assert "step 3/" not in proc.stdout and read_json(out / "trainer_state.json")["global_step"] == 2
    _same_weights(out / "checkpoint-2", out)


def test_changed_run_is_refused_and_a_finished_one_left_alone(tmp_path):
    from fastdpo import tiny

    data, out = tmp_path / "pairs.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.preference_rows("train", 40)))
    base = [PYTHON, "train_dpo.py", "--dataset_name", str(data), "--dataset_test_split", "0.25", "--output_dir",
            str(out), "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
            "--eval_before_train", "false"]
    run(base)
    results, report = (out / "all_results.json").read_bytes(), (out / "data_report.json").read_bytes()

    proc = run(base)  # the same command after it finished
    assert f"{out} already holds this run, finished; nothing to train" in proc.stdout
    assert "step " not in proc.stdout and not (out / "checkpoint-5").exists()

    proc = run(base + ["--learning_rate", "1e-3", "--beta", "0.2"], check=False)
    assert proc.returncode == 1 and f"{out}/checkpoint-4 was trained with other settings" in proc.stderr
    assert "beta: 0.1 -> 0.2" in proc.stderr and "learning_rate: 0.002 -> 0.001" in proc.stderr
    assert "--allow_changed_run true" in proc.stderr

    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.preference_rows("train", 44)[4:]))  # new rows
    proc = run(base, check=False)
    assert proc.returncode == 1 and "train_data:" in proc.stderr, proc.stderr[-2000:]
    assert (out / "all_results.json").read_bytes() == results  # nothing overwritten
    assert (out / "data_report.json").read_bytes() == report

    proc = run(base + ["--max_steps", "6", "--logging_steps", "2", "--allow_changed_run", "true"])
    assert f"--allow_changed_run: resuming from {out}/checkpoint-4 with changed settings: train_data:" in proc.stdout
    assert "changed since" in proc.stdout and "max_steps: 4 -> 6 (trains longer" in proc.stdout
    assert "logging_steps: 1.0 -> 2;" in proc.stdout  # safe changes are named too
    assert f"resuming from {out}/checkpoint-4" in proc.stdout and "step 6/6" in proc.stdout
    assert "optimizer steps: 6 (1.5 epochs of 4 steps), resuming at step 4" in proc.stdout  # 30 pairs / 8 a step
    assert read_json(out / "trainer_state.json")["global_step"] == 6


def test_impossible_settings_fail_before_any_work(tmp_path):
    import time

    for flags, message in ((["--beta=-0.5"], "beta: -0.5 learns to prefer the rejected answers"),
                           (["--model_name_or_path", "/nonexistent"], "/nonexistent: no such folder")):
        t0 = time.monotonic()
        proc = run([PYTHON, "train_dpo.py", "--output_dir", str(tmp_path / "o"), *flags], check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert "Repo id" not in proc.stderr and not (tmp_path / "o").exists()  # nothing read, nothing written
        assert time.monotonic() - t0 < 60  # imports only (about 5 s idle); tokenising or loading would show


def test_full_disk_at_the_final_save_says_so_and_keeps_the_metrics(tmp_path, tiny_model_path):
    """RLIMIT_FSIZE makes every write past 300 kB fail (EFBIG), as a full disk would (ENOSPC): the ~560 kB
    model cannot be written, the small files can."""
    import resource
    import subprocess

    out = tmp_path / "o"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    proc = subprocess.run([PYTHON, "train_dpo.py", "--output_dir", str(out), "--max_steps", "4",
                           "--eval_before_train", "false"], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=limit, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"could not write the final model to {out} (SafetensorError" in proc.stdout
    assert "this run saved no checkpoints (save_strategy: no), so its trained weights are lost" in proc.stdout
    assert f"error: the final model is not in {out}" in proc.stderr
    assert not (out / "model.safetensors").exists() and not (out / ".saving").exists()  # no half-written model
    assert "eval_loss" in read_json(out / "all_results.json")  # what fits is kept
    assert read_json(out / "run.json")["status"] == "running"  # not a finished run: a rerun trains again


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
                "--output_dir", str(out), "--max_steps", "2"], check=False)
    # the first bad row stops the run with its line; malformed JSON is a row error like any other
    assert proc.returncode == 2 and f"{path}:6: malformed JSON" in proc.stdout
    run([PYTHON, "train_dpo.py", "--dataset_name", str(path), "--dataset_test_split", "0.25",
         "--skip_bad_rows", "true", "--output_dir", str(out), "--max_steps", "2"])
    skipped = [json.loads(x) for x in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == [f"{path}:6"]
    assert skipped[0]["problem"].startswith("malformed JSON (Expecting property name")
    # chosen = rejected is no error: no pair, counted and listed
    no_pair = [json.loads(x) for x in (out / "no_pair_rows.jsonl").read_text().splitlines()]
    assert no_pair == [{"where": f"{path}:10", "problem": "chosen identical to rejected: no preference, no pair"}]
    report = read_json(out / "data_report.json")
    assert report["skipped_rows"] == 1 and report["train"]["pairs"] + report["eval"]["pairs"] == 40
    assert report["accounting"]["rows_read"] == 42 and report["accounting"]["no_pair"] == 1


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
    """Secrets planted in .env (found from the working directory) with TensorBoard, offline wandb and trackio
    (local-first, offline by default) all on: no file anywhere under the run holds them; an argument holding one
    is refused before anything is written."""
    import sqlite3

    token, wandb_key = "hf_PLANTEDsecret1234567890abcdef", "0123456789abcdefPLANTEDwandbkey0123456789"
    (tmp_path / ".env").write_text(f"HF_TOKEN={token}\nWANDB_API_KEY={wandb_key}\n")
    out, logs = tmp_path / "outputs" / "run", tmp_path / "logs"
    logs.mkdir()
    # the Hub refuses at once (trackio and the Hub client stay local); trackio's database under the run's folder
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "outputs"), "HF_TOKEN": "", "WANDB_API_KEY": "",
           "TRACKIO_DIR": str(tmp_path / "outputs" / "trackio"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env = {k: v for k, v in env.items() if v}
    os.environ.pop("HF_TOKEN", None), os.environ.pop("WANDB_API_KEY", None)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("report_to: none",
                                                                          "report_to: [tensorboard, wandb, trackio]"))
    cmd = [PYTHON, str(REPO / "train_dpo.py"), "--config", str(recipe), "--output_dir", str(out),
           "--max_steps", "4", "--logging_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    refused = run(cmd + ["--run_name", f"try-{token}"], cwd=tmp_path, env=env, check=False)
    assert refused.returncode == 1 and "run_name contains the value of HF_TOKEN" in refused.stderr
    assert not (tmp_path / "outputs").exists() and token not in refused.stdout + refused.stderr
    proc = run(cmd, cwd=tmp_path, env=env)
    assert f"secrets: read {tmp_path / '.env'} (HF_TOKEN, WANDB_API_KEY set)" in proc.stdout
    (logs / "run.out").write_text(refused.stdout + refused.stderr + proc.stdout + proc.stderr)
    assert (out / "checkpoint-4" / "training_args.bin").exists()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".env"]
    assert any("tfevents" in p.name for p in files) and any(p.suffix == ".wandb" for p in files)
    db = tmp_path / "outputs" / "trackio" / "huggingface.db"  # the default project's local database
    logged = [json.loads(m) for (m,) in sqlite3.connect(db).execute("select metrics from metrics").fetchall()]
    assert {2, 4} <= {m.get("train/global_step") for m in logged if "train/loss" in m}, logged
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
