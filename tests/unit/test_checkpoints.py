"""fastdpo.checkpoints without training: what counts as complete, what a resume may change, rotation order.
The end-to-end cases (kill -9 during a save, SIGTERM, a changed rerun, a full disk) are in tests/e2e/test_train.py."""

import json

from datasets import Dataset

from fastdpo import checkpoints as ck


def _checkpoint(out, step, files=None, marked=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name, text in (files or {"model.safetensors": "weights", "trainer_state.json": "{}"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    if marked:
        ck.mark_complete(path, step, {"learning_rate": 1e-3})
    return path


def test_complete_means_marked_and_every_listed_file_intact(tmp_path):
    good = _checkpoint(tmp_path, 4, {"model.safetensors": "w", "global_step4/zero_pp_rank_1_optim_states.pt": "o"})
    assert ck.incomplete_reason(good) is None
    assert json.loads((good / ck.MARKER).read_text())["files"]["global_step4/zero_pp_rank_1_optim_states.pt"] == 1
    assert ck.read_marker(good)["settings"] == {"learning_rate": 1e-3}
    assert "no checkpoint_complete.json" in ck.incomplete_reason(_checkpoint(tmp_path, 8, marked=False))
    (good / "global_step4" / "zero_pp_rank_1_optim_states.pt").unlink()
    assert "global_step4/zero_pp_rank_1_optim_states.pt is missing" in ck.incomplete_reason(good)
    truncated = _checkpoint(tmp_path, 12)
    (truncated / "model.safetensors").write_text("w")
    assert "model.safetensors is 1 bytes, checkpoint_complete.json says 7" in ck.incomplete_reason(truncated)
    (truncated / ck.MARKER).write_text('{"files": ')
    assert "unreadable" in ck.incomplete_reason(truncated)
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]


def test_rotation_counts_only_complete_checkpoints_and_keeps_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    partial = _checkpoint(tmp_path, 10, marked=False)
    ck.rotate(tmp_path, keep=2, best=str(tmp_path / "checkpoint-2"))
    assert [p.name for p in ck.checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-8", "checkpoint-10"]
    assert partial.exists()  # not counted, not touched: the start-up of the next run removes it, with a log line
    ck.rotate(tmp_path, keep=None, best=None)  # no limit: nothing deleted
    assert len(ck.checkpoint_dirs(tmp_path)) == 3


def test_what_a_resume_may_change():
    old = {"learning_rate": 2e-3, "beta": 0.1, "logging_steps": 8, "max_steps": 8, "num_train_epochs": 1,
           "train_data": "abc (10 rows)", "world_size": 2, "save_steps": 4}
    same = dict(old)
    assert ck.compare(old, same) == ([], [])
    changed, safe = ck.compare(old, {**old, "learning_rate": 1e-3, "world_size": 4, "logging_steps": 1,
                                     "save_steps": 2, "max_steps": 16})
    assert changed == ["learning_rate: 0.002 -> 0.001", "world_size: 2 -> 4"]
    assert safe[:2] == ["logging_steps: 8 -> 1", "save_steps: 4 -> 2"] and safe[2].startswith("max_steps: 8 -> 16 (")
    assert ck.compare(old, {**old, "max_steps": 4})[0] == ["max_steps: 8 -> max_steps: 4"]  # shorter: not the run
    epochs = {**old, "max_steps": -1}
    assert ck.compare(epochs, {**epochs, "num_train_epochs": 3})[0] == []  # more epochs: continues
    assert ck.compare(old, epochs)[0] == ["max_steps: 8 -> num_train_epochs: 1"]  # switching is a change
    assert ck.compare(old, {**old, "train_data": "def (10 rows)"}, keys=ck.DATA_KEYS)[0] == [
        'train_data: "abc (10 rows)" -> "def (10 rows)"']
    assert ck.compare({"beta": 0.1}, {"beta": 0.1, "new_option": 1}) == ([], [])  # unknown to the old version


def test_fingerprint_follows_content_not_names():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]},
            {"prompt_ids": [5], "chosen_ids": [6, 7], "rejected_ids": [8]}]
    a, b = Dataset.from_list(rows), Dataset.from_list(rows)
    assert ck.fingerprint(a) == ck.fingerprint(b) and ck.fingerprint(a).endswith("(2 rows)")
    assert ck.fingerprint(a) != ck.fingerprint(Dataset.from_list(rows[::-1]))  # order is the data order too
    raw = Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])  # SFT rows: the Arrow table
    assert ck.fingerprint(raw) != ck.fingerprint(Dataset.from_list([{"messages": [{"role": "user", "content": "ho"}]}]))


def test_model_fingerprint_sees_a_retrained_folder_of_the_same_size(tmp_path):
    model = tmp_path / "sft"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    weights = bytearray(range(256)) * 40_000  # ~10 MB: sampled, not read whole
    (model / "model.safetensors").write_bytes(weights)
    before = ck.model_fingerprint(str(model))
    assert before == ck.model_fingerprint(str(model)) and before.endswith("(2 files)")
    weights[len(weights) * 3 // 17 : len(weights) * 3 // 17 + 8] = b"retrain!"  # same size, other values
    (model / "model.safetensors").write_bytes(weights)
    assert ck.model_fingerprint(str(model)) != before
    assert ck.model_fingerprint("org/hub-model") is None  # a Hub id is compared by name and revision


def test_a_resume_across_backends_is_refused_with_the_launch_that_reads_it():
    assert ck.backend_change("o/checkpoint-4", "DEEPSPEED (ZeRO-2)", "DEEPSPEED (ZeRO-2)") is None
    assert ck.backend_change("o/checkpoint-4", None, "DEEPSPEED (ZeRO-3)") is None  # a marker from before the key
    why = ck.backend_change("o/checkpoint-4", "DEEPSPEED (ZeRO-3)", "DEEPSPEED (ZeRO-2)")
    assert why.startswith("o/checkpoint-4 was saved by DEEPSPEED (ZeRO-3), this run trains with DEEPSPEED (ZeRO-2)")
    assert "Fix: resume with BACKEND=zero3 (accelerate_config_zero3.yaml)" in why
    assert "--model_name_or_path o/checkpoint-4 --output_dir" in why  # its consolidated model.safetensors
    why = ck.backend_change("o/checkpoint-4", "FSDP (FSDP2)", "MULTI_GPU")
    assert "BACKEND=fsdp2" in why and "accelerate merge-weights o/checkpoint-4/pytorch_model_fsdp_0" in why
