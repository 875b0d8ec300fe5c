"""Checkpoints that a kill cannot break, and the run identity a resume must match.

A `checkpoint-N` folder counts only once `checkpoint_complete.json` is in it: written last, after every rank
has written its part and the files are flushed, listing every file with its size. Resume takes the newest
complete checkpoint; partial ones (killed, out of time or out of disk during the save) are named in the log
with the reason and removed. Old checkpoints are deleted (`save_total_limit`) only after the new one is
complete, so a kill at any moment leaves one to resume from.

The marker, and output_dir/run.json for runs without checkpoints, also record the run's settings. What
defines the run (data fingerprint, model, objective, optimiser and schedule, batch arithmetic, lengths)
must match on resume, or the rerun is refused, naming each changed key, unless `--allow_changed_run true`;
other changes (logging, save cadence, a longer max_steps) are logged and allowed.

    run = Run(output_dir, script_args, training_args, model_args)  # finds the checkpoint; refuses changed settings
    run.check_data(train_ds, eval_ds)                                # after tokenising: refuses changed data
    if run.done:                                                     # the same finished run again: nothing to do
        return
    run.attach(trainer)                                              # marks checkpoints complete as they are saved
    trainer.train(resume_from_checkpoint=run.checkpoint)
    saved = run.save_model(trainer, output_dir)                      # a full disk is reported, not fatal
    run.finished()
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from transformers import TrainerCallback

from . import files, frameworks, mixture, ranks
from .models import resolve
from .refcache import token_hash

logger = logging.getLogger("fastdpo")

MARKER = "checkpoint_complete.json"
RUN_FILE = "run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# What defines a run: resuming with any of these changed would silently mix two runs.
DEFINING = {
    # model
    "model_name_or_path", "model_data", "model_revision", "dtype", "use_peft", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "use_rslora", "use_dora", "load_in_4bit", "load_in_8bit",
    # data
    "dataset_name", "dataset_config", "dataset_train_split", "max_train_samples", "dataset_shuffle_seed",
    "column_map", "max_prompt_length", "chat_template_path", "skip_bad_rows", "train_data", "mixture",
    # objective
    "beta", "loss_type", "loss_weights", "label_smoothing", "ld_alpha", "use_weighting", "f_divergence_type",
    "f_alpha_divergence_coef", "discopop_tau", "sync_ref_model", "assistant_only_loss", "completion_only_loss",
    "packing",
    # optimiser and schedule
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "optim",
    "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "seed", "data_seed",
    "train_sampling_strategy",
    # batch arithmetic, lengths, precision; the backend decides the checkpoint's optimizer format
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "max_length", "truncation_mode",
    "bf16", "fp16", "backend",
}
# The run's length: longer is allowed (it continues), shorter or switching between the two is a change.
LENGTH = ("max_steps", "num_train_epochs")
# Not settings of the run: where it is written, per-process values, this very flag.
IGNORED = {"output_dir", "local_rank", "allow_changed_run", "resume_from_checkpoint", "hub_token", "run_name"}
# Keys compared only once the data is tokenised (Run.check_data).
DATA_KEYS = {"train_data", "eval_data"}


# ------------------------------------------------------------------------------------------- settings


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _local(name):
    """A local path as its absolute form, so `data/x.jsonl` and `/repo/data/x.jsonl` are the same source."""
    if isinstance(name, str) and not name.startswith("embedded:") and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return name


def backend(training_args) -> str:
    """How the ranks train: DeepSpeed (with its ZeRO stage), DDP, FSDP (with its version) or one process. Each
    writes its own optimizer-state format: a ZeRO-2 checkpoint holds one partition per rank of flat fp32 groups,
    ZeRO-3 partitions the parameters as well, FSDP2 writes torch.distributed.checkpoint shards, DDP one file."""
    kind = getattr(training_args.distributed_state.distributed_type, "value", "NO")
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None:
        return f"{kind} (ZeRO-{plugin.zero_stage})"
    if kind == "FSDP":  # accelerate launch tells the ranks the version through the environment
        return f"FSDP (FSDP{os.environ.get('FSDP_VERSION', '1')})"
    return kind


# The sbatch scripts' BACKEND knob (scripts/_launch.sh) that trains with each backend() value, for the fix.
_LAUNCH = {"ZeRO-2": "BACKEND=zero2 (accelerate_config.yaml)", "ZeRO-3": "BACKEND=zero3 (accelerate_config_zero3.yaml)",
           "FSDP2": "BACKEND=fsdp2 (accelerate_config_fsdp2.yaml)"}


def _how_to_launch(value: str) -> str:
    return next((how for key, how in _LAUNCH.items() if key in value), f"the launch that gave {value}")


def backend_change(checkpoint: str, old: str | None, new: str) -> str | None:
    """Why `checkpoint` (saved with backend `old`) cannot be resumed with backend `new`, with the fix; None when it
    can. Not overridable by --allow_changed_run: the new backend cannot read the old optimizer state at all."""
    if old is None or old == new:
        return None
    weights = (f"{checkpoint}/pytorch_model_fsdp_0 (consolidate it first: accelerate merge-weights "
               f"{checkpoint}/pytorch_model_fsdp_0 <folder>)" if "FSDP" in old else checkpoint)
    return (f"{checkpoint} was saved by {old}, this run trains with {new}: its optimizer and parameter states are in "
            f"{old}'s format, which {new} cannot load (--allow_changed_run does not help).\nFix: resume with "
            f"{_how_to_launch(old)}, or start a new run from its weights with the new backend: "
            f"--model_name_or_path {weights} --output_dir <a new folder> (a fresh optimizer and schedule).")


def settings(*configs, world_size: int = 1) -> dict:
    """Every field of the run's configs, JSON-plain, minus secrets and where-it-is-written keys."""
    out = {}
    for conf in configs:
        for f in fields(conf):
            if f.name in IGNORED or f.name.endswith("token") or f.name in out:
                continue
            out[f.name] = _plain(getattr(conf, f.name))
    for key in ("model_name_or_path", "dataset_name", "eval_dataset_name", "chat_template_path"):
        if key in out:
            out[key] = _local(out[key])
    out["world_size"] = world_size
    return out


