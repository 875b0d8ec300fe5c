"""The data module: every source and layout, every bad-input case, truncation, and TRL-identical tokens."""

import gzip
import json
import logging
import re
import types

import pytest
from datasets import Dataset

from fastdpo import checks, data, errors, layouts, sources, tiny, tokens
from fastdpo.config import ScriptArguments
from fastdpo.dataspec import DataSpec

STANDARD = [{"prompt": f"Question {i}?", "chosen": f" Good answer {i}.", "rejected": f" Bad {i}."} for i in range(10)]
CONVERSATIONAL = tiny.preference_rows("train", 10)


def args(**kw):
    return ScriptArguments(**kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_standard_jsonl(tmp_path):
    pairs = data.load_pairs(args(dataset_name=str(write_jsonl(tmp_path / "d.jsonl", STANDARD))))
    assert len(pairs.train) == 10 and pairs.eval is None
    assert pairs.train[0] == STANDARD[0]


def test_conversational_json_gz_parquet_csv(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in CONVERSATIONAL)
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps(CONVERSATIONAL))
    pq = tmp_path / "d.parquet"
    Dataset.from_list(CONVERSATIONAL).to_parquet(pq)
    csv = tmp_path / "d.csv"
    Dataset.from_list(STANDARD).to_csv(csv, index=False)
    for path in (gz, arr, pq):
        rows = data.load_pairs(args(dataset_name=str(path))).train.to_list()
        assert rows == CONVERSATIONAL, path
    assert data.load_pairs(args(dataset_name=str(csv))).train.to_list() == STANDARD


def test_folder_goes_through_load_dataset_with_splits(tmp_path):
    # The same code path as a Hub dataset id: split names come from the file names.
    write_jsonl(tmp_path / "train.jsonl", CONVERSATIONAL)
    write_jsonl(tmp_path / "test.jsonl", tiny.preference_rows("test", 3))
    pairs = data.load_pairs(args(dataset_name=str(tmp_path), dataset_test_split="test"))
    assert len(pairs.train) == 10 and len(pairs.eval) == 3


def test_implicit_prompt_hh_rlhf_transcripts():
    row = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
           "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}
    out = checks.normalize_row(row, None)
    assert out["prompt"] == [{"role": "user", "content": "Hi there"}]
    assert out["chosen"] == [{"role": "assistant", "content": "Hello! How can I help?"}]
    assert out["rejected"] == [{"role": "assistant", "content": "Go away."}]


def test_implicit_prompt_multi_turn_messages_and_text():
    conv = CONVERSATIONAL[0]
    row = {"chosen": conv["prompt"] + conv["chosen"], "rejected": conv["prompt"] + conv["rejected"]}
    assert checks.normalize_row(row, None) == conv
    out = checks.normalize_row({"chosen": "Q: sky colour? It is blue", "rejected": "Q: sky colour? It is green"}, None)
    # TRL's extract_prompt: the first differing character, the space before it going to the answers
    assert out == {"prompt": "Q: sky colour? It is", "chosen": " blue", "rejected": " green"}


