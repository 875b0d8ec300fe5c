"""DPO post-training with TRL's DPOTrainer, from a YAML recipe with command-line overrides.

    # laptop CPU, embedded tiny model and data (about a minute; same as `make demo`)
    python train_dpo.py

    # one GPU
    python train_dpo.py --config recipes/smollm2_orca.yaml

    # one node, 4 GPUs, DeepSpeed ZeRO-2
    accelerate launch --config_file accelerate_config.yaml train_dpo.py --config recipes/olmo3_think.yaml

    # Slurm, one node or many (see scripts/dpo_train.sh)
    sbatch scripts/dpo_train.sh
    sbatch --nodes=2 scripts/dpo_instruct_train.sh --max_steps 100

    # any flag overrides the recipe; flag names are TRL's (DPOConfig, ModelConfig) plus fastdpo.config.ScriptArguments
    python train_dpo.py --dataset_name data/my_pairs.jsonl --max_steps 50 --output_dir outputs/mine

Secrets (HF_TOKEN, WANDB_API_KEY) are read from .env and never logged or saved.
"""

import json
import logging
import sys
from pathlib import Path

from fastdpo import cli

cli.stop_on_ctrl_c()  # first: a Ctrl-C during the imports below stops with one line, not a traceback

from fastdpo import config as cfg  # noqa: E402

cfg.load_env()  # before TRL/transformers read HF_TOKEN or WANDB_* from the environment

from transformers.trainer_utils import IntervalStrategy  # noqa: E402
from trl import get_peft_config  # noqa: E402

from fastdpo import checkpoints, memory, models, ranks, report, runlock, tokcache, watchdog  # noqa: E402
from fastdpo.dataspec import DataSpec  # noqa: E402
from fastdpo.exits import exits  # noqa: E402
from fastdpo.logs import setup_logging, use_plain_progress  # noqa: E402
from fastdpo.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback  # noqa: E402
from fastdpo.trainer import DPOTrainer  # noqa: E402

logger = logging.getLogger("fastdpo")

TABLE_KEYS = ["eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen",
              "eval_logps/rejected"]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def print_table(before: dict | None, after: dict, names: list[str]) -> None:
    """The held-out metrics before and after training: the overall ones, then each eval set's of a mixture."""
    print("\n| metric (held-out) | before | after |\n|---|---|---|")
    keys = TABLE_KEYS + [k.replace("eval_", f"eval_{name}_", 1) for name in names for k in TABLE_KEYS[:3]]
    for key in keys:
        if key not in after:
            continue
        b = f"{before[key]:.4f}" if before and key in before else "-"
        print(f"| {key} | {b} | {after[key]:.4f} |")
    print()


