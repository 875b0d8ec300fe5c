# /// script
# requires-python = ">=3.11"
# dependencies = []
# ///
"""DPO on Hugging Face Jobs: only this file is uploaded, so it fetches fastdpo from git, installs the checkout's
pinned requirements and runs train_dpo.py on a recipe of that checkout, pushing the model to the Hub at the end.

    hf jobs uv run --flavor a100-large --secrets HF_TOKEN \\
        -e FASTDPO_GIT_URL=https://github.com/<you>/fastdpo -e FASTDPO_GIT_REF=main \\
        -e FASTDPO_RECIPE=recipes/smollm3_hh_rlhf.yaml \\
        scripts/hf_job.py --hub_model_id <you>/SmolLM3-3B-DPO-hh-rlhf

    FASTDPO_GIT_URL   the repository to fetch (required): your fork or a copy with your recipe committed
    FASTDPO_GIT_REF   branch, tag or commit to check out (default: main)
    FASTDPO_RECIPE    recipe path inside the checkout (default: recipes/smollm3_hh_rlhf.yaml, the course exercise)
    arguments         train_dpo.py flags after the recipe; --push_to_hub true comes first (a job's disk is gone
                      when it ends), so --push_to_hub false here turns it off

The header lists no dependencies on purpose: it is static text, and the pins that matter (TRL, transformers, ...)
are the fetched checkout's own requirements.txt, installed into this script's environment with `uv pip` (hf jobs
runs the script with uv). torch is the Makefile's pin, from PyPI (the CUDA build on Linux). More than one GPU:
`accelerate launch` with DeepSpeed ZeRO-2 (accelerate_config.yaml), one process per GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TORCH = "torch==2.13.0"  # the Makefile's TORCH
DEFAULT_RECIPE = "recipes/smollm3_hh_rlhf.yaml"


def step(what: str, cmd: list[str], **kwargs) -> None:
    print(f"hf_job: {what}: {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, **kwargs)
    if done.returncode != 0:
        sys.exit(f"hf_job: {what} failed (exit {done.returncode}); see above")


def fetch(url: str, ref: str) -> Path:
    """One commit of the repository, without its history: a branch, a tag or a commit id."""
    git = shutil.which("git") or sys.exit("hf_job: git is not installed in this image; run the job with an image "
                                          "that has it (hf jobs uv run --image ...)")
    checkout = Path(tempfile.mkdtemp(prefix="fastdpo-"))
    step("git", [git, "init", "-q", str(checkout)])
    step(f"fetch {ref} of {url}", [git, "-C", str(checkout), "fetch", "-q", "--depth", "1", url, ref])
    step("check out", [git, "-C", str(checkout), "checkout", "-q", "FETCH_HEAD"])
    return checkout


def install(checkout: Path) -> None:
    """torch and the checkout's pins into this script's environment (uv's, when hf jobs or `uv run` runs it)."""
    uv = os.environ.get("UV") or shutil.which("uv")
    pip = [uv, "pip", "install", "--python", sys.executable] if uv else [sys.executable, "-m", "pip", "install"]
    step("install", [*pip, TORCH, "-r", str(checkout / "requirements.txt")])


def gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def main(argv: list[str]) -> int:
    url = os.environ.get("FASTDPO_GIT_URL") or sys.exit(
        "hf_job: set FASTDPO_GIT_URL to the fastdpo repository to fetch (hf jobs uv run ... -e "
        "FASTDPO_GIT_URL=https://github.com/<you>/fastdpo), and FASTDPO_GIT_REF to a branch, tag or commit")
    checkout = fetch(url, os.environ.get("FASTDPO_GIT_REF") or "main")
    recipe = os.environ.get("FASTDPO_RECIPE") or DEFAULT_RECIPE
    if not (checkout / recipe).is_file():
        sys.exit(f"hf_job: {recipe} is not in {url} at {os.environ.get('FASTDPO_GIT_REF') or 'main'}: commit it "
                 "there, or set FASTDPO_RECIPE to one of recipes/*.yaml")
    install(checkout)
    n = gpus()
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_config.yaml",
                 "--num_processes", str(n), "--num_machines", "1"] if n > 1 else [sys.executable])
    cmd = [*launcher, "train_dpo.py", "--config", recipe, "--push_to_hub", "true", *argv]
    print(f"hf_job: train ({n} GPU{'s' * (n != 1)}): {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd, cwd=checkout).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
