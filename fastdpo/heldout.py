"""A DPO run read back from its output folder: its settings, its reference model, and the pairs it held out, taken
through training's own pipeline, so `scripts/evaluate.py OUTPUT_DIR` scores exactly the pairs the run evaluated.

    run = heldout.read("outputs/mine")              # None: not a run's folder (a plain model folder)
    spec = run.data_spec()                         # DataSpec.of(the run's saved arguments)
    prepared = tokcache.prepare(spec, tokenizer)    # train and eval, as training took them
    heldout.eval_sets(prepared.eval)               # [(label, dataset)]: one, or one per eval set of a mixture
    heldout.training_pairs(prepared.train, rows)   # how many of `rows` are pairs the run trained on

What is read: output_dir/run.json (written when the data is settled and again when the run finishes: every field of
the run's script, trainer and model arguments, local paths made absolute, plus the fingerprints of its train and
eval token rows), or a checkpoint's checkpoint_complete.json (the same settings, for a checkpoint-N folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import xxhash
from datasets import Dataset

from . import layouts
from .checkpoints import MARKER, RUN_FILE, checkpoint_dirs, fingerprint, incomplete_reason, read_marker
from .dataspec import DataSpec


@dataclass
class Run:
    folder: Path
    settings: dict
    status: str  # "finished", "running" (run.json), or "checkpoint" (a checkpoint-N folder)
    record: Path  # the file the settings came from

    @property
    def is_dpo(self) -> bool:
        return "beta" in self.settings  # SFTConfig has no beta

    @property
    def reference(self) -> str:
        """What DPO started from: TRL's reference is a frozen copy of model_name_or_path (with LoRA, the base with
        the adapter off, which is the same model)."""
        return self.settings["model_name_or_path"]

    def data_spec(self, **overrides) -> DataSpec:
        """The run's data, split rule and lengths as its arguments said (max_length is the trainer's)."""
        mix = self.settings.get("mixture")
        if mix is not None and not (isinstance(mix, dict) and mix.get("sources")):  # a record from before mixtures
            raise SystemExit(f"{self.record}: the run mixes several sources, and its record does not hold the "
                             "recipe's mixture to read its held-out pairs back; its eval numbers per source are in "
                             f"{self.folder / 'all_results.json'} (eval_<label>_...)")
        args = SimpleNamespace(**self.settings)
        return DataSpec.of(args, **{"max_length": self.settings.get("max_length"), **overrides})

    def other_data(self, name: str, split: str, config: str | None = None, limit: int | None = None,
                   **options) -> DataSpec:
        """Another source, every row of one split, read as the run read its own: its column_map, conversion options
        and skip rule, unless `options` (column_map, ranked_pairs, judged_pairs, ...) say otherwise."""
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(given.get("column_map"), str):
            given["column_map"] = layouts.parse_column_map(given["column_map"])
        args = SimpleNamespace(**{**self.settings, "dataset_name": name, "dataset_config": config,
                                  "dataset_train_split": split, "dataset_test_split": None, "eval_dataset_name": None,
                                  "max_train_samples": limit, "dedup": "none", "dataset_shuffle_seed": None,
                                  "mixture": None, **given})
        return DataSpec.of(args)

    def unfinished(self) -> str | None:
        """Why the folder holds no final model to score, with the fix; None when it does."""
        if self.status != "running":
            return None
        complete = [p for p in checkpoint_dirs(self.folder) if incomplete_reason(p) is None]
        hint = (f"score its newest complete checkpoint: {complete[-1]}" if complete else
                "it saved no complete checkpoint yet; let it finish, or rerun the same command to resume it")
        return f"{self.folder} holds a run that has not finished ({self.record} says running): {hint}"


def read(folder: str | Path) -> Run | None:
    """The run whose output folder (or checkpoint-N folder) this is; None for a folder no run wrote."""
    folder = Path(folder)
    try:
        if (folder / RUN_FILE).is_file():
            record = json.loads((folder / RUN_FILE).read_text())
            return Run(folder, record["settings"], record.get("status", "running"), folder / RUN_FILE)
        if (folder / MARKER).is_file():
            return Run(folder, read_marker(folder)["settings"], "checkpoint", folder / MARKER)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{folder}: its run record cannot be read ({type(e).__name__}: {e}); pass --ref, "
                         "--dataset_name and --beta to score it as a plain model") from None
    return None


def eval_sets(evals) -> list[tuple[str | None, Dataset]]:
    """[(label, dataset)]: one unlabelled set, or a mixture's named eval sets in the run's order."""
    if evals is None:
        return []
    if isinstance(evals, dict):
        return list(evals.items())
    return [(None, evals)]


def same_as_run(run: Run, label: str | None, ds: Dataset) -> str | None:
    """None when `ds` holds the token rows the run evaluated (its saved fingerprint), else what differs."""
    saved = run.settings.get("eval_data")
    if isinstance(saved, dict):
        saved = saved.get(label)
    if not isinstance(saved, str):
        return None if saved is None and label is not None else "the run saved no fingerprint of its eval rows"
    now = fingerprint(ds)
    return None if now == saved else f"the run evaluated {saved}, these are {now}"


def row_hashes(ds: Dataset) -> list[bytes]:
    """One hash per tokenised pair (its prompt, chosen and rejected ids, whatever their integer type): equal
    hashes, the same pair as trained. Read through Arrow's buffers: about a second per 100k pairs."""
    out = []
    arrow = ds.with_format("arrow")
    for start in range(0, len(ds), 4096):
        batch = arrow[start: start + 4096]
        columns = []
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            col = batch.column(name).combine_chunks()
            columns.append((col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False).astype(np.int64)))
        for i in range(batch.num_rows):
            h = xxhash.xxh3_128()
            for offsets, values in columns:
                part = values[offsets[i]: offsets[i + 1]]
                h.update(len(part).to_bytes(4, "little"))
                h.update(part.tobytes())
            out.append(h.digest())
    return out


def training_pairs(train: Dataset, rows) -> int:
    """How many of the tokenised pairs `rows` the run trained on: the same prompt, chosen and rejected tokens."""
    trained = set(row_hashes(train))
    return sum(h in trained for h in row_hashes(rows))
