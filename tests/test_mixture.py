"""fastdpo.mixture and the mixture path of the token cache: the recipe forms and their one-line errors, the amounts'
arithmetic, seeding, the per-source hold-out before any copy, the mixed file's cache key, the accounting per source,
and the run identity naming a changed source.

    .venv/bin/python -m pytest tests/test_mixture.py          # about 30 s on 2 cores
"""

import json
from pathlib import Path

import numpy as np
import pytest
from trl import SFTConfig

from fastdpo import checkpoints, mixture, tiny, tokcache
from fastdpo.config import parse_args
from fastdpo.dataspec import DataSpec
from fastdpo.errors import DataError

from .conftest import REPO

TINY = (REPO / "recipes" / "tiny.yaml").read_text().replace("dataset_name: embedded:tiny-prefs", "")
TINY = TINY.replace("dataset_test_split: test", "dataset_test_split: 0.1")


def recipe(tmp_path: Path, body: str, base: str = TINY) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(base + "\n" + body)
    return path


def parse(path: Path, *flags, **kw):
    return parse_args(["--config", str(path), *flags], **kw)


def refused(path: Path, *flags, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        parse(path, *flags, **kw)
    return str(e.value)


@pytest.fixture
def files(tmp_path):
    """Two local sources in different layouts: conversational messages, and TRL's plain text columns."""
    convo = tiny.write_jsonl(tiny.preference_rows("train", 80, seed=1), tmp_path / "convo.jsonl")
    flat = tmp_path / "flat.jsonl"
    rows = [{"prompt": r["chosen"][0]["content"], "chosen": r["chosen"][-1]["content"],
             "rejected": r["rejected"][-1]["content"]} for r in tiny.preference_rows("train", 40, seed=2)]
    flat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return convo, flat


# ------------------------------------------------------------------------------------------- recipe forms


def test_trl_form_with_our_keys(tmp_path, files):
    convo, flat = files
    path = recipe(tmp_path, f"datasets:\n  - path: {convo}\n    count: 50\n  - path: {flat}\n    weight: 2.5\n"
                            f"    label: plain\n  - path: json\n    data_files: [{flat}]\n"
                            "    columns: [prompt, chosen, rejected]\n")
    s, _, _ = parse(path)
    names = [e["label"] for e in s.mixture["sources"]]
    assert names == ["convo", "plain", "flat"]  # file stem, label:, the stem of `path: json`'s first data file
    assert [e["amount"] for e in s.mixture["sources"]] == [{"count": 50}, {"weight": 2.5}, None]
    assert s.mixture["sources"][2]["columns"] == ["prompt", "chosen", "rejected"]
    spec = DataSpec.of(s)
    assert [x.display for x in spec.sources] == names and spec.train.display == "convo"


def test_handbook_form_maps_split_and_seed(tmp_path, files):
    convo, flat = files
    base = TINY.replace("dataset_test_split: 0.1\n", "")
    body = (f"dataset_mixture:\n  datasets:\n    - id: {convo}\n      weight: 0.5\n    - id: {flat}\n"
            "      weight: 1.0\n  test_split_size: 0.2\n  seed: 7\n")
    s, _, _ = parse(recipe(tmp_path, body, base))
    assert s.dataset_test_split == "0.2" and s.dataset_seed == 7
    assert [e["amount"] for e in s.mixture["sources"]] == [{"weight": 0.5}, {"weight": 1.0}]
    assert "dataset_seed: and the mixture's seed" in refused(recipe(tmp_path, "dataset_seed: 3\n" + body, base))
    s, _, _ = parse(recipe(tmp_path, body, base), "--dataset_seed", "3")  # a flag overrides the recipe
    assert s.dataset_seed == 3


def test_hub_names_and_embedded_names():
    assert mixture.display_name("allenai/Dolci-Instruct-DPO") == "Dolci-Instruct-DPO"
    assert mixture.display_name("embedded:tiny-prefs") == "tiny-prefs"
    assert mixture.display_name("data/x.jsonl.gz") == "x"


@pytest.mark.parametrize("body, expected", [
    ("  - path: {convo}\n    cuont: 5\n", "{path}:{n2}: datasets[0]: unknown key 'cuont': did you mean 'count'?"),
    ("  - path: {convo}\n    count: 5\n    weight: 2\n", "{path}:{n3}: datasets[0].weight: count and weight both"),
    ("  - path: {convo}\n    count: 2.5\n", "{path}:{n2}: datasets[0].count: 2.5; expected a whole number"),
    ("  - path: {convo}\n  - path: {convo}\n", "{path}:{n2}: datasets: two sources named 'convo' (the first on "
                                              "line {n1}); give one a label:"),
    ("  - path: {convo}\n    fraction: 0.5\n  - path: {flat}\n", "{path}:{n3}: datasets: fraction: is set on 1 of 2"),
    ("  - path: {convo}\n    column_map: {{bogus: q}}\n", "{path}:{n2}: datasets[0].column_map:"),
    ("  - path: {convo}\n    ranked_pairs: best\n", "{path}:{n2}: datasets[0].ranked_pairs: 'best'; expected one of"),
    ("  - count: 3\n", "{path}:{n1}: datasets[0]: give the source as path:"),
])
def test_entry_mistakes_are_one_line_with_place(tmp_path, files, body, expected):
    convo, flat = files
    n = len(TINY.splitlines()) + 2  # the line of `datasets:`
    path = recipe(tmp_path, "datasets:\n" + body.format(convo=convo, flat=flat))
    msg = refused(path)
    assert expected.format(path=path, n1=n + 1, n2=n + 2, n3=n + 3) in msg, msg
    assert "Traceback" not in msg and len(msg.splitlines()) == 1


def test_single_source_keys_with_a_mixture(tmp_path, files):
    convo, flat = files
    mix = f"datasets:\n  - path: {convo}\n    column_map: {{prompt: prompt}}\n"
    msg = refused(recipe(tmp_path, f"dataset_name: {flat}\n" + mix))
    assert "dataset_name: with a mixture" in msg and "keep one" in msg
    assert "column_map: with a mixture" in refused(recipe(tmp_path, "column_map: '{\"prompt\": \"q\"}'\n" + mix))
    assert "set count: N" in refused(recipe(tmp_path, mix), "--max_train_samples", "5")
    assert "not as a flag" in refused(recipe(tmp_path, ""), "--datasets", "x")
    sft = (REPO / "recipes" / "tiny_sft.yaml").read_text()
    assert "a mixture trains DPO" in refused(recipe(tmp_path, mix, sft), trainer_config=SFTConfig)
    assert "dataset_mixture: and datasets: both" in refused(recipe(tmp_path, mix + "dataset_mixture: {}\n"))
    assert "write dataset_test_split: 0.05" in refused(recipe(tmp_path, "test_split_size: 0.05\n"))
    # the entry's own column_map is not mistaken for the recipe's
    s, _, _ = parse(recipe(tmp_path, mix))
    assert s.mixture["sources"][0]["options"] == {"column_map": {"prompt": "prompt"}}


def test_eval_datasets_take_no_amount(tmp_path, files):
    convo, flat = files
    base = TINY.replace("dataset_test_split: 0.1\n", "")
    ok = recipe(tmp_path, f"datasets:\n  - path: {convo}\neval_datasets:\n  - path: {flat}\n    label: held\n", base)
    s, _, _ = parse(ok)
    assert [e["label"] for e in s.mixture["eval"]] == ["held"]
    bad = recipe(tmp_path, f"datasets:\n  - path: {convo}\neval_datasets:\n  - path: {flat}\n    count: 4\n", base)
    assert "eval_datasets[0].count: eval sets take every row" in refused(bad)


# ------------------------------------------------------------------------------------------- amounts and seeds


def test_amounts_arithmetic():
    sizes, names = [100, 50, 10], ["a", "b", "c"]
    assert mixture.resolve_amounts([{"count": 30}, {"weight": 0.5}, {"weight": 2.5}], sizes, names) == [30, 25, 25]
    assert mixture.resolve_amounts([None, {"count": 120}, None], sizes, names) == [100, 120, 10]
    # TRL's fraction: the largest mixture in which no source oversamples, shared by the normalised fractions
    assert mixture.resolve_amounts([{"fraction": 2}, {"fraction": 1}, {"fraction": 1}], sizes, names) == [20, 10, 10]
    with pytest.raises(DataError, match="source 'c': weight 0.01 of its 10 pairs is no pair"):
        mixture.resolve_amounts([None, None, {"weight": 0.01}], sizes, names)


def test_take_copies_then_draws_without_replacement():
    pool = np.arange(10, 20)
    rows, distinct = mixture.take(pool, 25, mixture.rng(42, "a", "take"))
    assert distinct == 10 and len(rows) == 25
    counts = np.bincount(rows - 10)
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5  # two whole copies, then 5 drawn once each
    half, distinct = mixture.take(pool, 5, mixture.rng(42, "a", "take"))
    assert distinct == 5 and len(set(half.tolist())) == 5 and list(half) == sorted(half)


def rows(name, n, amount=None, dup_of=None):
    hashes = [f"{name}{i}".encode() for i in range(n)]
    if dup_of is not None:  # the first five pairs are dup_of's
        hashes[:5] = dup_of.hashes[:5]
    return mixture.Rows(name, hashes, np.ones(n, bool), [f"{name}:{i + 1}" for i in range(n)], amount)


def test_plan_is_seeded_per_source_and_holds_out_before_copies():
    a, b = rows("a", 50, {"weight": 3}), rows("b", 30, {"count": 10})
    parts, _ = mixture.plan_rows([a, b], None, [0.2, 0.2], 42, "eval", None)
    again, _ = mixture.plan_rows([a, b], None, [0.2, 0.2], 42, "eval", None)
    for p, q in zip(parts, again, strict=True):
        assert np.array_equal(p.train, q.train) and np.array_equal(p.eval, q.eval)
    pa_, pb = parts
    assert len(pa_.eval) == 10 and len(pa_.train) == 120 and not set(pa_.eval) & set(pa_.train)
    assert pa_.counts["upsampled"] == 80 and pa_.counts["taken"] == 40 and pb.counts["not_taken"] == 14
    other, _ = mixture.plan_rows([a, b], None, [0.2, 0.2], 7, "eval", None)
    assert not np.array_equal(other[0].eval, pa_.eval)
    # a source added before it changes nothing drawn from `b`: its generator is seeded by its own name
    c = rows("c", 20)
    more, _ = mixture.plan_rows([c, a, b], None, [0.2] * 3, 42, "eval", None)
    assert np.array_equal(more[2].train, pb.train) and np.array_equal(more[2].eval, pb.eval)
    for p in parts:
        mixture.check_counts(p)


def test_copies_are_not_duplicates_but_repeats_across_sources_are():
    a = rows("a", 20, {"weight": 2})
    b = rows("b", 8, None, dup_of=a)
    parts, _ = mixture.plan_rows([a, b], None, [None, None], 1, "all", None)
    assert parts[0].counts["duplicates_removed"] == 0 and parts[0].counts["upsampled"] == 20
    assert parts[1].counts["duplicates_removed"] == 5 and "repeats the pair at a:1" in parts[1].removed[0][1]
    assert parts[1].counts["trained"] == 3
    with pytest.raises(DataError, match="source 'b': no pair left to train on"):
        mixture.resolve_amounts([None, None], [20, 0], ["a", "b"])


# ------------------------------------------------------------------------------------------- through the cache


def prepare(s, tok, cache):
    return tokcache.prepare(DataSpec.of(s, max_length=128), tok, None, cache)


def test_mixture_cache_accounting_and_identity(tmp_path, files, tiny_tokenizer):
    convo, flat = files
    cache = tmp_path / "cache"
    path = recipe(tmp_path, f"datasets:\n  - path: {convo}\n    count: 50\n  - path: {flat}\n    weight: 2.5\n")
    s, _, _ = parse(path)
    first = prepare(s, tiny_tokenizer, cache)
    assert first.report["cache"]["built"] and first.report["cache"]["mixed"]
    src = first.report["sources"]
    assert (src["convo"]["trained"], src["convo"]["eval"], src["convo"]["not_taken"]) == (50, 8, 22)
    assert (src["flat"]["trained"], src["flat"]["taken"], src["flat"]["upsampled"]) == (90, 36, 54)
    assert first.report["accounting"]["trained"] == len(first.train) == 140
    assert list(first.eval) == ["convo", "flat"] and [len(v) for v in first.eval.values()] == [8, 4]
    assert first.report["accounting_line"].startswith("120 rows read = 86 taken + 12 eval + 22 not taken")
    # the same recipe: nothing tokenised, nothing mixed
    again = prepare(s, tiny_tokenizer, cache)
    assert not again.report["cache"]["built"] and not again.report["cache"]["mixed"]
    assert again.report["cache"]["mixture"] == first.report["cache"]["mixture"]
    assert again.train["chosen_ids"] == first.train["chosen_ids"]
    # a changed amount: another mixed file from the same source entries (tokens do not depend on amounts)
    s2, _, _ = parse(recipe(tmp_path, path.read_text().replace("count: 50", "count: 60"), base=""))
    changed = prepare(s2, tiny_tokenizer, cache)
    assert not changed.report["cache"]["built"] and changed.report["cache"]["mixed"]
    assert changed.report["cache"]["mixture"] != first.report["cache"]["mixture"] and len(changed.train) == 150
    # no eval pair is in train, copies included
    train = {tuple(x) for x in first.train["chosen_ids"]}
    assert not any(tuple(x) in train for ds in first.eval.values() for x in ds["chosen_ids"])
    # the run identity names the change
    lines, _ = checkpoints.compare({"mixture": s.mixture}, {"mixture": s2.mixture})
    assert lines == ["mixture: source 'convo': amount count 50 -> count 60"]


def test_listings_and_bad_rows_per_source(tmp_path, files, tiny_tokenizer):
    convo, flat = files
    with open(flat, "a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    path = recipe(tmp_path, f"datasets:\n  - path: {convo}\n  - path: {flat}\n    weight: 2\n")
    s, _, _ = parse(path, "--skip_bad_rows", "true", "--dedup", "all")
    prep = prepare(s, tiny_tokenizer, tmp_path / "cache")
    flat_acc = prep.report["sources"]["flat"]
    assert (flat_acc["rows_read"], flat_acc["skipped"], flat_acc["no_pair"]) == (42, 1, 1)
    assert flat_acc["duplicates_removed"] == 0 and flat_acc["upsampled"] == flat_acc["taken"]
    (skip,) = prep.listings["skipped_rows.jsonl"]
    assert skip["source"] == "flat" and skip["where"] == f"{flat}:41"
    assert prep.listings["no_pair_rows.jsonl"][0]["where"] == f"{flat}:42"


@pytest.mark.slow
def test_benchmark_data_mixture_runs_small(tmp_path, tiny_model_path):
    """scripts/benchmark_data.py --mixture at a tiny size (the timed run is 260k pairs): both sides train the same
    number of pairs, and the requeue reads the mixture back."""
    from .conftest import PYTHON, run

    out = tmp_path / "bench.json"
    run([PYTHON, "scripts/benchmark_data.py", "--mixture", "--rows", "60", "--procs", "1", "--work",
         str(tmp_path / "work"), "--tokenizer_dir", tiny_model_path, "--prose", str(REPO / "docs"), "--json",
         str(out)], timeout=600)
    result = json.loads(out.read_text())
    assert result["mixture"] and {(r["impl"], r["launch"]) for r in result["runs"]} == {
        ("mix", "first"), ("mix", "second"), ("ours", "first"), ("ours", "second")}
    assert all(r["pairs"] == 60 for r in result["runs"])
    plan = json.loads((tmp_path / "work" / "mix-60.json").read_text())
    assert [s["amount"] for s in plan["sources"]] == [None, {"count": 18}, {"weight": 2.0}]
