"""The sbatch scripts on a real two-node Slurm on this host (tests/slurm/slurm_cluster.py), with the CPU overrides:

    RECIPE=recipes/tiny.yaml GPUS_PER_NODE=2 SBATCH_GRES=none \
        sbatch --wait scripts/dpo_train.sh --use_cpu true --max_steps 40 --output_dir ...
    RECIPE=recipes/tiny.yaml GPUS_PER_NODE=1 SBATCH_GRES=none \
        sbatch --wait --nodes=2 scripts/dpo_train.sh --use_cpu true --max_steps 40 --output_dir ...

Two processes per job (2 on one node, or 1 on each of two), DeepSpeed ZeRO-2 from the repo's
accelerate_config.yaml and ds_config.json, and ZeRO-3 on two nodes (BACKEND=zero3: accelerate_config_zero3.yaml,
ds_config_zero3.json). The uninterrupted runs are the references the interrupted ones must end on bit for bit.
Run: .venv/bin/python -m pytest tests/slurm/test_slurm.py -m slurm   (as root; installs Slurm with apt-get)
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastdpo.checkpoints import MARKER
from tests.slurm.slurm_cluster import NODES, SlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"scripts/dpo_train.sh": "dpo-think", "scripts/dpo_instruct_train.sh": "dpo-instruct"}
STEPS = 40  # ~10 s of training at 2 ranks: long enough to interrupt in the middle
JOB_TIMEOUT = 600  # the first job in a fresh CI image also builds DeepSpeed's CPU comm op (~1 min)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="session")
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster.start()
    yield c
    c.stop()


def submit(cluster, script, out_dir, wait=True, nodes=1, backend=None, extra=(), env=None):
    """sbatch the repo's own script with the CPU overrides; returns (job id, sbatch result)."""
    env = {**cluster.env, "RECIPE": "recipes/tiny.yaml", "GPUS_PER_NODE": str(2 // nodes), "SBATCH_GRES": "none",
           **({"BACKEND": backend} if backend else {}), **(env or {})}
    # eval_before_train is off: transformers cannot evaluate a ZeRO-2 model before training starts.
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *([f"--nodes={nodes}"] if nodes > 1 else []),
           script, "--use_cpu", "true", "--eval_before_train", "false", "--max_steps", str(STEPS),
           "--logging_steps", "2", "--output_dir", str(out_dir), *extra]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    job_id = r.stdout.split(";")[0].strip()
    assert job_id.isdigit(), f"sbatch failed ({r.returncode}): {r.stderr}"
    return job_id, r


def log_of(cluster, job_id):
    return Path(cluster.scontrol_job(job_id)["StdOut"])


def _read(cluster, job_id):
    log = log_of(cluster, job_id)
    return log.read_text() if log.exists() else ""


def assert_trained(cluster, job_id, out_dir, name):
    job = cluster.scontrol_job(job_id)
    log = Path(job["StdOut"])
    text = log.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job_id}: {job['JobState']}\n{text[-3000:]}"
    assert log.parent == REPO / "logs" and log.name == f"{name}-{job_id}.out"
    assert "16 pairs per optimizer step" in text and "2 processes" in text  # 8 pairs x 2 ranks: both ran
    steps = [int(n) for n in re.findall(rf"^step (\d+)/{STEPS} \| loss [\d.]+ \| acc ", text, re.M)]
    assert steps and steps[-1] == STEPS, text[-3000:]
    assert "\r" not in text  # no progress bars in log files
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()
    return text


