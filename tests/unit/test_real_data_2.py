"""Published preference shapes (tests/fixtures/real_data_2, described in its README and manifest.json): each source
is read with no column_map (judged data with its documented option) and gives exactly the conversations of its
`*.expected.jsonl` in TRL's conversational layout, tools included, and the token ids TRL 1.16's own DPO
preprocessing gives those rows (trl_reference.py, with each row's tools read); every row is accounted for; data
that is not pairs is refused saying what it is; a template that would drop tools is refused.

    .venv/bin/python -m pytest tests/unit/test_real_data_2.py -m "not slow"     # seconds
    .venv/bin/python -m pytest tests/unit/test_real_data_2.py -m slow           # train_dpo.py end to end, minutes
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest

from fastdpo import checks, data, errors, layouts, lengths, models, tokcache, tokens
from fastdpo.dataspec import DataSpec, SourceSpec
from tests.helpers import PYTHON, REPO, read_json, run

FIXTURES = REPO / "tests" / "fixtures" / "real_data_2"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
TEMPLATE = FIXTURES / "tool_template.jinja"
# the manifest's no-pair kinds -> the note each is counted under
NOTE = {"identical": "no_preference", "tie": "tie", "split": "split", "unlabelled": "unlabelled"}
# (source, its expected file, the options it needs): PKU-SafeRLHF twice, once for each label
CASES = [(name, m[exp], m[opts]) for name, m in MANIFEST.items()
         for exp, opts in (("expected", "options"), ("expected_safer", "options_safer")) if exp in m]
REFUSED = {name: m for name, m in MANIFEST.items() if "refusal" in m or "refusal_without_options" in m}
TOOL_FILES = [name for name, m in MANIFEST.items() if "tools" in m]


def _load_reference():
    spec = importlib.util.spec_from_file_location("trl_reference", FIXTURES / "trl_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trl_reference = _load_reference()


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_model_path):
    """The tiny tokenizer with the tool-capable template (it renders text conversations as the tiny model's own)."""
    return models.load_tokenizer(tiny_model_path, str(TEMPLATE))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def place(name: str, row: int) -> str:
    """A row's place as the sources stage names it: file:line for JSON lines, `file row N` for a JSON array."""
    path = FIXTURES / name
    return f"{path} row {row}" if name.endswith(".json") else f"{path}:{row}"


def spec_of(name: str, options: dict, **kw) -> DataSpec:
    return DataSpec(SourceSpec(str(FIXTURES / name), options=layouts.Options(**options)), **kw)


def ids(ds) -> list[dict]:
    cols = ds[:]
    return [{k: cols[k][i] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in range(len(ds))]


# ------------------------------------------------------------------- every source: its conversations, TRL's ids


@pytest.mark.parametrize("name,expected,options", CASES, ids=[f"{c[0]}-{c[1].split('.')[-3]}" for c in CASES])
def test_source_gives_its_expected_conversations_with_trls_token_ids(name, expected, options, tool_tokenizer,
                                                                     tmp_path):
    m = MANIFEST[name]
    want = read_rows(FIXTURES / expected)
    got, _ = checks.read_pairs(SourceSpec(str(FIXTURES / name), options=layouts.Options(**options)), True)
    # the conversations themselves, tools as the source holds them, from the rows the manifest names
    assert got.pairs == want
    assert got.where == [place(name, r) for r in m["pairs_from_rows"]]
    # every row without a pair is counted under its kind, at its place
    assert len(got.no_pair) == len(m["no_pair"])
    for row in m["no_pair"]:
        assert place(name, row["row"]) in got.notes.first[NOTE[row["kind"]]], row
    # training's path (the token cache) gives the ids TRL's own DPO preprocessing gives the expected rows
    reference = trl_reference.prepared(want, tool_tokenizer, False, str(tmp_path))
    prep = tokcache.prepare(spec_of(name, options, test_split="none"), tool_tokenizer, cache_dir=tmp_path / "c")
    assert ids(prep.train) == reference
    acc = prep.report["accounting"]
    assert (acc["rows_read"], acc["trained"], acc["no_pair"]) == (m["rows"], len(want), len(m["no_pair"]))
    # the in-memory path (datasets' Arrow in between) gives them too
    pairs = data.load_pairs(spec_of(name, options, test_split="none"), tool_tokenizer)
    ds, _ = data.tokenize_dataset(pairs.train, tool_tokenizer, None, None)
    assert ids(ds) == reference


@pytest.mark.parametrize("name", TOOL_FILES)
def test_tool_sources_render_their_tools_and_report_what_the_template_does_not_read(name, tool_tokenizer, tmp_path):
    """The prompts are as long as TRL's with the tools read (not the bare conversation's); a key of OpenAI's input
    that no template reads is listed, never dropped silently."""
    m = MANIFEST[name]
    prep = tokcache.prepare(spec_of(name, m["options"], test_split="none"), tool_tokenizer, cache_dir=tmp_path / "c")
    bare = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_rows(FIXTURES / m["expected"])]
    without = trl_reference.prepared(bare, tool_tokenizer, False, str(tmp_path))
    extra = sum(len(x) for x in prep.train["prompt_ids"]) - sum(len(x["prompt_ids"]) for x in without)
    assert extra > 50 * len(without)  # tool schemas are hundreds of tokens a row
    layout = prep.report["layout"]
    first = json.loads((FIXTURES / name).read_text())[0] if name.endswith(".json") else read_rows(FIXTURES / name)[0]
    first_has_tools = layouts.has_path(first, m["tools"]["column"])  # ms-swift's first rows have none: read anyway
    assert layout["columns"].get("tools") == (m["tools"]["column"] if first_has_tools else None)
    assert layout["unused_columns"] == (["input.parallel_tool_calls"] if "not_rendered" in m else [])
    assert ("not read: input.parallel_tool_calls" in layout["description"]) == ("not_rendered" in m)


# --------------------------------------------------------------------------------- refusals that name the data


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_data_that_is_not_pairs_or_needs_an_option_is_refused_naming_it(name, tiny_tokenizer, tmp_path):
    m = REFUSED[name]
    refusal = m.get("refusal") or m["refusal_without_options"]
    with pytest.raises(errors.DataError) as e:
        tokcache.prepare(spec_of(name, {}), tiny_tokenizer, cache_dir=tmp_path / "c")
    text = str(e.value)
    assert text.startswith(place(name, 1) + ": ")
    for column in refusal["must_name"]:
        assert repr(column) in text, (column, text)
    assert "rename" not in text.lower() and "column_map" not in text
    said = {"kto": ["KTO data", "chosen and rejected"], "unlabelled": ["unlabelled", "Judge the pairs first"],
            "multi_annotator": ["annotators: majority"], "two_labels": ["judged_label: better_response_id",
                                                                        "judged_label: safer_response_id"]}
    for words in said[refusal["kind"]]:
        assert words in text, (words, text)


def test_the_analyzer_exits_2_on_data_that_is_not_pairs(tmp_path):
    proc = run([PYTHON, "scripts/analyze_dataset.py", str(FIXTURES / "kto_messages.jsonl"), "--recipe",
                "recipes/tiny.yaml"], env={"FASTDPO_CACHE": str(tmp_path)}, check=False)
    assert proc.returncode == 2 and "KTO data, not preference pairs" in proc.stderr, proc.stderr[-2000:]


def test_a_number_label_of_an_unknown_shape_needs_its_codes(tiny_tokenizer, tmp_path):
    """Three published meanings of 0: a number label is never guessed; judged_codes says what each value means."""
    rows = [{"question": f"Q{k}?", "response_x": f"good {k}", "response_y": f"bad {k}", "label": v}
            for k, v in enumerate([0, 1, 2, 0])]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(layouts.NeedsOption, match=r"'label' pick between 'response_x' and 'response_y' with numbers "
                                                   r"\(0 in this row\).*judged_codes"):
        checks.read_pairs(SourceSpec(str(path), options=layouts.Options(judged_pairs=True)), True)
    codes = {"0": "response_x", "1": "response_y", "2": "tie"}
    got, layout = checks.read_pairs(SourceSpec(str(path), options=layouts.Options(judged_pairs=True,
                                                                                  judged_codes=codes)), True)
    assert [p["chosen"][0]["content"] for p in got.pairs] == ["good 0", "bad 1", "good 3"]
    assert got.notes.counts == {"tie": 1} and "codes from judged_codes" in layout.describe()
    with pytest.raises(errors.DataError, match=r"field 'label' is 7: expected codes from judged_codes: 0 = "
                                               r"response_x, 1 = response_y, 2 = tie"):
        layouts.detect(rows[0], layouts.Options(judged_pairs=True, judged_codes=codes)).convert({**rows[0], "label": 7})


def test_a_label_value_outside_the_codes_is_a_row_error_naming_the_codes(tmp_path):
    rows = json.loads((FIXTURES / "alpaca_eval_annotations.json").read_text())
    rows[1]["preference"] = 3
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(errors.DataError, match=rf"{path} row 2: field 'preference' is 3: expected alpaca_eval "
                                               r"annotations: 1 = output_1, 2 = output_2, 0 = a draw"):
        checks.read_pairs(SourceSpec(str(path), options=layouts.Options(judged_pairs=True)), True)


# ----------------------------------------------------------------------------- tools the template cannot render


@pytest.mark.parametrize("name", TOOL_FILES)
def test_tools_with_a_template_that_drops_them_are_refused_naming_the_column(name, tiny_tokenizer, tmp_path):
    """The tiny model's own template ignores tools: training on it would teach calls to tools never shown."""
    column = MANIFEST[name]["tools"]["column"]
    with pytest.raises(tokens.ToolsNotRendered, match=rf"column {column!r} holds tool schemas but the chat "
                                                      r"template does not render them.*chat_template_path"):
        tokcache.prepare(spec_of(name, {}, test_split="none"), tiny_tokenizer, cache_dir=tmp_path / "c")


def test_tool_calls_with_a_template_that_drops_them_are_refused(tiny_tokenizer, tmp_path):
    rows = json.loads((FIXTURES / "sharegpt_toolcall_dpo.json").read_text())
    rows = [{**r, "tools": ""} for r in rows]  # no tools: only the calls
    path = tmp_path / "calls.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(tokens.ToolsNotRendered, match=rf"{path} row 1: the conversation holds assistant tool calls"):
        tokcache.prepare(DataSpec(SourceSpec(str(path)), test_split="none"), tiny_tokenizer, cache_dir=tmp_path / "c")


def test_bad_tools_values_are_row_errors_naming_the_column(tmp_path):
    row = read_rows(FIXTURES / "medicalgpt_toolcall_dpo.jsonl")[0]
    layout = layouts.detect(row)
    for bad, problem in (("[{oops", "field 'tools' is a string but not JSON"),
                         ('["get_weather"]', "field 'tools' holds a list with items that are not objects"),
                         ({"name": "x"}, "field 'tools' holds dict, not tool schemas")):
        with pytest.raises(errors.DataError, match=problem):
            layout.convert({**row, "tools": bad})
    assert "tools" not in layout.convert({**row, "tools": ""})[0][0]  # LLaMA-Factory's "no tools"


def test_chat_template_kwargs_reach_the_template_as_trl_passes_them(tiny_model_path, tmp_path):
    """A row's chat_template_kwargs are template variables for its prompt and both answers; null means none (TRL
    would fail on it); a JSON string of an object is read as the object."""
    template = tmp_path / "t.jinja"
    template.write_text("{%- if note is defined %}[{{ note }}]{% endif -%}\n" + TEMPLATE.read_text())
    tok = models.load_tokenizer(tiny_model_path, str(template))
    convs = read_rows(FIXTURES / "msswift_rejected_messages.expected.jsonl")
    kwargs = [{"note": "think step by step"}, None, json.dumps({"note": "be brief"})]
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({**c, "chat_template_kwargs": k}) + "\n" for c, k in zip(convs, kwargs,
                                                                                                  strict=True)))
    expected = [{**c, "chat_template_kwargs": json.loads(k) if isinstance(k, str) else k} if k else c
                for c, k in zip(convs, kwargs, strict=True)]
    got, _ = checks.read_pairs(SourceSpec(str(source)), True)
    assert got.pairs == expected
    prep = tokcache.prepare(DataSpec(SourceSpec(str(source)), test_split="none"), tok, cache_dir=tmp_path / "c")
    reference = trl_reference.prepared(expected, tok, False, str(tmp_path))
    assert ids(prep.train) == reference
    assert tok.decode(prep.train[0]["prompt_ids"]).startswith("[think step by step]")


