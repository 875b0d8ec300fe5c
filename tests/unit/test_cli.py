"""The command line a user types first: `--help` fits a screen or two, `--config=FILE` is `--config FILE`, a bad value
is one line, and `pip install -e .` gives a `fastdpo` command that runs the same scripts."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastdpo import cli
from fastdpo import config as cfg
from tests.helpers import PYTHON, REPO, run


def _parse(monkeypatch, *argv, **kwargs):
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", *argv])
    return cli.parse_training("doc", **kwargs)


def test_help_is_a_screen_or_two_and_help_all_has_everything():
    proc = run([PYTHON, "train_dpo.py", "--help"])
    lines = proc.stdout.splitlines()
    assert lines[0] == "usage: python train_dpo.py [--config RECIPE.yaml] [--key value ...]"
    assert "DPO post-training with TRL's DPOTrainer" in proc.stdout  # the script's own description
    assert len(lines) <= 80 and max(map(len, lines)) <= cli.WIDTH, len(lines)
    for flag in ("--dataset_name STR", "--column_map", "--beta FLOAT", "--learning_rate FLOAT", "--use_peft BOOL",
                 "--report_to", "--allow_changed_run"):
        assert flag in proc.stdout, flag
    assert "(default 0.1)" in proc.stdout
    assert lines[-1].startswith("All ") and lines[-1].endswith("python train_dpo.py --help-all")
    sft = run([PYTHON, "train_sft.py", "--help"]).stdout
    assert "SFT (TRL SFTConfig):" in sft and "--assistant_only_loss BOOL" in sft and "--beta" not in sft
    full = run([PYTHON, "train_dpo.py", "--help-all"]).stdout
    assert len(full.splitlines()) > 500 and "--ref_model_sync_steps" in full and "--token_budget" in full


def test_config_equals_file_is_config_file(monkeypatch, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "tiny.yaml").read_text().replace("beta: 0.1", "beta: 0.25"))
    spaced = _parse(monkeypatch, "--config", str(recipe), "--learning_rate", "3e-3")
    equals = _parse(monkeypatch, f"--config={recipe}", "--learning_rate=3e-3")
    assert sys.argv == ["train_dpo.py", "--config", str(recipe), "--learning_rate=3e-3"]  # given_keys reads it
    assert equals[1].beta == spaced[1].beta == 0.25 and equals[1].learning_rate == 3e-3
    assert "beta" in cfg.given_keys() and "learning_rate" in cfg.given_keys()


@pytest.mark.parametrize("argv, line", [
    (["--learning_rate", "abc"], "command line: --learning_rate 'abc': expected a number, e.g. 1e-6"),
    (["--max_steps=1.5"], "command line: --max_steps '1.5': expected a whole number"),
    (["--padding_free", "maybe"], "command line: --padding_free 'maybe': expected true or false"),
    (["--packed_layout", "fast"], "command line: --packed_layout 'fast': expected one of 'auto', 'segments', 'dense'"),
    (["--max_steps"], "command line: --max_steps needs a value (--max_steps VALUE)"),
])
def test_a_bad_value_is_one_line(monkeypatch, capsys, argv, line):
    with pytest.raises(SystemExit) as e:
        _parse(monkeypatch, *argv)
    assert e.value.code == 2
    assert capsys.readouterr().err == line + "\n"  # no usage dump


def test_a_bad_recipe_value_names_the_line(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# mine\nmax_steps: 10\nlearning_rate: fast\n")
    with pytest.raises(SystemExit) as e:
        _parse(monkeypatch, "--config", str(recipe))
    assert e.value.code == 2
    assert capsys.readouterr().err == f"{recipe}:3: learning_rate 'fast': expected a number, e.g. 1e-6\n"


def test_the_fastdpo_command_after_pip_install_e(tmp_path):
    """An editable install in a throwaway venv that sees this environment's packages through a .pth file (a venv made
    from a venv's python would see the base interpreter's packages, not these); --no-index: nothing is downloaded."""
    site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "trl").is_dir())
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "shared.pth").write_text(site + "\n")
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", "-e",
         str(REPO)], cwd=tmp_path)
    fastdpo = str(venv / "bin" / "fastdpo")
    proc = run([fastdpo, "train", "--help"], cwd=tmp_path)
    assert proc.stdout.startswith("usage: fastdpo train [--config RECIPE.yaml]"), proc.stdout[:500]
    assert "fastdpo train --help-all" in proc.stdout
    proc = run([fastdpo, "trian"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == ("fastdpo: unknown command 'trian' (did you mean 'train'?); one "
                                                    "of train, sft, analyze, evaluate\n")
    proc = run([fastdpo, "train", "--config=recipes/nope.yaml"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "recipe not found: recipes/nope.yaml" in proc.stderr
    proc = run([fastdpo, "analyze", "--help"], cwd=tmp_path)
    assert "--recipe" in proc.stdout and "--samples" in proc.stdout


def test_sft_push_without_the_hub_fails_before_any_data(tmp_path):
    """As train_dpo.py: the real huggingface_hub client, refused at once (offline, or a closed local port), before
    the output folder, the data or the model is touched."""
    import time

    base = [PYTHON, "train_sft.py", "--push_to_hub", "true", "--hub_model_id", "me/tiny-sft",
            "--output_dir", str(tmp_path / "o")]
    for env, message in (({"HF_HUB_OFFLINE": "1"}, "push_to_hub is set but HF_HUB_OFFLINE=1"),
                         ({"HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_not_a_real_token_123456",
                           "HF_ENDPOINT": "http://127.0.0.1:9"}, "push_to_hub is set but the Hub check failed")):
        t0 = time.monotonic()
        proc = run(base, env=env, check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "hf_not_a_real_token_123456" not in proc.stdout + proc.stderr
        assert not (tmp_path / "o").exists() and "SFT model" not in proc.stdout  # nothing read, nothing written
        assert time.monotonic() - t0 < 60  # imports only (about 10 s idle); loading data or a model would show
