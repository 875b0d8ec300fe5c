"""SFT -> DPO, LoRA, loss variants and evaluation, on the embedded tiny model (CPU).

Fast: recipes and the SFT data layer. Slow (@slow): LoRA trains only adapters against the adapter-free base,
the saved adapter reloads to the same log-probs, every TRL loss type trains, and the CLI stages chain
(train_sft.py -> train_dpo.py -> scripts/evaluate.py, and scripts/demo.py) with tiny max_steps.
"""

import gc
import json
import re

import pytest
import torch

from tests.helpers import PYTHON, REPO, read_json, run

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# TRL 1.16's DPOConfig.loss_type values; test_loss_types_match_trl notices when a TRL bump adds or drops one.
LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# losses that need a setting besides loss_type (exo_pair refuses label_smoothing 0)
LOSS_EXTRAS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}


# ----------------------------------------------------------------------------------------------- fast


def test_sft_recipe_parses_with_sft_config():
    from trl import SFTConfig

    from fastdpo import config as cfg

    script_args, training_args, model_args = cfg.parse_args([], trainer_config=SFTConfig,
                                                            default_recipe=cfg.DEFAULT_SFT_RECIPE)
    assert isinstance(training_args, SFTConfig) and training_args.assistant_only_loss
    assert script_args.dataset_name == "embedded:tiny-sft" and not hasattr(script_args, "chat_template_path")
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 32, 0.05)
    assert model_args.lora_target_modules == LORA_TARGETS
    with pytest.raises(SystemExit, match="'beta'"):  # a DPO-only key in an SFT run names itself
        cfg.parse_args(["--beta", "0.1"], trainer_config=SFTConfig, default_recipe=cfg.DEFAULT_SFT_RECIPE)


def test_dpo_after_sft_recipe_and_lora_flags():
    from fastdpo import config as cfg

    # check_paths=False: the recipe names the SFT stage's output folder, which exists only once that stage ran
    script_args, training_args, model_args = cfg.parse_args(
        ["--config", "recipes/tiny_dpo_after_sft.yaml", "--use_peft", "true", "--merge_adapter", "true",
         "--loss_type", "ipo"], check_paths=False)
    assert model_args.model_name_or_path == "outputs/demo/sft" and model_args.use_peft
    assert script_args.merge_adapter and training_args.loss_type == ["ipo"]
    with pytest.raises(SystemExit, match="merge_adapter: true needs use_peft"):
        cfg.parse_args(["--merge_adapter", "true"])


def test_loss_types_match_trl():
    from trl import DPOConfig

    help_text = next(f for f in DPOConfig.__dataclass_fields__.values() if f.name == "loss_type").metadata["help"]
    assert sorted(re.findall(r"`'(\w+)'`", help_text)) == sorted(LOSS_TYPES)


def test_sft_layouts_and_errors(tmp_path):
    from fastdpo import errors, sft
    from fastdpo.config import ScriptArguments

    msgs = tmp_path / "m.jsonl"
    msgs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": "a"}]}) + "\n"
                            for i in range(20)))
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "extra": 1}) + "\n" for i in range(4)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")

    got = sft.load_sft(ScriptArguments(dataset_name=str(msgs), dataset_test_split="0.1"))
    assert (len(got.train), len(got.eval)) == (18, 2) and got.train.column_names == ["messages"]
    assert sft.load_sft(ScriptArguments(dataset_name=str(pc))).train.column_names == ["prompt", "completion"]
    with pytest.raises(errors.DataError, match="bad.jsonl:1: SFT needs a `messages` column"):
        sft.load_sft(ScriptArguments(dataset_name=str(bad)))


