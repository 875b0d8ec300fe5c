"""Eval sets by name: fastdpo.trainer.DPOTrainer takes eval_dataset={name: tokenised Dataset}; each set's metrics
(`eval_<name>_...`) are what evaluating that set alone gives, the plain `eval_...` ones are over all the pairs
pooled, and all of them reach the log history, TensorBoard, the one-line log and the dict evaluate() returns; on one
rank and on two (DDP, dist_eval_sets.py). With precomputed reference log-probs each set has one reference
pass, cached by its content, which a rerun reads.

    .venv/bin/python -m pytest tests/test_eval_per_source.py      # about 4 minutes on 2 cores (30 s without slow)
"""

import json
import math
import os
import socket
import subprocess

import pytest
from datasets import Dataset, concatenate_datasets
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastdpo import config as cfg
from fastdpo import data, models
from fastdpo.logs import use_plain_progress
from fastdpo.trainer import DPOTrainer, named_eval_sets
from tests.helpers import PYTHON, REPO, evaluate_alone

# TRL's eval metrics that are a mean over pairs: pooled, they are the mean over every eval pair
PER_PAIR = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")
SPEED = ("runtime", "samples_per_second", "steps_per_second")


@pytest.fixture(scope="module")
def tiny():
    """64 training pairs and two held-out sets of 22 and 9 pairs: with 4 pairs an eval batch, both end on a part
    batch, and a mean of the two sets' means would weigh the small one 22/9 times too much."""
    script_args, args, model_args = cfg.parse_args(["--output_dir", "/tmp/unused"])
    tok = models.load_tokenizer(model_args.model_name_or_path)
    pairs = data.load_pairs(script_args)
    train, _ = data.tokenize_dataset(pairs.train.select(range(64)), tok, args.max_length,
                                     script_args.max_prompt_length)
    held, _ = data.tokenize_dataset(pairs.eval.select(range(31)), tok, args.max_length,
                                    script_args.max_prompt_length, name="eval")
    # "polite.jsonl": a name as a data file would give it; its metrics are eval_polite_jsonl_*
    sets = {"polite.jsonl": held.select(range(22)), "b": held.select(range(22, 31))}
    return tok, train, sets, model_args


def trainer_for(tiny, out, *flags):
    tok, train, sets, model_args = tiny
    _, args, _ = cfg.parse_args(["--output_dir", str(out), "--eval_before_train", "false", "--report_to", "none",
                                 "--save_strategy", "no", "--max_steps", "3", "--per_device_eval_batch_size", "4",
                                 "--logging_steps", "1", *flags])
    return DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=train, eval_dataset=sets,
                      processing_class=tok)


@pytest.mark.parametrize("flags", [["--ref_logps_cache_dir", "{tmp}/ref"],
                                   pytest.param(["--precompute_ref_log_probs", "false"], marks=pytest.mark.slow),
                                   pytest.param(["--padding_free", "false"], marks=pytest.mark.slow)],
                         ids=["fast-precomputed", "fast-reference-forward", "stock-precomputed"])
def test_per_source_metrics_are_each_set_alone_and_the_overall_is_pooled(flags, tiny, tmp_path):
    trainer = trainer_for(tiny, tmp_path / "out", *(f.format(tmp=tmp_path) for f in flags))
    assert list(trainer.eval_dataset) == ["polite_jsonl", "b"]
    trainer.train()  # 3 steps: rewards away from the ties of policy == reference
    metrics = trainer.evaluate()
    names = {"polite_jsonl": 22, "b": 9}
    for key in ("epoch", *(f"eval_{k}" for k in PER_PAIR + SPEED)):
        assert key in metrics, key
    # one log entry holds all of it, as one set's evaluation does
    assert {k: v for k, v in trainer.state.log_history[-1].items() if k != "step"} == metrics

    # each set's metrics: the numbers its own evaluation gives (the same batches, so the same values)
    for name in names:
        alone = evaluate_alone(trainer, trainer.eval_dataset[name])
        mine = {k.removeprefix(f"eval_{name}_"): v for k, v in metrics.items() if k.startswith(f"eval_{name}_")}
        theirs = {k.removeprefix("eval_"): v for k, v in alone.items() if k.startswith("eval_")}
        assert mine.keys() == theirs.keys() and set(PER_PAIR) <= mine.keys()
        assert {k: v for k, v in mine.items() if k not in SPEED} == {k: v for k, v in theirs.items() if k not in SPEED}

    # the overall: every pair pooled, which one evaluation of all pairs at one pair a batch computes directly
    everything = concatenate_datasets(list(trainer.eval_dataset.values()))
    one_by_one = evaluate_alone(trainer, everything, batch_size=1)
    for key in PER_PAIR:
        assert metrics[f"eval_{key}"] == pytest.approx(one_by_one[f"eval_{key}"], rel=1e-5, abs=1e-6), key
    # not the mean of the sets' means (it would be, were the sets weighted alike)
    mean_of_means = sum(metrics[f"eval_{n}_rewards/margins"] for n in names) / len(names)
    assert not math.isclose(metrics["eval_rewards/margins"], mean_of_means, rel_tol=1e-3)
    assert metrics["eval_samples_per_second"] * metrics["eval_runtime"] == pytest.approx(31, rel=1e-3)


