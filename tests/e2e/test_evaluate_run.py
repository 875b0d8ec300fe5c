"""`scripts/evaluate.py OUTPUT_DIR` reads the finished run: it scores exactly the pairs the run held out, with the
run's beta, loss, lengths and reference, and refuses (unless told) to score pairs the run trained on."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import PYTHON, REPO, read_json, run

pytestmark = pytest.mark.slow


def evaluate_cli(argv: list[str]) -> dict:
    """scripts/evaluate.py's main in this process (the command line costs 10 s of imports per call)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(module.parse(argv))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A DPO run on a local file of 40 pairs, a tenth held out, with a beta and max_length of its own, a checkpoint
    at step 2 and the final model at step 3."""
    from fastdpo import tiny

    tmp = tmp_path_factory.mktemp("run")
    data = tmp / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.preference_rows("train")[:40]))
    out = tmp / "out"
    run([PYTHON, "train_dpo.py", "--dataset_name", str(data), "--dataset_test_split", "0.1", "--beta", "0.2",
         "--max_length", "96", "--max_steps", "3", "--save_strategy", "steps", "--save_steps", "2",
         "--output_dir", str(out)])
    return data, out


def test_output_dir_alone_scores_the_held_out_pairs_with_the_runs_settings(finished, tmp_path):
    data, out = finished
    trl = read_json(out / "all_results.json")
    held_out = read_json(out / "data_report.json")["eval"]["pairs"]
    proc = run([PYTHON, "scripts/evaluate.py", str(out), "--json", str(tmp_path / "eval.json"), "--samples", "1",
                "--max_new_tokens", "4"])
    report = read_json(tmp_path / "eval.json")
    assert report["num_pairs"] == held_out == 4 and report["training_pairs"] == 0
    assert report["as_run"] == "yes (fingerprint as in run.json)"
    assert report["values"]["beta"] == {"value": 0.2, "from": "run.json"}
    assert report["values"]["max_length"] == {"value": 96, "from": "run.json"}
    assert report["values"]["reference"] == {"value": "embedded:tiny-llama", "from": "run.json"}
    assert report["values"]["data"]["value"] == f"{data}, 0.1 of its rows held out (dataset_seed 42)"
    # the numbers TRL logged on the same pairs at the end of training: the same pairs, beta and loss
    assert report["loss"] == pytest.approx(trl["eval_loss"], abs=1e-4)
    assert report["preference_accuracy"] == pytest.approx(trl["eval_rewards/accuracies"])
    assert report["reward_margin"] == pytest.approx(trl["eval_rewards/margins"], rel=1e-3, abs=1e-5)
    assert "| beta | 0.2 | run.json |" in proc.stdout
    assert "4 pairs the run held out; 0 of them were training pairs" in proc.stdout
    assert "Traceback" not in proc.stderr

    # the fastdpo command is the same code path
    command = run([PYTHON, "-m", "fastdpo.cli", "evaluate", str(out), "--json", str(tmp_path / "cmd.json"),
                   "--samples", "1", "--max_new_tokens", "4"])
    again = read_json(tmp_path / "cmd.json")
    assert again["num_pairs"] == 4 and again["loss"] == report["loss"] and "| loss |" in command.stdout

    # a flag overrides the run, and the report says so: rewards are beta x the log-ratios
    doubled = evaluate_cli([str(out), "--beta", "0.4", "--samples", "0", "--gen_prompts", "1",
                            "--max_new_tokens", "2"])
    assert doubled["values"]["beta"] == {"value": 0.4, "from": "flag"}
    assert doubled["reward_margin"] == pytest.approx(2 * report["reward_margin"], rel=1e-6)


def test_the_training_file_is_refused_unless_allowed_and_counted_either_way(finished):
    data, out = finished
    proc = run([PYTHON, "scripts/evaluate.py", str(out), "--dataset_name", str(data)], check=False)
    lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip() and not x.startswith("data: ")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert lines == [f"{data} [test]: 36 of 40 pairs are pairs {out} trained on: their scores would measure "
                     "memorisation, not what the run learnt. Score the pairs it held out with `scripts/evaluate.py "
                     f"{out}` alone, or pass --allow_train_pairs true to score these anyway (the report counts them)"]
    report = evaluate_cli([str(out), "--dataset_name", str(data), "--allow_train_pairs", "true", "--samples", "0",
                           "--gen_prompts", "1", "--max_new_tokens", "2"])
    assert report["num_pairs"] == 40 and report["training_pairs"] == 36
    assert report["values"]["data"] == {"value": f"{data} [test]", "from": "flag"}


def test_a_checkpoint_folder_is_read_with_the_settings_of_its_marker(finished):
    _, out = finished
    report = evaluate_cli([str(out / "checkpoint-2"), "--samples", "0", "--gen_prompts", "1", "--max_new_tokens",
                           "2"])
    assert report["run"] == str(out / "checkpoint-2" / "checkpoint_complete.json")
    assert report["num_pairs"] == 4 and report["values"]["beta"]["value"] == 0.2
    assert report["as_run"] == "yes (fingerprint as in checkpoint_complete.json)"
