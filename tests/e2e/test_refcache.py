"""fastdpo.refcache: the reference pass is saved in chunks as it goes, SIGUSR1 stops it at a chunk boundary with
exit 75 and the rerun resumes; a truncated, corrupt or unreadable cache is moved aside and recomputed; a folder
that cannot be written gives a warning and training goes on.

    .venv/bin/python -m pytest tests/e2e/test_refcache.py          # ~40 s on 2 cores
"""

import gc
import logging
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow as pa
import pytest

from fastdpo import config as cfg
from fastdpo import data, models
from fastdpo.trainer import DPOTrainer
from tests.helpers import PYTHON, REPO, run


@pytest.fixture(scope="module")
def tiny():
    script_args, args, model_args = cfg.parse_args(["--output_dir", "/tmp/unused"])
    tok = models.load_tokenizer(model_args.model_name_or_path)
    pairs = data.load_pairs(script_args)
    ds, _ = data.tokenize_dataset(pairs.train.select(range(160)), tok, args.max_length, script_args.max_prompt_length)
    return tok, ds, model_args


def trainer_for(tiny, tmp_path, cache):
    tok, ds, model_args = tiny
    _, args, _ = cfg.parse_args(["--output_dir", str(tmp_path / "out"), "--eval_before_train", "false",
                                 "--report_to", "none", "--save_strategy", "no", "--max_steps", "1",
                                 "--ref_logps_cache_dir", str(cache)])
    return DPOTrainer(model=models.load_model(model_args, args), args=args, train_dataset=ds, processing_class=tok)


def ref_logps(trainer) -> np.ndarray:
    rows = trainer.train_dataset[:]  # plain lists: nothing keeps the memory-mapped file open
    return np.array([rows["ref_chosen_logps"], rows["ref_rejected_logps"]])


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {  # 160 pairs -> chunks of 64, 64, 32
    "truncated ref_logps.arrow": lambda f: _truncate(f / "ref_logps.arrow"),
    "garbage ref_logps.arrow": lambda f: (f / "ref_logps.arrow").write_bytes(b"not arrow at all" * 8),
    "unreadable ref_logps.arrow (a folder)": lambda f: ((f / "ref_logps.arrow").unlink(),
                                                         (f / "ref_logps.arrow").mkdir()),
    "truncated chunk": lambda f: ((f / "ref_logps.arrow").unlink(), _truncate(f / "chunk-000001.npy")),
}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One reference pass (3 chunks and ref_logps.arrow) and its numbers; each test damages a copy."""
    tmp = tmp_path_factory.mktemp("reference")
    trainer = trainer_for(tiny, tmp, tmp / "ref")
    files = {os.path.basename(f["filename"]) for f in trainer.train_dataset.cache_files}
    assert "ref_logps.arrow" in files  # a memory-mapped column of the dataset, not Python lists
    want = ref_logps(trainer)
    del trainer
    gc.collect()  # no memory map of a file a test damages may survive (reading a truncated mapping is a SIGBUS)
    return tmp / "ref", want


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_bad_reference_cache_is_moved_aside_and_recomputed(damage, tiny, reference, tmp_path, caplog):
    cache = tmp_path / "ref"
    shutil.copytree(reference[0], cache)
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    DAMAGE[damage](folder)
    caplog.set_level(logging.INFO, logger="fastdpo")
    again = trainer_for(tiny, tmp_path, cache)
    # the pass ran again (its summary line), not from the cache
    assert "train: reference log-probs for " in caplog.text and "reference log-probs from cache" not in caplog.text
    assert np.array_equal(ref_logps(again), reference[1])
    assert f"reference cache {folder}/" in caplog.text and "moved aside" in caplog.text
    if damage == "truncated chunk":  # chunks 0 and 2 kept, 1 recomputed
        assert "resuming the reference pass: 2 of 3 chunks saved" in caplog.text
        assert "train: reference log-probs for 64 pairs in" in caplog.text and "2 chunks resumed" in caplog.text
    assert pa.ipc.open_stream(pa.memory_map(str(folder / "ref_logps.arrow"))).read_all().num_rows == 160


def test_unwritable_reference_cache_folder_warns_and_training_goes_on(tiny, tmp_path, caplog):
    (tmp_path / "a_file").write_text("")
    cache = tmp_path / "a_file" / "ref"  # cannot be created, even by root: its parent is a file
    caplog.set_level(logging.WARNING)
    trainer = trainer_for(tiny, tmp_path, cache)
    assert "cannot be written" in caplog.text and str(cache) in caplog.text
    assert len(trainer.train_dataset["ref_chosen_logps"]) == 160
    assert trainer.train().global_step == 1


@pytest.mark.slow
def test_usr1_during_the_reference_pass_stops_at_a_chunk_and_the_rerun_resumes(tmp_path):
    """train_dpo.py end to end: SIGUSR1 while the reference pass runs -> every chunk so far saved, exit 75 (the
    sbatch script requeues on it); the same command then resumes from the saved chunks and trains."""
    cache = tmp_path / "cache"
    cmd = [PYTHON, "train_dpo.py", "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1",
           "--eval_before_train", "false", "--dataset_test_split", "none"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "FASTDPO_CACHE": str(cache)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ref = cache / "ref_logps"
    deadline = time.time() + 300
    while not list(ref.glob("*/chunk-000000.npy")):  # 1024 pairs: 16 chunks of 64
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert "reference pass stopped after chunk" in out and "rerun the same command to resume" in out
    saved = sorted(ref.glob("*/chunk-*.npy"))
    assert 1 <= len(saved) < 16 and not list(ref.glob("*/ref_logps.arrow"))
    before = {p.name: np.load(p) for p in saved}
    again = run(cmd, env={"FASTDPO_CACHE": str(cache)})
    assert f"resuming the reference pass: {len(saved)} of 16 chunks saved" in again.stdout
    assert "step 2/2" in again.stdout
    (final,) = ref.glob("*/ref_logps.arrow")
    table = pa.ipc.open_stream(pa.memory_map(str(final))).read_all()
    values = np.stack([table.column(0).to_numpy(), table.column(1).to_numpy()], axis=1)
    for name, chunk in before.items():  # the resumed run used the saved chunks, not new numbers
        start = int(name[6:12]) * 64
        assert np.array_equal(values[start: start + len(chunk)], chunk)
