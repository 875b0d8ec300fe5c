"""Configuration: a YAML recipe plus command-line overrides -> (ScriptArguments, DPOConfig, ModelConfig)."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path

from trl import DPOConfig as _TRLDPOConfig
from trl import ModelConfig, TrlParser

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
DEFAULT_SFT_RECIPE = DEFAULT_RECIPE.with_name("tiny_sft.yaml")
SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")

# Keys that users carry over from older TRL/transformers, with what to write instead.
RENAMED = {
    "warmup_ratio": "transformers 5 removed warmup_ratio: write warmup_steps: 0.1 (a float below 1 is a ratio)",
    "group_by_length": "transformers 5 renamed it: write train_sampling_strategy: group_by_length",
    "hub_token": "put HF_TOKEN in .env instead: a token in a recipe ends up in training_args.bin",
    "dataset_text_field": "DPO reads prompt/chosen/rejected; map other columns with column_map",
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
    prefix_sharing: bool = field(
        default=True,
        metadata={"help": "Padding-free with sdpa: run each pair's prompt once, shared by its chosen and rejected "
                  "answers (the rejected tokens attend to the prompt and themselves). Same log-probs and gradients; "
                  "the start-up probe turns it off, with the reason logged, where it is not."},
    )
    token_budget: int | None = field(
        default=None,
        metadata={"help": "Most tokens one packed micro-batch computes (padding-free only). Steps keep their "
                  "pairs (per_device_train_batch_size x gradient_accumulation_steps) and per-pair loss weights. "
                  "Default: per_device_train_batch_size x 2 x max_length, the stock worst case."},
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
        metadata={"help": "Eval split: a split name (e.g. test) or a fraction of the train rows (e.g. 0.05)."},
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
        metadata={"help": "JSON object mapping prompt/chosen/rejected/system to the dataset's columns, e.g. "
                  '\'{"system": "system", "prompt": "question", "chosen": "chosen", "rejected": "rejected"}\'.'},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Cut longer prompts to their last N tokens (TRL 1.16 removed this option)."},
    )
    skip_bad_rows: bool = field(
        default=False, metadata={"help": "Skip malformed rows (listed in output_dir/skipped_rows.jsonl) instead of failing."}
    )
    chat_template_path: str | None = field(
        default=None, metadata={"help": "A Jinja chat template file (or tokenizer folder) for a model without one."}
    )
    eval_before_train: bool = field(
        default=False, metadata={"help": "Evaluate once before training, for a before/after table."}
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
            bad = set(self.column_map) - {"prompt", "chosen", "rejected", "system"}
            if not isinstance(self.column_map, dict) or bad:
                raise SystemExit(f"column_map keys must be among prompt, chosen, rejected, system; got {sorted(bad)}")


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


def parse_args(argv: list[str] | None = None, trainer_config=DPOConfig, default_recipe: Path = DEFAULT_RECIPE):
    """Parse `--config recipe.yaml` plus overrides into (ScriptArguments, DPOConfig, ModelConfig).

    With no --config the embedded tiny recipe is used. Keys no config knows fail, naming the recipe line or
    the flag and a likely fix. train_sft.py passes trainer_config=SFTConfig and the tiny SFT recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(default_recipe)] + argv
    recipe = argv[argv.index("--config") + 1]
    if not Path(recipe).is_file():
        raise SystemExit(f"recipe not found: {recipe} (recipes live in recipes/, e.g. --config recipes/tiny.yaml)")
    parser = TrlParser((_script_arguments_for(trainer_config), trainer_config, ModelConfig))
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
    if messages:
        raise SystemExit("\n".join(messages))
    return script_args, training_args, model_args


# ---------------------------------------------------------------------------------------------- secrets


def load_env(path: str | Path = ".env") -> None:
    """Read HF_TOKEN, WANDB_API_KEY, ... from .env (never printed); the shell's own values win."""
    from dotenv import load_dotenv

    load_dotenv(path, override=False)


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
    """Mask secret values in every log record, whichever library emits it."""
    secrets = [os.environ[n] for n in SECRET_NAMES if len(os.environ.get(n, "")) >= 8]
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
