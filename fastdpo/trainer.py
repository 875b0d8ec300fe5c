"""TRL's DPOTrainer on pairs fastdpo has already tokenised and truncated (fastdpo.tokcache.prepare), plus the fast
path.

Fast path (on by default through fastdpo.config.DPOConfig; each piece falls back with a logged reason):
  * padding-free: micro-batches run as packed rows (fastdpo.packing); TRL's own `_compute_loss` computes the
    losses and metrics from the unpacked per-token outputs, so every loss_type and option keeps TRL's formula.
  * token budget: each optimizer step's pairs re-cut into micro-batches up to `token_budget` tokens, with the
    per-pair loss weights of the stock path (fastdpo.batching).
  * reference log-probs precomputed once, packed, cached on disk (fastdpo.refcache).

Evaluation takes one eval set (TRL's own evaluate) or a dict of named sets, {name: tokenised Dataset}: each set is
evaluated alone, logged as `eval_<name>_loss`, `eval_<name>_rewards/accuracies`, ... (the numbers evaluating that set
alone gives), and the plain `eval_...` keys are the metrics over every eval pair pooled, each batch counting by its
pairs (not a mean of the sets' means). Everything goes into one log entry (log history, trackers) and one dict
returned (all_results.json). With precomputed reference log-probs each set is precomputed once, in __init__.

DPOTrainer reads in three parts: which path (the blocker, the candidate packing schemes, the start-up probe's
verdict), the data (the reference pass, the token-budget dataloader), and the step (packed loss, one slot's
micro-batches). What it needs of TRL's and transformers' private methods goes through fastdpo.frameworks.

Under parameter sharding (DeepSpeed ZeRO-3, FSDP2) every forward gathers the weights collectively, so every rank runs
the same number of forwards and backwards: the token-budget sampler gives each rank the same micro-batch count per
step, and the reference pass pads a rank's share with one-token forwards (fastdpo.refcache). The probe runs a float32
twin instead of the sharded weights (fastdpo.probe).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import re
import time

import torch
from accelerate.utils import DistributedType, is_peft_model
from datasets import Dataset
from transformers.trainer_utils import speed_metrics
from trl import DPOTrainer as TRLDPOTrainer
from trl.models import prepare_deepspeed

from . import frameworks, packing, refcache
from .batching import TokenBudgetSampler, sequence_lengths, slot_dataloader
from .packing import PackedForward, PackedPreferenceCollator, varlen_schemes
from .probe import choose
from .refcache import sharded_module_hash

logger = logging.getLogger("fastdpo")


def release_memory() -> None:
    """Hand back what one-off work before training (the probe, the reference pass) freed: the CUDA cache, and on
    Linux glibc's free heap pages, which it otherwise keeps, so training's peak does not stack on top of them.
    (No gc.collect: tensors are freed by reference counting, and a full collection costs 0.25 s.)"""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def fsdp_version(args) -> int | None:
    """FSDP as TrainingArguments (`fsdp`, default version 2) or an accelerate config (its env, default 1) asks."""
    if getattr(args, "fsdp", None):
        return int((args.fsdp_config or {}).get("version", 2))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def fast_path_blocker(model, args, data_collator, train_dataset, processing_class) -> str | None:
    """Why the padding-free path would not be TRL's math here (None = it is)."""
    if args is None:
        return "no DPOConfig was passed"
    if isinstance(model, str):
        return "the model was passed as a name; pass the loaded model"
    attn = frameworks.attn_implementation(model)
    if attn not in packing.PACKING_ATTENTION:
        return (f"attn_implementation={attn!r} does not build a per-sequence mask from position_ids; use one of "
                f"{sorted(packing.PACKING_ATTENTION)}")
    coupled = packing.BATCH_COUPLED_LOSSES & set(args.loss_type)
    if coupled:
        return f"loss_type {sorted(coupled)} couples the pairs of a micro-batch (sorting or a batch token mean)"
    if data_collator is not None:
        return "a custom data_collator was passed"
    if not isinstance(train_dataset, Dataset) or "prompt_ids" not in train_dataset.column_names:
        return "the train dataset is not a tokenised map-style Dataset (fastdpo.data.tokenize_dataset makes one)"
    if processing_class is None or not hasattr(processing_class, "pad_token_id"):
        return "no tokenizer was passed"
    if args.max_length is None:
        return "max_length is None (the token budget and row size derive from it)"
    if getattr(args, "packed_layout", "auto") == "segments" and attn != "sdpa":
        return f"packed_layout=segments needs attn_implementation='sdpa' (the model uses {attn!r})"
    if fsdp_version(args) == 1:
        return ("FSDP version 1 is not tested with packing (FSDP2, ZeRO-2/3 and DDP are): set fsdp_version: 2 "
                "(accelerate config) or fsdp_config {version: 2}")
    return None


