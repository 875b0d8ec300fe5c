"""fastdpo: the reusable pieces behind train_dpo.py, train_sft.py and scripts/.

cli         the `fastdpo` command: train | sft | analyze | evaluate, the scripts' flags
hub         a Hub id or local path checked once; an unreachable one fails in one line with the fix
config      recipe + command line -> (ScriptArguments, DPOConfig, ModelConfig): the entry points' one door
  recipes   where each key came from (recipe line, flag), unknown and renamed keys
  settings  values that cannot work, refused before any data or model is loaded
  credentials  secrets from .env, masked in logs, refused in arguments
errors      row errors with their place, the skip-or-fail policy, notes (merged turns, empty answers, no-pair rows)
files       atomic writes and content digests
frameworks  every private name of TRL, transformers, accelerate, torch and datasets fastdpo uses, in one place
dataspec    what a data run reads and how: the spec training, SFT, evaluation and the analyzer pass the data stages
sources     every data source streamed in batches, with file:line for each row
layouts     the preference layouts users bring, detected once per source, each row -> TRL's preference form
checks      rows through their layout, each accounted for; a source's prompts checked as a whole
tokens      pairs -> TRL-identical token ids, truncation
splits      the eval split, dedup and shuffle (DPO and SFT, in memory and from the token cache)
tokcache    tokenise once: the memory-mapped token cache every launch and rank reads
  tokbuild  one cache entry built: a source through forked workers into Arrow files
report      the accounting line, data_report.json and the listings of rows not trained on
data        the data stages in memory: pairs and token datasets for evaluation, tests and small tools
sft         SFT rows (messages or prompt/completion) for train_sft.py, split as preference data
memory      per-GPU memory of weights, gradients, optimizer states and activations per backend (README table)
models      model/tokenizer loading (`embedded:tiny-llama` resolves to the offline tiny model)
tiny        the embedded tiny model, tokenizer and datasets
trainer     TRL's DPOTrainer taking pre-tokenised pairs, plus the fast path:
  packing   padding-free rows of chosen/rejected sequences; the packing schemes the probe chooses from
  segattn   per-sequence causal sdpa inside packed rows
  batching  token-budget micro-batches with the stock per-pair loss weights
  refcache  reference log-probs computed once, in resumable chunks, cached on disk
lengths     token-length statistics for scripts/analyze_dataset.py
evaluation  preference accuracy, margins, KL and generations for scripts/evaluate.py
heldout     a finished run's held-out rows, rebuilt from its run.json (scripts/evaluate.py OUTPUT_DIR)
preemption  SIGUSR1/SIGTERM -> checkpoint and exit 75 (Slurm requeue)
checkpoints complete-checkpoint markers, resume choice, run identity (a changed rerun is refused)
logs        one plain progress line per logging step
ranks       which process this is and which one writes (caches per node, output_dir per run)
watchdog    a stalled rank dumps its stacks and exits 70 (retried); waits for another process, with deadlines
runlock     one run per output_dir (a lock that works on NFS/Lustre, stale ones taken over)
failures    after a failed attempt: who failed first, of what, retry or not (scripts/_launch.sh)
exits       the entry points' way out: each exception -> its exit code and failure note
"""

import logging

# peft imports bitsandbytes, whose CPU backend warns (on CPUs with AVX512-BF16) that the optional `kernels` package
# is missing: it only speeds up 4-bit matmuls on CPU, which fastdpo refuses (QLoRA needs a CUDA GPU). Set here, so
# every use of the package (scripts, `python -c`, notebooks) is spared the line, not only the entry points.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