def assert_same_weights(reference_dir, out_dir):
    reference = load_file(reference_dir / "model.safetensors")
    resumed = load_file(out_dir / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


def wait_for_a_step(cluster, job_id, deadline):
    while not re.search(r"^step \d+/", _read(cluster, job_id), re.M):  # training has taken a step
        assert time.monotonic() < deadline, _read(cluster, job_id)[-3000:]
        time.sleep(0.5)


def wait_until_ended(cluster, job_id, deadline):
    while (job := cluster.scontrol_job(job_id))["JobState"] not in ENDED:
        assert time.monotonic() < deadline, _read(cluster, job_id)[-3000:]
        time.sleep(1)
    return job


@pytest.fixture(scope="session")
def one_node(cluster, tmp_path_factory):
    """scripts/dpo_train.sh on one node, 2 processes; the reference for the scancel-and-resubmit test."""
    out = tmp_path_factory.mktemp("slurm") / "one_node"
    job_id, r = submit(cluster, "scripts/dpo_train.sh", out)
    assert r.returncode == 0, f"sbatch --wait returned {r.returncode}: {r.stderr}\n{_read(cluster, job_id)[-3000:]}"
    return job_id, out


@pytest.fixture(scope="session")
def two_nodes(cluster, tmp_path_factory):
    """scripts/dpo_train.sh with --nodes=2, 1 process per node; the reference for the two-node USR1 test."""
    out = tmp_path_factory.mktemp("slurm") / "two_nodes"
    job_id, r = submit(cluster, "scripts/dpo_train.sh", out, nodes=2)
    assert r.returncode == 0, f"sbatch --wait returned {r.returncode}: {r.stderr}\n{_read(cluster, job_id)[-3000:]}"
    return job_id, out


def test_dpo_train_sh(cluster, one_node):
    job_id, out = one_node
    text = assert_trained(cluster, job_id, out, "dpo-think")
    assert "recipe:  recipes/tiny.yaml" in text and "restart 0" in text
    assert "backend: zero2 (accelerate_config.yaml)" in text  # the default, unchanged
    assert f"launcher: node {NODES[0]}, machine rank 0 of 1" in text


def test_two_nodes_one_process_each(cluster, two_nodes, one_node):
    job_id, out = two_nodes
    text = assert_trained(cluster, job_id, out, "dpo-think")
    assert f"nodes:   2 ({NODES[0][:-1]}[1-2]), main {NODES[0]}:" in text and "gpus:    1 per node, 2 processes" in text
    assert "x 2 processes x" in text  # world size 2 across the two nodes
    for rank, node in enumerate(NODES):  # one launcher on each node, ranked by its own SLURM_NODEID
        assert f"launcher: node {node}, machine rank {rank} of 2" in text
    # 2 ranks on two nodes or on one: the same ZeRO-2 math, to the bit
    assert_same_weights(one_node[1], out)


def test_a_mixture_on_two_nodes(cluster, tmp_path):
    """A mixture recipe (two local sources, by count and by weight) on two nodes, one process each: the ranks
    train the same mixture in lockstep to the last step, from one mixed file, accounted per source."""
    from tests.test_mixture_train import mixture_recipe, write_sources

    convo, flat = write_sources(tmp_path)
    recipe, out, cache = mixture_recipe(tmp_path, convo, flat, 50), tmp_path / "out", tmp_path / "cache"
    job_id, r = submit(cluster, "scripts/dpo_train.sh", out, nodes=2,
                       env={"RECIPE": str(recipe), "FASTDPO_CACHE": str(cache)})
    assert r.returncode == 0, f"sbatch --wait returned {r.returncode}: {r.stderr}\n{_read(cluster, job_id)[-3000:]}"
    text = assert_trained(cluster, job_id, out, "dpo-think")
    assert "x 2 processes x" in text and "mixture of 2 sources:" in text
    report = json.loads((out / "data_report.json").read_text())
    assert (report["sources"]["convo"]["trained"], report["sources"]["plain"]["trained"]) == (50, 90)
    assert len(list((cache / "tokens").glob("mix-*.arrow"))) == 1  # one file, the same for every rank
    assert set(json.loads((out / "run.json").read_text())["settings"]["eval_data"]) == {"convo", "plain"}


def test_usr1_on_two_nodes_saves_requeues_and_resumes_to_the_same_weights(cluster, two_nodes, tmp_path):
    out = tmp_path / "out"
    job_id, _ = submit(cluster, "scripts/dpo_train.sh", out, wait=False, nodes=2)
    deadline = time.monotonic() + JOB_TIMEOUT
    wait_for_a_step(cluster, job_id, deadline)
    # What a user (or an admin draining a node) types; the time-limit warning takes the same path.
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], env=cluster.env, check=True)

    job = wait_until_ended(cluster, job_id, deadline)
    text = assert_trained(cluster, job_id, out, "dpo-think")
    assert job["Restarts"] == "1", text[-3000:]
    stopped = re.search(r"preempted \(SIGUSR1\): saving a checkpoint at step (\d+)/", text)
    assert stopped and 0 < int(stopped[1]) < STEPS, text[-3000:]
    assert f"requeueing job {job_id}" in text and "restart 1" in text
    assert f"resuming from {out}/checkpoint-{stopped[1]}" in text
    assert text.count(f"launcher: node {NODES[1]}, machine rank 1 of 2") == 2  # both runs on both nodes
    assert_same_weights(two_nodes[1], out)


