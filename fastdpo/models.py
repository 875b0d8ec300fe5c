"""Model and tokenizer loading shared by training, analysis and evaluation."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
from trl import get_quantization_config

from . import tiny


def resolve(name_or_path: str) -> str:
    """`embedded:tiny-llama` -> its cached folder (built on first use); anything else unchanged."""
    return tiny.materialize_model() if name_or_path == tiny.MODEL_ID else name_or_path


def load_tokenizer(name_or_path: str, chat_template_path: str | None = None, revision: str | None = None):
    tok = AutoTokenizer.from_pretrained(resolve(name_or_path), revision=revision)
    if chat_template_path:
        path = Path(chat_template_path)
        if path.is_dir():
            tok.chat_template = AutoTokenizer.from_pretrained(path).chat_template
        elif path.is_file():
            tok.chat_template = path.read_text()
        else:
            raise SystemExit(f"chat_template_path not found: {chat_template_path}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # DPO pads with it; padded positions are masked out of the loss
    return tok


def torch_dtype(name: str | None):
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def load_model(model_args, training_args):
    """Load the policy; the reference model is built by TRL from the same path (or is the adapter-free base)."""
    quantization = get_quantization_config(model_args)
    if quantization is not None and not torch.cuda.is_available():
        raise SystemExit("load_in_4bit/load_in_8bit (QLoRA) needs a CUDA GPU (bitsandbytes); on CPU use "
                         "--use_peft true without quantization")
    kwargs = dict(
        revision=model_args.model_revision,
        dtype=torch_dtype(model_args.dtype),
        attn_implementation=model_args.attn_implementation,
    )
    if quantization is not None:
        # each process puts its quantised copy on its own GPU
        kwargs.update(quantization_config=quantization, device_map={"": PartialState().local_process_index})
    model = AutoModelForCausalLM.from_pretrained(resolve(model_args.model_name_or_path), **kwargs)
    if training_args.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless with recomputation and transformers warns about it
    return model


def save_merged(model, tokenizer, out, adapter_dir=None) -> None:
    """Fold a trained LoRA adapter into its base and save a plain model folder (what the next stage loads).

    Merges in place, so call it last: the PEFT wrapper is unusable afterwards. Under ZeRO-3 or FSDP the trained
    model's weights are shards (a merge would fold the adapter into this rank's slice only), so the saved adapter
    (`adapter_dir`, written by the collective save) is merged into a fresh full copy of the base instead, on this
    process alone.
    """
    if _sharded(model):
        if adapter_dir is None:
            raise ValueError("the model's weights are sharded (ZeRO-3/FSDP): pass adapter_dir, the saved adapter")
        model = _base_with_adapter(adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sharded(model) -> bool:
    # ds_id: a ZeRO-3 partitioned parameter; DTensor: an FSDP2 shard
    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


def _base_with_adapter(adapter_dir):
    from peft import PeftConfig, PeftModel  # heavy and optional: only to merge a trained adapter

    if is_deepspeed_zero3_enabled():
        # from_pretrained would partition the copy over all ranks (zero.Init, a collective) while only this rank
        # loads it; nothing after the merge needs the ZeRO-3 setting (the trainer's engine keeps its own config)
        unset_hf_deepspeed_config()
    config = PeftConfig.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype="auto",
                                                revision=config.revision)
    return PeftModel.from_pretrained(base, adapter_dir)
