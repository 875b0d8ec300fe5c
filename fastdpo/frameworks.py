"""The seam with the frameworks: every private name of TRL, transformers, accelerate, DeepSpeed, torch and datasets
that fastdpo uses (a leading underscore, a patched function, an overridden private method) is used here and
nowhere else in the package (tests/unit/test_house.py checks it).

A version bump of one of them re-checks this file: `PRIVATES` lists each name with the version it was checked on
and the test that fails when it moves; tests/unit/test_frameworks.py finds every name in the installed versions in
seconds, and the guard tests check the behaviour that depends on it. At the ground floor: imports nothing from the
package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.models.mixtral import modeling_mixtral
from transformers.tokenization_utils_base import PaddingStrategy, PreTrainedTokenizerBase, TruncationStrategy
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer as TRLDPOTrainer

try:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # another transformers: the per-sequence attention is refused, the probe says why
    ALL_ATTENTION_FUNCTIONS = None


@dataclass(frozen=True)
class Private:
    name: str  # dotted, from the package it belongs to
    checked: str  # the version this repo was last checked against
    guard: str  # the test that fails when it moves (tests/FILE.py::TEST)
    use: str


PRIVATES = [
    Private("trl.DPOTrainer._prepare_dataset", "trl 1.16.0",
            "tests/parity/test_parity.py::test_reference_cache_parity",
            "overridden: tokenised pairs pass through untouched (keep_tokenized)"),
    Private("trl.DPOTrainer._precompute_ref_logps", "trl 1.16.0",
            "tests/e2e/test_refcache.py::test_bad_reference_cache_is_moved_aside_and_recomputed",
            "overridden: the reference pass is fastdpo.refcache's (precompute_ref_logps, stock_ref_logps)"),
    Private("trl.DPOTrainer._precompute_model_hash", "trl 1.16.0",
            "tests/parity/test_parity.py::test_reference_cache_parity",
            "read: TRL's hash of the reference weights keys the reference cache (trl_reference_hash)"),
    Private("trl.DPOTrainer._metrics", "trl 1.16.0",
            "tests/e2e/test_eval_per_source.py::test_per_source_metrics_are_each_set_alone_and_the_overall_is_pooled",
            "read and cleared: each eval set's per-batch metrics, before TRL's log averages them (take_metrics)"),
    Private("transformers.Trainer._memory_tracker", "transformers 5.23.0",
            "tests/e2e/test_eval_per_source.py::test_per_source_metrics_are_each_set_alone_and_the_overall_is_pooled",
            "started and stopped around an evaluation of named sets, as Trainer.evaluate does (memory_tracker)"),
    Private("transformers.Trainer._remove_unused_columns", "transformers 5.23.0",
            "tests/parity/test_parity.py::test_loss_trajectory_parity",
            "called: the token-budget dataloader's columns"),
    Private("transformers.Trainer._train_batch_size", "transformers 5.23.0",
            "tests/parity/test_parity.py::test_loss_trajectory_parity",
            "read: pairs per micro-batch of the stock path"),
    Private("transformers.Trainer._prepare_inputs", "transformers 5.23.0",
            "tests/parity/test_parity.py::test_loss_trajectory_parity", "called: a packed micro-batch to the device"),
    Private("transformers.Trainer._save", "transformers 5.23.0",
            "tests/distributed/test_sharded.py::test_sharded_fast_path_equals_ddp",
            "called: FSDP's gathered final weights"),
    Private("transformers.Trainer._run_epoch", "transformers 5.23.0",
            "tests/e2e/test_train.py::test_a_checkpoint_at_max_steps_resumes_without_another_step",
            "replaced on the instance: a checkpoint at max_steps resumes without a step (skip_training_loop)"),
    Private("transformers.PreTrainedModel._from_config", "transformers 5.23.0",
            "tests/parity/test_parity_arch.py::test_family_parity_bf16", "called: the probe's float32 twin"),
    Private("transformers.PreTrainedModel._tied_weights_keys", "transformers 5.23.0",
            "tests/e2e/test_train.py::test_embedded_default_learns_the_preference",
            "read: the embedded tiny model's weights saved without the tied copy"),
    Private("transformers.PretrainedConfig._attn_implementation", "transformers 5.23.0",
            "tests/parity/test_parity_arch.py::test_family_parity", "read: which attention a model runs"),
    Private("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", "transformers 5.23.0",
            "tests/distributed/test_sharded.py::test_sharded_fast_path_equals_ddp",
            "read: ZeRO-3 switched off while the probe's twin is built whole (outside_zero3)"),
    Private("transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func", "transformers 5.23.0",
            "tests/parity/test_parity_arch.py::test_moe_load_balancing_loss_parity",
            "patched for one forward: the router loss weighted by packed tokens (weighted_load_balancing)"),
    Private("transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS", "transformers 5.23.0",
            "tests/parity/test_parity.py::test_packed_logps_parity",
            "its 'sdpa' entry wrapped: the per-sequence attention (wrap_attention)"),
    Private("trl.DPOConfig.loss_type", "trl 1.16.0", "tests/e2e/test_sft_lora_eval.py::test_loss_types_match_trl",
            "read: the loss types listed in its help text (trl_loss_types)"),
    Private("accelerate.state.GradientState._set_sync_gradients", "accelerate 1.15.0",
            "tests/parity/test_parity.py::test_distributed_parity",
            "called: gradients sync after a slot's last micro-batch"),
    Private("accelerate.Accelerator.gather", "accelerate 1.15.0",
            "tests/parity/test_parity.py::test_distributed_parity",
            "shadowed on the instance for one loss: ragged per-rank metrics (ragged_gather)"),
    Private("torch.distributed.distributed_c10d._get_default_store", "torch 2.13.0",
            "tests/distributed/test_failures.py::test_stopped_and_hung_ranks_end_the_job_with_stacks_and_the_rerun_resumes",
            "called: the watchdog's heartbeats (default_store)"),
    Private("torch.distributed.distributed_c10d._set_pg_timeout", "torch 2.13.0",
            "tests/distributed/test_failures.py::test_stopped_and_hung_ranks_end_the_job_with_stacks_and_the_rerun_resumes",
            "called: a collective gives up no later than the watchdog (set_pg_timeout)"),
    Private("datasets.Dataset._indices", "datasets 5.2.0", "tests/parity/test_parity.py::test_reference_cache_parity",
            "read: a selected dataset is flattened before its Arrow buffers are read (flat)"),
    Private("datasets.Dataset._fingerprint", "datasets 5.2.0",
            "tests/unit/test_layouts.py::test_nested_parquet_and_save_to_disk_go_through_the_same_detection",
            "read: datasets' own fingerprint of a prepared Hub or saved split keys its token cache (fingerprint)"),
    Private("transformers.tokenization_utils_tokenizers.TokenizersBackend._tokenizer", "transformers 5.23.0",
            "tests/unit/test_data.py::test_tokens_identical_to_trl",
            "read: the Rust backend whose encode_batch_fast skips character offsets (fast_encoder)"),
    Private("transformers.tokenization_utils_tokenizers.TokenizersBackend._encode_plus", "transformers 5.23.0",
            "tests/unit/test_data.py::test_tokens_identical_to_trl",
            "compared: a tokenizer that overrides it keeps the ordinary call (fast_encoder)"),
]


# ----------------------------------------------------------------------------------------------------- TRL


def keep_tokenized(trainer, dataset, processing_class, args, dataset_name):
    """DPOTrainer._prepare_dataset: pairs that already carry prompt_ids/chosen_ids/rejected_ids (fastdpo's
    tokenisation, max_prompt_length applied) pass through; tokenising again would be slower and undo that cut."""
    if "prompt_ids" in dataset.column_names:
        return dataset
    return TRLDPOTrainer._prepare_dataset(trainer, dataset, processing_class, args, dataset_name)


def precompute_ref_logps(trainer, dataset, name: str, batch_size: int):
    """DPOTrainer._precompute_ref_logps, which TRL's __init__ and evaluate call with precompute_ref_log_probs:
    answered by the trainer's own `reference_logps`."""
    return trainer.reference_logps(dataset, name, batch_size)