def fingerprint(dataset) -> str:
    """Content hash of a dataset: the token ids for tokenised pairs (refcache.token_hash, seconds for millions of
    tokens), otherwise the Arrow table itself; plus the row count, for humans."""
    if "prompt_ids" in dataset.column_names:
        digest = token_hash(dataset)
    else:
        ds = frameworks.flat(dataset)
        h = hashlib.blake2b(digest_size=16)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
        h.update(sink.getvalue().to_pybytes())
        digest = h.hexdigest()
    return f"{digest[:16]} ({len(dataset)} rows)"


def model_fingerprint(name_or_path: str) -> str | None:
    """A local model folder's content, sampled: every weight file's size, its first MiB (the safetensors header)
    and 16 blocks spread over it, plus config.json. Retraining the folder in place (an earlier stage rerun with
    other settings) changes it; reading ~2 MiB per file keeps it fast for a 7B model. None for a Hub id."""
    path = Path(resolve(name_or_path)).expanduser()
    if not path.is_dir():
        return None
    h = hashlib.blake2b(digest_size=16)
    weights = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt")
                                                                   or p.name in ("config.json", "adapter_config.json")))
    for p in weights:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(2**20))
            for i in range(1, 17):
                f.seek(size * i // 17)
                h.update(f.read(2**16))
    return f"{h.hexdigest()[:16]} ({len(weights)} files)"


def _fmt(value) -> str:
    return "(unset)" if value is _MISSING else json.dumps(value)


_MISSING = object()


def _length(s: dict):
    steps = s.get("max_steps", -1)
    if isinstance(steps, int) and steps > 0:
        return "max_steps", steps
    return "num_train_epochs", s.get("num_train_epochs")


def compare(old: dict, new: dict, keys=None) -> tuple[list[str], list[str]]:
    """(changes that define the run, changes that are safe), as `key: old -> new` lines. A key either side does
    not know (a version that did not record it) is not a change."""
    changed, safe = [], []
    for key in sorted(set(old) | set(new)):
        if key in LENGTH or (keys is not None and key not in keys):
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or a == b:
            continue
        if key == "mixture":  # which source, and what of it, rather than two copies of the whole plan
            changed += [f"mixture: {change}" for change in mixture.changes(a, b)]
            continue
        (changed if key in DEFINING else safe).append(f"{key}: {_fmt(a)} -> {_fmt(b)}")
    if keys is None or set(LENGTH) & set(keys):
        (ka, a), (kb, b) = _length(old), _length(new)
        if (ka, a) != (kb, b):
            if ka == kb and a is not None and b is not None and b > a:
                safe.append(f"{kb}: {a} -> {b} (trains longer; the learning-rate schedule now ends there)")
            else:
                changed.append(f"{ka}: {json.dumps(a)} -> {kb}: {json.dumps(b)}")
    return changed, safe


# ------------------------------------------------------------------------------------------- checkpoints


def _step(path: Path) -> int:
    return int(_CHECKPOINT.match(path.name)[1])


def checkpoint_dirs(out: Path) -> list[Path]:
    """checkpoint-N folders, oldest step first."""
    if not out.is_dir():
        return []
    return sorted((p for p in out.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)), key=_step)


