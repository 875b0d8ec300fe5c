"""The fast path under parameter sharding (DeepSpeed ZeRO-3, FSDP2) is the same math as under DDP: 2 CPU processes
(gloo), a tiny Llama and a tiny OLMo 3 (sliding windows of 8 tokens on 3 of 4 layers), gradient checkpointing on,
4 optimizer steps of 2 x 4 pairs per rank with several token-budget micro-batches each.

    .venv/bin/python -m pytest tests/distributed/test_sharded.py      # ~2-3 minutes on 2 cores

Per backend: the probe picks per-sequence attention with the prompt shared (on the float32 twin: the sharded weights
are never gathered for it), the reference pass pads the rank with fewer micro-batches to the other's forward count,
each rank holds half the weights, the ranks end with identical weights and losses, and every step's loss equals
DDP's within 1e-5 (fp32: the backends reduce gradients in different orders and partitions, ~1e-7 apart here; a
wrong gradient or other initial weights moved the third step's loss by 2e-2).

FSDP2 on CPU: accelerate 1.15 drops the FSDP plugin when use_cpu is set (plain MULTI_CPU DDP), so
dist_sharded.py marks accelerate's state FSDP as it does on GPUs; torch's fully_shard itself runs on gloo.
"""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdpo import models, tiny
from tests import archs

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.parity
ARCHS = ("llama", "olmo3")


def torchrun(script: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """2 processes on a free port (`--master_port 0` hangs torchrun's static rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{ROOT / '.venv/bin'}:{os.environ.get('PATH', '')}"}
    # torchrun as a module of the venv's python: its console script failed to import torch once, while the shared
    # venv was being reinstalled
    return subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port),
                           str(HERE / script), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process run per backend, each training both tiny models from the same saved weights."""
    tmp = tmp_path_factory.mktemp("sharded")
    models.resolve(tiny.MODEL_ID)  # the embedded tokenizer's folder, built here once rather than by two ranks at once
    folders = []
    for name in ARCHS:
        archs.build(name).save_pretrained(tmp / "models" / name)
        folders.append(str(tmp / "models" / name))
    out = {}
    for backend in ("ddp", "zero3", "fsdp2"):
        proc = torchrun("dist_sharded.py", str(tmp / backend), backend, *folders)
        assert proc.returncode == 0, f"{backend}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        out[backend] = {name: [(json.loads((tmp / backend / name / f"rank{r}.json").read_text()),
                                torch.load(tmp / backend / name / f"rank{r}.pt")) for r in range(2)]
                        for name in ARCHS}
        out[backend]["log"] = proc.stdout + proc.stderr
        out[backend]["final"] = {name: load_file(tmp / backend / name / "final" / "model.safetensors")
                                 for name in ARCHS if (tmp / backend / name / "final").is_dir()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_sharded_fast_path_equals_ddp(runs, backend, name):
    (info0, w0), (info1, w1) = runs[backend][name]
    (ddp, ddp_w), _ = runs["ddp"][name]
    kind = {"zero3": "DistributedType.DEEPSPEED", "fsdp2": "DistributedType.FSDP"}[backend]
    for info in (info0, info1):
        assert info["fast"] and info["scheme"] == "segments + prefix sharing", info
        assert info["distributed_type"] == kind and info["world"] == 2
        assert info["share"] == pytest.approx(0.5, abs=0.02), info["share"]  # each rank holds half the weights
    assert ddp["share"] == 1.0
    # the reference pass: one rank ran more micro-batches, the other padded to its count
    assert sorted(i["ref_pass"]["even_padding"] for i in (info0, info1))[-1] > 0, (info0["ref_pass"], info1["ref_pass"])
    assert ddp["ref_pass"]["even_padding"] == 0
    # ranks agree: the same logged losses and the same trained weights; their own micro-batch losses differ
    assert info0["losses"] == info1["losses"]
    assert info0["local"] != info1["local"]
    assert w0.keys() == w1.keys() == ddp_w.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # the same training as DDP's, step for step
    assert len(info0["losses"]) == len(ddp["losses"]) == 4
    torch.testing.assert_close(torch.tensor(info0["losses"]), torch.tensor(ddp["losses"]), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(info0["local"]), torch.tensor(ddp["local"]), atol=1e-5, rtol=0)
    worst = max((w0[k] - ddp_w[k]).abs().max().item() for k in w0)
    assert worst <= 1e-5, worst
    if backend == "fsdp2":  # the final model folder holds the trained weights, gathered from the shards
        final = runs[backend]["final"][name]
        assert final and final.keys() <= w0.keys(), sorted(final)
        for k in final:
            assert torch.equal(final[k], w0[k].to(final[k].dtype)), k
    if backend == "zero3":  # loaded partitioned (zero.Init): no rank ever held the whole model
        assert info0["loaded_share"] < 0.05 and info1["loaded_share"] < 0.05, (info0["loaded_share"],
                                                                                info1["loaded_share"])


@pytest.mark.slow
def test_probe_verdict_is_one_for_all_ranks(tmp_path):
    """A packing scheme rejected on one rank is rejected on every rank: here rank 1's model (Gemma 3 with bidirectional
    attention) refuses per-sequence attention, and both ranks take the model's own packed mask, rank 0 saying why."""
    proc = torchrun("dist_probe.py", str(tmp_path), "disagree", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert chosen == [{"scheme": "dense"}, {"scheme": "dense"}]
    assert "matches here" in proc.stderr and "but not on another rank; all ranks keep one path" in proc.stderr


@pytest.mark.slow
def test_probe_out_of_memory_stops_every_rank_with_the_fix(tmp_path):
    """A real allocation failure in rank 1's probe (RLIMIT_AS) is an out-of-memory on every rank, with the fix, not
    a rejected scheme (which would have sent the ranks down different paths, or the run to stock and a later OOM)."""
    proc = torchrun("dist_probe.py", str(tmp_path), "oom", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    msgs = [json.loads((tmp_path / f"rank{r}.json").read_text()).get("oom", "") for r in range(2)]
    assert "(on another rank)" in msgs[0] and "can't allocate memory" in msgs[1], msgs
    for m in msgs:
        assert "out of memory while checking" in m and "lower token_budget" in m and "gradient_checkpointing" in m


def test_fsdp_version_1_keeps_the_stock_path(tmp_path, monkeypatch):
    """FSDP1 (an accelerate config's default version) is not tested with packing: refused with the setting to
    change, whether it comes from TrainingArguments or accelerate's environment; FSDP2 is not refused."""
    from datasets import Dataset

    from fastdpo import config as cfg
    from fastdpo.trainer import fast_path_blocker

    tok = models.load_tokenizer(tiny.MODEL_ID)
    ds = Dataset.from_list([{"prompt_ids": [3], "chosen_ids": [4], "rejected_ids": [5]}])
    model = archs.build("llama")
    _, args, _ = cfg.parse_args(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert fast_path_blocker(model, args, None, ds, tok) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "FSDP version 1 is not tested" in fast_path_blocker(model, args, None, ds, tok)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fast_path_blocker(model, args, None, ds, tok) is None
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    args.fsdp, args.fsdp_config = True, {"version": 1}
    assert "fsdp_version: 2" in fast_path_blocker(model, args, None, ds, tok)