def test_tiny_data_makes_the_demo_measurable():
    from fastdpo import tiny

    # held-out prompts pair adjectives and subjects in new ways, but every subject was seen in training
    assert not set(tiny.EVAL_COMBOS) & set(tiny.TRAIN_COMBOS)
    assert {n for _, n in tiny.EVAL_COMBOS} <= {n for _, n in tiny.TRAIN_COMBOS}
    rows = tiny.sft_rows()
    good = [tiny.preferred(r["messages"][-1]["content"], r["messages"][1]["content"]) for r in rows]
    assert 0.4 < sum(good) / len(rows) < 0.6  # both kinds of answer, about half each
    for r, g in zip(rows, good, strict=True):  # and which kind depends on how the prompt asks
        assert g != r["messages"][1]["content"].startswith(tiny.RUDE_ASKS)


# ----------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def tiny_pairs(tiny_tokenizer):
    from fastdpo import data
    from fastdpo.config import ScriptArguments

    pairs = data.load_pairs(ScriptArguments(max_train_samples=16, dataset_test_split="test", max_eval_samples=8))
    train, _ = data.tokenize_dataset(pairs.train, tiny_tokenizer, 128, 64)
    evals, _ = data.tokenize_dataset(pairs.eval, tiny_tokenizer, 128, 64, name="eval")
    return pairs, train, evals


def dpo_args(tmp_path, **overrides):
    from trl import DPOConfig

    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=3, per_device_train_batch_size=4,
                  learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                  seed=0)
    return DPOConfig(**(kwargs | overrides))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_lora_trains_only_adapters_against_the_base_and_reloads(tmp_path, tiny_model_path, tiny_tokenizer,
                                                                  tiny_pairs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from trl import ModelConfig, get_peft_config

    from fastdpo import evaluation
    from fastdpo.trainer import DPOTrainer

    _, train, evals = tiny_pairs
    ids = torch.tensor([train[0]["prompt_ids"] + train[0]["chosen_ids"]])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = _logits(model, ids)
    gc.collect()
    models_before = sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())

    peft_config = get_peft_config(ModelConfig(use_peft=True, lora_target_modules=LORA_TARGETS))
    trainer = DPOTrainer(model=model, args=dpo_args(tmp_path), train_dataset=train, eval_dataset=evals,
                         processing_class=tiny_tokenizer, peft_config=peft_config)
    # the reference is the policy with its adapter switched off: no second model anywhere in memory
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == models_before
    assert trainer.model.peft_config["default"].r == 16 and trainer.model.peft_config["default"].lora_alpha == 32
    trainer.train()

    changed_lora = 0
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            changed_lora += param.requires_grad and bool(param.abs().sum() > 0)  # lora_B starts at zero
            continue
        plain = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert not param.requires_grad and torch.equal(param, base[plain]), f"{name} changed"
    assert changed_lora == 2 * 4 * 2  # A and B, four projections, two layers
    with trainer.model.disable_adapter():
        assert torch.equal(_logits(trainer.model, ids), base_logits)
    trained_logits = _logits(trainer.model, ids)
    assert not torch.allclose(trained_logits, base_logits)

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter only, megabytes not gigabytes
    reloaded = evaluation.load(str(tmp_path / "adapter"))
    assert reloaded.base == tiny_model_path
    torch.testing.assert_close(_logits(reloaded.model, ids), trained_logits, rtol=1e-5, atol=1e-5)
    # evaluation's default reference for an adapter is its base: the same rewards TRL's eval computes
    scores = evaluation.score(reloaded, None, evals)
    trl_eval = trainer.evaluate()
    assert scores["reward_margin"] == pytest.approx(trl_eval["eval_rewards/margins"], rel=1e-4, abs=1e-5)
    assert scores["preference_accuracy"] == pytest.approx(trl_eval["eval_rewards/accuracies"])


@pytest.mark.slow
def test_every_loss_type_trains(tmp_path, tiny_model_path, tiny_tokenizer, tiny_pairs):
    from transformers import AutoModelForCausalLM

    from fastdpo.trainer import DPOTrainer

    _, train, _ = tiny_pairs
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    for loss_type in LOSS_TYPES + [["sigmoid", "sft"]]:  # a list combines losses (RPO: DPO + NLL on chosen)
        types = loss_type if isinstance(loss_type, list) else [loss_type]
        model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
        args = dpo_args(tmp_path / "_".join(types), max_steps=2, loss_type=types,
                        **LOSS_EXTRAS.get(types[0], {}))
        trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tiny_tokenizer)
        result = trainer.train()
        assert torch.isfinite(torch.tensor(result.training_loss)), loss_type
        moved = any(not torch.equal(p, initial[n]) for n, p in trainer.model.state_dict().items())
        assert moved, f"{loss_type}: no weight changed"


