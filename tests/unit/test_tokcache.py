"""fastdpo.tokcache and tokbuild: tokenise once, memory-map after; any changed input rebuilds; bad or unwritable
caches never stop a run; every row accounted for; the local main process builds while the other ranks wait.

    .venv/bin/python -m pytest tests/unit/test_tokcache.py          # ~1 minute on 2 cores (the torchrun test ~20 s)
"""

import copy
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fastdpo import data, errors, tiny, tokbuild, tokcache, tokcopy
from fastdpo.config import ScriptArguments
from fastdpo.dataspec import DataSpec
from tests.helpers import PYTHON, REPO, run


def args(path, **kw):
    return ScriptArguments(dataset_name=str(path), **kw)


def prepare(a, tok, cache, max_length=128, max_prompt_length=None, num_proc=None):
    spec = DataSpec.of(a, max_length=max_length, max_prompt_length=max_prompt_length)
    return tokcache.prepare(spec, tok, num_proc, cache)


def ids(ds):
    rows = ds[:]  # plain lists (a column would stay a lazy view of the memory-mapped file)
    return [rows[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")]


@pytest.fixture
def rows_file(tmp_path):
    return tiny.write_jsonl(tiny.preference_rows("train", 200, seed=4), tmp_path / "d.jsonl")


def test_second_launch_reads_the_cache_and_changed_inputs_rebuild(rows_file, tiny_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    a = args(rows_file, dataset_test_split="0.1", dataset_shuffle_seed=3)
    first = prepare(a, tiny_tokenizer, cache)
    assert first.report["cache"]["built"] and first.train.cache_files  # memory-mapped from the cache
    again = prepare(a, tiny_tokenizer, cache)
    assert not again.report["cache"]["built"]
    assert ids(again.train) == ids(first.train) and ids(again.eval) == ids(first.eval)
    # the rows are the in-memory path's, whose ids tests/unit/test_data.py checks against TRL's own preprocessing
    pairs = data.load_pairs(a)
    for got, pairs_ds in ((first.train, pairs.train), (first.eval, pairs.eval)):
        want, _ = data.tokenize_dataset(pairs_ds, tiny_tokenizer, 128, None)
        assert ids(got) == ids(want)
    # every input of the ids is in the key: a changed one never hits a stale entry
    template = copy.deepcopy(tiny_tokenizer)
    template.chat_template = tiny_tokenizer.chat_template.replace("<|end|>", "<|end|>\n")
    changed = {
        "max_length": lambda: prepare(a, tiny_tokenizer, cache, max_length=96),
        "max_prompt_length": lambda: prepare(a, tiny_tokenizer, cache, max_prompt_length=20),
        "chat template": lambda: prepare(a, template, cache),
        "max_train_samples": lambda: prepare(args(rows_file, max_train_samples=150), tiny_tokenizer, cache),
    }
    for what, call in changed.items():
        assert call().report["cache"]["built"], what
    with open(rows_file, "a") as f:  # same path, new content
        f.write(json.dumps(tiny.preference_rows("train", 1, seed=9)[0]) + "\n")
    assert prepare(a, tiny_tokenizer, cache).report["cache"]["built"]
    assert not prepare(a, tiny_tokenizer, cache).report["cache"]["built"]


def _entry(prep) -> Path:
    return Path(prep.report["cache"]["train"])


DAMAGE = {
    "truncated tokens.arrow": lambda e: (e / "tokens.arrow").write_bytes((e / "tokens.arrow").read_bytes()[:500]),
    "garbage meta.json": lambda e: (e / "meta.json").write_text("{not json"),
    "rows.arrow unreadable": lambda e: ((e / "rows.arrow").unlink(), (e / "rows.arrow").mkdir()),
    "interrupted build (no meta.json)": lambda e: (e / "meta.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_entry_is_reported_moved_aside_and_rebuilt(damage, rows_file, tiny_tokenizer, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = prepare(args(rows_file), tiny_tokenizer, cache)
    want, entry = ids(first.train), _entry(first)
    del first  # its memory map must not outlive the damage below (a truncated mapped file is a SIGBUS)
    DAMAGE[damage](entry)
    caplog.set_level(logging.WARNING)
    again = prepare(args(rows_file), tiny_tokenizer, cache)
    assert again.report["cache"]["built"] and ids(again.train) == want
    assert f"token cache {entry}" in caplog.text and "moved aside" in caplog.text
    assert len(list(cache.glob(f"{entry.name}.bad-*"))) == 1


def test_leftover_of_a_killed_build_is_never_used(rows_file, tiny_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    entry = _entry(prepare(args(rows_file), tiny_tokenizer, cache))
    os.replace(entry, entry.with_name(f"{entry.name}.tmp-host-123"))  # as a build killed before its rename
    again = prepare(args(rows_file), tiny_tokenizer, cache)
    assert again.report["cache"]["built"] and not list(cache.glob("*.tmp-*"))


def test_unwritable_cache_folder_warns_and_goes_on(rows_file, tiny_tokenizer, tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "cache"  # cannot be created (even by root): its parent is a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    caplog.set_level(logging.WARNING)
    prep = prepare(args(rows_file), tiny_tokenizer, cache)
    assert len(prep.train) == 200
    assert f"token cache {cache} is not writable" in caplog.text
    assert str(tmp_path / "tmp") in prep.report["cache"]["train"]


def test_every_row_is_accounted_for(tmp_path, tiny_tokenizer):
    rows = [json.dumps(r) for r in tiny.preference_rows("train", 30, seed=2)]
    rows.insert(3, "{not json")  # line 4: skipped
    rows.insert(7, rows[5])  # line 8: repeats line 6
    long = tiny.preference_rows("train", 1, seed=7)[0]
    long["prompt"][1]["content"] = "word " * 300
    rows.insert(10, json.dumps(long))  # line 11: the prompt alone fills max_length: dropped
    same = tiny.preference_rows("train", 1, seed=9)[0]
    rows.insert(12, json.dumps({**same, "rejected": same["chosen"]}))  # line 13: chosen = rejected: no pair
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join([rows[0]] + [json.dumps(r) for r in tiny.preference_rows("test", 5)]) + "\n")
    prep = prepare(args(tmp_path, dataset_test_split="test", skip_bad_rows=True, max_eval_samples=4), tiny_tokenizer,
                   tmp_path / "cache")
    acc = prep.report["accounting"]
    assert acc == {"rows_read": 40, "pairs": 38, "trained": 31, "eval": 4, "skipped": 1, "no_pair": 1, "dropped": 1,
                   "duplicates_removed": 1, "eval_unused": 1}
    assert prep.report["duplicates"] == {"train": 1, "eval": 0, "eval_in_train": 1, "removed": 1, "dedup": "eval"}
    listed = {name: [(r["where"], r["problem"][:30]) for r in v] for name, v in prep.listings.items()}
    assert listed["skipped_rows.jsonl"] == [(f"{train}:4", "malformed JSON (Expecting prop")]
    assert listed["dropped_rows.jsonl"] == [(f"{train}:11", "train: the prompt is 918 token")]
    assert listed["duplicate_rows.jsonl"] == [(f"{test}:1", f"eval pair also in train at {train}"[:30])]
    assert listed["no_pair_rows.jsonl"] == [(f"{train}:13", "chosen identical to rejected: ")]
    assert prep.report["notes"]["no_preference"] == {"count": 1, "what": errors.NOTE_TEXT["no_preference"],
                                                     "first": [f"{train}:13"]}
    assert prep.report["accounting_line"].startswith("40 rows read = 31 trained + 4 eval + 1 skipped + 1 without a "
                                                     "pair + 1 dropped")
    # the cached entry holds the skipped row: without --skip_bad_rows it fails exactly as a fresh read does
    with pytest.raises(errors.DataError, match=rf"{train}:4: malformed JSON .*--skip_bad_rows true"):
        prepare(args(tmp_path, dataset_test_split="test"), tiny_tokenizer, tmp_path / "cache")


def test_worker_pool_gives_the_rows_of_one_process(rows_file, tiny_tokenizer, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tokcache, "SMALL_SOURCE_BYTES", 0)  # a pool even for this small file, on any machine
    monkeypatch.setattr(tokbuild, "POOL_MIN_CPUS", 1)
    monkeypatch.setattr(tokbuild, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO)
    pool = prepare(args(rows_file), tiny_tokenizer, tmp_path / "a", num_proc=2)
    one = prepare(args(rows_file), tiny_tokenizer, tmp_path / "b", num_proc=1)
    assert ids(pool.train) == ids(one.train)
    metas = [json.loads((_entry(p) / "meta.json").read_text()) for p in (pool, one)]
    assert [m["workers"] for m in metas] == [2, 1]
    assert f"tokenising {rows_file}: " in caplog.text and "pairs/s, eta " in caplog.text  # the progress line


def test_the_key_covers_the_code_of_every_data_stage():
    """An edit to any stage's code makes new keys: the digest reads every module of the pipeline (each file of the
    layouts package) and nothing else."""
    pkg = REPO / "fastdpo"
    names = ("errors", "files", "sources", "dataspec", "checks", "tokens", "splits", "tokbuild", "tokcopy",
             "tokcache", "report")
    stages = {pkg / f"{m}.py" for m in names} | set((pkg / "layouts").glob("*.py"))
    assert set(tokcache.code_files()) == stages


def test_cache_is_memory_mapped_int32(rows_file, tiny_tokenizer, tmp_path):
    prep = prepare(args(rows_file), tiny_tokenizer, tmp_path / "cache")
    assert prep.train.data.column("prompt_ids").type == pa.list_(pa.int32())
    assert all(f["filename"].startswith(str(tmp_path / "cache")) for f in prep.train.cache_files)


@pytest.mark.slow
def test_two_processes_build_once_and_share(tmp_path, tiny_model_path):
    """torchrun, 2 CPU processes: the local main process tokenises, the other waits and reads the same files."""
    path = tiny.write_jsonl(tiny.preference_rows("train", 300, seed=6), tmp_path / "d.jsonl")
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29400 + os.getpid() % 500),
           str(REPO / "scripts" / "benchmark_data.py"), "--child", "ours", "--data", str(path), "--tokenizer",
           tiny_model_path, "--num_proc", "1"]
    proc = run(cmd, env={"FASTDPO_CACHE": str(tmp_path / "cache")}, timeout=300)
    results = sorted((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1] and [r["built"] for r in results] == [True, False]
    assert results[0]["pairs"] == results[1]["pairs"] == 300
    assert results[0]["cache"] == results[1]["cache"]  # one entry, memory-mapped by both
    assert results[1]["cpu"] < 0.5 * results[0]["cpu"] + 1  # the waiting rank does not tokenise


def test_implicit_prompt_without_chat_template_trains_as_raw_text(tmp_path, tiny_tokenizer, caplog):
    """hh-rlhf transcripts with a base model's tokenizer (no chat template): the cached rows are TRL's own
    preprocessing of the same file (raw text, TRL's prompt split), and the log says so."""
    import types

    from datasets import Dataset
    from trl import DPOTrainer

    rows = [{"chosen": f"\n\nHuman: What is {w}?\n\nAssistant: {w} is a word.",
             "rejected": f"\n\nHuman: What is {w}?\n\nAssistant: No idea."} for w in ("tea", "rain", "stone")]
    base = copy.deepcopy(tiny_tokenizer)
    base.chat_template = None
    caplog.set_level(logging.INFO)
    prep = prepare(args(tiny.write_jsonl(rows, tmp_path / "hh.jsonl")), base, tmp_path / "cache", max_length=None)
    assert "no chat template: plain-text rows tokenised as raw text" in caplog.text
    theirs = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=base), Dataset.from_list(rows), base,
                                         types.SimpleNamespace(dataset_num_proc=None, max_length=None,
                                                               truncation_mode="keep_start"), "train")
    assert ids(prep.train) == ids(theirs)


def test_copied_rows_come_in_order_across_batches_files_and_windows(tmp_path, monkeypatch):
    """A mixed or taken file holds exactly the rows asked for, copies and all, in the order asked, whichever record
    batch and source file each comes from, across chunk and window edges (made small here)."""
    rng = np.random.default_rng(0)
    files, want = [], []
    for k, sizes in enumerate([(3, 1, 5, 2), (4, 4), (1,)]):
        rows = [[list(range(k * 1000 + r, k * 1000 + r + 1 + r % 3))] * 3 for r in range(sum(sizes))]
        want.append(rows)
        path = tmp_path / f"{k}.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, tokbuild.TOKENS_SCHEMA) as out:
            start = 0
            for n in sizes:  # record batches of uneven sizes, as tokbuild writes them
                cols = list(zip(*rows[start: start + n], strict=True))
                out.write_batch(pa.record_batch([pa.array(c, pa.list_(pa.int32())) for c in cols],
                                                schema=tokbuild.TOKENS_SCHEMA))
                start += n
        files.append(path)
    src = rng.integers(0, 3, 200).astype(np.int32)
    rows = np.array([rng.integers(0, len(want[s])) for s in src], np.int64)
    monkeypatch.setattr(tokcopy, "CHUNK", 3)
    monkeypatch.setattr(tokcopy, "WINDOW", 7)
    tokcopy.copy_rows(tmp_path / "out.arrow", files, src, rows)
    got = pa.ipc.open_stream(pa.memory_map(str(tmp_path / "out.arrow"))).read_all().to_pylist()
    assert [[g["prompt_ids"], g["chosen_ids"], g["rejected_ids"]] for g in got] == [want[s][r] for s, r in
                                                                                    zip(src, rows, strict=True)]
