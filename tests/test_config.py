"""Every recipe parses into valid configs; unknown keys fail with the line and a fix."""

import pytest
import yaml

from fastdpo.config import parse_args

from .conftest import REPO

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
    assert t.save_strategy.value == "no" and "tensorboard" in t.report_to
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
