"""Run by test_sharded.py under `torchrun --nproc_per_node 2` (CPU, gloo): train tiny models a few steps on
the fast path under one backend and save, per rank, the per-step losses, this rank's own loss sums, what its log
says (the fast path taken, the packing scheme the probe chose, the reference pass's one-token forwards) and the full
trained weights (gathered from the shards), so the test can compare backends and ranks.

    torchrun --nproc_per_node 2 tests/distributed/dist_sharded.py OUT BACKEND MODEL_DIR [MODEL_DIR ...]
BACKEND: ddp | zero2 | zero3 | fsdp2 (TrainingArguments' own `deepspeed=` / `fsdp=` options, no accelerate config).
By hand: DIST_EXTRA="--flag value ..." adds training flags (e.g. --precompute_ref_log_probs false); DIST_STOCK=1
trains stock TRL instead (with DIST_EXTRA="--padding_free false --precompute_ref_log_probs false"), to tell a backend's
own difference from the fast path's.
On a machine with 2+ GPUs the same script runs on CUDA (NCCL, accelerate's own FSDP/DeepSpeed set-up): the check
this repo could not run (CLAUDE.md).
MODEL_DIR: a saved tiny model (tests/archs.py): loading it with from_pretrained gives every backend the same initial
weights (a model built by from_config under ZeRO-3 is initialised inside deepspeed.zero.Init, with other values).
"""

import json
import logging
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastdpo import checkpoints, data, models, tiny  # noqa: E402
from fastdpo import config as cfg  # noqa: E402
from fastdpo.trainer import DPOTrainer  # noqa: E402


class Lines(logging.Handler):
    """This rank's fastdpo log lines, as a user reads them."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


BACKENDS = {
    "ddp": [],
    "zero2": ["--deepspeed", str(ROOT / "ds_config.json")],
    "zero3": ["--deepspeed", str(ROOT / "ds_config_zero3.json")],
    "fsdp2": ["--fsdp", "full_shard auto_wrap", "--fsdp_config", json.dumps({"version": 2})],
}
STEPS = 4
CPU = torch.cuda.device_count() < 2


def fsdp_on_cpu() -> None:
    """accelerate 1.15 selects FSDP only for GPU-like devices: with use_cpu an FSDP plugin is dropped and the run is
    plain multi-CPU DDP (distributed_type MULTI_CPU). torch's fully_shard itself runs on CPU with gloo, so keep the
    plugin the Trainer passes and mark the state FSDP, as accelerate does on GPUs."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def sharded_share(trainer) -> float:
    """Elements of the trained model this rank holds, over the model's: 1.0 unsharded, ~1/world when sharded."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):  # ZeRO-3: the rank's partition
            local, total = local + p.ds_tensor.numel(), total + p.ds_numel
        elif hasattr(p, "to_local"):  # FSDP2: a DTensor
            local, total = local + p.to_local().numel(), total + p.numel()
        else:
            local, total = local + p.numel(), total + p.numel()
    return local / total


def full_weights(trainer) -> dict:
    """Every parameter whole, on CPU, whatever the backend shards."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if getattr(trainer, "is_deepspeed_enabled", False) and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    out = {}
    for n, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):  # FSDP2: a DTensor shard
            t = t.full_tensor()
        out[n] = t.detach().cpu().clone()
    return out


def train(out: Path, backend: str, model_dir: Path) -> None:
    out = out / model_dir.name
    script_args, args, model_args = cfg.parse_args([
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_steps", str(STEPS),
        "--logging_steps", "1",
        "--eval_before_train", "false", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--token_budget", "256", "--max_train_samples", "63",
        # one pair per reference micro-batch at most (budget 2 x longest), 32 pairs on rank 0 and 31 on rank 1: the
        # ranks' reference passes need different forward counts, which sharded backends must even out
        "--precompute_ref_batch_size", "1", "--learning_rate", "1e-3",
        "--gradient_checkpointing", "true", "--ref_logps_cache_dir", str(out / "ref_cache"),
        "--report_to", "none", "--use_cpu", str(CPU).lower(), "--save_strategy", "no", *BACKENDS[backend],
        *os.environ.get("DIST_EXTRA", "").split()])
    tok = models.load_tokenizer(tiny.MODEL_ID)
    ds, _ = data.tokenize_dataset(data.load_pairs(script_args).train, tok, args.max_length,
                                  script_args.max_prompt_length)
    if backend == "fsdp2" and CPU:
        fsdp_on_cpu()
    if backend == "zero3" and CPU:
        # On GPUs accelerate's PartialState starts deepspeed.comm; with use_cpu it does not, and zero.Init would
        # then size its batch check for one process ("train_batch_size is not equal to ... 16 != 4 * 2 * 1").
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    # loaded after the arguments: under ZeRO-3 from_pretrained then loads it partitioned (deepspeed.zero.Init), as
    # for a model too big for one rank
    model = models.load_model(model_args, args)
    # share of the weights this rank holds right after loading (ZeRO-3: only what zero.Init left unpartitioned)
    loaded = sum(p.numel() for p in model.parameters()) / sum(getattr(p, "ds_numel", p.numel())
                                                                for p in model.parameters())
    from fastdpo.trainer import StockDPOTrainer
    cls = StockDPOTrainer if os.environ.get("DIST_STOCK") else DPOTrainer
    extra = {"ref_model": models.load_model(model_args, args)} if os.environ.get("DIST_STOCK") else {}
    log = Lines()
    logging.getLogger("fastdpo").addHandler(log)
    try:
        trainer = cls(model=model, **extra, args=args, train_dataset=ds, processing_class=tok)
    finally:
        logging.getLogger("fastdpo").removeHandler(log)
    text = "\n".join(log.lines)
    fast = "fast path: " in text
    scheme = re.search(r"packing probe: (.+) scheme matches the padded path", text)
    padding = re.search(r"(\d+) one-token forwards on this rank", text)
    local = []
    step = trainer.training_step

    def recording(*a, **k):
        loss = step(*a, **k)
        local.append(float(loss))
        return loss

    trainer.training_step = recording
    trainer.train()
    rank = args.process_index
    torch.save(full_weights(trainer), out / f"rank{rank}.pt")
    if backend == "fsdp2":  # the final save gathers the shards into one model folder (fastdpo.checkpoints)
        checkpoints.Run(out, script_args, args, model_args).save_model(trainer, out / "final")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "local": local,
        "fast": fast, "scheme": scheme[1] if fast and scheme else None,
        "world": args.world_size, "loaded_share": loaded, "share": sharded_share(trainer),
        "ref_pass": {"even_padding": int(padding[1]) if padding else 0},
        "distributed_type": str(trainer.accelerator.distributed_type)}))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for folder in sys.argv[3:]:
        train(Path(sys.argv[1]), sys.argv[2], Path(folder))
