#!/usr/bin/env bash
# Wheels that scripts/gpu_check.py needs on a GPU machine whose image lacks them or has other versions (Python 3.12,
# torch 2.11, transformers 5.17, accelerate, peft; no TRL, datasets or DeepSpeed), pinned as requirements.txt pins
# them, downloaded here into .whl/ (git-ignored) and carried with the device call (README "GPU check").
# huggingface_hub 2.4 (transformers 5.23 wants >= 1.31) brings httpx2/httpcore2/truststore, which the image lacks.
# Pure Python except tokenizers and safetensors (transformers 5.23 needs tokenizers 0.23 and safetensors >= 0.8;
# both are abi3 wheels, ~4 MB together). pyarrow is the image's own (a 40 MB wheel would not fit in a call's 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
rm -rf .whl && mkdir -p .whl
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    transformers==5.23.0 trl==1.16.0 accelerate==1.15.0 datasets==5.2.0 peft==0.21.2 \
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 tokenizers==0.23.3 \
    safetensors==0.8.0 dill==0.4.1 multiprocess==0.70.19 python-dotenv==1.2.4
du -sh .whl && ls .whl
