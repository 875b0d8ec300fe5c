"""Preference layouts as users bring them: each detected from its rows with no column_map and no flag, every one
giving the token ids of the same conversations in TRL's conversational layout; real files from a folder beside the
checkout (skipped with a message where that folder is absent); oddities with a rule; nothing silently unused.

    .venv/bin/python -m pytest tests/unit/test_layouts.py        # ~1 minute on 2 cores
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from datasets import Dataset

from fastdpo import checks, data, errors, layouts, lengths, sources, tokcache
from fastdpo.config import ScriptArguments
from fastdpo.dataspec import DataSpec, SourceSpec
from tests.helpers import PYTHON, REPO, read_json, run
from tests.unit.layout_shapes import CONVERSATIONS, OPTIONS, WRITERS, hh_rlhf_rows

# Real public preference files, kept beside the checkout (not in it); FASTDPO_REAL_DATA points elsewhere.
REAL = Path(os.environ.get("FASTDPO_REAL_DATA", REPO.parent / "shared" / "real-data"))
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent: the real-data tests read public "
                                "preference files from there (set FASTDPO_REAL_DATA to their folder)")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def prepared(path, tok, cache, **kw):
    a = ScriptArguments(dataset_name=str(path), dataset_test_split="none", **kw)
    return tokcache.prepare(DataSpec.of(a), tok, cache_dir=cache)


def read_pairs(path, **options):
    """The pairs of one source through the pipeline's in-memory source stage (a chat template assumed)."""
    return checks.read_pairs(SourceSpec(str(path), options=layouts.Options(**options)), True)