# ------------------------------------------------------------------------------------ one rule, any path


def test_column_map_gives_the_tokens_of_the_same_rows_detected(tiny_tokenizer, tmp_path, caplog):
    m = MANIFEST["stack_exchange_paired.jsonl"]
    renamed = [{"question": r["question"], "chosen": r["response_j"], "rejected": r["response_k"]}
               for r in read_rows(FIXTURES / "stack_exchange_paired.jsonl")]
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    with caplog.at_level(logging.INFO):
        mapped = tokcache.prepare(spec_of("stack_exchange_paired.jsonl", m["options"], test_split="none"),
                                  tiny_tokenizer, cache_dir=tmp_path / "c")
    detected = tokcache.prepare(DataSpec(SourceSpec(str(path)), test_split="none"), tiny_tokenizer,
                                cache_dir=tmp_path / "c")
    assert ids(mapped.train) == ids(detected.train)
    layout_line = next(r.getMessage() for r in caplog.records if ": layout " in r.getMessage())
    assert "layout question (column_map)" in layout_line and "raw" not in layout_line, layout_line
    # TRL's own text layout stays raw, and says so
    text = tmp_path / "standard.jsonl"
    text.write_text("".join(json.dumps({"prompt": r["question"], "chosen": r["chosen"], "rejected": r["rejected"]})
                            + "\n" for r in renamed))
    standard = tokcache.prepare(DataSpec(SourceSpec(str(text)), test_split="none"), tiny_tokenizer,
                                cache_dir=tmp_path / "c")
    assert "text used raw, as TRL tokenises its own text layout" in standard.report["layout"]["description"]
    assert ids(standard.train) != ids(detected.train)