@pytest.mark.slow
def test_each_eval_set_is_precomputed_once_and_a_rerun_reads_the_cache(tiny, tmp_path, capsys):
    cache = tmp_path / "ref"
    flags = ["--ref_logps_cache_dir", str(cache), "--report_to", "tensorboard", "--eval_strategy", "steps",
             "--eval_steps", "1", "--eval_on_start", "true"]
    trainer = trainer_for(tiny, tmp_path / "out", *flags)
    use_plain_progress(trainer)
    passes = [(name, stats["cached"]) for name, stats in trainer.reference_passes]
    assert passes == [("train", False), ("polite_jsonl", False), ("b", False)]
    folders = sorted(p for p in cache.iterdir() if p.is_dir())
    metas = {json.loads((f / "meta.json").read_text())["name"]: f for f in folders}
    assert sorted(metas) == ["b", "polite_jsonl", "train"]  # a folder each
    assert all((f / "ref_logps.arrow").exists() for f in folders)
    assert json.loads((metas["b"] / "meta.json").read_text())["pairs"] == 9

    trainer.train()  # evaluates before the first step and after each of the 3
    trainer.evaluate()
    trainer.evaluate(dict(trainer.eval_dataset))  # sets passed again, carrying their reference log-probs
    assert len(trainer.reference_passes) == 3  # no pass after __init__
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 1, 2, 3, 3, 3]
    assert all(f"eval_{n}_rewards/accuracies" in h for h in evals for n in ("polite_jsonl", "b"))
    # the one-line log: the line over all pairs, then one per set
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("eval step 2/3")]
    last = evals[2]
    assert lines == [f"eval step 2/3{head} | loss {last[f'eval_{k}loss']:.4f} | "
                     f"acc {last[f'eval_{k}rewards/accuracies']:.2f} | margin {last[f'eval_{k}rewards/margins']:.3f}"
                     for head, k in (("", ""), (" | polite_jsonl", "polite_jsonl_"), (" | b", "b_"))]

    # TensorBoard gets the same keys ("eval_" becomes "eval/"), at every evaluation
    (folder,) = {p.parent for p in (tmp_path / "out").rglob("events.out.tfevents.*")}  # a file per writer opened
    board = EventAccumulator(str(folder))
    board.Reload()
    for tag in ("eval/loss", "eval/rewards/margins", "eval/polite_jsonl_loss", "eval/b_rewards/accuracies"):
        assert [e.step for e in board.Scalars(tag)] == [0, 1, 2, 3, 3, 3], tag

    # a rerun (or a resume) of the same run: every set's reference log-probs from the cache
    again = trainer_for(tiny, tmp_path / "again", *flags)
    assert [(name, stats["cached"]) for name, stats in again.reference_passes] == [
        ("train", True), ("polite_jsonl", True), ("b", True)]
    # a set passed to evaluate() without them: its pass comes from the cache too
    _, _, sets, _ = tiny
    again.evaluate({"b": sets["b"]})
    assert again.reference_passes[-1][0] == "b" and again.reference_passes[-1][1]["cached"]
    assert sorted(p for p in cache.iterdir() if p.is_dir()) == folders


def test_eval_set_names_become_metric_keys_or_are_refused():
    ds = Dataset.from_dict({"x": [1]})
    assert list(named_eval_sets({"HuggingFaceH4/ultrafeedback": ds, "my data.jsonl": ds, "ok-1_a": ds})) == [
        "HuggingFaceH4_ultrafeedback", "my_data_jsonl", "ok-1_a"]
    with pytest.raises(ValueError, match="both log as eval_a_b_"):
        named_eval_sets({"a/b": ds, "a.b": ds})
    with pytest.raises(ValueError, match="no letter or digit"):
        named_eval_sets({"//": ds})
    with pytest.raises(ValueError, match="'empty' has no pairs"):
        named_eval_sets({"empty": ds.select([])})
    with pytest.raises(ValueError, match="empty dict"):
        named_eval_sets({})


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--precompute_ref_log_probs", "false"]],
                         ids=["precomputed", "reference-forward"])
def test_two_ranks_gather_each_batch_once_and_agree(extra, tiny_model_path, tmp_path):
    """DDP on 2 CPU processes (dist_eval_sets.py): the same per-set and pooled numbers as above, every rank
    returning the same metrics (the per-batch pair counts are gathered over the ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FASTDPO_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                           str(REPO / "tests/distributed/dist_eval_sets.py"), str(tmp_path), *extra], cwd=REPO,
                          env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    def steady(metrics):
        return {k: v for k, v in metrics.items() if not k.endswith(SPEED)}

    assert steady(ranks[0]["named"]) == steady(ranks[1]["named"])
    named = ranks[0]["named"]
    for name in ("a", "b"):
        mine = {k.removeprefix(f"eval_{name}_"): v for k, v in steady(named).items() if k.startswith(f"eval_{name}_")}
        theirs = {k.removeprefix("eval_"): v for k, v in steady(ranks[0]["alone"][name]).items()}
        assert mine == {k: v for k, v in theirs.items() if k != "epoch"}
    for key in PER_PAIR:
        assert named[f"eval_{key}"] == pytest.approx(ranks[0]["pooled"][f"eval_{key}"], rel=1e-5, abs=1e-6), key
    mean_of_means = (named["eval_a_rewards/margins"] + named["eval_b_rewards/margins"]) / 2
    assert not math.isclose(named["eval_rewards/margins"], mean_of_means, rel_tol=1e-3)
