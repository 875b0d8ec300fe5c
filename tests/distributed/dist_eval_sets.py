"""Run by tests/e2e/test_eval_per_source.py under `torchrun --nproc_per_node 2` (CPU, gloo): eval sets by name on two
ranks. Trains the embedded tiny model 2 steps with two named eval sets (24 and 8 held-out pairs, 4 a rank a batch:
every batch whole on both ranks, so no pair is repeated to even them out), then writes OUT/rank{r}.json with the
named evaluation, each set evaluated alone, and all 32 pairs evaluated as one set at one pair a rank a batch.

    torchrun --nproc_per_node 2 tests/distributed/dist_eval_sets.py OUT [--precompute_ref_log_probs false]
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402
from datasets import concatenate_datasets  # noqa: E402

from fastdpo import config as cfg  # noqa: E402
from fastdpo import data, models  # noqa: E402
from fastdpo.trainer import DPOTrainer  # noqa: E402
from tests.helpers import evaluate_alone  # noqa: E402


def main(out: Path, extra: list[str]) -> None:
    script_args, args, model_args = cfg.parse_args([
        "--output_dir", str(out / "run"), "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no",
        "--eval_before_train", "false", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", *extra])
    tok = models.load_tokenizer(model_args.model_name_or_path)
    pairs = data.load_pairs(script_args)
    train, _ = data.tokenize_dataset(pairs.train.select(range(32)), tok, args.max_length,
                                     script_args.max_prompt_length)
    held, _ = data.tokenize_dataset(pairs.eval.select(range(32)), tok, args.max_length,
                                    script_args.max_prompt_length, name="eval")
    trainer = DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=train,
                         eval_dataset={"a": held.select(range(24)), "b": held.select(range(24, 32))},
                         processing_class=tok)
    trainer.train()
    every = concatenate_datasets(list(trainer.eval_dataset.values()))
    result = {"named": trainer.evaluate(),
              "alone": {name: evaluate_alone(trainer, ds) for name, ds in trainer.eval_dataset.items()},
              "pooled": evaluate_alone(trainer, every, batch_size=1)}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
