"""Configuration: a YAML recipe plus command-line overrides -> (ScriptArguments, DPOConfig, ModelConfig)."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path

from .cli import argument_error

# peft imports bitsandbytes, whose CPU backend warns on every run that an optional 4-bit kernel package is
# missing. Nothing here runs 4-bit on CPU (models.load_model refuses it), so the line is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# TRL 1.16's configs default `gradient_checkpointing` (transformers 5.23's deprecated alias of
# `activation_checkpointing`), so transformers warned about the old name on every run, set by the user or not.
# The two names are mirrored both ways; TRL still reads the old one, which is why the recipes use it.
warnings.filterwarnings("ignore", message="`gradient_checkpointing(_kwargs)?` is deprecated", category=FutureWarning)
# DeepSpeed 0.19.8's ZeRO-3 calls torch 2.13's deprecated collectives on every step: 1,250 FutureWarnings (two
# lines each) in a 40-step job log. Drop the filter when DeepSpeed moves to the *_single names.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                        "deprecated", category=FutureWarning)

from trl import DPOConfig as _TRLDPOConfig  # noqa: E402
from trl import ModelConfig, TrlParser  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "tiny.yaml"
DEFAULT_SFT_RECIPE = DEFAULT_RECIPE.with_name("tiny_sft.yaml")
SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
# .env keys whose values are treated as secrets too (a .env also holds harmless settings like WANDB_PROJECT)
SECRET_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)

# Keys that users carry over from older TRL/transformers, with what to write instead.
RENAMED = {
    "warmup_ratio": "transformers 5 removed warmup_ratio: write warmup_steps: 0.1 (a float below 1 is a ratio)",
    "group_by_length": "transformers 5 replaced it by train_sampling_strategy (random or sequential for DPO: the "
                       "packed path has no padding for length grouping to save)",
    "hub_token": "put HF_TOKEN in .env instead: a token in a recipe ends up in training_args.bin",
    "dataset_text_field": "DPO reads prompt/chosen/rejected; map other columns with column_map",
    "logging_dir": "transformers 5 removed logging_dir: TensorBoard writes to output_dir/runs; to choose the "
                   "folder set TENSORBOARD_LOGGING_DIR=... in the environment",
    "overwrite_output_dir": "transformers 5 removed it: a rerun resumes from output_dir's newest complete "
                            "checkpoint; for a fresh run choose a new output_dir",
    "evaluation_strategy": "renamed: write eval_strategy",
    "no_cuda": "transformers 5 removed it: write use_cpu: true",
    "per_gpu_train_batch_size": "write per_device_train_batch_size",
    "per_gpu_eval_batch_size": "write per_device_eval_batch_size",
    "push_to_hub_token": "put HF_TOKEN in .env instead: a token in a recipe ends up in training_args.bin",
    "push_to_hub_model_id": "write hub_model_id: org/name",
    "push_to_hub_organization": "write hub_model_id: org/name",
    "torch_dtype": "transformers 5 renamed it: write dtype",
    "save_safetensors": "transformers 5 removed it: weights are always saved as safetensors",
    "max_completion_length": "TRL 1.16 removed it: max_length caps prompt + answer, max_prompt_length the prompt",
    "max_target_length": "TRL 1.16 removed it: max_length caps prompt + answer, max_prompt_length the prompt",
    "rpo_alpha": "TRL 1.16 removed it: write loss_type: [sigmoid, sft] and loss_weights: [1.0, <alpha>]",
    "generate_during_eval": "TRL 1.16 removed it: scripts/evaluate.py --samples N prints generations",
    "use_mps_device": "transformers 5 removed it: accelerate picks the Apple GPU by itself",
    "fp16_backend": "transformers 5 removed it: set fp16: true or bf16: true",
    "half_precision_backend": "transformers 5 removed it: set fp16: true or bf16: true",
    "dispatch_batches": "write accelerator_config: {dispatch_batches: true}",
    "split_batches": "write accelerator_config: {split_batches: true}",
    "include_inputs_for_metrics": "write include_for_metrics: [inputs]",
    "padding_value": "TRL 1.16 removed it: the tokenizer's pad token is used (set pad_token to choose)",
    "label_pad_token_id": "TRL 1.16 removed it: labels are masked without a pad id",
}


@dataclass
class DPOConfig(_TRLDPOConfig):
    """TRL's DPOConfig with the fast path on by default (fastdpo.trainer implements it; TRL 1.16 disables
    padding_free) and the knobs it adds. Each fast piece is checked against the stock path in tests/test_parity.py
    and falls back, with a logged reason, where it would not be the same math."""

    padding_free: bool = field(
        default=True,
        metadata={"help": "Pack each micro-batch's sequences into rows without padding (position_ids restart per "
                  "sequence). Same loss as the padded path; off = stock TRL collation."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Compute reference log-probs once before training (packed, cached on disk by "
                  "ref_logps_cache_dir) instead of a reference forward every step; no reference copy is loaded."},
    )
    packed_layout: str = field(
        default="auto",
        metadata={"help": "Padding-free layout: auto (the fastest the start-up probe finds exact on the model), "
                  "segments (per-sequence sdpa, sdpa only) or dense (the model's own packed mask).",
                  "choices": ["auto", "segments", "dense"]},
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={"help": "Padding-free with sdpa: run each pair's prompt once, shared by its chosen and rejected "
                  "answers (the rejected tokens attend to the prompt and themselves). Same log-probs and gradients; "
                  "the start-up probe turns it off, with the reason logged, where it is not."},
    )
    token_budget: int | None = field(
        default=None,
        metadata={"help": "Most tokens of chosen + rejected sequences in one packed micro-batch (padding-free only; "
                  "a shared prompt still counts twice, so prefix sharing computes fewer). Steps keep their "
                  "pairs (per_device_train_batch_size x gradient_accumulation_steps) and per-pair loss weights. "
                  "Default: per_device_train_batch_size x 2 x the longest sequence in the data (at most max_length), "
                  "the largest micro-batch stock TRL builds on the same data, so peak memory stays at or below its."},
    )
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where precomputed reference log-probs are cached (default ~/.cache/fastdpo/ref_logps, "
                  "or $FASTDPO_CACHE/ref_logps)."},
    )


@dataclass
class ScriptArguments:
    """What TRL's configs do not cover: where the data comes from and how it is shaped."""

    dataset_name: str = field(
        default="embedded:tiny-prefs",
        metadata={"help": "Hub dataset id, local file (.jsonl/.json/.parquet/.csv, optionally .gz) or folder."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "Eval split: a split name (e.g. test), a fraction of the train rows (e.g. 0.05), or none "
                  "(no eval)."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "A separate eval source (file, folder or Hub id); overrides the fraction."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval rows."})
    dataset_seed: int = field(default=42, metadata={"help": "Seed for the fraction eval split."})
    dataset_shuffle_seed: int | None = field(
        default=None, metadata={"help": "Shuffle the train rows once with this seed (the sampler shuffles anyway)."}
    )
    column_map: str | None = field(
        default=None,
        metadata={"help": "JSON object naming the columns of a layout detection does not know: prompt (or messages), "
                  "chosen, rejected, system; dotted paths reach nested fields (input.messages); message keys and role "
                  "names with LLaMA-Factory's tags (role_tag, content_tag, user_tag, assistant_tag, system_tag, "
                  'observation_tag, function_tag), e.g. \'{"prompt": "question", "chosen": "good", "rejected": '
                  '"bad"}\'. Most layouts are detected without it (README: data layouts).'},
    )
    ranked_pairs: str | None = field(
        default=None,
        metadata={"help": "Ranked or scored replies (LLaMA-Factory's ranking layout, Nectar, UltraFeedback's raw "
                  "completions) -> pairs: best_vs_worst (one pair a row) or best_vs_rest (the best against each "
                  "other reply). Replies of equal rank give no pair and are counted.",
                  "choices": ["best_vs_worst", "best_vs_rest"]},
    )
    judged_pairs: bool = field(
        default=False,
        metadata={"help": "Two answers and a judge's winner label (FastChat judgments, Chatbot Arena) -> pairs: the "
                  "winner is chosen, the other rejected; ties and unlabelled rows give no pair and are counted."},
    )
    annotators: str | None = field(
        default=None,
        metadata={"help": "Judged data with several annotator columns (PandaLM's annotator1..3) -> one verdict: "
                  "majority (more than half of the raters; a majority for a tie, or none, gives no pair, counted).",
                  "choices": ["majority"]},
    )
    judged_label: str | None = field(
        default=None,
        metadata={"help": "Judged data with two label columns (PKU-SafeRLHF: better_response_id, safer_response_id): "
                  "the one that makes chosen."},
    )
    judged_codes: str | None = field(
        default=None,
        metadata={"help": "Judged data with a number label whose codes are not known: a JSON object from each value "
                  'to the answer column it picks or "tie", e.g. \'{"1": "response1", "2": "response2", "0": '
                  '"tie"}\'.'},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Cut longer prompts to their last N tokens (TRL 1.16 removed this option)."},
    )
    skip_bad_rows: bool = field(
        default=False,
        metadata={"help": "Skip malformed rows (listed in output_dir/skipped_rows.jsonl) instead of failing."}
    )
    dedup: str = field(
        default="eval",
        metadata={"help": "Repeated pairs (same prompt, chosen and rejected): eval = drop eval pairs that also occur "
                  "in train; all = also keep only the first of repeats within each split; none = keep all. Counted "
                  "in data_report.json and listed in duplicate_rows.jsonl either way."},
    )
    chat_template_path: str | None = field(
        default=None, metadata={"help": "A Jinja chat template file (or tokenizer folder) for a model without one."}
    )
    eval_before_train: bool = field(
        default=False, metadata={"help": "Evaluate once before training, for a before/after table."}
    )
    allow_changed_run: bool = field(
        default=False,
        metadata={"help": "Resume a checkpoint in output_dir (or replace a finished run there) even though what "
                  "defines the run changed (data, model, learning rate, beta, batch, ...); every change is logged. "
                  "Without it such a rerun is refused."},
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With use_peft: save the base with the LoRA adapter merged in (a plain model folder the "
                  "next stage can load) and the adapter itself under output_dir/adapter; default saves the adapter."},
    )

    def __post_init__(self):
        if isinstance(self.column_map, str):
            try:
                self.column_map = json.loads(self.column_map)
            except json.JSONDecodeError as e:
                raise SystemExit(f"column_map is not a JSON object ({e}); example: "
                                 '\'{"prompt": "question", "chosen": "good", "rejected": "bad"}\'') from None
        if self.column_map is not None:
            from .layouts import check_column_map

            problem = check_column_map(self.column_map)
            if problem:
                raise SystemExit(problem)
        if isinstance(self.judged_codes, str):
            from .layouts import parse_codes

            self.judged_codes = parse_codes(self.judged_codes)


def _script_arguments_for(trainer_config) -> type:
    """ScriptArguments minus the fields the trainer config already has, which argparse would reject as duplicates.

    SFTConfig has its own chat_template_path; for SFT that one is used (same meaning, same name in the recipe).
    """
    taken = {f.name for f in fields(trainer_config)}
    if not taken & {f.name for f in fields(ScriptArguments)}:
        return ScriptArguments
    keep = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
            if f.default_factory is not MISSING else
            (f.name, f.type, field(default=f.default, metadata=f.metadata))
            for f in fields(ScriptArguments) if f.name not in taken]
    return make_dataclass(f"ScriptArgumentsFor{trainer_config.__name__}", keep,
                          namespace={"__module__": __name__, "__post_init__": ScriptArguments.__post_init__})


def _valid_keys(trainer_config=DPOConfig) -> set[str]:
    return {f.name for cls in (ScriptArguments, trainer_config, ModelConfig) for f in fields(cls)}


def _line_of(path: str, key: str) -> str:
    try:
        for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if re.match(rf"\s*{re.escape(key)}\s*:", line):
                return f"{path}:{i}"
    except OSError:
        pass
    return path


def _explain_unknown(keys: list[str], where: str, recipe: str | None, trainer_config=DPOConfig) -> str:
    valid = _valid_keys(trainer_config)
    lines = []
    for key in keys:
        place = _line_of(recipe, key) if recipe and where == "recipe" else "command line"
        hint = RENAMED.get(key)
        if not hint:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = (f"did you mean {close[0]!r}?" if close else
                    f"not a {trainer_config.__name__}, ModelConfig or ScriptArguments field")
        lines.append(f"{place}: unknown key {key!r}: {hint}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None, trainer_config=DPOConfig, default_recipe: Path = DEFAULT_RECIPE,
               check_paths: bool = True):
    """Parse `--config recipe.yaml` plus overrides into (ScriptArguments, DPOConfig, ModelConfig).

    With no --config the embedded tiny recipe is used. Keys no config knows fail, naming the recipe line or
    the flag and a likely fix. train_sft.py passes trainer_config=SFTConfig and the tiny SFT recipe.
    Values that cannot work, or would train silently wrong, fail here too (`check_settings`), before any data
    or model is loaded; `check_paths=False` skips the local-path checks (parsing a recipe whose model is an
    earlier stage's output folder).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(default_recipe)] + argv
    recipe = argv[argv.index("--config") + 1]
    if not Path(recipe).is_file():
        raise SystemExit(f"recipe not found: {recipe} (recipes live in recipes/, e.g. --config recipes/tiny.yaml)")
    parser = TrlParser((_script_arguments_for(trainer_config), trainer_config, ModelConfig))
    parser.error = argument_error  # one line naming the flag, value and what is expected; no usage dump
    try:
        script_args, training_args, model_args, from_recipe, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except ValueError as e:
        raise SystemExit(f"{recipe}: {e}") from None
    bad_recipe = [s[2:] for s in from_recipe if s.startswith("--")]
    bad_cli = [s.lstrip("-").split("=")[0] for s in from_cli if s.startswith("-")]
    messages = []
    if bad_recipe:
        messages.append(_explain_unknown(bad_recipe, "recipe", recipe, trainer_config))
    if bad_cli:
        messages.append(_explain_unknown(bad_cli, "cli", recipe, trainer_config))
    if from_cli and not bad_cli:
        messages.append(f"command line: unexpected argument(s) {from_cli}; flags look like --max_steps 10")
    if getattr(training_args, "hub_token", None):
        messages.append(f"{recipe}: hub_token: {RENAMED['hub_token']}")
    if script_args.merge_adapter and not model_args.use_peft:
        messages.append(f"{recipe}: merge_adapter: true needs use_peft: true (there is no adapter to merge)")
    if script_args.merge_adapter and training_args.push_to_hub:
        messages.append(f"{recipe}: merge_adapter with push_to_hub would upload the adapter and the merged model "
                        "into one repo; push the merged output_dir afterwards with `hf upload`")
    if not messages:  # values are only worth checking once every key is known
        where = _Where(recipe, argv)
        messages += check_settings(where, script_args, training_args, model_args, check_paths)
        messages += check_secrets(where, script_args, training_args, model_args)
    if messages:
        raise SystemExit("\n".join(messages))
    return script_args, training_args, model_args


# ------------------------------------------------------------------------------------- value checks


class _Where:
    """Where a key got its value: the flag, the recipe line, or the default."""

    def __init__(self, recipe: str, argv: list[str]):
        self.recipe = recipe
        self.cli = {a[2:].split("=")[0] for a in argv if a.startswith("--") and a != "--config"}

    def given(self, key: str) -> bool:
        """Set on the command line or in the recipe (a default asks for nothing)."""
        return key in self.cli or _line_of(self.recipe, key) != self.recipe

    def __call__(self, key: str) -> str:
        if key in self.cli:
            return f"command line (--{key})"
        place = _line_of(self.recipe, key)
        return place if place != self.recipe else f"default (not set in {self.recipe})"


def trl_loss_types() -> list[str]:
    """The loss_type values TRL's DPOConfig documents (tests/test_sft_lora_eval.py pins the list)."""
    help_text = _TRLDPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    return re.findall(r"`'(\w+)'`", help_text)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".parquet.gz", ".csv.gz")


