"""scripts/gpu_check.py --cpu: the GPU check's own code at tiny shapes, so it cannot rot between GPU sessions.

    .venv/bin/python -m pytest tests/e2e/test_gpu_check.py          # ~40 s of CPU on 2 cores
"""

import json

import pytest

from tests.helpers import PYTHON, REPO, run

pytestmark = pytest.mark.slow


def test_cpu_dry_run(tmp_path):
    """One run of the one command: the JSON and the markdown summary are written,
    every family's parity cells are exact with the varlen scheme (reference kernel) chosen first, the skipped
    implementations say why, and stock and fast both trained, the fast path packed without padding."""
    proc = run([PYTHON, "scripts/gpu_check.py", "--cpu", "--out", str(tmp_path)], timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary in proc.stdout and "## Parity, packed vs padded" in summary

    env = report["environment"]
    assert env["device"] == "cpu" and env["gpu"] is None and env["torch"] and env["transformers"] and env["trl"]
    assert report["matmul_peak_flops"] > 0

    rows = report["parity"]
    assert {r["family"] for r in rows} == {"llama", "olmo3", "qwen3"}
    for r in rows:
        assert "error" not in r, r
        assert r["logps_max"] <= 1e-5 and r["grad_rel"] <= 1e-4 and r["probe_ok"], r
    chosen = {r["family"]: r["scheme"] for r in rows if r["chosen"]}
    assert chosen == dict.fromkeys(("llama", "olmo3", "qwen3"), "varlen + prefix sharing [reference kernel]")
    assert "no CPU backward" in report["parity_skipped"]["flex_attention"]

    runs = report["bench"]["runs"]
    assert set(runs) == {"stock", "fast"} and all("error" not in r for r in runs.values()), runs
    assert runs["stock"]["scheme"] is None and runs["fast"]["scheme"] == "segments + prefix sharing"
    assert runs["fast"]["padding_efficiency"] == 1.0 > runs["stock"]["padding_efficiency"]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_mem_mb"] > 0 for r in runs.values())
    assert report["bench"]["model"]["model_type"] == "olmo3"


def test_refuses_cuda_mode_without_a_gpu():
    """Without --cpu on a machine without CUDA it stops at once and says how to run the dry run."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run([PYTHON, "scripts/gpu_check.py", "--out", "/nonexistent"], cwd=REPO, check=False, timeout=120)
    assert proc.returncode == 1 and "run with --cpu for the dry run" in proc.stderr