def candidate_schemes(attn: str, pad_id: int, args) -> list[PackedPreferenceCollator]:
    """Packing schemes to try, fastest first; the start-up probe keeps the first that is exact on this model."""
    common = dict(pad_token_id=pad_id, max_length=args.max_length, truncation_mode=args.truncation_mode)
    schemes = []
    wanted = getattr(args, "packed_layout", "auto")
    if attn == "sdpa" and wanted in ("auto", "segments"):
        # one varlen kernel call per layer first (CUDA, half precision; else [] and the reason logged)
        schemes += varlen_schemes(common, args)
        # per-sequence attention: no dense mask, so rows are unbounded
        if getattr(args, "prefix_sharing", False):
            schemes.append(PackedPreferenceCollator(**common, mode="segments", share_prefix=True))
        schemes.append(PackedPreferenceCollator(**common, mode="segments"))
    # the model's own mask: sdpa/eager build it dense (row x row), so no row costs more than stock's longest;
    # varlen kernels take one long row
    capacity = None if attn in packing.VARLEN_ATTENTION else args.max_length
    if wanted in ("auto", "dense"):
        schemes.append(PackedPreferenceCollator(**common, row_capacity=capacity, mode="dense"))
    return schemes


UNSAFE_IN_KEYS = re.compile(r"[^A-Za-z0-9_-]+")
SPEED_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def named_eval_sets(sets: dict) -> dict:
    """Named eval sets with each name as its metric keys spell it (`eval_<name>_loss`): letters, digits, `_` and `-`
    kept, every other run of characters (`/`, `.`, spaces) one `_`, since TensorBoard rewrites such characters
    itself and wandb reads `/` as a panel section. A renamed set is logged; an empty dict, an empty set, a name
    empty once cleaned or two names cleaned alike raise ValueError (the recipe's names are checked at parse time)."""
    if not sets:
        raise ValueError("eval_dataset is an empty dict: pass None for no evaluation")
    out = {}
    for name, dataset in sets.items():
        key = UNSAFE_IN_KEYS.sub("_", str(name)).strip("_")
        if not key:
            raise ValueError(f"eval set {name!r}: its name has no letter or digit to name its metrics by")
        if key in out:
            raise ValueError(f"eval sets {name!r} and another both log as eval_{key}_*: give them distinct names")
        if len(dataset) == 0:
            raise ValueError(f"eval set {name!r} has no pairs")
        if key != name:
            logger.info("eval set %r logs its metrics as eval_%s_*", name, key)
        out[key] = dataset
    return out


def pooled(sets: list[tuple[dict[str, list[float]], list[tuple[float, float]]]]) -> dict[str, float]:
    """The metrics of all eval pairs together, from each set's batches: (TRL's metric -> one value per batch,
    [(pairs, loss x pairs)] per batch). A batch's value is the mean over its pairs, so weighting it by its pairs
    gives the mean over every pair: exact for the loss and the per-pair metrics (rewards/*, logps/*); the per-token
    ones (entropy, logits/*, mean_token_accuracy) count each batch by its pairs too. A metric that is not one value
    per batch (num_tokens: the training tokens so far) is the mean of what the sets logged."""
    total = sum(pairs for _, batches in sets for pairs, _ in batches)
    out = {"loss": sum(loss for _, batches in sets for _, loss in batches) / total}
    for key in dict.fromkeys(k for values, _ in sets for k in values):
        if all(len(values.get(key, ())) == len(batches) for values, batches in sets):
            out[key] = sum(v * pairs for values, batches in sets
                           for v, (pairs, _) in zip(values[key], batches, strict=True)) / total
        else:
            logged = [v for values, _ in sets for v in values.get(key, ())]
            out[key] = sum(logged) / len(logged)
    return out