def test_the_analyzer_measures_tool_rows_as_training_tokenises_them(tool_tokenizer, tmp_path):
    """ms-swift's first rows have no tools, rows 4-5 do: Arrow's first-row columns would drop them silently."""
    spec = spec_of("msswift_rlhf.jsonl", {}, test_split="none")
    sample = lengths.load_sample(spec, None)
    measured = lengths.measure(sample.pairs, tool_tokenizer)
    prep = tokcache.prepare(spec, tool_tokenizer, cache_dir=tmp_path / "c")
    assert measured.prompt.tolist() == [len(x) for x in prep.train["prompt_ids"]]
    assert measured.prompt[3] > 3 * measured.prompt[2]  # the tools are in the prompt


# --------------------------------------------------------------------------------------------- the small ones


def test_a_file_too_small_to_hold_out_from_trains_without_eval(tiny_tokenizer, tmp_path, caplog):
    path = tmp_path / "one.jsonl"
    path.write_text((FIXTURES / "shp.jsonl").read_text().splitlines()[0] + "\n")
    spec = DataSpec(SourceSpec(str(path), options=layouts.Options(judged_pairs=True)), test_split="0.1")
    with caplog.at_level(logging.WARNING):
        prep = tokcache.prepare(spec, tiny_tokenizer, cache_dir=tmp_path / "c")
    assert prep.eval is None and len(prep.train) == 1 and prep.report["accounting"]["trained"] == 1
    assert f"{path} [train]: 1 pair is too few to hold out 10% for eval: training without evaluation" in caplog.text