def stock_ref_logps(trainer, dataset, name: str, batch_size: int):
    """TRL's own reference pass (padded), for a trainer on the stock path."""
    return TRLDPOTrainer._precompute_ref_logps(trainer, dataset, name, batch_size)


def trl_reference_hash(trainer) -> str | None:
    """TRL's hash of the reference weights, taken in __init__ before any wrapping or sharding (None when
    precompute_ref_log_probs is off)."""
    return trainer._precompute_model_hash


def take_metrics(trainer, mode: str) -> dict[str, list[float]]:
    """The metrics TRL's loss has appended since its last log ("train" or "eval"), one value per batch (num_tokens:
    one value), taken out as TRL's log takes them: the trainer holds none afterwards."""
    held = trainer._metrics[mode]
    values = {key: list(v) for key, v in held.items()}
    held.clear()
    return values


def trl_loss_types() -> list[str]:
    """The loss_type values TRL's DPOConfig documents in its help text (tests/e2e/test_sft_lora_eval.py pins them)."""
    field = next(f for f in dataclasses.fields(TRLDPOConfig) if f.name == "loss_type")
    return re.findall(r"`'(\w+)'`", field.metadata["help"])


# ---------------------------------------------------------------------------------------------- transformers


def unused_columns_removed(trainer, dataset, description: str):
    return trainer._remove_unused_columns(dataset, description=description)


def memory_tracker(trainer):
    """The Trainer's memory-metrics tracker (skip_memory_metrics); its start() must be called from `evaluate`."""
    return trainer._memory_tracker


def train_batch_size(trainer) -> int:
    return trainer._train_batch_size


def prepare_inputs(trainer, inputs: dict) -> dict:
    return trainer._prepare_inputs(inputs)


