"""A mixture end to end on CPU with the tiny model: two local sources in different layouts, one taken by count and
one upsampled by weight, train; every pair is accounted for per source; eval metrics come per source; a rerun
reuses the tokenised mixture; a changed mixture is refused on resume, naming the change; the analyzer reports per
source.

    .venv/bin/python -m pytest tests/test_mixture_train.py     # about 2 minutes on 2 cores
"""

import json

import pytest

from fastdpo import tiny

from .conftest import PYTHON, REPO, read_json, run

pytestmark = pytest.mark.slow


def write_sources(folder):
    """Conversational messages (the Dolci layout) and TRL's plain text columns with other names (a column_map)."""
    convo = tiny.write_jsonl(tiny.preference_rows("train", 80, seed=1), folder / "convo.jsonl")
    flat = folder / "flat.jsonl"
    rows = [{"question": r["chosen"][0]["content"], "good": r["chosen"][-1]["content"],
             "bad": r["rejected"][-1]["content"]} for r in tiny.preference_rows("train", 40, seed=2)]
    rows.append({"question": "q", "good": "same", "bad": "same"})  # no pair: counted, listed
    flat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return convo, flat


def mixture_recipe(folder, convo, flat, count: int):
    text = (REPO / "recipes" / "tiny.yaml").read_text().replace("dataset_name: embedded:tiny-prefs", "")
    text = text.replace("dataset_test_split: test", "dataset_test_split: 0.1")
    path = folder / "mix.yaml"
    path.write_text(text + f"""
datasets:
  - path: {convo}
    count: {count}
  - path: {flat}
    label: plain
    column_map: {{prompt: question, chosen: good, rejected: bad}}
    weight: 2.5
""")
    return path


def test_a_mixture_trains_accounts_evaluates_and_resumes(tmp_path):
    convo, flat = write_sources(tmp_path)
    recipe, out = mixture_recipe(tmp_path, convo, flat, 50), tmp_path / "out"
    env = {"FASTDPO_CACHE": str(tmp_path / "cache")}
    base = [PYTHON, "train_dpo.py", "--config", str(recipe), "--output_dir", str(out), "--max_steps", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "2", "--eval_before_train", "false"]
    proc = run(base, env=env)
    log = proc.stdout + proc.stderr
    assert "source 'convo' (" in log and "count 50): 80 rows read = 50 taken + 8 eval + 22 not taken" in log
    assert "source 'plain' (" in log and "90 trained = 36 taken + 54 upsampled copies" in log
    report = read_json(out / "data_report.json")
    src = report["sources"]
    assert (src["convo"]["trained"], src["plain"]["trained"], src["plain"]["no_pair"]) == (50, 90, 1)
    assert report["accounting"]["rows_read"] == 121 and report["train"]["pairs"] == 140
    assert src["plain"]["layout"]["from_column_map"] and src["convo"]["layout"]["name"] == "conversational"
    (no_pair,) = [json.loads(x) for x in (out / "no_pair_rows.jsonl").read_text().splitlines()]
    assert no_pair["source"] == "plain" and no_pair["where"] == f"{flat}:41"
    results = read_json(out / "all_results.json")
    for name in ("convo", "plain"):  # per source, and the overall ones
        assert f"eval_{name}_loss" in results and f"eval_{name}_rewards/accuracies" in results
    assert "eval_loss" in results
    settings = read_json(out / "run.json")["settings"]
    assert [e["label"] for e in settings["mixture"]["sources"]] == ["convo", "plain"]
    assert set(settings["eval_data"]) == {"convo", "plain"}

    proc = run(base, env=env)  # the same command: the tokenised mixture is read back, nothing is tokenised
    assert "already holds this run, finished" in proc.stdout
    assert "mixture of 2 sources:" in proc.stdout and "(from cache in" in proc.stdout
    assert f"tokenised {convo}:" not in proc.stdout and f"tokenised {flat}:" not in proc.stdout

    changed = mixture_recipe(tmp_path, convo, flat, 60)
    proc = run(base[:3] + [str(changed)] + base[4:] + ["--max_steps", "6"], env=env, check=False)
    assert proc.returncode == 1 and f"{out}/checkpoint-4 was trained with other settings" in proc.stderr
    assert "mixture: source 'convo': amount count 50 -> count 60" in proc.stderr

    proc = run([PYTHON, "scripts/analyze_dataset.py", "--recipe", str(recipe), "--samples", "all"], env=env)
    for name in ("convo", "plain", "mixture"):
        assert f"## {name}" in proc.stdout
    assert "max_length" in proc.stdout.split("## mixture")[1]