def analyzer():
    spec = importlib.util.spec_from_file_location("analyze_dataset", REPO / "scripts" / "analyze_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_analyzer_takes_the_flag_values_its_messages_print(tmp_path):
    with pytest.raises(layouts.NeedsOption) as e:
        checks.read_pairs(SourceSpec(str(FIXTURES / "pandalm_testset.json")), True)
    printed = re.findall(r"--\w+ \w+", errors.FIX_SKIP + str(e.value))
    assert sorted(printed) == ["--annotators majority", "--judged_pairs true", "--skip_bad_rows true"]
    args = analyzer().parse(["x.jsonl"] + " ".join(printed).split())
    assert (args.judged_pairs, args.skip_bad_rows, args.annotators) == (True, True, "majority")
    parse = analyzer().parse
    assert parse(["x.jsonl", "--judged_pairs"]).judged_pairs is True and parse(["x.jsonl"]).judged_pairs is None
    assert parse(["x.jsonl", "--skip_bad_rows", "false"]).skip_bad_rows is False


def test_the_analyzer_reports_split_refusals_and_the_layout_as_data_report_has_it(tiny_tokenizer, tmp_path):
    name = "pandalm_testset.json"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text() + f"\neval_dataset_name: {FIXTURES / name}\n")
    out = analyzer().main([str(FIXTURES / name), "--recipe", str(recipe), "--judged_pairs", "true",
                           "--annotators", "majority"])
    assert out["training_refuses"] and "every eval pair also occurs in train" in out["refusal"]
    with pytest.raises(errors.DataError, match="every eval pair also occurs in train"):
        tokcache.prepare(spec_of(name, MANIFEST[name]["options"], eval_name=str(FIXTURES / name)), tiny_tokenizer,
                         cache_dir=tmp_path / "c")
    prep = tokcache.prepare(spec_of(name, MANIFEST[name]["options"], test_split="none"), tiny_tokenizer,
                            cache_dir=tmp_path / "c")
    shown, reported = out["layout"], prep.report["layout"]
    assert isinstance(shown, dict) and set(shown) <= set(reported)
    assert {k: shown[k] for k in ("name", "description", "columns", "unused_columns")} == \
           {k: reported[k] for k in ("name", "description", "columns", "unused_columns")}


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_dpo_on_a_tool_file_and_a_judged_file(tmp_path):
    """train_dpo.py as a user runs it: LLaMA-Factory's sharegpt tool pairs with a template that renders tools, and
    PandaLM's judgments with the majority of its annotators; then a one-row file, which trains without eval."""
    one = tmp_path / "one.jsonl"
    one.write_text((FIXTURES / "shp.jsonl").read_text().splitlines()[0] + "\n")
    runs = [("sharegpt_toolcall_dpo.json", ["--chat_template_path", str(TEMPLATE)]),
            ("pandalm_testset.json", ["--judged_pairs", "true", "--annotators", "majority"]),
            (str(one), ["--judged_pairs", "true"])]
    for k, (name, flags) in enumerate(runs):
        out = tmp_path / f"out{k}"
        proc = run([PYTHON, "train_dpo.py", "--dataset_name", str(FIXTURES / name), "--output_dir", str(out),
                    "--max_steps", "2", "--use_cpu", "true", *flags], env={"FASTDPO_CACHE": str(tmp_path / "c")})
        report, log = read_json(out / "data_report.json"), proc.stdout + proc.stderr
        assert (out / "model.safetensors").is_file()
        acc = report["accounting"]
        if k == 0:
            assert report["layout"]["columns"]["tools"] == "tools" and acc["trained"] + acc["eval"] == 5
            assert "tools <- tools" in log
        elif k == 1:
            assert report["notes"]["split"]["count"] == 1 and report["notes"]["tie"]["count"] == 2
            assert acc["no_pair"] == 4 and acc["trained"] + acc["eval"] == 6 and "PandaLM" in log
        else:
            assert acc["trained"] == 1 and acc["eval"] == 0 and "too few to hold out" in log
