"""Where a run's keys come from: the recipe line or command-line flag that set each one, keys no config knows
explained (a known rename, or the closest valid key), and the keys a run set, for its log."""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "tiny.yaml"
DEFAULT_SFT_RECIPE = DEFAULT_RECIPE.with_name("tiny_sft.yaml")

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
# A mixture's keys are the recipe's, never flags: a list of sources does not fit on a command line.
MIXTURE_FLAG = ("a mixture is written in the recipe (datasets: [{path: ..., count: ...}]; docs/mixtures.md), not "
                "as a flag")
RENAMED.update({key: MIXTURE_FLAG for key in ("datasets", "dataset_mixture", "eval_datasets", "test_split_size")})



def line_of(path: str, key: str) -> str:
    """`path:N`, the recipe line that sets `key`; `path` alone when no line does (or it cannot be read)."""
    try:
        for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if re.match(rf"\s*{re.escape(key)}\s*:", line):
                return f"{path}:{i}"
    except OSError:
        pass
    return path


def explain_unknown(keys: list[str], where: str, recipe: str | None, valid: set[str], trainer_name: str) -> str:
    """One line per unknown key: its place (recipe line or command line) and a known rename or the closest key."""
    lines = []
    for key in keys:
        place = line_of(recipe, key) if recipe and where == "recipe" else "command line"
        hint = RENAMED.get(key)
        if not hint:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = (f"did you mean {close[0]!r}?" if close else
                    f"not a {trainer_name}, ModelConfig or ScriptArguments field")
        lines.append(f"{place}: unknown key {key!r}: {hint}")
    return "\n".join(lines)


# argparse's type names, as a fix says them
EXPECTED = {"float": "a number, e.g. 1e-6", "int": "a whole number", "string_to_bool": "true or false"}


def argument_error(message: str) -> None:
    """argparse's error, as one line with the flag, the value, where it was given and what is expected: the
    training scripts' parser gets this as its `error` (instead of 170 lines of usage, then the error)."""
    flag = re.match(r"argument (--?[\w.-]+)", message)
    flag = flag.group(1) if flag else None
    where = "command line"
    if flag and not any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:]):
        argv = sys.argv[1:]
        recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else "the recipe"
        where, flag = line_of(recipe, flag.lstrip("-")), flag.lstrip("-")  # a recipe value: the key as written
    bad = re.search(r"invalid (\w+) value: '(.*)'$", message)
    if bad:
        text = f"{flag} {bad.group(2)!r}: expected {EXPECTED.get(bad.group(1), bad.group(1))}"
    elif "Truthy value expected" in message:
        value = re.search(r"got (.*?) but expected", message)
        text = f"{flag} {value.group(1)!r}: expected true or false" if value else message
    elif "invalid choice" in message:
        value, options = re.search(r"invalid choice: '?(.*?)'? \(choose from (.*)\)", message).groups()
        text = f"{flag} {value!r}: expected one of {options}"
    elif "expected one argument" in message:
        text = f"{flag} needs a value ({flag} VALUE)"
    else:
        text = message
    sys.stderr.write(f"{where}: {text}\n")
    raise SystemExit(2)


class Where:
    """Where a key got its value: the flag, the recipe line, or the default."""

    def __init__(self, recipe: str, argv: list[str]):
        self.recipe = recipe
        self.cli = {a[2:].split("=")[0] for a in argv if a.startswith("--") and a != "--config"}

    def given(self, key: str) -> bool:
        """Set on the command line or in the recipe (a default asks for nothing)."""
        return key in self.cli or line_of(self.recipe, key) != self.recipe

    def __call__(self, key: str) -> str:
        if key in self.cli:
            return f"command line (--{key})"
        place = line_of(self.recipe, key)
        return place if place != self.recipe else f"default (not set in {self.recipe})"


def given_keys(argv: list[str] | None = None) -> list[str]:
    """The keys a run set: the recipe's, then the command line's (the defaulted recipe when none is given)."""
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