def incomplete_reason(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None when it is complete."""
    marker = path / MARKER
    if not marker.is_file():
        return (f"no {MARKER} (written last, when every rank has finished writing): the save was interrupted "
                "(killed, out of time or out of disk)")
    try:
        listed = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MARKER} is unreadable ({e})"
    for name, size in listed.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing (listed in {MARKER})"
        if p.stat().st_size != size:
            return f"{name} is {p.stat().st_size} bytes, {MARKER} says {size} (truncated or rewritten)"
    return None


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def mark_complete(path: Path, step: int, run_settings: dict) -> None:
    """Flush every file of the checkpoint to disk, then write the marker that makes it resumable."""
    sizes = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(Path(MARKER).stem + ".tmp"):
            files.fsync(p)  # a node crash (not only a killed process) must not leave a marker over unwritten data
            sizes[str(p.relative_to(path))] = p.stat().st_size
    files.write_json(path / MARKER, {"step": step, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "files": sizes, "settings": run_settings})


def remove_checkpoint(path: Path) -> None:
    # The marker goes first: a kill halfway through the deletion leaves an incomplete folder, never a
    # "complete" one with files missing.
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def rotate(out: Path, keep: int | None, best: str | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (transformers' rule: the newest and the best stay)."""
    if not keep or keep <= 0:
        return
    complete = [p for p in checkpoint_dirs(out) if incomplete_reason(p) is None]
    protected = {complete[-1].resolve()} if complete else set()
    if best:
        protected.add(Path(best).resolve())
    excess = len(complete) - max(keep, len(protected))
    for path in complete:
        if excess <= 0:
            break
        if path.resolve() not in protected:
            logger.info("removing %s (save_total_limit %d)", path, keep)
            remove_checkpoint(path)
            excess -= 1


def _writes(args) -> bool:
    """output_dir's one writer (fastdpo.ranks): rank 0, or each node's local main process with save_on_each_node."""
    return ranks.writes("run", getattr(args, "save_on_each_node", False))


def _dist():
    return dist if dist.is_available() and dist.is_initialized() else None


def _barrier() -> None:
    if (d := _dist()) is not None:
        d.barrier()


def _from_rank0(obj):
    """Rank 0's value on every rank: all ranks must resume the same checkpoint, even if a shared filesystem
    shows them different listings for a moment."""
    if (d := _dist()) is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once every rank has written it, then rotates old ones.

    transformers rotates (`save_total_limit`) inside the save, before anything could mark the new checkpoint
    complete; with a limit of 1 a kill at that moment would leave nothing to resume. So the limit is taken over
    for the duration of training and applied here, after the marker.
    """

    def __init__(self, run_settings: dict):
        self.settings = run_settings
        self.keep = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.keep, args.save_total_limit = args.save_total_limit, None

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _barrier()  # every rank's part (ZeRO shards, RNG states) is on disk
        if _writes(args) and path.is_dir():
            mark_complete(path, state.global_step, self.settings)
            rotate(Path(args.output_dir), self.keep, state.best_model_checkpoint)

    def on_train_end(self, args, state, control, **kwargs):
        args.save_total_limit = self.keep


# ------------------------------------------------------------------------------------------------ run


def _save_fsdp_full(trainer, folder: Path) -> None:
    """The final model of an FSDP run as one from_pretrained folder, in the dtype it was loaded in.

    Checkpoints are sharded (SHARDED_STATE_DICT, accelerate_config_fsdp2.yaml), and transformers' save_model then
    writes no weights at all; a full state dict is gathered instead (every rank takes part, rank 0 receives it).
    accelerate upcasts trainable parameters to fp32 for FSDP2's mixed precision (they are the master copy), so the
    gathered weights are fp32: cast back to the loaded dtype (bf16 for the OLMo recipes), as ZeRO saves them.
    """
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    state = trainer.accelerator.get_state_dict(trainer.model)
    dtype = getattr(trainer.accelerator.unwrap_model(trainer.model).config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    frameworks.save_weights(trainer, str(folder), state)


class Run:
    """output_dir's run: which checkpoint to resume, whether this command is the same run, the final save."""

    def __init__(self, out, script_args, training_args, model_args):
        self.out = Path(out)
        self.args = training_args
        self.allow = bool(getattr(script_args, "allow_changed_run", False))
        self.settings = settings(script_args, training_args, model_args, world_size=training_args.world_size)
        self.settings["model_data"] = model_fingerprint(model_args.model_name_or_path)
        self.settings["backend"] = backend(training_args)
        self.checkpoint, self.incomplete = _from_rank0(self._find())
        for path, reason in self.incomplete:
            logger.warning("skipping %s: %s; it will be removed", path, reason)
        self.finished_settings = self._finished()
        if self.checkpoint:
            self.previous, self.previous_name = read_marker(Path(self.checkpoint)).get("settings"), self.checkpoint
        else:
            self.previous, self.previous_name = self.finished_settings, f"the finished run in {self.out}"
        self.done = False  # set by check_data
        if self.checkpoint and (why := backend_change(self.checkpoint, (self.previous or {}).get("backend"),
                                                     self.settings["backend"])):
            raise SystemExit(why)
        self._check(keys=set(self.settings) - DATA_KEYS | set(LENGTH))

    def _find(self) -> tuple[str | None, list[tuple[str, str]]]:
        incomplete, newest = [], None
        for path in checkpoint_dirs(self.out):
            reason = incomplete_reason(path)
            if reason is None:
                newest = str(path)
            else:
                incomplete.append((str(path), reason))
        return newest, incomplete

    def _finished(self) -> dict | None:
        """The settings of the finished run output_dir holds, if it holds one."""
        try:
            record = json.loads((self.out / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        return record.get("settings") if record.get("status") == "finished" else None

    def _check(self, keys) -> None:
        if not self.previous:
            return
        changed, safe = compare(self.previous, self.settings, keys)
        if safe:
            logger.info("changed since %s (safe to change): %s", self.previous_name, "; ".join(safe))
        if not changed:
            return
        action = "resume from it" if self.checkpoint else "replace it"
        if self.allow:
            logger.warning("--allow_changed_run: %s %s with changed settings: %s",
                           "resuming from" if self.checkpoint else "replacing", self.previous_name, "; ".join(changed))
            return
        raise SystemExit(
            f"{self.previous_name} was trained with other settings; continuing it with these would silently mix "
            "two runs:\n  " + "\n  ".join(changed) + "\nFix: rerun with the old values, choose a new --output_dir for "
            f"a new run, or pass --allow_changed_run true to {action} anyway (the changes are logged).")

    def check_data(self, train_dataset, eval_dataset=None) -> None:
        """After tokenising: refuse changed training data; then clear partial checkpoints and record the run."""
        self.settings["train_data"] = fingerprint(train_dataset)
        if isinstance(eval_dataset, dict):  # a mixture's eval sets, by name
            self.settings["eval_data"] = {name: fingerprint(ds) for name, ds in eval_dataset.items()}
        elif eval_dataset is not None:
            self.settings["eval_data"] = fingerprint(eval_dataset)
        self._check(keys=DATA_KEYS)
        if self.finished_settings is not None:
            changed, _ = compare(self.finished_settings, self.settings)
            longer = _length(self.finished_settings) != _length(self.settings)
            self.done = not changed and not longer
        if self.done:
            logger.info("%s already holds this run, finished; nothing to train and nothing is rewritten (raise "
                        "max_steps or num_train_epochs to train longer)", self.out)
        elif self.finished_settings is not None and not self.checkpoint:
            logger.warning("the finished run in %s saved no checkpoint to continue from: this run starts from step 0 "
                           "and replaces its outputs", self.out)
        _barrier()  # every rank has chosen its checkpoint before partial ones disappear
        if _writes(self.args):
            for path, _ in self.incomplete:
                remove_checkpoint(Path(path))
            if not self.done:
                self._write_run("running")

    def _write_run(self, status: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        files.write_json(self.out / RUN_FILE, {"status": status, "settings": self.settings})

    def attach(self, trainer) -> None:
        """Mark checkpoints complete as they are saved. A checkpoint at (or past) max_steps is resumed without
        running an epoch: transformers 5.23 tests the step count only after a step, so it would train one
        step more than asked (and, with a cosine schedule, move the weights)."""
        trainer.add_callback(CompleteCheckpoints(self.settings))
        if self.checkpoint and self.args.max_steps > 0:
            step = json.loads((Path(self.checkpoint) / "trainer_state.json").read_text())["global_step"]
            if step >= self.args.max_steps:
                logger.info("%s is at step %d of max_steps %d: resuming it without a training step", self.checkpoint,
                            step, self.args.max_steps)
                frameworks.skip_training_loop(trainer)

    def check_space(self, model, use_peft: bool, merge_adapter: bool) -> None:
        """Fail before training when output_dir's disk cannot hold the final model (a run that saves no
        checkpoints would otherwise lose everything at the very end)."""
        if use_peft and not merge_adapter:
            return  # an adapter is megabytes
        # ds_numel: under ZeRO-3 (zero3_init_flag) each rank holds a partition and the parameter itself is empty
        need = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise SystemExit(f"output_dir {self.out}: {free / 2**30:.2f} GiB free, the final model alone needs "
                             f"{need / 2**30:.2f} GiB; free space or choose another --output_dir")
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        # Adam's two fp32 moments, and with 16-bit weights an fp32 master copy too (DeepSpeed's optimizer state;
        # FSDP2 keeps its sharded parameters in fp32)
        per_checkpoint = need + (12 if any(p.element_size() < 4 for p in model.parameters()) else 8) * trainable
        logger.info("disk: the final model takes %.3g GiB, a checkpoint about %.3g GiB; %.3g GiB free in %s",
                    need / 2**30, per_checkpoint / 2**30, free / 2**30, self.out)
        if self.args.save_strategy != "no" and free < need + per_checkpoint:
            logger.warning("output_dir %s: %.2f GiB free; a checkpoint takes about %.2f GiB and the final model "
                           "%.2f GiB", self.out, free / 2**30, per_checkpoint / 2**30, need / 2**30)

    def save_model(self, trainer, path) -> bool:
        """trainer.save_model into a folder beside `path`, then moved in file by file: a failure (full disk, quota)
        leaves `path`'s previous files whole instead of a half-written model. Returns False (after saying what
        is lost and what is kept) instead of raising, so the metrics still get written."""
        path = Path(path)
        tmp = path / ".saving"
        try:
            if _writes(self.args):
                shutil.rmtree(tmp, ignore_errors=True)
            if trainer.is_fsdp_enabled:
                _save_fsdp_full(trainer, tmp)
            else:
                trainer.save_model(str(tmp))  # every rank: ZeRO-3 gathers the 16-bit weights collectively
            if _writes(self.args):
                for p in sorted(tmp.rglob("*")):
                    if p.is_file():
                        dest = path / p.relative_to(tmp)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(p, dest)
                shutil.rmtree(tmp)
            return True
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
            shutil.rmtree(tmp, ignore_errors=True)
            kept = (f"the newest complete checkpoint ({self._newest_complete()}) is kept: free space and rerun the "
                    "same command, which resumes from it and saves again" if self._newest_complete() else
                    "this run saved no checkpoints (save_strategy: no), so its trained weights are lost: free space "
                    "and rerun, or save checkpoints (save_strategy: steps) on long runs")
            logger.error("could not write the final model to %s (%s: %s); %s; the metrics are still written",
                         path, type(e).__name__, e, kept)
            return False

    def _newest_complete(self) -> str | None:
        complete = [p for p in checkpoint_dirs(self.out) if incomplete_reason(p) is None]
        return str(complete[-1]) if complete else None

    def finished(self) -> None:
        """Record that output_dir holds a finished run: a rerun with other settings is then refused."""
        if _writes(self.args):
            self._write_run("finished")
