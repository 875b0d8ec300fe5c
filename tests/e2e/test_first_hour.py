"""What a new user meets first, end to end on CPU: Ctrl-C saves and the same command resumes (one process and under
torchrun), Ctrl-C before training stops with one line."""

import os
from pathlib import Path

import pytest

from fastdpo.checkpoints import MARKER
from tests.e2e.test_train import _same_weights
from tests.helpers import PYTHON, REPO, run

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(PYTHON).with_name("torchrun"))
ARGS = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "2",
        "--eval_before_train", "false"]


def _train(out, fault=None, check=True, extra=()):
    cmd = [PYTHON, "tests/faults.py", fault, "train_dpo.py"] if fault else [PYTHON, "train_dpo.py"]
    return run(cmd + ["--output_dir", str(out), *ARGS, *extra], check=check)


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """First Ctrl-C: the step finishes, a checkpoint is saved, exit 75 with SIGTERM's resume line. A second one
    stops at once (exit 130) without the checkpoint of the step in flight. Each rerun of the same command resumes
    and ends bit-for-bit where the uninterrupted run ends."""
    full, out = tmp_path / "full", tmp_path / "interrupted"
    _train(full)

    proc = _train(out, "int-at-step:3", check=False)
    assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Ctrl-C: finishing step 3 and saving a checkpoint" in proc.stderr
    assert "preempted (SIGINT): saving a checkpoint at step 3/8" in proc.stdout
    assert "preempted at step 3; rerun the same command to resume" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (out / "checkpoint-3" / MARKER).exists()

    # resumes from 3, saves checkpoint-4 as scheduled; two Ctrl-C at the end of step 5 stop before its checkpoint
    proc = _train(out, "int-twice-at-step:5", check=False)
    assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming from {out}/checkpoint-3" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at once (second Ctrl-C): no checkpoint was written for step 5"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (out / "checkpoint-4" / MARKER).exists() and not (out / "checkpoint-5").exists()

    proc = _train(out)
    assert f"resuming from {out}/checkpoint-4" in proc.stdout and "step 8/8" in proc.stdout
    _same_weights(full, out)


@pytest.mark.parametrize("fault, line", [
    ("int-at-import", "stopped (Ctrl-C) while starting: nothing was written"),
    ("int-at-load", "stopped (Ctrl-C) before the first training step: nothing to save; rerun the same command"),
])
def test_ctrl_c_before_training_stops_at_once_with_one_line(tmp_path, fault, line):
    out = tmp_path / "o"
    proc = _train(out, f"{fault}:0", check=False)
    assert proc.returncode == 130, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "data_report.json").exists()


def test_ctrl_c_under_torchrun_reaches_every_rank_and_resumes(tmp_path):
    """torchrun starts its ranks in sessions of their own: a terminal's Ctrl-C reaches the launcher only, which
    sends each rank one SIGINT. Both ranks stop at the same step boundary with a complete checkpoint (exit 75 each;
    the launcher then reports its own SignalException), and the same command resumes to the uninterrupted
    weights."""
    def launch(out, fault=None, check=True):
        env = {"FASTDPO_FAULT": fault, "PYTHONPATH": str(REPO / "tests" / "fault_site")} if fault else None
        return run([TORCHRUN, "--nproc_per_node", "2", "train_dpo.py", "--use_cpu", "true", "--output_dir", str(out),
                    *ARGS], env=env, check=check)

    full, out = tmp_path / "full", tmp_path / "interrupted"
    launch(full)
    proc = launch(out, "int-launcher-at-step:3@0", check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "closing signal SIGINT" in log, log[-4000:]
    assert "Ctrl-C: finishing step" in log and "preempted (SIGINT): saving a checkpoint at step" in log
    saved = [p for p in out.glob("checkpoint-*") if (p / MARKER).exists()]
    assert len(saved) == 1 and {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(saved[0])), saved
    proc = launch(out)
    assert f"resuming from {saved[0]}" in proc.stdout and "step 8/8" in proc.stdout
    _same_weights(full, out)


WORKER = """
import os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda n, f: print(f"rank got {signal.Signals(n).name}", flush=True) or sys.exit(75))
print("ready", flush=True)
time.sleep(60)
"""


def test_the_slurm_launcher_leaves_sigterm_to_the_ranks_and_passes_sigint_on(tmp_path):
    """scripts/_launch.sh's per-node launcher line, run as is: torchrun must not handle SIGTERM (the ranks get Slurm's
    own and save within KillWait; torchrun's handler would SIGKILL them 30 s later), and passes a SIGINT on."""
    import signal
    import subprocess
    import time

    line = next(ln.strip() for ln in (REPO / "scripts" / "_launch.sh").read_text().splitlines()
                if ln.strip().startswith('trap "" USR1 TERM;'))
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "log"
    with open(log, "w") as out:
        launcher = subprocess.Popen(["bash", "-c", f"{line}\nexec {TORCHRUN} --nproc_per_node 1 worker.py"],
                                    cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)
        time.sleep(3)
        assert launcher.poll() is None and "rank got" not in log.read_text(), log.read_text()  # ignored
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=60)
        text = log.read_text()
        assert "closing signal SIGINT" in text and "rank got SIGINT" in text and "SIGTERM" not in text, text
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_the_log_keeps_real_warnings_only(tmp_path):
    """A run and its resume: none of fastdpo.logs.QUIET's lines (DeepSpeed's CPU notice, TRL's padding_free notice
    that contradicts fastdpo, the tied lm_head 'missing' on resume, TRL's deprecated-name FutureWarning), while real
    warnings stay, TRL's own among them (the same logger as a dropped line)."""
    import torch

    from fastdpo import logs

    args = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--loss_type", "aot",
            "--model_init_kwargs", '{"low_cpu_mem_usage": true}']  # aot: the stock path, where TRL's notices fire
    out = tmp_path / "o"
    first = run([PYTHON, "tests/faults.py", "int-at-step:1", "train_dpo.py", "--output_dir", str(out), *args],
                check=False)
    assert first.returncode == 75, first.stdout[-3000:] + first.stderr[-3000:]
    second = run([PYTHON, "train_dpo.py", "--output_dir", str(out), *args])
    assert f"resuming from {out}/checkpoint-1" in second.stdout
    log = first.stdout + first.stderr + second.stdout + second.stderr
    for name, start, _, _ in logs.QUIET:
        if name != "DeepSpeed" or not torch.cuda.is_available():
            assert start not in log, start
    for message, _, _ in logs.QUIET_WARNINGS:
        assert message.replace("\\", "") not in log
    assert "padding_free: using the stock padded path because loss_type ['aot'] couples the pairs" in log
    assert "trl.trainer.dpo_trainer: [RANK 0] You passed `model_init_kwargs` to the `DPOConfig`" in log


