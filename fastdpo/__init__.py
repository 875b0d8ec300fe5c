"""fastdpo: the reusable pieces behind train_dpo.py.

config     recipe + command line -> (ScriptArguments, DPOConfig, ModelConfig); secrets from .env
data       any preference source -> TRL's format -> TRL-identical token ids (shared with the analyzer)
models     model/tokenizer loading (`embedded:tiny-llama` resolves to the offline tiny model)
tiny       the embedded tiny model, tokenizer and datasets
trainer    TRL's DPOTrainer taking pre-tokenised pairs, plus the packed fast path
logs       one plain progress line per logging step
"""
