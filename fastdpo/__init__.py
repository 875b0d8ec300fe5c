"""fastdpo: the reusable pieces behind train_dpo.py, train_sft.py and scripts/.

config      recipe + command line -> (ScriptArguments, DPOConfig, ModelConfig); secrets from .env
errors      row errors with their place, notes (merged turns, empty answers, no-pair rows) with first places
files       atomic writes and content digests
sources     every data source streamed in batches, with file:line for each row
layouts     the preference layouts users bring, detected once per source, each row -> TRL's preference form
data        pairs -> TRL-identical token ids, truncation, the eval split and dedup (DPO, SFT, analyzer, evaluation)
tokcache    tokenise once: the memory-mapped token cache every launch and rank reads
sft         SFT rows (messages or prompt/completion) for train_sft.py, split as preference data
memory      per-GPU memory of weights, gradients, optimizer states and activations per backend (README table)
models      model/tokenizer loading (`embedded:tiny-llama` resolves to the offline tiny model)
tiny        the embedded tiny model, tokenizer and datasets
trainer     TRL's DPOTrainer taking pre-tokenised pairs, plus the fast path:
  packing   padding-free rows of chosen/rejected sequences
  segattn   per-sequence causal sdpa inside packed rows
  batching  token-budget micro-batches with the stock per-pair loss weights
  refcache  reference log-probs computed once, in resumable chunks, cached on disk
lengths     token-length statistics for scripts/analyze_dataset.py
evaluation  preference accuracy, margins, KL and generations for scripts/evaluate.py
preemption  SIGUSR1/SIGTERM -> checkpoint and exit 75 (Slurm requeue)
checkpoints complete-checkpoint markers, resume choice, run identity (a changed rerun is refused)
logs        one plain progress line per logging step
ranks       which process this is and which one writes (caches per node, output_dir per run), exit codes, failure notes
watchdog    a stalled rank dumps its stacks and exits 70 (retried); waits for another process, with deadlines
runlock     one run per output_dir (a lock that works on NFS/Lustre, stale ones taken over)
failures    after a failed attempt: who failed first, of what, retry or not (scripts/_launch.sh)
exits       the entry points' way out: each exception -> its exit code and failure note
"""
