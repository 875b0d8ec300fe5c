"""The run's arguments: a YAML recipe plus command-line overrides -> (ScriptArguments, DPOConfig, ModelConfig).

The entry points' one door: `parse_args` refuses unknown keys (fastdpo.recipes) and values that cannot work
(fastdpo.settings) before any data or model is loaded; `load_env` and `redact_logs` keep secrets out of logs and
arguments (fastdpo.credentials); `given_keys` and `describe` log what the run set.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from pathlib import Path

# TRL 1.16's configs default `gradient_checkpointing` (transformers 5.23's deprecated alias of
# `activation_checkpointing`), so transformers warned about the old name on every run, set by the user or not.
# The two names are mirrored both ways; TRL still reads the old one, which is why the recipes use it.
warnings.filterwarnings("ignore", message="`gradient_checkpointing(_kwargs)?` is deprecated", category=FutureWarning)
# DeepSpeed 0.19.8's ZeRO-3 calls torch 2.13's deprecated collectives on every step: 1,250 FutureWarnings (two
# lines each) in a 40-step job log. Drop the filter when DeepSpeed moves to the *_single names.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                        "deprecated", category=FutureWarning)

from trl import DPOConfig as TRLDPOConfig  # noqa: E402
from trl import ModelConfig, TrlParser  # noqa: E402

from .credentials import check_secrets  # noqa: E402
from .credentials import load_env as load_env  # noqa: E402  (re-exported: the entry points call cfg.load_env)
from .credentials import redact_logs as redact_logs  # noqa: E402
from .layouts import check_column_map, parse_codes  # noqa: E402
from .mixture import RECIPE_KEYS, Mixture, read_recipe  # noqa: E402
from .recipes import DEFAULT_RECIPE, RENAMED, Where, argument_error, explain_unknown  # noqa: E402
from .recipes import DEFAULT_SFT_RECIPE as DEFAULT_SFT_RECIPE  # noqa: E402
from .recipes import describe as describe  # noqa: E402
from .recipes import given_keys as given_keys  # noqa: E402
from .settings import check_settings  # noqa: E402


@dataclass
class DPOConfig(TRLDPOConfig):
    """TRL's DPOConfig with the fast path on by default (fastdpo.trainer implements it; TRL 1.16 disables
    padding_free) and the knobs it adds. Each fast piece is checked against the stock path in tests/parity/
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
        metadata={"help": "Packing scheme: auto (the fastest the start-up probe finds exact on the model), "
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
                  '"bad"}\'. Most layouts are detected without it (docs/data.md).'},
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
    mixture: str | None = field(
        default=None,
        metadata={"help": "Set from the recipe's datasets:, dataset_mixture: and eval_datasets: keys (several sources "
                  "by count or weight, docs/mixtures.md); not a flag."},
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
            problem = check_column_map(self.column_map)
            if problem:
                raise SystemExit(problem)
        if isinstance(self.judged_codes, str):
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



def valid_keys(trainer_config=DPOConfig) -> set[str]:
    return {f.name for cls in (ScriptArguments, trainer_config, ModelConfig) for f in fields(cls)}


def parse_args(argv: list[str] | None = None, trainer_config=DPOConfig, default_recipe: Path = DEFAULT_RECIPE,
               check_paths: bool = True, mixture: bool = True):
    """Parse `--config recipe.yaml` plus overrides into (ScriptArguments, DPOConfig, ModelConfig).

    With no --config the embedded tiny recipe is used. Keys no config knows fail, naming the recipe line or
    the flag and a likely fix. train_sft.py passes trainer_config=SFTConfig and the tiny SFT recipe.
    Values that cannot work, or would train silently wrong, fail here too (fastdpo.settings), before any data
    or model is loaded; `check_paths=False` skips the local-path checks (parsing a recipe whose model is an
    earlier stage's output folder). A recipe's mixture (datasets:, dataset_mixture:, eval_datasets:) is read by
    fastdpo.mixture and set as script_args.mixture, its plain plan; `mixture=False` leaves it out (the analyzer
    given one dataset).
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
    except ValueError as e:  # a config's own check (bf16 on CPU, ...): an unknown key is the likelier cause
        why = str(e).rstrip(".")
        if "bf16/gpu" in why:
            why = "bf16 needs a GPU here: on a machine without one set use_cpu: true (recipes/tiny.yaml does)"
        raise SystemExit(_unknown_before(recipe, argv, trainer_config) or f"{recipe}: {why}") from None
    mix, messages = read_recipe(recipe)
    messages += _unknown(recipe, from_recipe, from_cli, trainer_config)
    messages += _combinations(recipe, script_args, training_args, model_args)
    where = Where(recipe, argv)
    if mix is not None and mixture and not messages:
        messages += _with_mixture(where, mix, script_args, trainer_config)
    if not messages:  # values are only worth checking once every key is known
        messages += check_settings(where, script_args, training_args, model_args, check_paths)
        messages += check_secrets(where, script_args, training_args, model_args)
    if messages:
        raise SystemExit("\n".join(messages))
    return script_args, training_args, model_args


def _unknown(recipe: str, from_recipe: list[str], from_cli: list[str], trainer_config) -> list[str]:
    """What the parser left over: unknown keys (recipe or command line) and stray arguments."""
    bad_recipe = [s[2:] for s in from_recipe if s.startswith("--") and s[2:] not in RECIPE_KEYS]
    bad_cli = [s.lstrip("-").split("=")[0] for s in from_cli if s.startswith("-")]
    messages = []
    valid = valid_keys(trainer_config)
    if bad_recipe:
        messages.append(explain_unknown(bad_recipe, "recipe", recipe, valid, trainer_config.__name__))
    if bad_cli:
        messages.append(explain_unknown(bad_cli, "cli", recipe, valid, trainer_config.__name__))
    if from_cli and not bad_cli:
        messages.append(f"command line: unexpected argument(s) {from_cli}; flags look like --max_steps 10")
    return messages


def _unknown_before(recipe: str, argv: list[str], trainer_config) -> str:
    """Unknown keys, found without the parser (a config refused the values before its leftovers came back)."""
    valid = valid_keys(trainer_config) | set(RECIPE_KEYS)
    in_recipe = [k for k in given_keys(["--config", recipe]) if k not in valid]
    flags = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0][2:] not in valid | {"config"}]
    return "\n".join(_unknown(recipe, [f"--{k}" for k in in_recipe], flags, trainer_config))


def _combinations(recipe: str, script_args, training_args, model_args) -> list[str]:
    """Keys that are valid alone and refused here: a token in the arguments, merge_adapter without its adapter."""
    messages = []
    if getattr(training_args, "hub_token", None):
        messages.append(f"{recipe}: hub_token: {RENAMED['hub_token']}")
    if script_args.merge_adapter and not model_args.use_peft:
        messages.append(f"{recipe}: merge_adapter: true needs use_peft: true (there is no adapter to merge)")
    if script_args.merge_adapter and training_args.push_to_hub:
        messages.append(f"{recipe}: merge_adapter with push_to_hub would upload the adapter and the merged model "
                        "into one repo; push the merged output_dir afterwards with `hf upload`")
    return messages


# Single-source keys that a mixture sets per entry, or otherwise.
PER_SOURCE = {
    "dataset_name": "dataset_name names one source, datasets: several; keep one",
    "dataset_config": "set name: (TRL) or config: on the entry", "dataset_train_split": "set split: on the entry",
    "max_train_samples": "set count: N on the entry",
    "eval_dataset_name": "name the eval sets with eval_datasets: [{path: ...}]",
    **{k: "set it on each entry it applies to" for k in ("column_map", "ranked_pairs", "judged_pairs", "annotators",
                                                         "judged_label", "judged_codes")},
}


def _with_mixture(where: Where, mix, script_args, trainer_config) -> list[str]:
    """The recipe's mixture as script_args.mixture (its plain plan), or why it cannot be: keys that name one source,
    the handbook form's split and seed given twice, a trainer that reads one source."""
    place = f"{where.recipe}:{min(mix.given.values())}"

    def given(key):  # top-level keys only: an entry's own column_map is not the recipe's
        return key in where.cli or key in mix.top

    def at(key):
        return f"command line (--{key})" if key in where.cli else f"{where.recipe}:{mix.top[key]}"

    if not any(f.name == "beta" for f in fields(trainer_config)):
        return [f"{place}: a mixture trains DPO (train_dpo.py); SFT reads one dataset_name"]
    if given("mixture"):
        return [f"{at('mixture')}: mixture: is set from datasets: (docs/mixtures.md); write the sources there"]
    if not mix.sources:
        return [f"{place}: eval_datasets: names eval sets of a mixture; list its sources in datasets:, or use "
                "eval_dataset_name for one source"]
    bad = [f"{at(k)}: {k}: with a mixture ({place}): {fix}" for k, fix in PER_SOURCE.items() if given(k)]
    if mix.evals and given("dataset_test_split"):
        bad.append(f"{at('dataset_test_split')}: dataset_test_split: with eval_datasets: the eval sets are named "
                   "there; drop one")
    for key, value, own in (("dataset_test_split", mix.test_split, "test_split_size"),
                            ("dataset_seed", mix.seed, "seed")):
        if value is None or key in where.cli:
            continue  # a flag overrides the recipe
        if given(key):
            bad.append(f"{at(key)}: {key}: and the mixture's {own} ({place}) both set it; keep one")
        setattr(script_args, key, value)
    script_args.mixture = Mixture.of(mix).plain()
    return bad
