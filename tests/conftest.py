"""Fixtures for every layer. The layers, cheapest first: unit/ (data, configs, tokenisation, the house rules; seconds),
e2e/ (the entry points on CPU with the tiny model), parity/ (fast paths against the plain path, per architecture),
distributed/ (2 processes on CPU: DDP, ZeRO-2/3, FSDP2, crashes and stalls), slurm/ (a real two-node Slurm on this
host). Shared helpers live in tests/helpers.py; fault injection in tests/faults.py; the tiny architectures in
tests/archs.py."""

from __future__ import annotations

import signal

import pytest

from fastdpo import models, tiny


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    return tiny.materialize_model()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    return models.load_tokenizer(tiny_model_path)


# A suite started in the background by a shell without job control (`make test &` in a script, some CI runners)
# inherits SIGINT ignored, and so would every run it starts: fastdpo, rightly, leaves an ignored Ctrl-C ignored, and
# the Ctrl-C tests would see nothing happen. The runs the tests start get Ctrl-C back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