def test_column_map_orca_layout():
    row = {"system": "Be brief.", "question": "2+2?", "chosen": "4", "rejected": "5"}
    cmap = {"system": "system", "prompt": "question", "chosen": "chosen", "rejected": "rejected"}
    out = checks.normalize_row(row, cmap)
    assert out["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert out["chosen"] == [{"role": "assistant", "content": "4"}]
    # an empty system prompt (common in orca) adds no system turn
    out = checks.normalize_row({**row, "system": ""}, cmap)
    assert out["prompt"] == [{"role": "user", "content": "2+2?"}]


def test_subset_fraction_eval_and_seed():
    a = args(dataset_name=tiny.DATASET_ID, max_train_samples=100, dataset_test_split="0.1")
    p1, p2 = data.load_pairs(a), data.load_pairs(a)
    assert (len(p1.train), len(p1.eval)) == (90, 10)
    assert p1.eval.to_list() == p2.eval.to_list()  # deterministic
    p3 = data.load_pairs(args(dataset_name=tiny.DATASET_ID, max_train_samples=100, dataset_test_split="0.1",
                              dataset_seed=7))
    assert p3.eval.to_list() != p1.eval.to_list()


def test_the_data_spec_reads_every_data_field_of_the_script_arguments():
    """Training builds its DataSpec from the recipe's arguments; evaluation, the analyzer and SFT pass one."""
    from fastdpo.dataspec import SourceSpec

    a = args(dataset_name="d.jsonl", dataset_config="c", dataset_train_split="tr", dataset_test_split="0.2",
             eval_dataset_name="e.jsonl", max_train_samples=9, max_eval_samples=3, dataset_seed=1,
             dataset_shuffle_seed=2, column_map='{"prompt": "q"}', ranked_pairs="best_vs_worst", judged_pairs=True,
             max_prompt_length=32, skip_bad_rows=True, dedup="all")
    want = DataSpec(SourceSpec("d.jsonl", "c", "tr", layouts.Options({"prompt": "q"}, "best_vs_worst", True), 9),
                    test_split="0.2", eval_name="e.jsonl", max_eval_samples=3, dedup="all", seed=1, shuffle_seed=2,
                    max_length=64, max_prompt_length=32, skip_bad_rows=True)
    assert DataSpec.of(a, max_length=64) == want and DataSpec.of(want) is want
    assert want.eval_source("e.jsonl", "test") == SourceSpec("e.jsonl", "c", "test", want.train.options, None)
    assert DataSpec.of(args()) == DataSpec(SourceSpec(tiny.DATASET_ID))  # the defaults agree


def test_named_split_on_single_file_holds_out_a_fraction(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    pairs = data.load_pairs(args(dataset_name=str(path), dataset_test_split="test"))
    assert (len(pairs.train), len(pairs.eval)) == (9, 1)
    assert "single file with no 'test' split: holding out 10%" in caplog.text


# ------------------------------------------------------------------------------------------ bad input

BAD = [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b" "rejected": "c"}\n',
     ":2: malformed JSON"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n', ":1: field 'chosen' must be a string or a list"),
    ('{"prompt": "a", "chosen": null, "rejected": "c"}\n', ":1: field 'chosen' is missing or null"),
    ('{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "x"}], '
     '"rejected": [{"role": "assistant", "content": "y"}]}\n', ":1: field 'prompt' message 1 must be an object"),
    ('[1, 2]\n', ":1: expected an object"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
     ":2: missing column 'rejected'"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[b[1] for b in BAD])
def test_bad_rows_name_file_line_and_fix(tmp_path, text, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('\n' + text if "malformed" not in expected else text)  # a blank line must not shift numbers
    if "malformed" not in expected:
        expected = expected.replace(":1:", ":2:").replace(":2: missing", ":3: missing")
    with pytest.raises(errors.DataError) as e:
        data.load_pairs(args(dataset_name=str(path)))
    msg = str(e.value)
    assert f"{path}{expected}" in msg
    if "malformed" not in expected:
        assert "--skip_bad_rows true" in msg


def test_a_file_with_no_pair_layout_names_what_is_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(errors.DataError, match=rf"{path}:1: missing column 'rejected'; columns present: "):
        data.load_pairs(args(dataset_name=str(path)))
    path.write_text('{"question": "a", "good": "b", "bad": "c"}\n')
    with pytest.raises(errors.DataError, match=rf"{path}:1: no preference layout found in columns \['bad', 'good', "
                                             r"'question'\].*set column_map"):
        data.load_pairs(args(dataset_name=str(path)))


def test_oddities_have_a_rule_and_are_counted(tmp_path):
    """An empty answer is a pair; chosen = rejected gives no pair; both counted with their places, not fatal."""
    rows = STANDARD[:3] + [{"prompt": "p", "chosen": "", "rejected": "c"}, {"prompt": "p", "chosen": "x",
                                                                            "rejected": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pairs = data.load_pairs(args(dataset_name=str(path)))
    assert len(pairs.train) == 4 and {"prompt": "p", "chosen": "", "rejected": "c"} in pairs.train.to_list()
    assert pairs.notes.counts == {"empty_answer": 1, "no_preference": 1}
    assert pairs.notes.first == {"empty_answer": [f"{path}:4"], "no_preference": [f"{path}:5"]}
    assert not pairs.skipped.rows


def test_skip_bad_rows_counts_and_lists_them(tmp_path):
    lines = [json.dumps(r) for r in STANDARD[:3]]
    lines.insert(1, json.dumps({"prompt": "p", "chosen": None, "rejected": "x"}))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    pairs = data.load_pairs(args(dataset_name=str(path), skip_bad_rows=True))
    assert len(pairs.train) == 3
    assert pairs.skipped.rows == [{"where": f"{path}:2", "problem": "field 'chosen' is missing or null"}]


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(errors.DataError, match="no such file"):
        data.load_pairs(args(dataset_name=str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(errors.DataError, match="unsupported file type"):
        data.load_pairs(args(dataset_name=str(tmp_path / "d.txt")))


def test_parquet_row_numbers(tmp_path):
    rows = STANDARD[:3] + [{"prompt": "p", "chosen": None, "rejected": "x"}]
    Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(errors.DataError, match=r"d\.parquet row 4: field 'chosen' is missing or null"):
        data.load_pairs(args(dataset_name=str(tmp_path / "d.parquet")))


# ------------------------------------------------------------------------------------------ tokens


def _trl_prepare(rows, tokenizer, max_length=None):
    """TRL 1.16's own preprocessing (DPOTrainer._prepare_dataset), run on the same rows."""
    from trl import DPOTrainer

    fake_self = types.SimpleNamespace(_tokenizer=tokenizer)
    trl_args = types.SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(fake_self, Dataset.from_list(rows), tokenizer, trl_args, "train")


@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_tokens_identical_to_trl(rows, tiny_tokenizer):
    ours, counts = data.tokenize_dataset(Dataset.from_list(rows), tiny_tokenizer, None, None)
    theirs = _trl_prepare(rows, tiny_tokenizer)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == theirs[key], key
    assert counts == {"pairs": len(rows), "truncated": 0, "dropped": 0}


def test_truncation_keeps_prompt_end_and_bos():
    bos = 1
    p, c, r, s = tokens.truncate_pair([1, 10, 11, 12, 13, 14], [20, 21, 22], [30], max_length=6, max_prompt_length=4,
                                    bos_id=bos)
    assert (p, c, r, s) == ([1, 12, 13, 14], [20, 21], [30], "truncated")
    assert tokens.truncate_pair([5, 6], [7], [8], 10, 4) == ([5, 6], [7], [8], "ok")
    assert tokens.truncate_pair([5, 6, 7], [8], [9], 3, None)[3] == "dropped"


def test_tokenize_dataset_counts_truncated_and_dropped(tiny_tokenizer):
    rows = [{"prompt": "word " * 200, "chosen": " yes", "rejected": " no"},
            {"prompt": "Hi", "chosen": " a long answer " * 50, "rejected": " no"},
            {"prompt": "Hi", "chosen": " ok", "rejected": " no"}]
    ds, counts = data.tokenize_dataset(Dataset.from_list(rows), tiny_tokenizer, 64, None)
    assert counts == {"pairs": 3, "truncated": 1, "dropped": 1} and len(ds) == 2
    assert all(len(p) + len(c) <= 64 for p, c in zip(ds["prompt_ids"], ds["chosen_ids"], strict=True))
    ds, counts = data.tokenize_dataset(Dataset.from_list(rows), tiny_tokenizer, 64, 32)
    assert counts == {"pairs": 3, "truncated": 2, "dropped": 0} and len(ds) == 3
    assert len(ds["prompt_ids"][0]) == 32


def test_tiny_tokenizer_handles_any_utf8(tiny_tokenizer):
    text = "naïve café — 東京 🚀 \u0000 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


# --------------------------------------------------------------- rows that cannot be read, and chat roles


def test_invalid_utf8_and_malformed_json_are_row_errors_with_their_line(tmp_path):
    good = json.dumps(STANDARD[0]).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b'\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n{"prompt": \n' + good + b"\n")
    with pytest.raises(errors.DataError, match=rf"{path}:2: invalid UTF-8 \(byte 0xe9 at byte 16 of the line\)"):
        data.load_pairs(args(dataset_name=str(path)))
    pairs = data.load_pairs(args(dataset_name=str(path), skip_bad_rows=True, dedup="none"))
    assert len(pairs.train) == 2
    assert [r["where"] for r in pairs.skipped.rows] == [f"{path}:2", f"{path}:3"]
    assert pairs.skipped.rows[1]["problem"].startswith("malformed JSON (Expecting value")


def test_utf8_bom_is_accepted(tmp_path):
    jsonl, arr, csv = tmp_path / "d.jsonl", tmp_path / "d.json", tmp_path / "d.csv"
    jsonl.write_bytes(sources.BOM + "".join(json.dumps(r) + "\n" for r in STANDARD).encode())
    arr.write_bytes(sources.BOM + json.dumps(STANDARD).encode())
    Dataset.from_list(STANDARD).to_csv(csv, index=False)
    csv.write_bytes(sources.BOM + csv.read_bytes())
    for path in (jsonl, arr, csv):
        assert data.load_pairs(args(dataset_name=str(path))).train.to_list() == STANDARD, path


def msg(role, content="hi"):
    return {"role": role, "content": content}


ROLES = [
    ([msg("user"), msg("assistant")], "field 'prompt' ends with an assistant message and 'chosen' starts with one"),
    ([msg("assistant"), msg("user")], "field 'prompt' starts with an assistant message"),
    ([msg("usr")], "field 'prompt' message 1 has unknown role 'usr' (did you mean 'user'?)"),
    ([msg("user"), msg("system")], "field 'prompt' message 2 is a system message after the conversation started"),
]


@pytest.mark.parametrize("prompt,problem", ROLES, ids=[r[1][:30] for r in ROLES])
def test_chat_role_problems_are_row_errors(tmp_path, prompt, problem):
    rows = [CONVERSATIONAL[0], {"prompt": prompt, "chosen": [msg("assistant", "a")],
                                "rejected": [msg("assistant", "b")]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(errors.DataError, match=re.escape(f"{path}:2: {problem}")):
        data.load_pairs(args(dataset_name=str(path)))
    pairs = data.load_pairs(args(dataset_name=str(path), skip_bad_rows=True))
    assert len(pairs.train) == 1 and pairs.skipped.rows[0]["problem"].startswith(problem)


def test_roles_are_checked_before_a_strict_template_renders(tmp_path, tiny_tokenizer):
    """A template that raises on non-alternating roles (as many do) never sees a row it would fail on: two user turns
    in a row are merged (counted), a prompt ending with the assistant is skipped with its line, the rest train."""
    import copy

    from fastdpo import tokcache

    strict = copy.deepcopy(tiny_tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
                            "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}<|{{ m['role'] }}|>"
                            "{{ m['content'] }}<|end|>{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(Exception, match="roles must alternate"):  # what a user would see without the check
        strict.apply_chat_template([msg("user"), msg("user")], tokenize=False)
    rows = tiny.preference_rows("train", 8)
    rows.insert(3, {"prompt": [msg("user", "x"), msg("assistant", "y")], "chosen": [msg("assistant", "a")],
                    "rejected": [msg("assistant", "b")]})
    rows.insert(5, {"prompt": [msg("user", "one"), msg("user", "two")], "chosen": [msg("assistant", "a")],
                    "rejected": [msg("assistant", "b")]})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = DataSpec.of(args(dataset_name=str(path), skip_bad_rows=True, dataset_test_split="none"), max_length=128)
    prep = tokcache.prepare(spec, strict, cache_dir=tmp_path / "cache")
    assert len(prep.train) == 9
    assert [r["where"] for r in prep.listings["skipped_rows.jsonl"]] == [f"{path}:4"]
    assert prep.report["notes"]["merged_turns"]["first"] == [f"{path}:6"]


def test_csv_rows_keep_their_real_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\nQ1,"a long\nanswer",no\nQ2,same,same\n\nQ3,yes,"no,\nnever"\n')
    pairs = data.load_pairs(args(dataset_name=str(path)))
    assert pairs.notes.first == {"no_preference": [f"{path}:4"]}
    assert pairs.train.to_list() == [{"prompt": "Q1", "chosen": "a long\nanswer", "rejected": "no"},
                                     {"prompt": "Q3", "chosen": "yes", "rejected": "no,\nnever"}]
    path.write_text('prompt,chosen,rejected\nQ1,a,b\nQ2,a,b,c\n')
    with pytest.raises(errors.DataError, match=rf"{path}:3: 4 fields where the header has 3"):
        data.load_pairs(args(dataset_name=str(path)))


def test_save_to_disk_folder(tmp_path):
    from datasets import DatasetDict

    Dataset.from_list(STANDARD).save_to_disk(tmp_path / "one")
    assert data.load_pairs(args(dataset_name=str(tmp_path / "one"))).train.to_list() == STANDARD
    DatasetDict({"train": Dataset.from_list(STANDARD), "test": Dataset.from_list(STANDARD[:2])}).save_to_disk(
        tmp_path / "dict")
    pairs = data.load_pairs(args(dataset_name=str(tmp_path / "dict"), dataset_test_split="test", dedup="none"))
    assert (len(pairs.train), len(pairs.eval)) == (10, 2)
    with pytest.raises(errors.DataError, match=r"has no split 'valid' \(saved splits: \['test', 'train'\]\)"):
        data.load_pairs(args(dataset_name=str(tmp_path / "dict"), dataset_train_split="valid"))


def test_folder_with_several_file_types_is_read_whole(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", STANDARD[:3])
    Dataset.from_list(STANDARD[3:6]).to_parquet(tmp_path / "b.parquet")
    Dataset.from_list(STANDARD[6:]).to_csv(tmp_path / "c.csv", index=False)
    assert data.load_pairs(args(dataset_name=str(tmp_path))).train.to_list() == STANDARD


@pytest.mark.parametrize("value", ["none", "None", ""])
def test_dataset_test_split_none_means_no_eval(tmp_path, caplog, value):
    caplog.set_level(logging.INFO)
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD)
    pairs = data.load_pairs(args(dataset_name=str(path), dataset_test_split=value))
    assert pairs.eval is None and len(pairs.train) == 10
    assert "no eval split" in caplog.text


def test_duplicates_are_counted_and_eval_rows_in_train_dropped(tmp_path):
    train, test = tiny.preference_rows("train", 6), tiny.preference_rows("test", 3)
    write_jsonl(tmp_path / "train.jsonl", train + [train[1]])
    write_jsonl(tmp_path / "test.jsonl", test + [train[2]])
    pairs = data.load_pairs(args(dataset_name=str(tmp_path), dataset_test_split="test"))  # default: dedup eval
    assert (len(pairs.train), len(pairs.eval)) == (7, 3) and train[2] not in pairs.eval.to_list()
    pairs = data.load_pairs(args(dataset_name=str(tmp_path), dataset_test_split="test", dedup="all"))
    assert (len(pairs.train), len(pairs.eval)) == (6, 3)
    pairs = data.load_pairs(args(dataset_name=str(tmp_path), dataset_test_split="test", dedup="none"))
    assert (len(pairs.train), len(pairs.eval)) == (7, 4)
    with pytest.raises(errors.DataError, match="dedup='some'"):
        data.load_pairs(args(dataset_name=str(tmp_path), dataset_test_split="test", dedup="some"))


# ------------------------------------------------------------------- implicit prompts without a template


HH = [{"chosen": f"\n\nHuman: What is {w}?\n\nAssistant: {w} is a word.",
       "rejected": f"\n\nHuman: What is {w}?\n\nAssistant: No idea."} for w in ("tea", "rain", "stone")]


def test_implicit_prompt_without_chat_template_trains_as_raw_text(tmp_path, tiny_tokenizer):
    """A base model's tokenizer (no chat template) trains hh-rlhf transcripts as raw text, split by TRL's own
    extract_prompt: the same ids as TRL's preprocessing. With a template they become messages, as before."""
    import copy

    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = None
    path = write_jsonl(tmp_path / "hh.jsonl", HH)
    pairs = data.load_pairs(args(dataset_name=str(path)), base)
    assert pairs.train[0] == {"prompt": "\n\nHuman: What is tea?\n\nAssistant:", "chosen": " tea is a word.",
                              "rejected": " No idea."}
    ours, _ = data.tokenize_dataset(pairs.train, base, None, None)
    theirs = _trl_prepare(HH, base)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == theirs[key], key
    assert isinstance(data.load_pairs(args(dataset_name=str(path)), tiny_tokenizer).train[0]["prompt"], list)
    conv = write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONAL)
    with pytest.raises(errors.TemplateMissing, match=rf"{conv}:1: .*no chat template; set chat_template_path"):
        data.load_pairs(args(dataset_name=str(conv)), base)
