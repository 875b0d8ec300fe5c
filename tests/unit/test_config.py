"""Every recipe parses into valid configs; unknown keys fail with the line and a fix."""

import os

import pytest
import torch
import yaml

from fastdpo.config import parse_args
from tests.helpers import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _parse(recipe, *extra):
    # Hub names are only parsed here (the Hub is unreachable); CPU so that bf16 recipes validate; no path checks,
    # because tiny_dpo_after_sft.yaml names the SFT stage's output folder, which exists only after that stage ran.
    return parse_args(["--config", str(recipe), "--use_cpu", "true", *extra], check_paths=False)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe):
    text = recipe.read_text()
    assert text.startswith("#"), "a recipe opens with a comment giving its launch command"
    assert "Batch:" in text.split("\n\n")[0], "the header gives the batch arithmetic"
    if recipe.name.startswith("tiny_sft"):  # the SFT stage's recipe parses into SFTConfig (train_sft.py)
        from trl import SFTConfig

        script_args, training_args, model_args = parse_args(["--config", str(recipe)], trainer_config=SFTConfig,
                                                            check_paths=False)
    else:
        script_args, training_args, model_args = _parse(recipe)
    assert model_args.model_name_or_path and script_args.dataset_name
    assert training_args.output_dir


def test_olmo3_recipes_match_the_published_hyperparameters():
    for name, max_length in (("olmo3_think.yaml", 8192), ("olmo3_instruct.yaml", 4096)):
        s, t, m = _parse(REPO / "recipes" / name)
        assert t.loss_type == ["sigmoid_norm"] and t.beta == 5.0
        assert t.learning_rate == 1e-6 and t.lr_scheduler_type.value == "linear"
        assert t.warmup_steps == 0.1 and t.num_train_epochs == 1
        assert t.bf16 and t.gradient_checkpointing
        assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 4 == 128
        assert t.max_length == max_length and s.max_prompt_length < max_length
        assert t.push_to_hub and t.hub_model_id
    s, t, m = _parse(REPO / "recipes" / "olmo3_think.yaml")
    assert s.dataset_name == "allenai/Dolci-Think-DPO-7B" and t.output_dir == "outputs/dpo"
    assert m.model_name_or_path == "geodesic-research/sfm-sft_dolci_think_unfiltered"


def test_small_recipes():
    s, t, m = _parse(REPO / "recipes" / "smollm2_orca.yaml")
    assert (m.model_name_or_path, s.dataset_name) == ("HuggingFaceTB/SmolLM2-135M-SFT-Only", "Intel/orca_dpo_pairs")
    assert s.max_train_samples == 10000 and t.beta == 0.5 and t.learning_rate == 5e-6
    assert t.lr_scheduler_type.value == "cosine" and t.num_train_epochs == 3 and t.per_device_train_batch_size == 8
    assert (t.max_length, s.max_prompt_length) == (1024, 512)
    assert t.save_strategy.value == "steps" and t.save_total_limit == 2 and "tensorboard" in t.report_to
    assert s.column_map == {"system": "system", "prompt": "question", "chosen": "chosen", "rejected": "rejected"}
    s, t, m = _parse(REPO / "recipes" / "smollm3_hh_rlhf.yaml")
    assert (m.model_name_or_path, s.dataset_name) == ("HuggingFaceTB/SmolLM3-3B", "Anthropic/hh-rlhf")
    assert (t.beta, t.learning_rate, t.max_steps, t.warmup_steps) == (0.1, 5e-7, 1000, 100)
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2, 8)
    assert t.bf16 and t.gradient_checkpointing and t.push_to_hub


def test_cli_overrides_recipe():
    s, t, m = _parse(REPO / "recipes" / "tiny.yaml", "--max_steps", "7", "--beta", "0.3",
                     "--dataset_name", "x.jsonl")
    assert (t.max_steps, t.beta, s.dataset_name) == (7, 0.3, "x.jsonl")


def test_no_config_means_the_tiny_recipe():
    s, t, m = parse_args([])
    assert m.model_name_or_path == "embedded:tiny-llama" and t.use_cpu


def test_unknown_recipe_key_names_line_and_fix(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text()
    recipe.write_text(text + "warmup_ratio: 0.1\nlearnig_rate: 1.0e-5\n")
    n = len(text.splitlines())
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(recipe)])
    msg = str(e.value)
    assert f"{recipe}:{n + 1}: unknown key 'warmup_ratio'" in msg and "warmup_steps: 0.1" in msg
    assert f"{recipe}:{n + 2}: unknown key 'learnig_rate'" in msg and "'learning_rate'" in msg