def _local_path(name: str | None) -> Path | None:
    """The local path a name must be, or None when it may be a Hub id (`org/name`) or an embedded name."""
    if not name or name.startswith("embedded:"):
        return None
    path = Path(name).expanduser()
    if (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.lower().endswith(DATA_SUFFIXES)
            or path.exists()):
        return path
    return None


def check_settings(where, script_args, training_args, model_args, check_paths: bool = True) -> list[str]:
    """Every value that cannot work, or trains silently wrong, as `place: key: problem; fix` lines.

    Checked here, within seconds of start, because TRL and transformers notice these only after tokenising,
    loading the model and the reference pass, if at all (beta 0 trains nothing, a negative beta learns to
    prefer the rejected answers, and both finish with exit 0).
    """
    import torch
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from trl import __version__ as trl_version

    t, s, m = training_args, script_args, model_args
    bad = []

    def fail(key, problem):
        bad.append(f"{where(key)}: {key}: {problem}")

    dpo = isinstance(t, _TRLDPOConfig)  # SFTConfig has a loss_type of its own (nll, dft) and no beta
    if dpo and not t.beta > 0:
        effect = "trains nothing (the loss stays at ln 2)" if t.beta == 0 else "learns to prefer the rejected answers"
        fail("beta", f"{t.beta} {effect}; "
             "use beta > 0 (TRL's default 0.1; the OLMo 3 recipes use 5 with loss_type sigmoid_norm)")
    if not t.learning_rate > 0:
        effect = "trains nothing" if t.learning_rate == 0 else "climbs the loss instead of descending it"
        fail("learning_rate", f"{t.learning_rate} {effect}; "
             "use a positive value (about 1e-6 for a 7B SFT model, 5e-6 for a small one); to only evaluate a model "
             "use scripts/evaluate.py")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            fail(key, f"{getattr(t, key)}; it must be at least 1")
    if t.max_steps == 0 or t.max_steps < -1:
        fail("max_steps", f"{t.max_steps}; use a positive number of optimizer steps, or -1 to train num_train_epochs")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        fail("num_train_epochs", f"{t.num_train_epochs} trains nothing; use a positive value (or set max_steps)")
    if t.warmup_steps < 0:
        fail("warmup_steps", f"{t.warmup_steps}; use a step count, or a float below 1 for a ratio (0.1)")
    if dpo:
        known = trl_loss_types()
        unknown = [x for x in t.loss_type if known and x not in known]
        if unknown:
            hints = [f"{x!r} (did you mean {difflib.get_close_matches(x, known, n=1)[0]!r}?)"
                     if difflib.get_close_matches(x, known, n=1) else repr(x) for x in unknown]
            fail("loss_type", f"unknown {', '.join(hints)}; TRL {trl_version} knows {', '.join(known)}")
        if t.loss_weights is not None and len(t.loss_weights) != len(t.loss_type):
            fail("loss_weights", f"{t.loss_weights} has {len(t.loss_weights)} weights for {len(t.loss_type)} loss "
                 f"types {t.loss_type}; give one weight per loss type")
        if "exo_pair" in t.loss_type and t.label_smoothing == 0:
            fail("label_smoothing", "0 with loss_type exo_pair, which TRL refuses; use 1.0e-3 (the EXO paper's value)")
        if t.use_weighting and {"aot", "aot_unpaired"} & set(t.loss_type):
            fail("use_weighting", "true with loss_type aot/aot_unpaired, which sort pairs and so cannot weight them; "
                 "set use_weighting: false")
        bad += _check_dpo_options(where, t)
    max_length = getattr(t, "max_length", None)
    if max_length is not None and max_length < 1:
        fail("max_length", f"{max_length}; use the token length that covers your pairs (scripts/analyze_dataset.py)")
    mpl = getattr(s, "max_prompt_length", None)
    if mpl is not None and max_length and mpl >= max_length:
        fail("max_prompt_length", f"{mpl} leaves no room for answers within max_length {max_length}; use at most "
             f"about half of it (e.g. {max_length // 2}), or raise max_length")
    elif mpl is not None and mpl < 1:
        fail("max_prompt_length", f"{mpl}; use a positive token count, or leave it unset")
    if (m.load_in_4bit or m.load_in_8bit) and not torch.cuda.is_available():
        fail("load_in_4bit" if m.load_in_4bit else "load_in_8bit",
             "QLoRA needs a CUDA GPU (bitsandbytes); on CPU use --use_peft true without quantization")
    for name in t.report_to:
        if name in ("none", "all") or name in get_available_reporting_integrations():
            continue
        if name in INTEGRATION_TO_CALLBACK:
            fail("report_to", f"{name} is not installed in this environment; pip install {name}, or drop it")
        else:
            close = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            fail("report_to", f"unknown tracker {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                 "this repo uses tensorboard, wandb or trackio")
    if check_paths:
        bad += _check_paths(where, s, t, m)
    return bad


# transformers' samplers that DPO pairs cannot use. Both infer lengths from an `input_ids` column, which pairs do
# not have, so the stock path (padding_free: false, or a logged fallback) and evaluation fail with "Can only
# automatically infer lengths" after the model and the reference pass are loaded.
UNSUPPORTED_ORDERS = {
    "group_by_length": "it groups pairs by length to cut padding, which packed rows do not have (padding "
                       "efficiency 1.000 without it)",
    "batch_rebalance": "it gives micro-batches different pair counts, so a pair weighs 1/(accumulation x its "
                       "micro-batch's size), another objective than the other orders; token_budget already packs "
                       "each step's micro-batches by tokens",
}
# Our DPOConfig's options that only the padding-free path reads, and the values that ask for something.
PACKED_ONLY = {"token_budget": lambda v: v is not None, "packed_layout": lambda v: v != "auto",
               "prefix_sharing": lambda v: v, "ref_logps_cache_dir": lambda v: v is not None}


def _check_dpo_options(where, t) -> list[str]:
    """Options that would be accepted and then ignored, or do something other than they say."""
    bad = []
    order = t.train_sampling_strategy
    if order in UNSUPPORTED_ORDERS:
        bad.append(f"{where('train_sampling_strategy')}: train_sampling_strategy: {order} is not offered for DPO: "
                   "transformers' sampler for it infers lengths from input_ids, which pairs do not have, and "
                   f"{UNSUPPORTED_ORDERS[order]}; use random (the default) or sequential")
    if where.given("length_column_name"):
        bad.append(f"{where('length_column_name')}: length_column_name: read only by train_sampling_strategy "
                   "group_by_length or batch_rebalance, which DPO here does not offer; drop it")
    if t.sync_ref_model and t.precompute_ref_log_probs:  # TRL raises this only after loading model and data
        bad.append(f"{where('sync_ref_model')}: sync_ref_model: true updates the reference during training, so "
                   "reference log-probs computed once (precompute_ref_log_probs: true, this repo's default) would be "
                   "stale; set precompute_ref_log_probs: false")
    if not hasattr(t, "token_budget"):  # TRL's own DPOConfig (scripts/benchmark.py's stock runs): no packed path
        return bad
    if t.padding_free and t.include_num_input_tokens_seen != "no":
        # transformers counts tokens from the batch's input_ids; a packed slot holds micro-batches instead, so it
        # would warn "not configured properly" every step and count 0
        bad.append(f"{where('include_num_input_tokens_seen')}: include_num_input_tokens_seen: "
                   f"{t.include_num_input_tokens_seen} is not counted on the packed path (padding_free: true, the "
                   "default); the progress line logs tok/s; drop it, or set padding_free: false")
    if t.padding_free and where.given("pad_to_multiple_of") and t.pad_to_multiple_of is not None:
        bad.append(f"{where('pad_to_multiple_of')}: pad_to_multiple_of: {t.pad_to_multiple_of} pads the stock "
                   "collation's rows; packed rows (padding_free: true, the default) have no padding to round; drop it, "
                   "or set padding_free: false")
    if not t.padding_free:
        for key, asks in PACKED_ONLY.items():
            if where.given(key) and asks(getattr(t, key)):
                bad.append(f"{where(key)}: {key}: {getattr(t, key)} is read only by the padding-free path, and "
                           "padding_free is false (stock TRL collation); drop it, or set padding_free: true")
    return bad


def _check_paths(where, s, t, m) -> list[str]:
    bad = []
    path = _local_path(m.model_name_or_path)
    if path is not None and not path.exists():
        bad.append(f"{where('model_name_or_path')}: model_name_or_path: {m.model_name_or_path}: no such folder; "
                   "a local model is a folder with config.json (an earlier stage's output_dir), a Hub model an id "
                   "like org/name")
    elif path is not None and not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        bad.append(f"{where('model_name_or_path')}: model_name_or_path: {m.model_name_or_path} has no config.json "
                   "(or adapter_config.json): not a saved model folder; point it at a training run's output_dir")
    for key in ("dataset_name", "eval_dataset_name"):
        name = getattr(s, key, None)
        path = _local_path(name)
        if path is not None and not path.exists():
            bad.append(f"{where(key)}: {key}: {name}: no such file or folder; a local dataset is a "
                       f"{'/'.join(x for x in DATA_SUFFIXES if not x.endswith('.gz'))} file (optionally .gz) or a "
                       "folder of them, a Hub dataset an id like org/name")
    template = getattr(s, "chat_template_path", None) or getattr(t, "chat_template_path", None)
    if template and not Path(template).expanduser().exists():
        bad.append(f"{where('chat_template_path')}: chat_template_path: {template}: no such file or folder; give "
                   "a Jinja file or a tokenizer folder that has a chat template")
    return bad


def _strings(value, key: str):
    """(key, string) for every string inside a field's value (lists and dicts included)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)


def check_secrets(where, *configs) -> list[str]:
    """Refuse any string argument holding a secret: arguments are written to training_args.bin, TensorBoard,
    wandb/trackio configs and the model card, which a Hub push uploads; a log filter cannot reach those."""
    secrets = secret_values()
    bad = []
    for conf in configs:
        for f in fields(conf):
            if f.name == "hub_token":  # refused on its own, with the fix
                continue
            for key, text in _strings(getattr(conf, f.name), f.name):
                names = [name for name, value in secrets.items() if value in text]
                if names:
                    bad.append(f"{where(f.name)}: {key} contains the value of {' and '.join(names)}; remove it: "
                               "arguments are saved in training_args.bin, TensorBoard and tracker configs (secrets "
                               "belong in .env only)")
    return bad


# ---------------------------------------------------------------------------------------------- secrets


_env_files: list[Path] = []  # the .env files load_env read, for the log


def load_env(dirs: list[Path] | None = None) -> list[Path]:
    """Read HF_TOKEN, WANDB_API_KEY, ... from .env (never printed); the shell's own values win.

    `.env` is looked for in the current directory, then in the repo root (a run started from elsewhere, e.g.
    `python ~/fastdpo/train_dpo.py`, still finds it); for a key in both, the current directory's wins.
    """
    from dotenv import load_dotenv

    found = []
    for d in dirs if dirs is not None else [Path.cwd(), REPO]:
        path = (Path(d) / ".env").resolve()
        if path.is_file() and path not in found:
            load_dotenv(path, override=False)
            found.append(path)
    _env_files[:] = found
    return found


def secret_values() -> dict[str, str]:
    """name -> value of every secret in the environment: the known token names, plus .env keys that look like
    secrets (TOKEN, KEY, SECRET, PASSWORD in the name). Values under 8 characters are too common to match."""
    from dotenv import dotenv_values

    names = set(SECRET_NAMES)
    for path in _env_files:
        names |= {k for k in dotenv_values(path) if SECRET_PATTERN.search(k)}
    return {n: os.environ[n] for n in sorted(names) if len(os.environ.get(n) or "") >= 8}


class _Redact(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(s in msg for s in self.secrets):
            for s in self.secrets:
                msg = msg.replace(s, "***")
            record.msg, record.args = msg, None
        return True


def redact_logs() -> None:
    """Mask secret values in every log record, whichever library emits it; say which .env files were read."""
    found = secret_values()
    if _env_files:
        logging.getLogger("fastdpo").info("secrets: read %s (%s set)", ", ".join(map(str, _env_files)),
                                          ", ".join(found) or "no secret")
    secrets = list(found.values())
    if not secrets:
        return
    flt = _Redact(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    logging.getLogger().addFilter(flt)


def given_keys(argv: list[str] | None = None) -> list[str]:
    """The keys a run set: the recipe's, then the command line's (the defaulted recipe when none is given)."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = argv[argv.index("--config") + 1] if "--config" in argv else str(DEFAULT_RECIPE)
    keys = list(yaml.safe_load(Path(recipe).read_text()) or {})
    keys += [a[2:].split("=")[0] for a in argv if a.startswith("--") and a != "--config"]
    return list(dict.fromkeys(keys))


def describe(keys: list[str], *configs) -> str:
    """`name: value` for every key the recipe or command line set, as parsed (tokens never shown)."""
    lines = []
    for key in keys:
        for conf in configs:
            if hasattr(conf, key) and not key.endswith("token"):
                value = getattr(conf, key)
                lines.append(f"  {key}: {getattr(value, 'value', value)}")
                break
    return "\n".join(lines)
