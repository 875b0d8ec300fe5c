"""The values a run cannot work with, or would train silently wrong with, refused when the recipe is parsed: each as
`place: key: problem; fix`, the place being the recipe line or the flag (fastdpo.recipes.Where).

Checked within seconds of start, because TRL and transformers notice these only after tokenising, loading the model
and the reference pass, if at all (beta 0 trains nothing, a negative beta learns to prefer the rejected answers, and
both finish with exit 0).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from transformers.integrations import get_available_reporting_integrations
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
from trl import DPOConfig as TRLDPOConfig
from trl import __version__ as trl_version

from . import frameworks, hub


def check_settings(where, script_args, training_args, model_args, check_paths: bool = True) -> list[str]:
    """Every value that cannot work, or trains silently wrong, as `place: key: problem; fix` lines;
    `check_paths=False` skips the local-path checks."""
    t, s, m = training_args, script_args, model_args
    dpo = isinstance(t, TRLDPOConfig)  # SFTConfig has a loss_type of its own (nll, dft) and no beta
    bad = _check_optimisation(where, t, dpo)
    if dpo:
        bad += _check_losses(where, t)
        bad += _check_dpo_options(where, t)
    bad += _check_lengths(where, s, t)
    bad += _check_environment(where, t, m)
    if check_paths:
        bad += _check_paths(where, s, t, m)
    return bad


def _check_optimisation(where, t, dpo: bool) -> list[str]:
    """beta, learning rate, batch sizes and the run's length."""
    bad = []

    def fail(key, problem):
        bad.append(f"{where(key)}: {key}: {problem}")

    if dpo and not t.beta > 0:
        effect = "trains nothing (the loss stays at ln 2)" if t.beta == 0 else "learns to prefer the rejected answers"
        fail("beta", f"{t.beta} {effect}; "
             "use beta > 0 (TRL's default 0.1; the OLMo 3 recipes use 5 with loss_type sigmoid_norm)")
    if not t.learning_rate > 0:
        effect = "trains nothing" if t.learning_rate == 0 else "climbs the loss instead of descending it"
        fail("learning_rate", f"{t.learning_rate} {effect}; "
             "use a positive value (about 1e-6 for a 7B SFT model, 5e-6 for a small one); to only evaluate a model "
             "use scripts/evaluate.py")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(t, key) < 1:
            fail(key, f"{getattr(t, key)}; it must be at least 1")
    if t.max_steps == 0 or t.max_steps < -1:
        fail("max_steps", f"{t.max_steps}; use a positive number of optimizer steps, or -1 to train num_train_epochs")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        fail("num_train_epochs", f"{t.num_train_epochs} trains nothing; use a positive value (or set max_steps)")
    if t.warmup_steps < 0:
        fail("warmup_steps", f"{t.warmup_steps}; use a step count, or a float below 1 for a ratio (0.1)")
    return bad


def _check_losses(where, t) -> list[str]:
    """DPO's loss types, their weights, and the options some of them refuse."""
    bad = []

    def fail(key, problem):
        bad.append(f"{where(key)}: {key}: {problem}")

    known = frameworks.trl_loss_types()
    unknown = [x for x in t.loss_type if known and x not in known]
    if unknown:
        hints = [f"{x!r} (did you mean {difflib.get_close_matches(x, known, n=1)[0]!r}?)"
                 if difflib.get_close_matches(x, known, n=1) else repr(x) for x in unknown]
        fail("loss_type", f"unknown {', '.join(hints)}; TRL {trl_version} knows {', '.join(known)}")
    if t.loss_weights is not None and len(t.loss_weights) != len(t.loss_type):
        fail("loss_weights", f"{t.loss_weights} has {len(t.loss_weights)} weights for {len(t.loss_type)} loss "
             f"types {t.loss_type}; give one weight per loss type")
    if "exo_pair" in t.loss_type and t.label_smoothing == 0:
        fail("label_smoothing", "0 with loss_type exo_pair, which TRL refuses; use 1.0e-3 (the EXO paper's value)")
    if t.use_weighting and {"aot", "aot_unpaired"} & set(t.loss_type):
        fail("use_weighting", "true with loss_type aot/aot_unpaired, which sort pairs and so cannot weight them; "
             "set use_weighting: false")
    return bad


def _check_lengths(where, s, t) -> list[str]:
    bad = []
    max_length = getattr(t, "max_length", None)
    if max_length is not None and max_length < 1:
        bad.append(f"{where('max_length')}: max_length: {max_length}; use the token length that covers your pairs "
                   "(scripts/analyze_dataset.py)")
    mpl = getattr(s, "max_prompt_length", None)
    if mpl is not None and max_length and mpl >= max_length:
        bad.append(f"{where('max_prompt_length')}: max_prompt_length: {mpl} leaves no room for answers within "
                   f"max_length {max_length}; use at most about half of it (e.g. {max_length // 2}), or raise "
                   "max_length")
    elif mpl is not None and mpl < 1:
        bad.append(f"{where('max_prompt_length')}: max_prompt_length: {mpl}; use a positive token count, or leave it "
                   "unset")
    return bad


