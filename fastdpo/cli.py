"""The `fastdpo` command and the training scripts' command line: short help, `--config=FILE`, one-line errors.

    fastdpo train [--config recipes/x.yaml] [--flag value ...]      # = python train_dpo.py ...
    fastdpo sft ...                                                 # = python train_sft.py ...
    fastdpo analyze [data.jsonl] [--recipe recipes/x.yaml] ...      # = python scripts/analyze_dataset.py ...
    fastdpo evaluate OUTPUT_DIR [...]                               # = python scripts/evaluate.py ...

Each command runs the checkout's own script (an editable install, `pip install -e .`, points here), so the two
spellings are one code path with the same flags. `--help` shows the script's own options and the most-used
TRL/transformers ones, by group; `--help-all` lists all of them (about a thousand lines).

Only the standard library is imported at the top: the entry points import this module first, so that a Ctrl-C
during their imports (torch, TRL: seconds) stops with one line instead of a traceback through importlib.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import runpy
import signal
import sys
from pathlib import Path

logger = logging.getLogger("fastdpo")

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "train": ("train_dpo.py", "DPO training from a YAML recipe plus flags"),
    "sft": ("train_sft.py", "supervised fine-tuning, the stage before DPO (same recipes and flags)"),
    "analyze": ("scripts/analyze_dataset.py", "token lengths of a dataset: choose max_length and the batch"),
    "evaluate": ("scripts/evaluate.py", "score a run on the pairs it held out (loss, accuracy, margins, KL)"),
}
_invoked_as: str | None = None  # "fastdpo train" when main() runs the script; the help's usage line says so

# The options a first run touches, by group: (title, [names]); every other option is in --help-all.
DPO_GROUPS = (
    ("data (fastdpo)", ["dataset_name", "dataset_test_split", "eval_dataset_name", "max_train_samples", "column_map",
                        "skip_bad_rows", "max_prompt_length", "chat_template_path"]),
    ("model (TRL ModelConfig)", ["model_name_or_path", "dtype", "attn_implementation", "use_peft", "lora_r",
                                 "lora_alpha", "load_in_4bit"]),
    ("DPO (TRL DPOConfig)", ["beta", "loss_type", "max_length", "padding_free", "precompute_ref_log_probs"]),
    ("optimisation (transformers)", ["learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                                     "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                                     "gradient_checkpointing", "bf16", "use_cpu", "seed"]),
    ("output, checkpoints, tracking", ["output_dir", "save_strategy", "save_steps", "save_total_limit",
                                       "logging_steps", "eval_strategy", "report_to", "push_to_hub", "hub_model_id"]),
    ("run (fastdpo)", ["eval_before_train", "allow_changed_run", "merge_adapter"]),
)
SFT_GROUPS = (
    DPO_GROUPS[0][:1] + ([n for n in DPO_GROUPS[0][1] if n != "max_prompt_length"],),
    DPO_GROUPS[1],
    ("SFT (TRL SFTConfig)", ["max_length", "packing", "assistant_only_loss", "completion_only_loss"]),
    *DPO_GROUPS[3:],
)
WIDTH = 120


def stop_on_ctrl_c() -> None:
    """Ctrl-C while an entry point starts (imports, reading the recipe): one line and exit 130 (fastdpo.preemption's
    INTERRUPTED_EXIT_CODE; not imported here, it imports torch), not a traceback. PreemptionCallback takes SIGINT
    over when it is created. A process started with SIGINT ignored (`cmd &` in a script) keeps ignoring it."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def stop(signum, frame):
        os.write(2, b"stopped (Ctrl-C) while starting: nothing was written\n")
        raise SystemExit(130)

    signal.signal(signal.SIGINT, stop)


# --------------------------------------------------------------------------- the training scripts' command line


def parse_training(doc: str | None, **parse_kwargs):
    """train_dpo.py's and train_sft.py's argument handling around `fastdpo.config.parse_args`: `--help` prints the
    short help (`doc`'s first paragraph, then the groups above), `--help-all` the full one; `--config=FILE` becomes
    `--config FILE` in sys.argv itself (config.given_keys reads sys.argv)."""
    from . import config as cfg  # imported here: TRL takes seconds, and a Ctrl-C during it is handled above

    argv = normalise(sys.argv[1:])
    sys.argv[1:] = argv
    trainer_config = parse_kwargs.get("trainer_config", cfg.DPOConfig)
    if "--help-all" in argv:
        cfg.parse_args(["--help"], **parse_kwargs)  # argparse prints every option and exits 0
    if "--help" in argv or "-h" in argv:
        sft = trainer_config is not cfg.DPOConfig
        _print(short_help(doc, (cfg.ScriptArguments, trainer_config, cfg.ModelConfig), SFT_GROUPS if sft else
                          DPO_GROUPS, parse_kwargs.get("default_recipe", cfg.DEFAULT_RECIPE)))
        raise SystemExit(0)
    script_args, training_args, model_args = cfg.parse_args(argv, **parse_kwargs)
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else parse_kwargs.get(
        "default_recipe", cfg.DEFAULT_RECIPE)
    check_sources(script_args, model_args, argv, recipe)
    return script_args, training_args, model_args