def test_a_short_recipe_on_cpu_names_its_typo_or_use_cpu(tmp_path):
    """A recipe without use_cpu makes TRL's config refuse bf16 on a CPU machine before the parser returns the unknown
    keys: the typo is still what the user hears about, and without one, the fix for bf16."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("learning_rat: 1.0e-3\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(recipe), "--max_stepz", "3"])
    assert str(e.value).splitlines() == [f"{recipe}:1: unknown key 'learning_rat': did you mean 'learning_rate'?",
                                         "command line: unknown key 'max_stepz': did you mean 'max_steps'?"]
    if torch.cuda.is_available():
        return  # bf16 is fine there
    recipe.write_text("learning_rate: 1.0e-3\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(recipe)])
    assert str(e.value) == f"{recipe}: bf16 needs a GPU here: on a machine without one set use_cpu: true " \
                           "(recipes/tiny.yaml does)"


def test_unknown_cli_flag_fails():
    with pytest.raises(SystemExit) as e:
        parse_args(["--max_stepz", "3"])
    assert "unknown key 'max_stepz'" in str(e.value) and "max_steps" in str(e.value)


def test_missing_recipe_file():
    with pytest.raises(SystemExit, match="recipe not found"):
        parse_args(["--config", "recipes/nope.yaml"])


def test_recipe_yaml_is_plain_mapping():
    for recipe in RECIPES:
        assert isinstance(yaml.safe_load(recipe.read_text()), dict)


# ------------------------------------------------------------------ values that cannot work fail at parse time
# One case per line: the flags, then what the error must say. parse_args runs before any data, tokenizer or
# model is touched (train_dpo.py calls it first), so each of these fails within seconds of start.

BAD_VALUES = {
    "beta_zero": (["--beta", "0"], "beta: 0.0 trains nothing"),
    "beta_negative": (["--beta=-0.5"], "beta: -0.5 learns to prefer the rejected answers"),
    "learning_rate_negative": (["--learning_rate=-1e-4"], "learning_rate: -0.0001 climbs the loss"),
    "learning_rate_zero": (["--learning_rate", "0"], "learning_rate: 0.0 trains nothing"),
    "train_batch_zero": (["--per_device_train_batch_size", "0"],
                         "per_device_train_batch_size: 0; it must be at least 1"),
    "eval_batch_zero": (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size: 0; it must be at least 1"),
    "accumulation_zero": (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps: 0; it must be"),
    "loss_type_unknown": (["--loss_type", "nonsense"], "loss_type: unknown 'nonsense'; TRL 1.16.0 knows sigmoid,"),
    "loss_type_typo": (["--loss_type", "sigmod"], "unknown 'sigmod' (did you mean 'sigmoid'?)"),
    "loss_weights_length": (["--loss_type", "sigmoid", "sft", "--loss_weights", "1.0"], "1 weights for 2 loss types"),
    "exo_pair_without_smoothing": (["--loss_type", "exo_pair"], "label_smoothing: 0 with loss_type exo_pair"),
    "max_steps_zero": (["--max_steps", "0"], "max_steps: 0; use a positive number"),
    "epochs_zero": (["--num_train_epochs", "0"], "num_train_epochs: 0.0 trains nothing"),
    "prompt_fills_max_length": (["--max_length", "64", "--max_prompt_length", "64"],
                                "max_prompt_length: 64 leaves no room for answers within max_length 64"),
    "model_path_missing": (["--model_name_or_path", "/nonexistent"],
                           "model_name_or_path: /nonexistent: no such folder"),
    "model_relative_path_missing": (["--model_name_or_path", "outputs/nope/sft"], "outputs/nope/sft: no such folder"),
    "dataset_file_missing": (["--dataset_name", "my_pairs.jsonl"], "dataset_name: my_pairs.jsonl: no such file"),
    "eval_dataset_missing": (["--eval_dataset_name", "./held_out"], "eval_dataset_name: ./held_out: no such file"),
    "chat_template_missing": (["--chat_template_path", "tmpl.jinja"], "chat_template_path: tmpl.jinja: no such file"),
    "report_to_unknown": (["--report_to", "tensorbord"], "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
    "report_to_not_installed": (["--report_to", "mlflow"], "mlflow is not installed in this environment"),
    "qlora_on_cpu": (["--use_peft", "true", "--load_in_4bit", "true"], "QLoRA needs a CUDA GPU"),
}


@pytest.mark.parametrize("case", BAD_VALUES, ids=str)
def test_value_that_cannot_work_fails_at_parse_time(case):
    flags, message = BAD_VALUES[case]
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert message in str(e.value)
    key = message.split(":")[0].split()[-1]
    if "--" + key in flags or f"--{key}=" in " ".join(flags):  # the flag the user typed is named
        assert f"command line (--{key})" in str(e.value)


def test_bad_recipe_value_names_its_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text().replace("beta: 0.1", "beta: 0")
    recipe.write_text(text)
    line = text.splitlines().index("beta: 0") + 1
    with pytest.raises(SystemExit, match=rf"{recipe}:{line}: beta: 0 trains nothing"):
        parse_args(["--config", str(recipe)])


def test_removed_keys_have_hints_and_are_really_gone():
    from fastdpo.config import valid_keys
    from fastdpo.recipes import RENAMED

    assert not (set(RENAMED) - {"hub_token"}) & valid_keys()  # a hint for a key that exists would shadow it
    with pytest.raises(SystemExit, match="unknown key 'logging_dir': transformers 5 removed logging_dir"):
        parse_args(["--logging_dir", "runs/x"])


def test_secret_in_any_argument_is_refused(monkeypatch):
    token = "hf_PLANTEDsecretForConfigTest123"
    monkeypatch.setenv("HF_TOKEN", token)
    for flags, key in ((["--run_name", f"try-{token}"], "run_name"),
                       (["--hub_model_id", f"me/{token}"], "hub_model_id"),
                       (["--lora_target_modules", "q_proj", token], "lora_target_modules")):
        with pytest.raises(SystemExit) as e:
            parse_args(flags)
        assert f"{key} contains the value of HF_TOKEN" in str(e.value) and token not in str(e.value)
    parse_args(["--run_name", "try-1"])  # an ordinary name is fine


def test_env_file_found_in_the_repo_root_and_the_current_directory(tmp_path, monkeypatch):
    from fastdpo import credentials

    repo, cwd = tmp_path / "repo", tmp_path / "elsewhere"
    repo.mkdir(), cwd.mkdir()
    (repo / ".env").write_text("FASTDPO_TEST_TOKEN=from-the-repo-root\nFASTDPO_TEST_PROJECT=repo\n")
    (cwd / ".env").write_text("FASTDPO_TEST_PROJECT=cwd\n")
    for name in ("FASTDPO_TEST_TOKEN", "FASTDPO_TEST_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    try:
        assert credentials.load_env([cwd, repo]) == [cwd / ".env", repo / ".env"]
        assert os.environ["FASTDPO_TEST_TOKEN"] == "from-the-repo-root"  # found from another directory
        assert os.environ["FASTDPO_TEST_PROJECT"] == "cwd"  # the current directory's value wins
        # a .env key named like a secret is treated as one (masked in logs, refused in arguments)
        assert credentials.secret_values()["FASTDPO_TEST_TOKEN"] == "from-the-repo-root"
        assert "FASTDPO_TEST_PROJECT" not in credentials.secret_values()
    finally:
        credentials.load_env([])
        for name in ("FASTDPO_TEST_TOKEN", "FASTDPO_TEST_PROJECT"):
            os.environ.pop(name, None)


# ------------------------------------------------- options that would be accepted, then ignored or do something else
# Each is refused at parse time with the reason and what to write instead; the combinations where the option does
# what it says still parse (test_option_honoured_where_it_applies_parses).

IGNORED_OR_OTHER = {
    "batch_rebalance": (["--train_sampling_strategy", "batch_rebalance"],
                        "train_sampling_strategy: batch_rebalance is not offered for DPO"),
    "group_by_length": (["--train_sampling_strategy", "group_by_length"],
                        "train_sampling_strategy: group_by_length is not offered for DPO"),
    "length_column_name": (["--length_column_name", "n_tokens"], "length_column_name: read only by"),
    "pad_to_multiple_of_packed": (["--pad_to_multiple_of", "8"], "pad_to_multiple_of: 8 pads the stock collation"),
    "token_budget_stock": (["--padding_free", "false", "--token_budget", "512"],
                           "token_budget: 512 is read only by the padding-free path"),
    "packed_layout_stock": (["--padding_free", "false", "--packed_layout", "dense"],
                            "packed_layout: dense is read only by the padding-free path"),
    "prefix_sharing_stock": (["--padding_free", "false", "--prefix_sharing", "true"],
                             "prefix_sharing: True is read only by the padding-free path"),
    "ref_cache_stock": (["--padding_free", "false", "--ref_logps_cache_dir", "/tmp/refs"],
                        "ref_logps_cache_dir: /tmp/refs is read only by the padding-free path"),
    "tokens_seen_packed": (["--include_num_input_tokens_seen", "true"],
                           "include_num_input_tokens_seen: all is not counted on the packed path"),
    "sync_ref_precomputed": (["--sync_ref_model", "true"], "sync_ref_model: true updates the reference"),
}


@pytest.mark.parametrize("case", IGNORED_OR_OTHER, ids=str)
def test_option_that_would_do_something_else_fails_at_parse_time(case):
    flags, message = IGNORED_OR_OTHER[case]
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert message in str(e.value)
    key = message.split(":")[0]
    assert f"command line (--{key})" in str(e.value)
    if key == "train_sampling_strategy":
        assert "use random (the default) or sequential" in str(e.value)


@pytest.mark.parametrize("flags", [
    ["--train_sampling_strategy", "sequential"],
    ["--token_budget", "512", "--packed_layout", "dense", "--prefix_sharing", "false"],
    ["--padding_free", "false", "--pad_to_multiple_of", "8"],
    ["--padding_free", "false", "--prefix_sharing", "false", "--packed_layout", "auto"],  # asks for nothing
    ["--padding_free", "false", "--include_num_input_tokens_seen", "true"],
    ["--sync_ref_model", "true", "--precompute_ref_log_probs", "false"],
], ids=" ".join)
def test_option_honoured_where_it_applies_parses(flags):
    parse_args(flags)


def test_sft_keeps_transformers_length_grouping():
    """SFT rows have input_ids, so transformers' samplers work there; only DPO refuses them."""
    from trl import SFTConfig

    _, training_args, _ = parse_args(["--config", str(REPO / "recipes" / "tiny_sft.yaml"),
                                      "--train_sampling_strategy", "group_by_length"], trainer_config=SFTConfig)
    assert training_args.train_sampling_strategy == "group_by_length"


