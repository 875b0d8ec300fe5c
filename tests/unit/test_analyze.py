"""scripts/analyze_dataset.py and fastdpo.lengths: lengths identical to training's, numbers worked out by hand.

Hand-checkable data uses a whitespace word tokenizer built here offline: a text pair whose prompt has k words
and whose answers have m and n words is exactly (k, m + 1, n + 1) tokens (each answer gains the EOS).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re

import numpy as np
import pytest
from trl.trainer.dpo_trainer import DataCollatorForPreference

from fastdpo import data, errors, lengths, tiny
from fastdpo.config import ScriptArguments
from tests.helpers import PYTHON, REPO, run

spec = importlib.util.spec_from_file_location("analyze_dataset", REPO / "scripts" / "analyze_dataset.py")
analyze_dataset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(analyze_dataset)

@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    """`--samples all` fills training's token cache: a fresh one per test, never the user's."""
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path))
    return tmp_path / "tokens"


WORD_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """One token per whitespace-separated word; saved as a normal tokenizer folder for --tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<pad>", "<eos>"]
    words = ["a", "b", "c", "<user>", "<assistant>", "<system>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = WORD_TEMPLATE
    path = tmp_path_factory.mktemp("word_tokenizer")
    fast.save_pretrained(path)
    return str(path)


def text_pair(k: int, m: int, n: int) -> dict:
    """A text pair of exactly (k, m + 1, n + 1) tokens with the word tokenizer."""
    return {"prompt": "a " * k, "chosen": " ".join(["b"] * m), "rejected": " ".join(["c"] * n)}


# (prompt, chosen, rejected) words -> tokens (k, m + 1, n + 1); totals 10, 20, ..., 100 in shuffled order
SHAPES = [(5, 44, 10), (2, 7, 3), (30, 30, 69), (10, 9, 2), (60, 20, 29), (4, 25, 10), (20, 29, 49), (8, 31, 3),
          (50, 29, 10), (15, 44, 14)]
TOTALS = [k + max(m, n) + 1 for k, m, n in SHAPES]


def data_tokenizer(path):
    from fastdpo import models

    return models.load_tokenizer(path)


def write_jsonl(path, rows):
    return str(tiny.write_jsonl(rows, path))


def cli(argv: list[str]) -> dict:
    """The command in-process (what `python scripts/analyze_dataset.py ...` runs), returning its result."""
    return analyze_dataset.main(argv)


# ------------------------------------------------------------------------------------------- by hand


def test_lengths_are_exact_with_word_tokenizer(word_tokenizer, tmp_path):
    assert sorted(TOTALS) == list(range(10, 101, 10))
    sample = lengths.load_sample(ScriptArguments(dataset_name=write_jsonl(tmp_path / "d.jsonl",
                                                 [text_pair(*s) for s in SHAPES])), None)
    lens = lengths.measure(sample.pairs, data_tokenizer(word_tokenizer))
    assert sample.num_rows == 10
    assert lens.prompt.tolist() == [k for k, _, _ in SHAPES]
    assert lens.chosen.tolist() == [m + 1 for _, m, _ in SHAPES]
    assert lens.rejected.tolist() == [n + 1 for _, _, n in SHAPES]
    assert lens.total.tolist() == TOTALS


def test_percentiles_coverage_and_recommendation_by_hand(word_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [text_pair(*s) for s in SHAPES])
    out = cli([path, "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer, "--samples", "all",
               "--max_length", "64", "--max_prompt_length", "16", "--coverage", "0.9"])
    # totals 10..100: nearest rank p50 = 5th smallest = 50, p90 = 9th = 90, p95 = p99 = max = 100
    assert out["percentiles"]["total"] == {"p50": 50, "p90": 90, "p95": 100, "p99": 100, "max": 100, "mean": 55.0}
    # prompts 2 4 5 8 10 15 20 30 50 60
    assert out["percentiles"]["prompt"] == {"p50": 10, "p90": 50, "p95": 60, "p99": 60, "max": 60, "mean": 20.4}
    by_len = {c["max_length"]: c for c in out["candidates"]}
    assert set(lengths.LADDER) | {64, 128} == set(by_len)
    recipe = by_len[64]
    assert recipe["source"] == "recipe"
    assert recipe["coverage"] == 0.6 and recipe["covered_pairs"] == 6  # totals 10..60
    # prompts over 16 tokens: 20, 30, 50, 60; kept prompts cut to 16 leave 48 tokens: answers > 48 cut
    assert recipe["prompts_over_max_prompt_length"] == 4 and recipe["prompt_truncated"] == 0.4
    # truncated = the 4 cut prompts; the answers cut (70 and 50 tokens > the 48 left) belong to those pairs,
    # and (15, 45, 15) still fits: 45 <= 64 - 15
    assert recipe["truncated_pairs"] == 4 and recipe["dropped_pairs"] == 0
    # 90% coverage needs total 90 -> rounded up to 128, which covers every pair
    rec = out["recommended"]
    assert rec["max_length"] == 128 and by_len[128]["coverage"] == 1.0 and "recommended" in by_len[128]["source"]
    # prompt p99 = 60 -> 128, capped at half of max_length
    assert rec["max_prompt_length"] == 64
    assert "max_length: 128" in rec["yaml"] and "max_prompt_length: 64" in rec["yaml"]
    assert out["num_samples"] == 10 and out["per_device_train_batch_size"] == 8


def test_truncation_and_drops_by_hand():
    lens = lengths.Lengths(np.array([10, 30, 5]), np.array([5, 5, 40]), np.array([3, 20, 1]))
    p, c, r, status = lengths.truncate(lens, 20, None)
    assert status.tolist() == [0, 2, 1]  # 15 fits; the 30-token prompt leaves no room; 40 is cut to 15
    assert (p[2], c[2], r[2]) == (5, 15, 1)
    p, c, r, status = lengths.truncate(lens, 20, 12)
    assert status.tolist() == [0, 1, 1] and p.tolist() == [10, 12, 5] and c[1] == 5 and r[1] == 8


def test_padding_overheads_by_hand():
    # batch size 1: each pair is a [2, L] tensor, L = the longer row; rows 15 and 13, then 10 and 10
    lens = lengths.Lengths(np.array([10, 5]), np.array([5, 5]), np.array([3, 5]))
    row = lengths.candidate(lens, 20, None, batch_size=1)
    real = 15 + 13 + 10 + 10
    assert row["real_tokens"] == real
    assert row["padding_overhead_batch"] == round(1 - real / (2 * 15 + 2 * 10), 4)
    assert row["padding_overhead_max_length"] == round(1 - real / (4 * 20), 4)
    # one batch of both pairs: [4, 15]
    assert lengths.candidate(lens, 20, None, batch_size=2)["padding_overhead_batch"] == round(1 - real / 60, 4)
    # pad_to_multiple_of 8 rounds L = 15 up to 16
    rounded = lengths.candidate(lens, 20, None, 2, pad_to_multiple_of=8)
    assert rounded["padding_overhead_batch"] == round(1 - real / 64, 4)
    # packed into 20-token sequences: 15 | 13 | 10+10 -> the emptiest (13) counts as its own tokens
    assert row["padding_overhead_packed"] == round(1 - real / (20 + 13 + 20), 4)


def test_best_fit_packing_by_hand():
    assert lengths._packed_tokens(np.array([60, 50, 40, 30, 20]), 100) == 200  # 60+40 | 50+30+20
    assert lengths._packed_tokens(np.array([70, 70, 70]), 100) == 270  # three sequences, the last counted as 70


@pytest.mark.parametrize("coverage", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
def test_recommendation_reaches_coverage_and_is_smallest(coverage):
    rng = np.random.default_rng(1)
    prompt = rng.lognormal(5, 1, 2000).astype(int) + 1
    chosen, rejected = (rng.lognormal(6.5, 1, 2000).astype(int) + 1 for _ in range(2))
    lens = lengths.Lengths(prompt, chosen, rejected)
    out = lengths.analyze(lens, coverage=coverage, max_length=4096, max_prompt_length=2048, batch_size=4)
    best = out["recommended"]["max_length"]
    covered = lambda m: (lens.total <= m).mean()  # noqa: E731  (an independent count)
    assert best % 128 == 0 and covered(best) >= coverage and covered(best - 128) < coverage
    assert out["recommended"]["max_prompt_length"] <= best // 2
    for c in out["candidates"]:
        assert c["coverage"] == round(covered(c["max_length"]), 4)
        for key in ("coverage", "truncated", "dropped", "prompt_truncated", "padding_overhead_max_length",
                    "padding_overhead_batch", "padding_overhead_packed"):
            assert 0 <= c[key] <= 1, (key, c)
        # packing never computes more than padding to the longest in a batch, which never exceeds max_length
        assert c["padding_overhead_packed"] <= c["padding_overhead_batch"] <= c["padding_overhead_max_length"]


# ------------------------------------------------------------------------------------- same as training


def training_rows(script_args, tokenizer, max_length, max_prompt_length):
    """Per-row lengths as TRL's collator builds them from the training data path."""
    pairs = data.load_pairs(script_args, tokenizer)
    ds, counts = data.tokenize_dataset(pairs.train, tokenizer, max_length, max_prompt_length)
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)
    batch = collator([ds[i] for i in range(len(ds))])
    per_row = batch["attention_mask"].sum(dim=1).tolist()
    n = len(ds)
    return per_row[:n], per_row[n:], counts


def hh(prompt: str, answer: str) -> str:
    return f"\n\nHuman: {prompt}\n\nAssistant: {answer}"


LAYOUTS = {
    "conversational": lambda rows: rows,
    "standard": lambda rows: [{"prompt": r["prompt"][1]["content"], "chosen": " " + r["chosen"][0]["content"],
                               "rejected": " " + r["rejected"][0]["content"]} for r in rows],
    "implicit_hh": lambda rows: [{"chosen": hh(r["prompt"][1]["content"], r["chosen"][0]["content"]),
                                  "rejected": hh(r["prompt"][1]["content"], r["rejected"][0]["content"])}
                                 for r in rows],
    "column_map": lambda rows: [{"sys": r["prompt"][0]["content"], "q": r["prompt"][1]["content"],
                                 "good": r["chosen"][0]["content"], "bad": r["rejected"][0]["content"]} for r in rows],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
# (24, None): prompts are ~25 tokens, so most pairs are dropped
@pytest.mark.parametrize("max_length,max_prompt_length", [(None, None), (40, None), (40, 20), (24, None)])
def test_lengths_equal_training_collator(layout, max_length, max_prompt_length, tiny_tokenizer, tmp_path):
    """The analyzer's per-pair lengths, truncated, equal the rows TRL's collator builds from the training path."""
    rows = tiny.preference_rows("train", 64, seed=3)
    # longer answers on some rows so that answers, not only prompts, get cut
    for i, r in enumerate(rows[::4]):
        r["chosen"][0]["content"] += " and more" * (i % 5)
    path = write_jsonl(tmp_path / "d.jsonl", LAYOUTS[layout](rows))
    column_map = None
    if layout == "column_map":
        column_map = {"system": "sys", "prompt": "q", "chosen": "good", "rejected": "bad"}
    script_args = ScriptArguments(dataset_name=path, column_map=column_map, max_prompt_length=max_prompt_length)
    lens = lengths.measure(lengths.load_sample(script_args, None).pairs, tiny_tokenizer)
    p, c, r, status = lengths.truncate(lens, max_length, max_prompt_length)
    kept = status != 2
    if not kept.any():
        with pytest.raises(errors.DataError, match="every pair was dropped"):
            training_rows(script_args, tiny_tokenizer, max_length, max_prompt_length)
        return
    chosen_rows, rejected_rows, counts = training_rows(script_args, tiny_tokenizer, max_length, max_prompt_length)
    assert (p + c)[kept].tolist() == chosen_rows
    assert (p + r)[kept].tolist() == rejected_rows
    assert counts == {"pairs": len(lens), "truncated": int((status == 1).sum()), "dropped": int((status == 2).sum())}
    if max_length is not None:  # the cases above do truncate, so the comparison is not vacuous
        assert (status != 0).any()


def test_cli_counts_equal_training_counts(tiny_tokenizer, tmp_path):
    """The table row for the recipe's max_length reports what tokenize_dataset reports when training."""
    path = write_jsonl(tmp_path / "d.jsonl", tiny.preference_rows("train", 200, seed=5))
    out = cli([path, "--recipe", "recipes/tiny.yaml", "--samples", "all", "--max_length", "48",
               "--max_prompt_length", "20"])
    row = next(c for c in out["candidates"] if "recipe" in c["source"])
    _, _, counts = training_rows(ScriptArguments(dataset_name=path, max_prompt_length=20), tiny_tokenizer, 48, 20)
    assert (row["truncated_pairs"], row["dropped_pairs"]) == (counts["truncated"], counts["dropped"])
    assert row["truncated_pairs"] > 0


# ---------------------------------------------------------------------------------------- the command


def test_samples_n_is_seeded_and_all_reads_everything(word_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [text_pair(*s) for s in SHAPES] * 3)
    base = [path, "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer]
    five = cli(base + ["--samples", "5"])
    assert (five["num_samples"], five["num_rows"]) == (5, 30)
    assert cli(base + ["--samples", "5"])["percentiles"] == five["percentiles"]  # same seed, same sample
    assert cli(base + ["--samples", "all"])["num_samples"] == 30
    assert cli(base)["num_samples"] == 30  # the default 1000 is more than the file holds


def test_recipe_limits_and_a_gpu_recipe_parse_on_cpu(word_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [text_pair(*s) for s in SHAPES])
    out = cli([path, "--recipe", "recipes/olmo3_instruct.yaml", "--tokenizer", word_tokenizer])
    assert (out["max_length"], out["max_prompt_length"], out["per_device_train_batch_size"]) == (4096, 2048, 4)
    assert next(c for c in out["candidates"] if c["max_length"] == 4096)["source"] == "recipe"
    out = cli(["--recipe", "recipes/tiny.yaml"])  # no dataset: the recipe's (the embedded data)
    assert out["dataset"] == "embedded:tiny-prefs" and out["tokenizer"] == "embedded:tiny-llama"
    assert out["max_length"] == 128 and out["max_prompt_length"] == 64
    timing = ("pairs_per_second", "tokenize_seconds")
    same = {k: v for k, v in cli(["--config", "recipes/tiny.yaml"]).items() if k not in timing}
    assert same == {k: v for k, v in out.items() if k not in timing}  # train_dpo.py's spelling of the flag


def test_conversational_column_map_override(word_tokenizer, tmp_path):
    rows = [{"q": "a " * k, "good": "b " * m, "bad": "c " * n} for k, m, n in SHAPES]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = cli([path, "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer, "--column_map",
               json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"})])
    # text through a column map gets the chat template, as the same rows with a question column detected do
    renamed = write_jsonl(tmp_path / "q.jsonl", [{"question": r["q"], "chosen": r["good"], "rejected": r["bad"]}
                                                 for r in rows])
    same = cli([renamed, "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer])
    assert out["percentiles"] == same["percentiles"] and out["layout"]["name"] == same["layout"]["name"] == "question"
    assert out["percentiles"]["prompt"]["max"] > 60  # k prompt words, and the template's tokens


@pytest.mark.slow
def test_json_schema_and_png(word_tokenizer, tmp_path):
    """The real command in a subprocess, without a GPU, as a user runs it."""
    path = write_jsonl(tmp_path / "d.jsonl", [text_pair(*s) for s in SHAPES])
    proc = run([PYTHON, "scripts/analyze_dataset.py", path, "--recipe", "recipes/tiny.yaml", "--tokenizer",
                word_tokenizer, "--json", str(tmp_path / "out" / "r.json"), "--plot", str(tmp_path / "out" / "r.png")],
               env={"CUDA_VISIBLE_DEVICES": ""})
    assert "| total | 50 | 90 | 100 | 100 | 100 | 55.0 |" in proc.stdout
    assert "```yaml\nmax_length: 128" in proc.stdout
    assert (tmp_path / "out" / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads((tmp_path / "out" / "r.json").read_text())
    for key in ("dataset", "num_samples", "tokenizer", "percentiles", "candidates", "recommended"):
        assert key in out
    assert out["dataset"] == path and out["num_samples"] == 10 and out["tokenizer"] == word_tokenizer
    for name in ("total", "prompt", "chosen", "rejected"):
        assert set(out["percentiles"][name]) == {"p50", "p90", "p95", "p99", "max", "mean"}
    for c in out["candidates"]:
        for key in ("max_length", "coverage", "truncated", "padding_overhead_max_length", "padding_overhead_batch",
                    "padding_overhead_packed"):
            assert key in c
        assert all(0 <= c[k] <= 1 for k in ("coverage", "truncated", "padding_overhead_max_length",
                                            "padding_overhead_batch", "padding_overhead_packed"))
    assert {"max_length", "max_prompt_length"} <= set(out["recommended"])
    assert [c["max_length"] for c in out["candidates"]][:2] == [128, 1024]
    assert math.isclose(out["coverage_target"], 0.9)


@pytest.mark.parametrize("text,expected", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', r"d.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
     r"d.jsonl:2: missing column 'rejected'"),
])
def test_bad_input_reported_as_training_refuses_it(text, expected, word_tokenizer, tmp_path):
    """The analyzer measures the pairs training would train and counts the rows it would refuse (exit 0);
    --strict fails with training's own message."""
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    out = cli([str(path), "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer])
    assert out["num_samples"] == 1 and out["bad_rows"] == 1 and out["training_refuses"]
    first = out["bad_rows_by_problem"][0]
    assert re.search(expected, f"{first['first'][0]}: {first['problem']}")
    with pytest.raises(errors.DataError, match=expected):
        cli([str(path), "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer, "--strict"])
    with pytest.raises(errors.DataError, match=expected):  # training's own loader says the same
        data.load_pairs(ScriptArguments(dataset_name=str(path)))


@pytest.mark.slow
def test_bad_input_exits_with_the_message_and_no_traceback(word_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"oops": 1}\n')
    cmd = [PYTHON, "scripts/analyze_dataset.py", str(path), "--recipe", "recipes/tiny.yaml", "--tokenizer",
           word_tokenizer]
    proc = run(cmd)  # reported, exit 0
    assert "1 row(s) that training refuses: missing column 'chosen'" in proc.stderr and f"{path}:2" in proc.stderr
    assert "| 1 | missing column 'chosen'" in proc.stdout
    proc = run(cmd + ["--strict"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {path}:2: missing column 'chosen'" in proc.stderr


@pytest.mark.parametrize("flags", [["--samples", "0"], ["--samples", "some"], ["--coverage", "90"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["d.jsonl"] + flags)
    assert e.value.code == 2 and ("--samples must be" in capsys.readouterr().err or "--coverage" in flags)


def test_missing_file_and_unknown_recipe_key(tmp_path):
    with pytest.raises(errors.DataError, match="no such file"):
        cli(["./no/such.jsonl", "--recipe", "recipes/tiny.yaml"])
    bad = tmp_path / "r.yaml"
    bad.write_text((REPO / "recipes" / "tiny.yaml").read_text() + "warmup_ratio: 0.1\n")
    with pytest.raises(SystemExit, match="warmup_ratio"):
        cli(["--recipe", str(bad)])


DPO_RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml") if not p.stem.endswith("_sft"))


@pytest.mark.parametrize("recipe", DPO_RECIPES)
def test_every_dpo_recipe_parses_for_the_analyzer_on_cpu(recipe):
    """GPU recipes (bf16) parse here too: the analyzer reads only their data settings."""
    _, script_args, training_args, model_args = analyze_dataset.settings(
        analyze_dataset.parse(["--recipe", f"recipes/{recipe}"]))
    assert script_args.dataset_name and model_args.model_name_or_path
    assert training_args.per_device_train_batch_size >= 1


def test_every_file_format_gives_the_same_lengths(word_tokenizer, tmp_path):
    import gzip

    from datasets import Dataset

    rows = [text_pair(*s) for s in SHAPES]
    paths = [write_jsonl(tmp_path / "d.jsonl", rows), str(tmp_path / "d.json.gz"), str(tmp_path / "d.parquet"),
             str(tmp_path / "d.csv")]
    with gzip.open(paths[1], "wt") as f:
        json.dump(rows, f)
    Dataset.from_list(rows).to_parquet(paths[2])
    Dataset.from_list(rows).to_csv(paths[3], index=False)
    results = [cli([p, "--recipe", "recipes/tiny.yaml", "--tokenizer", word_tokenizer]) for p in paths]
    assert all(r["percentiles"] == results[0]["percentiles"] for r in results)
    assert results[0]["percentiles"]["total"]["max"] == 100


def test_implicit_prompts_without_chat_template_are_analysed_as_raw_text(tiny_tokenizer, tmp_path):
    """A base model's tokenizer (no chat template) on hh-rlhf transcripts: raw text, as training reads them (this
    was refused before); the lengths are those of training's own rows (its token cache, filled here)."""
    import copy

    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = None
    base.save_pretrained(tmp_path / "base")
    rows = tiny.preference_rows("train", 40, seed=8)
    path = write_jsonl(tmp_path / "hh.jsonl", LAYOUTS["implicit_hh"](rows))
    out = cli([path, "--recipe", "recipes/tiny.yaml", "--tokenizer", str(tmp_path / "base"), "--samples", "all",
               "--max_length", "512"])
    assert out["num_samples"] == 40
    chosen_rows, rejected_rows, _ = training_rows(ScriptArguments(dataset_name=path), base, None, None)
    totals = np.maximum(chosen_rows, rejected_rows)  # prompt + the longer answer, as TRL's collator builds them
    assert out["percentiles"]["total"] == lengths.percentiles(totals)