def save_weights(trainer, folder: str, state_dict: dict) -> None:
    """Write a model folder from a state dict the caller gathered (what save_model does with its own)."""
    trainer._save(folder, state_dict=state_dict)


def skip_training_loop(trainer) -> None:
    """The next train() runs no epoch: it resumes, then saves and reports, without a step."""
    trainer._run_epoch = lambda *args, **kwargs: None


def from_config(model_class, config, **kwargs):
    """A randomly initialised model of `model_class` (what AutoModel.from_config does for a known class)."""
    return model_class._from_config(config, **kwargs)


def tied_weight_names(model) -> set[str]:
    return set(model._tied_weights_keys or {})


def attn_implementation(model_or_config) -> str | None:
    """The attention implementation a model (or its config) runs: "sdpa", "eager", "flash_attention_2", ..."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "_attn_implementation", None)


@contextlib.contextmanager
def outside_zero3():
    """transformers' ZeRO-3 switch off for a moment: a model built now is whole on this rank (not partitioned by
    deepspeed.zero.Init, which could only run inside an engine) and TRL's fused head does not try to gather its
    plain parameters (`ds_status`)."""
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


@contextlib.contextmanager
def weighted_load_balancing(token_weight: torch.Tensor | None):
    """The MoE load-balancing loss of the forwards inside, with each token weighted by `token_weight` in place of
    the attention mask. TRL's fused head imports the function from its module at call time, so replacing it there
    for the duration of one forward reaches it."""
    if token_weight is None:
        yield
        return
    original = modeling_mixtral.load_balancing_loss_func

    def weighted(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        return original(gate_logits, num_experts, top_k, token_weight)

    modeling_mixtral.load_balancing_loss_func = weighted
    try:
        yield
    finally:
        modeling_mixtral.load_balancing_loss_func = original


def wrap_attention(name: str, wrapper):
    """Put `wrapper` in place of transformers' attention function `name`; returns the function found there before
    (`wrapper` itself when it already is), or None when this transformers has no registry."""
    if ALL_ATTENTION_FUNCTIONS is None:
        return None
    current = ALL_ATTENTION_FUNCTIONS[name]
    if current is not wrapper:
        ALL_ATTENTION_FUNCTIONS[name] = wrapper
    return current


# ------------------------------------------------------------------------------------------------ accelerate


def set_sync_gradients(accelerator, sync: bool) -> None:
    """Whether the next backward reduces gradients across ranks (the Trainer decides it per accumulation slot)."""
    accelerator.gradient_state._set_sync_gradients(sync)


@contextlib.contextmanager
def ragged_gather(accelerator):
    """accelerator.gather for tensors whose first dimension differs between ranks: padded to the largest, gathered,
    the padding dropped (the values an even gather would give). For the calls inside only."""
    if accelerator.num_processes == 1:
        yield
        return
    plain = accelerator.gather

    def gather(tensor):
        if not torch.is_tensor(tensor) or tensor.dim() == 0:
            return plain(tensor)
        sizes = plain(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        chunks = plain(padded).split(max(sizes))
        return torch.cat([c[:n] for c, n in zip(chunks, sizes, strict=True)])

    accelerator.gather = gather  # an instance attribute shadows the method
    try:
        yield
    finally:
        del accelerator.gather


# ----------------------------------------------------------------------------------------------------- torch


def default_store():
    """The process group's key-value store (None without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def set_pg_timeout(timeout) -> None:
    """The default process group's collective timeout (a datetime.timedelta), NCCL and gloo alike."""
    dist.distributed_c10d._set_pg_timeout(timeout)


# -------------------------------------------------------------------------------------------------- datasets


def flat(dataset):
    """The dataset with a selection (select, shuffle) written out, so its Arrow table holds exactly its rows."""
    return dataset.flatten_indices() if getattr(dataset, "_indices", None) is not None else dataset


def fingerprint(dataset) -> str:
    """datasets' own fingerprint of a dataset: its builder config, data files and their revision."""
    return dataset._fingerprint


# ---------------------------------------------------------------------------------------------- tokenizers


def fast_encoder(tokenizer):
    """texts, add_special_tokens -> ids through the Rust backend's `encode_batch_fast` (no character offsets: ~15-20%
    less CPU than `encode_batch`), after the same set-up `tokenizer.__call__` does (no truncation or padding, its
    special-token splitting); None for a tokenizer that customises encoding in Python (`_switch_to_input_mode`, an
    own `_encode_plus` or `__call__`), which must keep the ordinary call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    plain = (isinstance(tokenizer, TokenizersBackend)
             and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
             and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
             and not hasattr(tokenizer, "_switch_to_input_mode") and hasattr(backend, "encode_batch_fast"))
    if not plain:
        return None

    def encode(texts, special):
        tokenizer.set_truncation_and_padding(PaddingStrategy.DO_NOT_PAD, TruncationStrategy.DO_NOT_TRUNCATE,
                                             None, 0, None, None)
        if backend.encode_special_tokens != tokenizer.split_special_tokens:
            backend.encode_special_tokens = tokenizer.split_special_tokens
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=special)]

    return encode