def test_refused_order_names_its_recipe_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "tiny.yaml").read_text() + "train_sampling_strategy: batch_rebalance\n"
    recipe.write_text(text)
    line = len(text.splitlines())
    with pytest.raises(SystemExit, match=rf"{recipe}:{line}: train_sampling_strategy: batch_rebalance"):
        parse_args(["--config", str(recipe)])


@pytest.mark.parametrize("order", ["group_by_length", "batch_rebalance"])
def test_transformers_length_samplers_cannot_read_pairs(order, tmp_path):
    """Why the refusal: on the stock path transformers' own samplers fail on tokenised pairs (they infer lengths
    from input_ids), for training and, with group_by_length, for evaluation; the packed path refuses both orders.
    If a transformers bump makes these work, revisit fastdpo.settings.UNSUPPORTED_ORDERS."""
    import dataclasses

    from trl import DPOConfig as StockConfig

    from fastdpo import data, models
    from fastdpo.batching import TokenBudgetSampler, sequence_lengths
    from fastdpo.trainer import StockDPOTrainer

    script_args, args, model_args = parse_args(["--output_dir", str(tmp_path), "--max_train_samples", "32"])
    tok = models.load_tokenizer(model_args.model_name_or_path)
    pairs = data.load_pairs(script_args)
    ds, _ = data.tokenize_dataset(pairs.train, tok, args.max_length, script_args.max_prompt_length)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(StockConfig) if f.init}
    values.update(padding_free=False, precompute_ref_log_probs=False, train_sampling_strategy=order)
    trainer = StockDPOTrainer(model=models.load_model(model_args, args), args=StockConfig(**values), train_dataset=ds,
                              eval_dataset=ds, processing_class=tok)
    with pytest.raises(ValueError, match="Can only automatically infer lengths"):
        trainer.get_train_dataloader()
    if order == "group_by_length":
        with pytest.raises(ValueError, match="Can only automatically infer lengths"):
            trainer.get_eval_dataloader()
    with pytest.raises(ValueError, match="the packed path orders pairs random or sequential"):
        TokenBudgetSampler(sequence_lengths(ds, args.max_length), 4, 1, order=order)


def test_olmo3_32b_recipe_keeps_the_objective_and_the_batch():
    text = (REPO / "recipes" / "olmo3_32b_think.yaml").read_text()
    assert "BACKEND=zero3 sbatch --nodes=4" in text  # the sharded backend, in the launch line
    s, t, m = _parse(REPO / "recipes" / "olmo3_32b_think.yaml")
    think = _parse(REPO / "recipes" / "olmo3_think.yaml")[1]
    assert (t.loss_type, t.beta, t.max_length) == (think.loss_type, think.beta, think.max_length)
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * 16 == 128  # 4 nodes x 4 GPUs
    assert t.bf16 and t.gradient_checkpointing and m.model_name_or_path.startswith("allenai/")