@pytest.fixture(scope="session")
def two_nodes_zero3(cluster, tmp_path_factory):
    """BACKEND=zero3 scripts/dpo_train.sh --nodes=2: DeepSpeed ZeRO-3 across two nodes; the USR1 test's reference."""
    out = tmp_path_factory.mktemp("slurm") / "two_nodes_zero3"
    job_id, r = submit(cluster, "scripts/dpo_train.sh", out, nodes=2, backend="zero3")
    assert r.returncode == 0, f"sbatch --wait returned {r.returncode}: {r.stderr}\n{_read(cluster, job_id)[-3000:]}"
    return job_id, out


def test_zero3_on_two_nodes_usr1_requeues_and_resumes_to_the_same_weights(cluster, two_nodes_zero3, tmp_path):
    job_id, reference = two_nodes_zero3
    text = assert_trained(cluster, job_id, reference, "dpo-think")
    assert "backend: zero3 (accelerate_config_zero3.yaml)" in text and "x 2 processes x" in text
    for rank, node in enumerate(NODES):
        assert f"launcher: node {node}, machine rank {rank} of 2" in text

    out = tmp_path / "out"
    job_id, _ = submit(cluster, "scripts/dpo_train.sh", out, wait=False, nodes=2, backend="zero3")
    deadline = time.monotonic() + JOB_TIMEOUT
    wait_for_a_step(cluster, job_id, deadline)
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], env=cluster.env, check=True)
    job = wait_until_ended(cluster, job_id, deadline)
    text = assert_trained(cluster, job_id, out, "dpo-think")
    assert job["Restarts"] == "1", text[-3000:]
    stopped = re.search(r"preempted \(SIGUSR1\): saving a checkpoint at step (\d+)/", text)
    assert stopped and 0 < int(stopped[1]) < STEPS, text[-3000:]
    assert f"resuming from {out}/checkpoint-{stopped[1]}" in text
    # the checkpoint it resumed from holds both ranks' parameter and optimizer partitions, all in the marker
    files = json.loads((out / f"checkpoint-{stopped[1]}" / MARKER).read_text())["files"]
    assert sum(re.fullmatch(r"global_step\d+/zero_pp_rank_[01]_mp_rank_00_(model|optim)_states\.pt", f) is not None
               for f in files) == 4, sorted(files)
    assert_same_weights(reference, out)


