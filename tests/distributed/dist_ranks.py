"""Run by tests/parity/test_parity.py under 2 processes (DDP or DeepSpeed ZeRO-2, CPU): train the tiny model a few steps
on the fast path and save this rank's weights and losses, so the test can check that the ranks agree. ZeRO-2, then DDP:

    accelerate launch --config_file accelerate_config.yaml --num_processes 2 tests/distributed/dist_ranks.py OUT
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/dist_ranks.py OUT
The recipe sets use_cpu (gloo); `accelerate launch --cpu --num_processes 2` would start only one process.
"""

import json
import logging
import sys
from pathlib import Path

import torch

from fastdpo import config as cfg
from fastdpo import data, models
from fastdpo.trainer import DPOTrainer


def main(out: Path, steps: int = 4):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    script_args, args, model_args = cfg.parse_args([
        "--output_dir", str(out), "--max_steps", str(steps), "--logging_steps", "1", "--eval_before_train", "false",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--token_budget", "256",
        "--max_train_samples", "64", "--ref_logps_cache_dir", str(out / "ref_cache"), "--report_to", "none",
        "--use_cpu", "true", "--save_strategy", "no"])
    tok = models.load_tokenizer(model_args.model_name_or_path)
    pairs = data.load_pairs(script_args)
    ds, _ = data.tokenize_dataset(pairs.train, tok, args.max_length, script_args.max_prompt_length)
    said = []  # this rank's fastdpo log lines: the fast path announces itself
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("fastdpo").addHandler(handler)
    trainer = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=ds,
                         processing_class=tok)
    logging.getLogger("fastdpo").removeHandler(handler)
    assert any(line.startswith("fast path: ") for line in said), f"fast path expected: {said}"
    trainer.train()
    rank = trainer.args.process_index
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    state = {k: v.detach().cpu().clone() for k, v in weights.items()}
    torch.save(state, out / f"rank{rank}.pt")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": losses, "world": trainer.args.world_size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
