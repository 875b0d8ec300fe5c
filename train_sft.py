"""Supervised fine-tuning with TRL's SFTTrainer: the stage before DPO, same recipes, flags and data sources.

    # laptop CPU, embedded tiny model and SFT data (both kinds of answers; `make demo` runs this, then DPO)
    python train_sft.py
    python train_dpo.py --config recipes/tiny_dpo_after_sft.yaml     # DPO starts from outputs/demo/sft

    # LoRA, merged into a plain model folder the DPO stage can load
    python train_sft.py --use_peft true --merge_adapter true

    # one node, 4 GPUs; Slurm through the shared launcher (ENTRY picks the script, RECIPE the recipe)
    accelerate launch --config_file accelerate_config.yaml train_sft.py --config recipes/my_sft.yaml
    ENTRY=train_sft.py RECIPE=recipes/my_sft.yaml sbatch scripts/dpo_train.sh

Data: a `messages` column (loss on the whole conversation) or `prompt` and `completion` (loss on the completion),
from the same sources as DPO: embedded:tiny-sft, a .jsonl/.json/.parquet/.csv file, a folder or a Hub id.
Flag names are TRL's (SFTConfig, ModelConfig) plus fastdpo.config.ScriptArguments; SFTConfig's own
chat_template_path replaces ours.
"""

import logging
import sys
from pathlib import Path

from fastdpo import cli

cli.stop_on_ctrl_c()  # first: a Ctrl-C during the imports below stops with one line, not a traceback

from fastdpo import config as cfg  # noqa: E402

cfg.load_env()  # before TRL/transformers read HF_TOKEN or WANDB_* from the environment

from trl import SFTConfig, SFTTrainer, get_peft_config  # noqa: E402

from fastdpo import checkpoints, models, ranks, runlock, sft, watchdog  # noqa: E402
from fastdpo.dataspec import DataSpec  # noqa: E402
from fastdpo.exits import exits  # noqa: E402
from fastdpo.logs import setup_logging, use_plain_progress  # noqa: E402
from fastdpo.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback  # noqa: E402

logger = logging.getLogger("fastdpo")


def main(script_args, training_args, model_args):
    is_main = ranks.writes("run", training_args.save_on_each_node)
    preemption = PreemptionCallback()  # SIGUSR1/SIGTERM/Ctrl-C: checkpoint and stop, like train_dpo.py
    setup_logging(is_main)
    cfg.redact_logs()
    watchdog.start()  # a stalled rank dumps its stacks and exits 70 (scripts/_launch.sh retries it)
    if training_args.push_to_hub:  # a push that cannot work fails now, not after training
        cli.check_hub_access(training_args.hub_model_id or training_args.output_dir)
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runlock.acquire(out, training_args.save_on_each_node)  # one run per output_dir; a second one stops here
    logger.info("SFT model %s | data %s | lr %g | max_length %s | peft %s", model_args.model_name_or_path,
                script_args.dataset_name, training_args.learning_rate, training_args.max_length,
                model_args.use_peft)
    run = checkpoints.Run(out, script_args, training_args, model_args)  # as in train_dpo.py

    # The template is set here once; SFTTrainer would apply the path again (and a folder would resize embeddings).
    tokenizer = models.load_tokenizer(model_args.model_name_or_path, training_args.chat_template_path,
                                      model_args.model_revision)
    training_args.chat_template_path = None
    ds = sft.load_sft(DataSpec.of(script_args))
    if "messages" in ds.train.column_names or isinstance(ds.train[0]["prompt"], list):
        if not tokenizer.chat_template:
            raise SystemExit(f"{model_args.model_name_or_path}: the tokenizer has no chat template but the data is "
                             "conversational; set chat_template_path to a Jinja file or a tokenizer folder")
    logger.info("data: %d train rows, %s eval rows, %d skipped", len(ds.train),
                len(ds.eval) if ds.eval is not None else "no", len(ds.skipped.rows))
    run.check_data(ds.train, ds.eval)
    if run.done:
        return

    model = models.load_model(model_args, training_args)
    run.check_space(model, model_args.use_peft, script_args.merge_adapter)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=ds.train,
        eval_dataset=ds.eval,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    use_plain_progress(trainer)

    if run.checkpoint:
        logger.info("resuming from %s", run.checkpoint)
    trainer.add_callback(preemption)
    run.attach(trainer)
    trainer.add_callback(watchdog.Callback())  # last: it reads the save/evaluate decisions of the others
    result = trainer.train(resume_from_checkpoint=run.checkpoint)
    if preemption.preempted:
        logger.warning("preempted at step %d; rerun the same command to resume", trainer.state.global_step)
        sys.exit(PREEMPTED_EXIT_CODE)

    # With merge_adapter the adapter goes to out/adapter and out becomes a plain model folder for the DPO stage.
    saved = run.save_model(trainer, out / "adapter" if script_args.merge_adapter else out)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if ds.eval is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if not saved:
        sys.exit(f"error: the final model is not in {out}; see 'could not write the final model' above")
    if script_args.merge_adapter and is_main:
        models.save_merged(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out, out / "adapter")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    run.finished()
    logger.info("saved to %s", out)


if __name__ == "__main__":
    with exits():  # exit codes and failure notes for scripts/_launch.sh (fastdpo/exits.py)
        main(*cli.parse_training(__doc__, trainer_config=SFTConfig, default_recipe=cfg.DEFAULT_SFT_RECIPE))