def main(script_args, training_args, model_args):
    is_main = ranks.writes("run", training_args.save_on_each_node)
    preemption = PreemptionCallback()  # SIGUSR1/SIGTERM/Ctrl-C: checkpoint and stop (Slurm: the job requeues)
    setup_logging(is_main)
    cfg.redact_logs()
    watchdog.start()  # a stalled rank dumps its stacks and exits 70 (scripts/_launch.sh retries it)
    if training_args.push_to_hub:
        cli.check_hub_access(training_args.hub_model_id or training_args.output_dir)
    memory.check_at_start(training_args, model_args)  # on CUDA: a run that cannot fit its GPUs stops here
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runlock.acquire(out, training_args.save_on_each_node)  # one run per output_dir; a second one stops here
    logger.info("resolved configuration (recipe + overrides):\n%s",
                cfg.describe(cfg.given_keys(), script_args, model_args, training_args))
    # The newest complete checkpoint in output_dir, if any; a changed run (learning rate, model, ...) is refused.
    run = checkpoints.Run(out, script_args, training_args, model_args)

    # Data: read, validate, tokenise exactly as TRL would, then truncate (max_prompt_length keeps the prompt end).
    # Done once per data and tokenizer by each node's local main process; a requeue, a resume or another run on
    # the same data memory-maps the cached rows in seconds (fastdpo/tokcache.py). A mixture (datasets: in the
    # recipe) gives one train set and its eval sets by source name, a dict the trainer evaluates one by one.
    tokenizer = models.load_tokenizer(model_args.model_name_or_path, script_args.chat_template_path,
                                      model_args.model_revision)
    prepared = tokcache.prepare(DataSpec.of(script_args, max_length=training_args.max_length), tokenizer,
                                training_args.dataset_num_proc)
    train_ds, eval_ds, data_report = prepared.train, prepared.eval, prepared.report
    if eval_ds is None and training_args.eval_strategy != "no":
        logger.warning("no eval split: eval_strategy %s -> no", training_args.eval_strategy.value)
        training_args.eval_strategy = IntervalStrategy.NO
    run.check_data(train_ds, eval_ds)  # other data than the checkpoint's (or a finished run's) is refused
    if run.done:  # the same command after the run finished: its outputs stay as they are
        return
    if is_main:  # data_report.json, and the rows not trained on with file:line; none left from an earlier run
        report.write(out, data_report, prepared.listings)

    # Model and trainer. The reference model is a frozen copy TRL loads from the same path (or, with LoRA,
    # the base model with the adapter disabled).
    model = models.load_model(model_args, training_args)
    run.check_space(model, model_args.use_peft, script_args.merge_adapter)
    last_checkpoint = run.checkpoint
    # The "before" evaluation runs inside train() (eval_on_start), after DeepSpeed has wrapped the model:
    # evaluate() before train() fails under ZeRO-2 ("ZeRO inference only makes sense with ZeRO Stage 3").
    if script_args.eval_before_train and eval_ds is not None and last_checkpoint is None:
        training_args.eval_on_start = True
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    use_plain_progress(trainer)

    if last_checkpoint:
        logger.info("resuming from %s", last_checkpoint)
    trainer.add_callback(preemption)
    run.attach(trainer)  # marks each checkpoint complete once every rank wrote it
    trainer.add_callback(watchdog.Callback())  # last: it reads the save/evaluate decisions of the others
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    if preemption.preempted:  # the checkpoint is the result; rerunning the same command resumes from it
        logger.info("preempted at step %d; rerun the same command to resume", trainer.state.global_step)
        sys.exit(PREEMPTED_EXIT_CODE)

    before = next((h for h in trainer.state.log_history if h.get("step") == 0 and "eval_loss" in h), None)
    # model (or LoRA adapter), tokenizer, model card; with merge_adapter the adapter goes to out/adapter and out
    # becomes a plain model folder (merged at the end, after evaluation, because merging unwraps the model)
    # a full disk is reported with what is kept, and the metrics below are still written
    saved = run.save_model(trainer, out / "adapter" if script_args.merge_adapter else out)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    after = None
    if eval_ds is not None:
        after = trainer.evaluate()
        trainer.log_metrics("eval", after)
        trainer.save_metrics("eval", after)
    if before is not None:
        trainer.save_metrics("before_eval", {k.replace("eval_", "before_eval_", 1): v for k, v in before.items()})
    if is_main and after is not None:
        print_table(before, after, list(eval_ds) if isinstance(eval_ds, dict) else [])

    if not saved:
        sys.exit(f"error: the final model is not in {out}; see 'could not write the final model' above")
    if script_args.merge_adapter and is_main:
        models.save_merged(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out, out / "adapter")
    if training_args.push_to_hub:  # a mixture's sources are listed in data_report.json, not on the model card
        trainer.push_to_hub(dataset_name=None if script_args.mixture else script_args.dataset_name)
    run.finished()
    logger.info("saved to %s", out)


if __name__ == "__main__":
    with exits():  # exit codes and failure notes for scripts/_launch.sh (fastdpo/exits.py)
        main(*cli.parse_training(__doc__))  # --help, --help-all, --config=FILE (fastdpo/cli.py)