def evaluate_cli(argv: list[str]) -> dict:
    """scripts/evaluate.py's main in this process (the command line costs 10 s of imports per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(module.parse(argv))


@pytest.mark.slow
def test_demo_sft_then_dpo_with_lora_then_evaluate(tmp_path, capsys):
    """scripts/demo.py with LoRA in both stages and tiny max_steps: train_sft.py (LoRA, merged) -> train_dpo.py
    on its output (LoRA adapter) -> report.json; then scripts/evaluate.py on the adapter and on a full model."""
    from transformers import AutoModelForCausalLM

    from fastdpo import evaluation

    out = tmp_path / "demo"
    sft, dpo = out / "sft", out / "dpo"
    proc = run([PYTHON, "scripts/demo.py", "--out", str(out), "--eval_prompts", "8", "--show", "2",
                "--sft_args", "--max_steps 6 --logging_steps 2 --use_peft true --merge_adapter true",
                "--dpo_args", "--max_steps 4 --logging_steps 2 --use_peft true --max_eval_samples 32"])
    report = read_json(out / "report.json")
    for key in ("preferred_share_before", "preferred_share_after", "preference_accuracy_before",
                "preference_accuracy_after", "likelihood_accuracy_before", "likelihood_accuracy_after"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["held_out_prompts"] == 8 and len(report["samples"]) == 2
    assert "| preferred share (greedy answers) |" in proc.stdout

    # SFT with merge_adapter: out/ is a plain model folder (what DPO loaded), equal to base + adapter
    assert (sft / "adapter" / "adapter_config.json").exists() and (sft / "model.safetensors").exists()
    assert not (sft / "adapter_config.json").exists()
    ids = torch.tensor([[1, 5, 9, 30, 42, 7]])
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(sft), ids),
                               _logits(evaluation.load(str(sft / "adapter")).model, ids), rtol=1e-4, atol=1e-4)
    # DPO with LoRA saves the adapter (default) and still writes TRL's eval numbers
    results = read_json(dpo / "all_results.json")
    assert "eval_rewards/accuracies" in results and (dpo / "adapter_config.json").exists()

    # evaluate.py on the adapter: the reference defaults to its base, the SFT model DPO started from, so the
    # implicit rewards are TRL's own eval numbers on the same 32 pairs
    png = tmp_path / "curves.png"
    report = evaluate_cli([str(dpo), "--max_pairs", "32", "--samples", "2", "--gen_prompts", "4",
                           "--max_new_tokens", "16", "--json", str(tmp_path / "eval.json"), "--plot", str(png)])
    assert read_json(tmp_path / "eval.json")["num_pairs"] == 32 == report["num_pairs"]
    assert report["reference"] == f"{sft} (adapter disabled)"
    assert report["preference_accuracy"] == pytest.approx(results["eval_rewards/accuracies"])
    assert report["reward_margin"] == pytest.approx(results["eval_rewards/margins"], rel=1e-4, abs=1e-5)
    assert report["kl"] >= 0 and len(report["samples"]) == 2 and png.stat().st_size > 10_000
    assert "| preference_accuracy |" in capsys.readouterr().out

    # a full model needs its reference named
    with pytest.raises(SystemExit, match="pass --ref"):
        evaluate_cli([str(sft)])
    full = evaluate_cli([str(sft), "--ref", "embedded:tiny-llama", "--max_pairs", "8", "--gen_prompts", "2",
                         "--samples", "1", "--max_new_tokens", "8"])
    assert full["num_pairs"] == 8 and full["kl"] > 0 and full["reference"] == "embedded:tiny-llama"