def ids(ds):
    rows = ds[:]
    return [rows[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]


# ------------------------------------------------------------------------- one conversation, every layout


@pytest.mark.parametrize("layout", [k for k in WRITERS if k != "conversational"])
def test_every_layout_gives_the_tokens_of_trls_conversational_layout(layout, tiny_tokenizer, tmp_path):
    convs = [c for c in CONVERSATIONS if WRITERS[layout](c) is not None]
    assert convs, layout
    ref = prepared(write_jsonl(tmp_path / "ref.jsonl", [WRITERS["conversational"](c) for c in convs]),
                   tiny_tokenizer, tmp_path / "cache")
    got = prepared(write_jsonl(tmp_path / "got.jsonl", [WRITERS[layout](c) for c in convs]), tiny_tokenizer,
                   tmp_path / "cache", **OPTIONS.get(layout, {}))
    assert ids(got.train) == ids(ref.train)
    assert all(len(p) > 3 for p in got.train["prompt_ids"])  # the prompts are really there
    assert got.report["accounting"]["trained"] == len(convs)


def test_nested_parquet_and_save_to_disk_go_through_the_same_detection(tiny_tokenizer, tmp_path):
    rows = [WRITERS["openai"](c) for c in CONVERSATIONS]
    ref = prepared(write_jsonl(tmp_path / "ref.jsonl", [WRITERS["conversational"](c) for c in CONVERSATIONS]),
                   tiny_tokenizer, tmp_path / "cache")
    Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")  # input is a nested struct column
    Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    for path in (tmp_path / "d.parquet", tmp_path / "saved", folder):
        got = prepared(path, tiny_tokenizer, tmp_path / "cache")
        assert ids(got.train) == ids(ref.train), path
        assert got.report["layout"]["name"] == "openai", path


def test_layout_and_unused_columns_are_in_the_log_and_report(tiny_tokenizer, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    path = write_jsonl(tmp_path / "h4.jsonl", [WRITERS["h4 text prompt (last user turn)"](c) for c in CONVERSATIONS])
    got = prepared(path, tiny_tokenizer, tmp_path / "cache")
    layout = got.report["layout"]
    assert layout["name"] == "h4" and layout["columns"] == {"prompt": "prompt", "chosen": "chosen",
                                                            "rejected": "rejected"}
    assert layout["unused_columns"] == ["prompt_id", "score_chosen"] and layout["detected_at"] == f"{path}:1"
    assert "layout h4: prompt <- prompt, chosen <- chosen, rejected <- rejected; not read: prompt_id, score_chosen" \
        in caplog.text


# ---------------------------------------------------------------------------------------- the rules


def test_h4_prompt_that_matches_no_shared_user_turn_is_a_row_error_naming_both(tiny_tokenizer, tmp_path):
    rows = [WRITERS["h4 text prompt (last user turn)"](c) for c in CONVERSATIONS]
    rows[1]["prompt"] = "Something else entirely"
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(errors.DataError, match=rf"{path}:2: field 'prompt' \('Something else entirely'\) matches "
                                             r"none of the user turns the 'chosen' conversations share "
                                             r"\('Name a colour.'\)"):
        prepared(path, tiny_tokenizer, tmp_path / "cache")


def test_hh_rlhf_shape_trains_with_no_flag_oddities_counted(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", hh_rlhf_rows())
    got = prepared(path, tiny_tokenizer, tmp_path / "cache")
    assert got.report["accounting"]["trained"] == 8  # every row
    notes = got.report["notes"]
    assert notes["empty_answer"]["first"] == [f"{path}:3"] and notes["merged_turns"]["first"] == [f"{path}:5"]
    rows, _ = read_pairs(path)
    empty = rows.pairs[2]
    assert empty["chosen"] == [{"role": "assistant", "content": ""}]  # trained as the end of turn alone
    assert rows.pairs[4]["prompt"][1] == {"role": "assistant", "content": "Yes.\n\nWhat do you need?"}
    # the analyzer reports the same, and exits 0
    out = analyze([str(path), "--recipe", "recipes/tiny.yaml", "--samples", "all"])
    assert out["num_samples"] == 8 and out["notes"]["empty_answer"]["count"] == 1 and not out["training_refuses"]


def test_identical_answers_give_no_pair_and_are_counted(tiny_tokenizer, tmp_path):
    rows = [WRITERS["conversational"](c) for c in CONVERSATIONS]
    rows.append({**rows[0], "rejected": rows[0]["chosen"]})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    got = prepared(path, tiny_tokenizer, tmp_path / "cache")
    assert got.report["accounting"]["no_pair"] == 1 and got.report["accounting"]["trained"] == 4
    assert got.listings["no_pair_rows.jsonl"] == [{"where": f"{path}:5", "problem":
                                                   "chosen identical to rejected: no preference, no pair"}]


def test_a_text_column_left_unread_where_no_prompt_was_found_is_refused(tiny_tokenizer, tmp_path):
    # The MedicalGPT mistake with a column detection does not know: the prompt would be silently dropped.
    rows = [{"context": "Tell me about the weather today", "chosen": "It is sunny.", "rejected": "Go away."}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(errors.DataError, match=rf"{path}:1: column 'context' holds text that this layout does not "
                                             r"read.*set column_map '\{\"prompt\": \"context\"\}'"):
        prepared(path, tiny_tokenizer, tmp_path / "cache")
    # short text escapes the row check, not the dataset check: prompts come out empty for most pairs
    rows = [{"topic": f"t{i}", "chosen": f"Yes {i}", "rejected": f"No {i}"} for i in range(4)]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(errors.DataError, match=r"4 of 4 pairs have an empty prompt .* column\(s\) \['topic'\] hold "
                                             r"text that is not read"):
        prepared(path, tiny_tokenizer, tmp_path / "cache")
    out = analyze([str(path), "--recipe", "recipes/tiny.yaml"])  # the analyzer reports it and exits 0
    assert out["training_refuses"] and "empty prompt" in out["refusal"]


def test_typed_parts_other_than_text_are_row_errors_naming_the_part(tiny_tokenizer, tmp_path):
    rows = [WRITERS["conversational typed parts"](c) for c in CONVERSATIONS]
    rows[2]["prompt"][0]["content"].append({"type": "image_url", "image_url": {"url": "x.png"}})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(errors.DataError, match=rf"{path}:3: field 'prompt' message 1 content part 2 is of type "
                                             r"'image_url': a text model trains on text parts only"):
        prepared(path, tiny_tokenizer, tmp_path / "cache")


def test_ranked_and_judged_data_are_refused_naming_the_option_then_converted(tiny_tokenizer, tmp_path):
    ranked = [{"instruction": f"Q{i}", "input": "", "history": [], "output": [f"best {i}", f"mid {i}", f"worst {i}"]}
              for i in range(3)]
    ranked.append({"instruction": "Q", "input": "", "history": [], "output": ["same", "same"]})
    path = write_jsonl(tmp_path / "r.jsonl", ranked)
    with pytest.raises(errors.DataError, match=r"ranked data: column 'output' holds replies ranked best first .*set "
                                             r"ranked_pairs: best_vs_worst"):
        prepared(path, tiny_tokenizer, tmp_path / "cache")
    worst = prepared(path, tiny_tokenizer, tmp_path / "cache", ranked_pairs="best_vs_worst")
    rest = prepared(path, tiny_tokenizer, tmp_path / "cache", ranked_pairs="best_vs_rest")
    acc = worst.report["accounting"]
    assert (acc["rows_read"], acc["pairs"], acc["no_pair"], acc["trained"]) == (4, 3, 1, 3)
    assert rest.report["accounting"]["pairs"] == 6 and rest.report["accounting"]["rows_read"] == 4
    assert "4 rows read = 3 with pairs + 0 skipped + 1 without a pair; their 6 pairs = 6 trained" in \
        rest.report["accounting_line"]
    judged = [{"question": f"Q{i}", "agent_response": f"A{i}", "base_response": f"B{i}", "grade": g}
              for i, g in enumerate(["agent", "base", "tie", None, "agent"])]
    path = write_jsonl(tmp_path / "j.jsonl", judged)
    with pytest.raises(errors.DataError, match=r"judged pairs: columns 'agent_response' and 'base_response' .*Set "
                                             r"judged_pairs: true"):
        prepared(path, tiny_tokenizer, tmp_path / "cache")
    got = prepared(path, tiny_tokenizer, tmp_path / "cache", judged_pairs=True)
    assert got.report["accounting"]["trained"] == 3
    assert {k: v["count"] for k, v in got.report["notes"].items()} == {"tie": 1, "unlabelled": 1}
    rows, _ = read_pairs(path, judged_pairs=True)
    assert rows.pairs[1]["chosen"] == [{"role": "assistant", "content": "B1"}]  # base won row 2


def test_column_map_reaches_nested_fields_message_keys_and_role_names(tiny_tokenizer, tmp_path):
    ref = [WRITERS["conversational"](c) for c in CONVERSATIONS]
    names = {"system": "narrator", "user": "customer", "assistant": "agent"}

    def odd(c):  # a layout detection cannot know: nested, with its own message keys and role names
        turns = ([("system", c["system"])] if c["system"] else []) + c["turns"]
        return {"data": {"dialog": [{"speaker": names[r], "text": t} for r, t in turns]},
                "good": {"speaker": "agent", "text": c["chosen"]}, "bad": {"speaker": "agent", "text": c["rejected"]}}

    path = write_jsonl(tmp_path / "odd.jsonl", [odd(c) for c in CONVERSATIONS])
    cmap = {"messages": "data.dialog", "chosen": "good", "rejected": "bad", "role_tag": "speaker",
            "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent", "system_tag": "narrator"}
    got = prepared(path, tiny_tokenizer, tmp_path / "cache", column_map=cmap)
    want = prepared(write_jsonl(tmp_path / "ref.jsonl", ref), tiny_tokenizer, tmp_path / "cache")
    assert ids(got.train) == ids(want.train)
    assert got.report["layout"]["from_column_map"] and got.report["layout"]["columns"]["prompt"] == "data.dialog"
    with pytest.raises(SystemExit, match="column_map keys must be among"):
        ScriptArguments(dataset_name="x.jsonl", column_map='{"question": "q"}')


def test_sft_single_file_with_a_named_test_split_holds_out_rows_not_its_train_rows(tmp_path):
    from fastdpo import sft

    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
            for i in range(50)]
    path = write_jsonl(tmp_path / "one.jsonl", rows)
    got = sft.load_sft(ScriptArguments(dataset_name=str(path), dataset_test_split="test"))
    assert (len(got.train), len(got.eval)) == (45, 5)
    assert not set(map(json.dumps, got.eval["messages"])) & set(map(json.dumps, got.train["messages"]))
    assert got.train[0]["messages"][0] == {"role": "user", "content": got.train[0]["messages"][0]["content"]}


# ------------------------------------------------------------------------------------ real public data


def _real(name):
    with gzip.open(REAL / name, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def _flat(content):
    return content if isinstance(content, str) else "".join(p["value"] for p in content)


def _sharegpt_ref(row):
    prompt = [{"role": ROLE[m["from"]], "content": m["value"]} for m in row["conversations"]]
    ans = lambda a: [{"role": "assistant", "content": a["value"] if isinstance(a, dict) else a}]  # noqa: E731
    return {"prompt": prompt, "chosen": ans(row["chosen"]), "rejected": ans(row["rejected"])}


def _v1_ref(row):
    c = [{"role": m["role"], "content": _flat(m["content"])} for m in row["chosen_messages"]]
    r = [{"role": m["role"], "content": _flat(m["content"])} for m in row["rejected_messages"]]
    k = next(i for i in range(len(c)) if c[i] != r[i])
    return {"prompt": c[:k], "chosen": c[k:], "rejected": r[k:]}


def _oaast_ref(row):
    prompt = [m for u, a in row["history"] for m in ({"role": "user", "content": u},
                                                      {"role": "assistant", "content": a})]
    q = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
    best, worst = row["output"][0], row["output"][-1]
    if best == worst:
        return None
    return {"prompt": prompt + [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": best}],
            "rejected": [{"role": "assistant", "content": worst}]}


def _judged_ref(row):
    if row["grade"] not in ("agent", "base"):
        return None
    win, lose = ("agent_response", "base_response") if row["grade"] == "agent" else ("base_response", "agent_response")
    return {"prompt": [{"role": "user", "content": row["question"]}],
            "chosen": [{"role": "assistant", "content": row[win]}],
            "rejected": [{"role": "assistant", "content": row[lose]}]}


# file -> (the same conversations in TRL's conversational layout, written by a plain converter; the option needed)
REAL_FILES = {
    "llamafactory-dpo_en_demo.json.gz": (_sharegpt_ref, {}),
    "llamafactory-dpo_zh_demo.json.gz": (_sharegpt_ref, {}),
    "llamafactory-v1_dpo_demo.jsonl.gz": (_v1_ref, {}),
    "medicalgpt-dpo_zh_500.jsonl.gz": (_sharegpt_ref, {}),
    "medicalgpt-reward_test.json.gz": (lambda r: {"prompt": [{"role": "user", "content": r["question"]}],
                                                  "chosen": [{"role": "assistant", "content": r["response_chosen"]}],
                                                  "rejected": [{"role": "assistant",
                                                                "content": r["response_rejected"]}]}, {}),
    "foundry-orca_dpo_pairs-validation.jsonl.gz": (lambda r: {"prompt": r["input"]["messages"],
                                                              "chosen": r["preferred_output"],
                                                              "rejected": r["non_preferred_output"]}, {}),
    "llamafactory-oaast_rm_zh.json.gz": (_oaast_ref, {"ranked_pairs": "best_vs_worst"}),
    "fastchat-pr3596-arena_hard_gpt-4o.jsonl.gz": (_judged_ref, {"judged_pairs": True}),
}


@needs_real
@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file_trains_token_identical_to_its_conversations_in_trls_layout(name, tiny_tokenizer, tmp_path):
    ref_of, options = REAL_FILES[name]
    refs = [r for r in map(ref_of, _real(name)) if r is not None]
    got = prepared(REAL / name, tiny_tokenizer, tmp_path / "cache", **options)
    want = prepared(write_jsonl(tmp_path / "ref.jsonl", refs), tiny_tokenizer, tmp_path / "cache")
    assert ids(got.train) == ids(want.train)
    assert got.report["accounting"]["trained"] == len(refs) and min(map(len, got.train["prompt_ids"])) > 2
    # the analyzer measures the same pairs, with real prompts, and exits 0
    out = analyze([str(REAL / name), "--recipe", "recipes/tiny.yaml", "--samples", "all"]
                  + [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()])
    assert out["num_samples"] == len(refs) and out["percentiles"]["prompt"]["p50"] > 2 and not out["bad_rows"]


@needs_real
def test_real_layouts_without_their_option_say_which_option(tiny_tokenizer, tmp_path):
    for name, option in (("llamafactory-oaast_rm_zh.json.gz", "ranked_pairs"),
                         ("fastchat-pr3596-arena_hard_gpt-4o.jsonl.gz", "judged_pairs")):
        with pytest.raises(errors.DataError, match=option):
            prepared(REAL / name, tiny_tokenizer, tmp_path / "cache")


@pytest.mark.slow
def test_train_dpo_on_real_and_hh_shaped_data_with_no_flag(tmp_path):
    """train_dpo.py as a user runs it: the MedicalGPT file (sharegpt conversations + string answers, once trained
    without its prompts) and hh-rlhf-shaped transcripts with their oddities."""
    hh = write_jsonl(tmp_path / "hh.jsonl", hh_rlhf_rows(copies=4))
    files = [hh] + ([REAL / "medicalgpt-dpo_zh_500.jsonl.gz"] if REAL.is_dir() else [])
    for k, path in enumerate(files):
        out = tmp_path / f"out{k}"
        proc = run([PYTHON, "train_dpo.py", "--dataset_name", str(path), "--output_dir", str(out), "--max_steps", "2",
                    "--use_cpu", "true", "--max_train_samples", "40"], env={"FASTDPO_CACHE": str(tmp_path / "c")})
        report = read_json(out / "data_report.json")
        log = proc.stdout + proc.stderr
        if path == hh:
            assert report["layout"]["name"] == "implicit" and report["accounting"]["rows_read"] == 32
            assert report["notes"]["empty_answer"]["count"] == 4 and report["notes"]["merged_turns"]["count"] == 4
            assert "data: rows changed or left out by rule: 4 x an empty answer" in log
        else:
            assert report["layout"]["name"] == "sharegpt" and report["accounting"]["rows_read"] == 40
            assert "layout sharegpt: prompt <- conversations" in log
        assert (out / "model.safetensors").is_file()


def analyze(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("analyze_dataset", REPO / "scripts" / "analyze_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def test_detection_reads_the_first_row_that_fits(tmp_path):
    """A bad first row stays a row error with its line; the layout comes from the first row that fits one, and
    the analyzer's sample uses the same detection."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"oops": 1}] + [WRITERS["openai"](c) for c in CONVERSATIONS])
    layout, _ = layouts.detect_source(sources.open_source(str(path)).batches())
    assert layout.name == "openai" and layout.first_place == f"{path}:2"
    with pytest.raises(errors.DataError, match=rf"{path}:1: missing column 'preferred_output' \(chosen\).*layout is "
                                             rf"openai \(detected from {path}:2\)"):
        data.load_pairs(ScriptArguments(dataset_name=str(path)))
    sample = lengths.load_sample(ScriptArguments(dataset_name=str(path)), None)
    assert sample.layout.name == "openai" and [s["where"] for s in sample.skipped] == [f"{path}:1"]


def test_nectar_ultrafeedback_and_arena_shapes(tiny_tokenizer, tmp_path):
    """Ranked and judged layouts of the Hub's other shapes: Nectar (hh-style prompt, answers with ranks),
    UltraFeedback's raw completions (scores, ties), Chatbot Arena (whole conversations, winner model_a/model_b)."""
    nectar = [{"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "turns": 1, "num_responses": 3,
               "answers": [{"answer": "Green.", "model": "m2", "rank": 2.0}, {"answer": "Blue.", "model": "m1",
                                                                              "rank": 1.0},
                           {"answer": "No.", "model": "m3", "rank": 3.0}]}]
    rows, layout = read_pairs(write_jsonl(tmp_path / "n.jsonl", nectar), ranked_pairs="best_vs_worst")
    assert layout.name == "ranked" and rows.pairs == [{"prompt": [{"role": "user", "content": "Name a colour."}],
                                                       "chosen": [{"role": "assistant", "content": "Blue."}],
                                                       "rejected": [{"role": "assistant", "content": "No."}]}]
    uf = [{"source": "evol", "instruction": "Say hi.", "models": ["a", "b", "c"],
           "completions": [{"response": "Hi!", "overall_score": 8.0}, {"response": "Hello.", "overall_score": 8.0},
                           {"response": "Go away.", "overall_score": 2.5}]},
          {"source": "evol", "instruction": "Say bye.", "completions": [{"response": "Bye!", "overall_score": 5.0},
                                                                        {"response": "Ciao.", "overall_score": 5.0}]}]
    rows, layout = read_pairs(write_jsonl(tmp_path / "uf.jsonl", uf), ranked_pairs="best_vs_rest")
    assert [p["rejected"][0]["content"] for p in rows.pairs] == ["Go away."]  # the equal-score rival is no pair
    assert rows.notes.counts == {"ranked_tie": 1, "tie": 1} and rows.no_pair[0]["where"].endswith(":2")
    conv = lambda a: [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": a}]  # noqa: E731
    arena = [{"question_id": "q", "model_a": "x", "model_b": "y", "winner": w, "conversation_a": conv("4"),
              "conversation_b": conv("5"), "turn": 1} for w in ("model_a", "model_b", "tie (bothbad)")]
    rows, layout = read_pairs(write_jsonl(tmp_path / "a.jsonl", arena), judged_pairs=True)
    assert layout.name == "judged" and [p["chosen"][0]["content"] for p in rows.pairs] == ["4", "5"]
    assert rows.pairs[0]["prompt"] == [{"role": "user", "content": "2+2?"}] and rows.notes.counts == {"tie": 1}