def check_sources(script_args, model_args, argv: list[str], recipe) -> None:
    """The model and data a run names, each an embedded name, a local path or a Hub id this machine can read: one
    line per problem with its place and fix, in seconds, before any model or data loads (fastdpo.hub)."""
    from . import hub, recipes  # imported here: this module stays standard-library at import

    where = recipes.Where(str(recipe), argv)

    def need(key, kind, revision=None):
        value = getattr(model_args if kind == hub.MODEL else script_args, key, None)
        return hub.Need(key, value, kind, revision, where(key))

    data = [need("dataset_name", hub.DATASET), need("eval_dataset_name", hub.DATASET)]
    if getattr(script_args, "mixture", None):
        data = mixture_needs(recipe)
    hub.check([need("model_name_or_path", hub.MODEL, model_args.model_revision)] + data)


def mixture_needs(recipe) -> list:
    """Each source and eval set of a recipe's mixture, as a name to check with its recipe line (`path: json` with
    data_files names no repository: its files are checked when read)."""
    from . import hub, mixture, sources  # imported here: this module stays standard-library at import

    found, _ = mixture.read_recipe(recipe)
    entries = [(f"datasets[{i}]", e) for i, e in enumerate(found.sources)] if found else []
    entries += [(f"eval_datasets[{i}]", e) for i, e in enumerate(found.evals or [])] if found else []
    return [hub.Need(f"{what}.path", e["path"], hub.DATASET, place=f"{recipe}:{e['line']}") for what, e in entries
            if not (e["path"] in sources.BUILDERS and e.get("data_files"))]


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `--help | head` stopped reading: not an error, and no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def normalise(argv: list[str]) -> list[str]:
    """`--config=FILE` -> `--config FILE`; the rest unchanged (argparse reads `--flag=value` itself)."""
    out = []
    for a in argv:
        out += ["--config", a.split("=", 1)[1]] if a.startswith("--config=") else [a]
    return out


def _metavar(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    kind = str(f.type)
    for word, name in (("bool", "BOOL"), ("float", "FLOAT"), ("int", "INT"), ("list", "LIST")):
        if re.search(rf"\b{word}\b", kind):
            return name
    return "STR"


def _summary(f: dataclasses.Field, room: int) -> str:
    """The help's first sentence, cut to `room` characters, then the default: `... (default 0.1)`."""
    text = " ".join(str(f.metadata.get("help", "")).replace("%%", "%").split())
    text = re.split(r"(?<=[a-z0-9)`'])\.\s+(?=[A-Z])", text)[0].rstrip(".")
    default = getattr(f.default, "value", f.default)
    tail = f" (default {default})" if default not in (None, "", [], dataclasses.MISSING) else ""
    room -= len(tail)
    return (text if len(text) <= room else text[:room - 3].rstrip() + "...") + tail


def short_help(doc: str | None, configs, groups, default_recipe) -> str:
    found = {}
    for conf in reversed(configs):  # the first config that has a name wins (ours over TRL's)
        found.update({f.name: f for f in dataclasses.fields(conf)})
    script = Path(sys.argv[0]).name or "train_dpo.py"
    prog = _invoked_as or f"python {script}"
    recipe = os.path.relpath(default_recipe, REPO) if str(default_recipe).startswith(str(REPO)) else default_recipe
    lines = [f"usage: {prog} [--config RECIPE.yaml] [--key value ...]", ""]
    if doc:
        lines += [doc.strip().split("\n\n")[0], ""]
    lines += [f"A recipe's keys are flags too, and a flag overrides the recipe (no --config: {recipe}).",
              "The defaults shown hold where neither the recipe nor a flag sets a key.",
              "Flags take --key value or --key=value; booleans take true/false; a negative number --key=-1e-3.", ""]
    for title, names in groups:
        lines.append(f"{title}:")
        for name in names:
            if name in found:
                left = f"  --{name} {_metavar(found[name])}"
                pad = max(34, len(left) + 2)
                lines.append(f"{left:<{pad}}{_summary(found[name], WIDTH - pad)}")
        lines.append("")
    lines.append(f"All {len(found)} options, with their full help: {prog} --help-all")
    return "\n".join(lines)


def check_hub_access(repo_id: str) -> None:
    """Fail in seconds, not after hours of training, when the push at the end cannot work (both training scripts
    call this before reading any data)."""
    from . import hub  # imported here: this module stays standard-library at import

    logger.info("will push to %s as %s", repo_id, hub.check_push(repo_id))


# ------------------------------------------------------------------------------------------- the fastdpo command


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {what} ({script})" for name, (script, what) in COMMANDS.items())
    return (f"usage: fastdpo COMMAND [flags]\n\n{rows}\n\nEach command takes its script's flags; `fastdpo COMMAND "
            f"--help` lists them.\nCheckout: {REPO}")


def main(argv: list[str] | None = None) -> int:
    global _invoked_as
    stop_on_ctrl_c()
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print(usage())
        return 0 if argv else 2
    command, *rest = argv
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        sys.stderr.write(f"fastdpo: unknown command {command!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                         f"one of {', '.join(COMMANDS)}\n")
        return 2
    script = REPO / COMMANDS[command][0]
    if not script.is_file():
        sys.stderr.write(f"fastdpo {command}: {script} is missing: the command runs the scripts of a checkout; install "
                         "one with `git clone ... && pip install -e <checkout>`\n")
        return 1
    _invoked_as = f"fastdpo {command}"
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(script.parent))  # as `python script.py` has it: the script's folder first
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