def _env_seeing(site: Path, folder: Path) -> Path:
    """A venv that sees `site`'s packages without copying or touching them: each package a symlink, each dist-info a
    copy without its RECORD (so uv counts it installed, and could not uninstall it through the link if it tried)."""
    import shutil
    import subprocess
    import sys

    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    target = next(folder.glob("lib/python*/site-packages"))
    for entry in site.iterdir():
        if entry.name.endswith(".dist-info"):
            shutil.copytree(entry, target / entry.name, ignore=shutil.ignore_patterns("RECORD"))
        else:
            (target / entry.name).symlink_to(entry)
    return folder


def test_the_hugging_face_job_script_with_uv_run(tmp_path):
    """scripts/hf_job.py as `hf jobs uv run` runs it, against this checkout (its committed HEAD): it fetches the
    repository from FASTDPO_GIT_URL, installs the checkout's pins with uv (offline: all already there, nothing is
    downloaded), and runs train_dpo.py on FASTDPO_RECIPE with the push on; the push is refused offline in seconds,
    and with --push_to_hub false the tiny recipe trains."""
    import shutil
    import sys

    uv = shutil.which("uv", path=f"{Path(PYTHON).parent}:{os.environ['PATH']}")
    assert uv, "uv is pinned in requirements.txt: make setup installs it"
    site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p, "trl").is_dir())
    venv = _env_seeing(site, tmp_path / "venv")
    env = {"VIRTUAL_ENV": str(venv), "UV_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path),
           "FASTDPO_GIT_URL": str(REPO), "FASTDPO_GIT_REF": "HEAD", "FASTDPO_RECIPE": "recipes/tiny.yaml"}
    cmd = [uv, "run", "--active", str(REPO / "scripts" / "hf_job.py"), "--output_dir", str(tmp_path / "out"),
           "--max_steps", "2", "--eval_before_train", "false"]
    proc = run(cmd, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"uv pip install --python {venv}/bin/python torch==2.13.0 -r" in proc.stdout  # uv names itself: UV
    assert "Installed" not in proc.stderr and "Uninstalled" not in proc.stderr  # uv found every pin in place
    assert f"hf_job: train (0 GPUs): {venv}/bin/python train_dpo.py --config recipes/tiny.yaml --push_to_hub true" in \
        proc.stdout
    assert "push_to_hub is set but HF_HUB_OFFLINE=1" in proc.stderr and not (tmp_path / "out").exists()
    proc = run(cmd + ["--push_to_hub", "false"], cwd=tmp_path, env=env)
    assert "step 2/2" in proc.stdout and (tmp_path / "out" / "model.safetensors").exists()
    proc = run(cmd, cwd=tmp_path, env={**env, "FASTDPO_GIT_URL": ""}, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("hf_job: set FASTDPO_GIT_URL to the fastdpo repository")