def test_unknown_backend_says_what_to_set():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "BACKEND": "zero4"}
    r = subprocess.run(["bash", "scripts/dpo_train.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "BACKEND=zero4: set BACKEND=zero2 (default: DeepSpeed ZeRO-2), zero3" in r.stderr


def test_scancel_saves_a_checkpoint_and_a_resubmit_resumes_to_the_same_weights(cluster, one_node, tmp_path):
    """Plain `scancel` sends SIGTERM, SIGKILL after KillWait (30 s): the ranks save in time; a user's cancel is
    not requeued, and submitting the same command again resumes. (A time limit or a preemption is requeued.)"""
    out = tmp_path / "out"
    job_id, _ = submit(cluster, "scripts/dpo_instruct_train.sh", out, wait=False)
    deadline = time.monotonic() + JOB_TIMEOUT
    wait_for_a_step(cluster, job_id, deadline)
    subprocess.run(["scancel", job_id], env=cluster.env, check=True)
    job = wait_until_ended(cluster, job_id, deadline)
    text = _read(cluster, job_id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), text[-3000:]
    # Slurm's SIGTERM and the batch shell's USR1 (passed on through srun) race to the ranks: either starts the save
    stopped = re.search(r"preempted \(SIG(?:TERM|USR1)\): saving a checkpoint at step (\d+)/", text)
    assert stopped and 0 < int(stopped[1]) < STEPS, text[-3000:]
    assert "cancelled (scancel): the checkpoint is saved but the job is not requeued" in text
    assert (out / f"checkpoint-{stopped[1]}" / MARKER).is_file()  # complete, written within KillWait

    again, r = submit(cluster, "scripts/dpo_instruct_train.sh", out)  # the same command again
    assert r.returncode == 0, _read(cluster, again)[-3000:]
    text = assert_trained(cluster, again, out, "dpo-instruct")
    assert f"resuming from {out}/checkpoint-{stopped[1]}" in text
    assert_same_weights(one_node[1], out)


def fault(spec):
    """Environment that makes tests/faults.py inject `spec` (<fault>:<step>@<rank>[@always]) into that rank."""
    return {"FASTDPO_FAULT": spec, "PYTHONPATH": str(REPO / "tests" / "fault_site")}


def test_kill9_of_a_rank_on_node_2_is_requeued_and_resumes_to_the_same_weights(cluster, two_nodes, tmp_path):
    """What the OOM killer or a failed GPU does to one rank: the job requeues itself (a crash, retry 1 of 3), names
    the rank, node and signal, and the resumed run ends on the uninterrupted run's weights to the bit."""
    out = tmp_path / "out"
    job_id, _ = submit(cluster, "scripts/dpo_train.sh", out, wait=False, nodes=2,
                       extra=["--save_strategy", "steps", "--save_steps", "10"], env=fault("kill-at-step:12@1"))
    job = wait_until_ended(cluster, job_id, time.monotonic() + 2 * JOB_TIMEOUT)
    text = assert_trained(cluster, job_id, out, "dpo-think")
    assert job["Restarts"] == "1", text[-3000:]
    assert "retries: 0 of 3 used" in text and "retries: 1 of 3 used" in text
    assert re.search(rf"first failure: rank 1 \(local 0\) on {NODES[1]} died of SIGKILL; requeueing, retry 1 of 3, "
                     r"resumes from checkpoint-10$", text, re.M), text[-4000:]
    assert f"resuming from {out}/checkpoint-10" in text
    assert_same_weights(two_nodes[1], out)


def test_a_configuration_error_is_not_requeued(cluster, tmp_path):
    job_id, _ = submit(cluster, "scripts/dpo_train.sh", tmp_path / "out", extra=["--learning_rate=-1"])
    job = wait_until_ended(cluster, job_id, time.monotonic() + JOB_TIMEOUT)
    text = _read(cluster, job_id)
    assert (job["JobState"], job["Restarts"]) == ("FAILED", "0"), text[-3000:]
    line = re.search(r"^=== .* failed \(srun exited \d+\): first failure: rank \d \(local \d\) on \S+: .*"
                     r"learning_rate.*; not retried: a configuration error$", text, re.M)
    assert line, text[-3000:]


def test_a_stalled_rank_is_retried_until_the_budget_is_spent(cluster, tmp_path):
    """A SIGSTOPped rank at step 4, every attempt, RETRIES=1: the watchdog ends the attempt within seconds, the job
    requeues once and resumes from checkpoint-2, stalls again, and stops saying the budget is spent."""
    out = tmp_path / "out"
    env = {**fault("stop-at-step:4@1@always"), "RETRIES": "1", "FASTDPO_STALL_TIMEOUT": "5"}
    job_id, _ = submit(cluster, "scripts/dpo_train.sh", out, wait=False,
                       extra=["--save_strategy", "steps", "--save_steps", "2"], env=env)
    job = wait_until_ended(cluster, job_id, time.monotonic() + 2 * JOB_TIMEOUT)
    text = _read(cluster, job_id)
    assert (job["JobState"], job["Restarts"]) == ("FAILED", "1"), text[-4000:]
    # each attempt: rank 0's watchdog names the stopped rank 1 and prints its own stacks
    # (a rank stopped before its first heartbeat of an attempt is named without its host and pid: "for ever")
    assert len(re.findall(r"ERROR fastdpo: watchdog: rank 0 \(local 0\) on \S+, pid \d+: likely cause: rank 1"
                          r"( \(local 1\) on \S+, pid \d+)?: no heartbeat for (\d+ s|ever)", text)) == 2, text[-4000:]
    # every thread's stack, each attempt: the watchdog's own ("Current thread") and the main one at least (how many
    # helper threads are alive at that moment varies)
    assert text.count("Current thread 0x") >= 2 and text.count("Thread 0x") >= 2, text[-4000:]
    first = re.findall(r"first failure: rank 0 \(local 0\) on \S+ stalled at step 3: no progress for \d+ s .*", text)
    assert len(first) == 2, text[-4000:]
    assert first[0].endswith("; requeueing, retry 1 of 1, resumes from checkpoint-2"), first[0]
    assert f"resuming from {out}/checkpoint-2" in text
    assert "taking over the lock of a run that is gone" not in text  # the watchdog released it on its way out
    assert first[1].endswith("; not retried: the retry budget is spent (1 of 1 retries used; RETRIES sets it)")


def test_main_host_that_does_not_resolve_fails_at_once(cluster):
    env = {**cluster.env, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "fastdpo-nowhere", "GPUS_PER_NODE": "1"}
    t0 = time.monotonic()
    r = subprocess.run(["bash", "scripts/dpo_train.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "the main host fastdpo-nowhere (first node of fastdpo-nowhere) does not resolve" in r.stderr
    assert time.monotonic() - t0 < 60  # not torchrun's 15-minute rendezvous


def test_gpu_request_fails_at_submit_without_gpus(cluster):
    # The header really asks for 4 GPUs; EnforcePartLimits turns "never" into an error instead of a pending job.
    r = subprocess.run(["sbatch", "scripts/dpo_train.sh"], cwd=REPO, env=cluster.env, capture_output=True, text=True)
    assert r.returncode != 0 and "Requested node configuration is not available" in r.stderr


def test_scripts_differ_only_in_recipe_and_job_name():
    think, instruct = ((REPO / s).read_text() for s in SCRIPTS)
    normalise = {"dpo_instruct_train.sh": "dpo_train.sh", "dpo-instruct": "dpo-think", "Instruct": "Think",
                 "olmo3_instruct": "olmo3_think"}
    for a, b in normalise.items():
        instruct = instruct.replace(a, b)
    assert think == instruct


def test_missing_prerequisites_say_what_to_do(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", "scripts/dpo_train.sh"], cwd=REPO, env={**env, "RECIPE": "recipes/nope.yaml"},
                       capture_output=True, text=True)
    assert r.returncode == 1 and "recipe recipes/nope.yaml not found" in r.stderr
    r = subprocess.run(["bash", str(REPO / "scripts/dpo_train.sh")], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 1 and "submit from the repo root" in r.stderr
    r = subprocess.run(["bash", "scripts/dpo_instruct_train.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "not inside a Slurm job; prerequisites look fine" in r.stderr