class StockDPOTrainer(TRLDPOTrainer):
    """TRL 1.16's DPOTrainer untouched except that it accepts our tokenised pairs: the baseline the parity tests
    and scripts/benchmark.py measure the fast path against."""

    _prepare_dataset = frameworks.keep_tokenized


class DPOTrainer(TRLDPOTrainer):
    """TRL's DPOTrainer with the fast path, and eval sets by name. `scheme`: the packing scheme training runs (None
    on the stock path); `reference_stats`: the numbers of the last reference pass (fastdpo.refcache.attach);
    `reference_passes`: (set name, numbers) of every reference pass on the fast path, in order ("train", then
    each eval set's name)."""

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        padding_free = bool(getattr(args, "padding_free", False))
        self._fast = padding_free and self._plan_fast_path(model, args, data_collator, train_dataset,
                                                           processing_class)
        self._packing_checked = False
        self._ref_engine, self._ref_model_hash = None, None
        self.reference_stats: dict = {}
        self.reference_passes: list[tuple[str, dict]] = []
        self._batch_records: list | None = None  # (pairs, loss x pairs) per eval batch while sets are evaluated
        if isinstance(eval_dataset, dict):
            eval_dataset = named_eval_sets(eval_dataset)
        if self._fast:
            args.padding_free = False  # TRL 1.16 would warn that it ignores the flag; this class implements it
        try:
            super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset,
                             processing_class=processing_class, **kwargs)
        finally:
            args.padding_free = padding_free
        if self._fast and not self._packing_checked:
            self._check_packing()
        if self._fast:
            self._use_packed_batches()

    @property
    def scheme(self) -> PackedPreferenceCollator | None:
        return self._scheme if self._fast else None

    @scheme.setter
    def scheme(self, collator: PackedPreferenceCollator) -> None:
        self._scheme = collator  # e.g. a wrapper that counts tokens (scripts/benchmark.py)

    # --- which path: the fast path's blocker, its candidate packing schemes, the start-up probe's verdict

    def _plan_fast_path(self, model, args, data_collator, train_dataset, processing_class) -> bool:
        """True when the padding-free path is TRL's math here (else the reason is logged); sets its candidate
        schemes and token budgets. The probe confirms a scheme on the real model later, once the Trainer exists."""
        reason = fast_path_blocker(model, args, data_collator, train_dataset, processing_class)
        if reason is not None:
            logger.warning("padding_free: using the stock padded path because %s", reason)
            return False
        pad_id = processing_class.pad_token_id
        if pad_id is None:
            pad_id = processing_class.eos_token_id
        self._schemes = candidate_schemes(frameworks.attn_implementation(model), pad_id, args)
        self._scheme = self._schemes[0]
        # Stock's largest micro-batch on this data: per_device_train_batch_size pairs, every row padded to the
        # longest sequence (the micro-batch holding it pads all its rows to it, once an epoch at least).
        longest = int(sequence_lengths(train_dataset, args.max_length)[:, :2].max())
        self._token_budget = getattr(args, "token_budget", None) or args.per_device_train_batch_size * 2 * longest
        # The reference pass keeps no activations and could take larger micro-batches, but it gains nothing by
        # it: on 2 CPU cores, twice the training micro-batch made the pass ~25% slower (cache), and a GPU is
        # already saturated by one training micro-batch of a real model. The same size keeps memory at training's.
        ref_pairs = args.precompute_ref_batch_size or args.per_device_train_batch_size
        self._ref_token_budget = ref_pairs * 2 * longest
        return True

    def _sharding(self) -> str | None:
        """The parameter-sharding backend (weights partitioned over the ranks), or None (DDP, ZeRO-1/2): what the
        Trainer's accelerator runs, however it was configured (TrainingArguments or an accelerate config)."""
        state = self.accelerator.state
        if state.deepspeed_plugin is not None and state.deepspeed_plugin.zero_stage == 3:
            return "DeepSpeed ZeRO-3"
        if self.accelerator.distributed_type == DistributedType.FSDP:
            return f"FSDP{state.fsdp_plugin.fsdp_version}"
        return None

    def _check_packing(self) -> bool:
        """Probe each candidate scheme (on every rank, one verdict); keep the first that matches the padded path,
        else stock. Sharded weights are not gathered: the probe runs the model's float32 twin."""
        self._packing_checked = True
        model, sharded = self.model, self._sharding() is not None
        if not sharded and next(model.parameters()).device != self.accelerator.device:
            model.to(self.accelerator.device)  # DeepSpeed moves it there anyway; the probe should not run on CPU
        # what _compute_loss adds to every forward (MoE router logits), so the probe runs the calls training makes
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        scheme = choose(model, self._schemes, sharded=sharded, device=self.accelerator.device, **extra)
        release_memory()
        if scheme is None:
            logger.warning("padding_free: no packing scheme matches the padded path on this model; using the stock "
                           "padded path")
            self._fast = False
            return False
        self._scheme = scheme
        return True

    def _use_packed_batches(self) -> None:
        # Every packed batch carries reference log-probs (precomputed, or computed packed in compute_loss), so
        # TRL's loss always reads them from the batch.
        self.precompute_ref_logps = True
        self.data_collator = self._scheme  # eval batches: same pairs as stock, packed
        c, args = self._scheme, self.args
        attention = {"segments": "per-sequence", "varlen": "per-sequence (one varlen call a layer)"}.get(
            c.mode, "the model's packed-mask")
        logger.info("fast path: %s attention, %s, rows of %s tokens, token budget %s per micro-batch, reference "
                    "log-probs %s%s", attention,
                    "prompt shared by chosen and rejected" if c.share_prefix else "no prefix sharing",
                    c.row_capacity or "unbounded", self._token_budget,
                    "precomputed (cached)" if args.precompute_ref_log_probs else "computed packed each step",
                    f", parameters sharded ({self._sharding()})" if self._sharding() else "")

    # --- data: tokenised pairs, the reference pass, token-budget micro-batches

    _prepare_dataset = frameworks.keep_tokenized
    _precompute_ref_logps = frameworks.precompute_ref_logps

    def reference_logps(self, dataset, name: str, batch_size: int):
        """`dataset` with the reference log-prob columns: fastdpo.refcache's packed, cached pass on the fast path,
        TRL's own otherwise (TRL asks for it in __init__ and evaluate, through fastdpo.frameworks)."""
        if self._fast and not self._packing_checked:
            self._check_packing()  # before any packed forward: a failed probe precomputes the stock way
        if not self._fast:
            return frameworks.stock_ref_logps(self, dataset, name, batch_size)
        model = self._reference_model()
        spec = refcache.ReferencePass(
            model=model, collator=self._scheme, token_budget=self._ref_token_budget,
            log_probs=self.compute_ref_log_probs, accelerator=self.accelerator, max_length=self.args.max_length,
            truncation_mode=self.args.truncation_mode, ld_alpha=self.args.ld_alpha,
            model_hash=self._ref_model_hash or frameworks.trl_reference_hash(self),
            even_forwards=self._sharding() is not None)
        dataset, self.reference_stats = refcache.attach(dataset, name, spec,
                                                        getattr(self.args, "ref_logps_cache_dir", None))
        self.reference_passes.append((name, self.reference_stats))
        release_memory()
        return dataset

    def _reference_model(self):
        """What the reference pass runs. ZeRO-3: the policy's partitioned weights are gathered layer by layer inside
        a DeepSpeed inference engine (TRL's own `prepare_deepspeed`, built once and kept for later passes as TRL
        does); its cache key hashes the weights one parameter at a time (TRL's hash of a partitioned module sees
        empty tensors). FSDP2: TRL's sharded reference copy. Otherwise the reference model or the policy itself."""
        if self.ref_model is None and self._sharding() == "DeepSpeed ZeRO-3":
            if self._ref_engine is None:
                if any(hasattr(p, "ds_id") for p in self.model.parameters()):  # partitioned by zero.Init
                    self._ref_model_hash = sharded_module_hash(self.model)
                self._ref_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._ref_engine
        return self.ref_model or self.model

    def get_train_dataloader(self):
        if not self._fast:
            return super().get_train_dataloader()
        dataset = frameworks.unused_columns_removed(self, self.train_dataset, "training")
        args = self.args
        extra = {}
        if args.dataloader_num_workers > 0:
            extra = {"persistent_workers": args.dataloader_persistent_workers,
                     "prefetch_factor": args.dataloader_prefetch_factor}
        return slot_dataloader(dataset, self._token_budget_sampler(dataset), self._scheme,
                               num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                               **extra)

    def _token_budget_sampler(self, dataset) -> TokenBudgetSampler:
        """The stock path's pairs per (rank, step), re-cut into micro-batches of at most the token budget; every
        rank plans every rank's steps, so all run the same number of micro-batches (collectives match)."""
        args = self.args
        return TokenBudgetSampler(
            sequence_lengths(dataset, args.max_length, args.truncation_mode), frameworks.train_batch_size(self),
            args.gradient_accumulation_steps, world_size=args.world_size, rank=args.process_index,
            token_budget=self._token_budget, row_capacity=self._scheme.row_capacity,
            order=args.train_sampling_strategy, seed=args.data_seed if args.data_seed is not None else args.seed,
            drop_last=args.dataloader_drop_last,
            # The budget counts each pair's two sequences whole, even when its prompt runs once: a micro-batch then
            # never holds more than stock's largest one, so peak memory stays below it. Counting shared tokens let
            # prompt-heavy micro-batches take more pairs: multiturn peak 1.02x stock's, against 0.82x this way, at
            # the same speed (shaped model, 2 CPU cores).
            share_prefix=False)

    # --- the step: packed loss through TRL's own code, one slot's micro-batches

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = self._loss(model, inputs, return_outputs, num_items_in_batch)
        if self._batch_records is not None:
            self._record_batch(inputs, out[0] if return_outputs else out)
        return out

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):
        if "packed_input_ids" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "ref_chosen_logps" not in inputs:
            # Reference model kept (precompute off): its forward runs packed too, through TRL's own function
            # (PEFT without a ref model: TRL disables the adapter on self.model inside it).
            ref = self.ref_model if self.ref_model is not None else self.model
            chosen, rejected = self.compute_ref_log_probs(PackedForward(ref), inputs)
            inputs = {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
        # TRL gathers per-pair metric tensors across ranks; token-budget micro-batches hold different pair counts
        # per rank
        with frameworks.ragged_gather(self.accelerator):
            return super().compute_loss(PackedForward(model), inputs, return_outputs, num_items_in_batch)

    def _record_batch(self, inputs, loss: torch.Tensor) -> None:
        """An eval batch's pairs and loss x pairs, summed over the ranks (each rank's loss is its pairs' mean), as
        TRL's metrics of the batch gather them (every rank runs each eval batch, so the gather matches)."""
        pairs = inputs["input_ids"].shape[0] // 2  # chosen rows, then rejected rows, on both paths
        local = torch.stack([loss.detach().float() * pairs, torch.tensor(float(pairs), device=loss.device)])
        loss_sum, total = self.accelerator.gather(local[None]).sum(dim=0).tolist()
        self._batch_records.append((total, loss_sum))

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "micro_batches" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        # One slot of an optimizer step: one or more packed micro-batches. Each backward gets its micro-batch's
        # mean loss times the sum of its pairs' step weights (fastdpo.batching), and nothing divides by the
        # accumulation count again: the step's gradient is the stock path's.
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        sync = self.accelerator.sync_gradients  # the Trainer's decision for this slot
        micro_batches = inputs["micro_batches"]
        total = torch.zeros((), device=self.args.device)
        for j, mb in enumerate(micro_batches):  # none: the step's pairs fit in fewer micro-batches than slots
            total += self._micro_batch_backward(model, mb, last=j == len(micro_batches) - 1, sync=sync)
        frameworks.set_sync_gradients(self.accelerator, sync)
        return total

    def _micro_batch_backward(self, model, mb, last: bool, sync: bool) -> torch.Tensor:
        """Forward and backward of one packed micro-batch of a slot, weighted by its pairs' step weights."""
        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        mb = frameworks.prepare_inputs(self, mb)
        # DDP / ZeRO reduce gradients only after the step's final micro-batch
        frameworks.set_sync_gradients(self.accelerator, sync and last)
        no_sync = contextlib.nullcontext() if last or deepspeed else self.accelerator.no_sync(model)
        with no_sync, self.maybe_activation_offload_context:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, mb) * mb["loss_weight"].to(torch.float32)
            self.accelerator.backward(loss, **({"scale_wrt_gas": False} if deepspeed else {}))
        return loss.detach()

    # --- evaluation: one set as TRL runs it; named sets each alone, then all their pairs pooled

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """One eval set: TRL's evaluate. Named sets ({name: dataset}, here or at __init__): each evaluated alone as
        Trainer.evaluate would (`<prefix>_<name>_...`), the plain `<prefix>_...` keys over all their pairs
        (`pooled`), logged once and passed to the callbacks once, as one set is."""
        sets = self.eval_dataset if eval_dataset is None else eval_dataset
        if not isinstance(sets, dict):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        tracker = frameworks.memory_tracker(self)
        tracker.start()  # it names its stage after the method that starts it, as in Trainer.evaluate
        if eval_dataset is not None:
            sets = self._prepared_eval_sets(eval_dataset)
        start, parts, per_set = time.time(), [], {}
        for name, dataset in sets.items():
            # by name, the Trainer reads its own set (and keeps its dataloader with persistent workers)
            metrics, values, batches = self._evaluate_one(name if eval_dataset is None else dataset,
                                                          f"{metric_key_prefix}_{name}", ignore_keys)
            per_set.update(metrics)
            parts.append((values, batches))
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in pooled(parts).items()}
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=sum(len(d) for d in sets.values()),
                                     num_steps=sum(len(batches) for _, batches in parts)))
        metrics.update(per_set)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        tracker.stop_and_update_metrics(metrics)
        return metrics

    def _evaluate_one(self, dataset, prefix: str, ignore_keys) -> tuple[dict, dict, list]:
        """One set as Trainer.evaluate runs it (its loop, its speed metrics, TRL's metrics averaged over the batches
        as TRL's log does), not logged: (its metrics, TRL's metric -> one value per batch, (pairs, loss x pairs) per
        batch)."""
        dataloader = self.get_eval_dataloader(dataset)
        frameworks.take_metrics(self, "eval")  # nothing left over from an evaluation that stopped
        start = time.time()
        self._batch_records = []
        try:
            output = self.evaluation_loop(dataloader, description="Evaluation", ignore_keys=ignore_keys,
                                          prediction_loss_only=True if self.compute_metrics is None else None,
                                          metric_key_prefix=prefix)
            batches = self._batch_records
        finally:
            self._batch_records = None
        metrics = output.metrics
        start += metrics.get(f"{prefix}_model_preparation_time", 0.0)
        metrics.update(speed_metrics(prefix, start, num_samples=output.num_samples, num_steps=math.ceil(
            output.num_samples / (self.args.eval_batch_size * self.args.world_size))))
        values = frameworks.take_metrics(self, "eval")
        metrics.update({f"{prefix}_{k}": sum(v) / len(v) for k, v in values.items()})
        return metrics, values, batches

    def _prepared_eval_sets(self, sets: dict) -> dict:
        """Named sets passed to evaluate(), made ready as __init__ readies its own: tokenised pairs kept, reference
        log-probs attached where they are precomputed, once (a set that carries them already keeps them)."""
        out = {}
        for name, dataset in named_eval_sets(sets).items():
            dataset = frameworks.keep_tokenized(self, dataset, self.processing_class, self.args, name)
            if self.args.precompute_ref_log_probs and not set(refcache.COLUMNS) <= set(dataset.column_names):
                if self.state.global_step > 0 and self.ref_model is None and not is_peft_model(self.model):
                    # the policy has moved: no reference left to compute them with (TRL refuses the same)
                    raise ValueError(
                        f"eval set {name!r}: reference log-probs cannot be computed after training started "
                        "(precompute_ref_log_probs without a ref_model keeps no reference): pass the set as "
                        "eval_dataset when the trainer is built, or set precompute_ref_log_probs false")
                dataset = frameworks.precompute_ref_logps(
                    self, dataset, name, self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size)
            out[name] = dataset
        return out
