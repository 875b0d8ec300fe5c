"""What a data run reads and how: the one small object DPO training, SFT, evaluation and the analyzer hand to the
data pipeline, rather than the whole set of script arguments.

`SourceSpec` is one source and how its rows become pairs (its own column_map and conversion options, its row
limit, and in a mixture its name and amount): the stages that read a source take one, so several of them can make
one run. `DataSpec` adds what is decided over the sources: the eval split and deduplication, the seeds, the token
lengths and the skip-or-fail policy; `mixture` holds a mixture's plan (fastdpo.mixture), whose sources and eval
sets `sources` and `eval_sets` give. `DataSpec.of(script_args)` reads a recipe's arguments (or any object with
their data fields, run.json's settings included).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import layouts, mixture, sources
from .errors import RowPolicy

NO_OPTIONS = layouts.Options()  # no column_map and no conversion option


@dataclass(frozen=True)
class SourceSpec:
    """One source of rows and how to read them."""

    name: str  # a Hub dataset id, a local file or folder, or an embedded dataset
    config: str | None = None  # the Hub dataset's configuration
    split: str = "train"
    options: layouts.Options = NO_OPTIONS  # column_map, ranked_pairs, judged_pairs
    limit: int | None = None  # rows read at most, bad ones included (max_train_samples)
    display: str | None = None  # a mixture's name for the source (logs, accounting, eval metrics)
    data_dir: str | None = None  # TRL's data_dir, data_files and columns (fastdpo.sources.open_source)
    data_files: object = None
    columns: tuple | None = None
    amount: dict | None = None  # a mixture's amount: {"count": N}, {"weight": w}, {"fraction": f}, or every row

    @property
    def label(self) -> str:
        return f"{self.name} [{self.split}]"

    def open(self) -> sources.Source:
        return sources.open_source(self.name, self.config, self.split, self.data_dir, self.data_files, self.columns)

    @classmethod
    def of_entry(cls, entry: dict) -> SourceSpec:
        """A mixture entry's plain form (fastdpo.mixture) as a source."""
        return cls(entry["path"], entry.get("config"), entry.get("split") or "train",
                   layouts.Options.of(_Fields(entry.get("options") or {})), None, entry["label"], entry.get("data_dir"),
                   entry.get("data_files"), tuple(entry["columns"]) if entry.get("columns") else None,
                   entry.get("amount"))


class _Fields:
    """A dict read as attributes (layouts.Options.of reads script arguments)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


@dataclass(frozen=True)
class DataSpec:
    """The train source and everything decided over the sources of a run (the recipe keys in comments)."""

    train: SourceSpec
    test_split: str | None = None  # dataset_test_split: a split name, a fraction of the train rows, or none
    eval_name: str | None = None  # eval_dataset_name: a separate eval source
    max_eval_samples: int | None = None
    dedup: str = "eval"  # eval, all or none (fastdpo.splits.plan_splits)
    seed: int = 42  # dataset_seed: the held-out fraction
    shuffle_seed: int | None = None  # dataset_shuffle_seed: one shuffle of the train rows
    max_length: int | None = None  # the trainer's max_length
    max_prompt_length: int | None = None
    skip_bad_rows: bool = False
    mixture: mixture.Mixture | None = None  # several sources (datasets: in the recipe); train is then the first

    @classmethod
    def of(cls, args, **overrides) -> DataSpec:
        """A spec from script arguments (any object with their data fields; a DataSpec is taken as it is), with
        `overrides` on top (max_length is the trainer's setting, not a script argument)."""
        if isinstance(args, DataSpec):
            return dataclasses.replace(args, **overrides) if overrides else args
        def get(name, default=None):
            return getattr(args, name, default)

        mix = get("mixture")
        if isinstance(mix, dict):  # the plain form script arguments and run.json hold
            mix = mixture.Mixture.from_plain(mix)
        train = (SourceSpec.of_entry(mix.sources[0]) if mix is not None else
                 SourceSpec(args.dataset_name, get("dataset_config"), get("dataset_train_split", "train"),
                            layouts.Options.of(args), get("max_train_samples")))
        test = get("dataset_test_split")
        test = repr(test) if isinstance(test, float) else test  # a recipe's bare 0.05 reaches here as a number
        spec = cls(train, test, get("eval_dataset_name"), get("max_eval_samples"),
                   get("dedup", "eval"), get("dataset_seed", 42), get("dataset_shuffle_seed"), get("max_length"),
                   get("max_prompt_length"), bool(get("skip_bad_rows", False)), mix)
        return dataclasses.replace(spec, **overrides) if overrides else spec

    @property
    def policy(self) -> RowPolicy:
        return RowPolicy(self.skip_bad_rows)

    @property
    def sources(self) -> tuple[SourceSpec, ...]:
        """The train sources: a mixture's, in the recipe's order, or the one."""
        if self.mixture is None:
            return (self.train,)
        return tuple(SourceSpec.of_entry(e) for e in self.mixture.sources)

    @property
    def eval_sets(self) -> tuple[SourceSpec, ...]:
        """A mixture's named eval sets (eval_datasets:), each read whole; empty otherwise."""
        if self.mixture is None or not self.mixture.evals:
            return ()
        return tuple(SourceSpec.of_entry(e) for e in self.mixture.evals)

    def eval_source(self, name: str, split: str) -> SourceSpec:
        """Another split or source read as the train source is (same configuration and options, every row)."""
        return dataclasses.replace(self.train, name=name, split=split, limit=None)