def _check_environment(where, t, m) -> list[str]:
    """What this machine and environment lack: a GPU for QLoRA, the trackers report_to names."""
    bad = []
    if (m.load_in_4bit or m.load_in_8bit) and not torch.cuda.is_available():
        key = "load_in_4bit" if m.load_in_4bit else "load_in_8bit"
        bad.append(f"{where(key)}: {key}: QLoRA needs a CUDA GPU (bitsandbytes); on CPU use --use_peft true without "
                   "quantization")
    for name in t.report_to:
        if name in ("none", "all") or name in get_available_reporting_integrations():
            continue
        if name in INTEGRATION_TO_CALLBACK:
            bad.append(f"{where('report_to')}: report_to: {name} is not installed in this environment; pip install "
                       f"{name}, or drop it")
        else:
            close = difflib.get_close_matches(name, list(INTEGRATION_TO_CALLBACK), n=1)
            bad.append(f"{where('report_to')}: report_to: unknown tracker {name!r}"
                       f"{f' (did you mean {close[0]!r}?)' if close else ''}; this repo uses tensorboard, wandb or "
                       "trackio")
    return bad


# transformers' samplers that DPO pairs cannot use. Both infer lengths from an `input_ids` column, which pairs do
# not have, so the stock path (padding_free: false, or a logged fallback) and evaluation fail with "Can only
# automatically infer lengths" after the model and the reference pass are loaded.
UNSUPPORTED_ORDERS = {
    "group_by_length": "it groups pairs by length to cut padding, which packed rows do not have (padding "
                       "efficiency 1.000 without it)",
    "batch_rebalance": "it gives micro-batches different pair counts, so a pair weighs 1/(accumulation x its "
                       "micro-batch's size), another objective than the other orders; token_budget already packs "
                       "each step's micro-batches by tokens",
}
# Our DPOConfig's options that only the padding-free path reads, and the values that ask for something.
PACKED_ONLY = {"token_budget": lambda v: v is not None, "packed_layout": lambda v: v != "auto",
               "prefix_sharing": lambda v: v, "ref_logps_cache_dir": lambda v: v is not None}


def _check_dpo_options(where, t) -> list[str]:
    """Options that would be accepted and then ignored, or do something other than they say."""
    bad = []
    order = t.train_sampling_strategy
    if order in UNSUPPORTED_ORDERS:
        bad.append(f"{where('train_sampling_strategy')}: train_sampling_strategy: {order} is not offered for DPO: "
                   "transformers' sampler for it infers lengths from input_ids, which pairs do not have, and "
                   f"{UNSUPPORTED_ORDERS[order]}; use random (the default) or sequential")
    if where.given("length_column_name"):
        bad.append(f"{where('length_column_name')}: length_column_name: read only by train_sampling_strategy "
                   "group_by_length or batch_rebalance, which DPO here does not offer; drop it")
    if t.sync_ref_model and t.precompute_ref_log_probs:  # TRL raises this only after loading model and data
        bad.append(f"{where('sync_ref_model')}: sync_ref_model: true updates the reference during training, so "
                   "reference log-probs computed once (precompute_ref_log_probs: true, this repo's default) would be "
                   "stale; set precompute_ref_log_probs: false")
    if not hasattr(t, "token_budget"):  # TRL's own DPOConfig (scripts/benchmark.py's stock runs): no packed path
        return bad
    if t.padding_free and t.include_num_input_tokens_seen != "no":
        # transformers counts tokens from the batch's input_ids; a packed slot holds micro-batches instead, so it
        # would warn "not configured properly" every step and count 0
        bad.append(f"{where('include_num_input_tokens_seen')}: include_num_input_tokens_seen: "
                   f"{t.include_num_input_tokens_seen} is not counted on the packed path (padding_free: true, the "
                   "default); the progress line logs tok/s; drop it, or set padding_free: false")
    if t.padding_free and where.given("pad_to_multiple_of") and t.pad_to_multiple_of is not None:
        bad.append(f"{where('pad_to_multiple_of')}: pad_to_multiple_of: {t.pad_to_multiple_of} pads the stock "
                   "collation's rows; packed rows (padding_free: true, the default) have no padding to round; drop it, "
                   "or set padding_free: false")
    if not t.padding_free:
        for key, asks in PACKED_ONLY.items():
            if where.given(key) and asks(getattr(t, key)):
                bad.append(f"{where(key)}: {key}: {getattr(t, key)} is read only by the padding-free path, and "
                           "padding_free is false (stock TRL collation); drop it, or set padding_free: true")
    return bad


def _check_paths(where, s, t, m) -> list[str]:
    bad = []  # local paths only: Hub ids are looked up once the arguments are parsed (fastdpo.hub, cli)
    for key, name, kind in (("model_name_or_path", m.model_name_or_path, hub.MODEL),
                            ("dataset_name", getattr(s, "dataset_name", None), hub.DATASET),
                            ("eval_dataset_name", getattr(s, "eval_dataset_name", None), hub.DATASET)):
        problem = hub.local_problem(name, kind)
        if problem:
            bad.append(f"{where(key)}: {key}: {problem}")
    template = getattr(s, "chat_template_path", None) or getattr(t, "chat_template_path", None)
    if template and not Path(template).expanduser().exists():
        bad.append(f"{where('chat_template_path')}: chat_template_path: {template}: no such file or folder; give "
                   "a Jinja file or a tokenizer folder that has a chat template")
    return bad
