"""TRL's DPOTrainer, taking the pairs our data module already tokenised and truncated."""

from __future__ import annotations

from trl import DPOTrainer as _TRLDPOTrainer


class DPOTrainer(_TRLDPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # `fastdpo.data.tokenize_dataset` produced prompt_ids/chosen_ids/rejected_ids with TRL's own tokenisation
        # plus max_prompt_length; tokenising again would be slower and would undo that truncation.
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
