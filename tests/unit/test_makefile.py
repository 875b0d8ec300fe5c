"""`make setup` explains itself: the Makefile, copied into a temporary folder (the checkout's .venv is never touched),
run with stand-in interpreters that print a version or record what they were asked to do; nothing is installed."""

import os
import shutil
import subprocess

from tests.helpers import REPO

RECORDER = """#!/bin/sh
# a stand-in: logs each call; `python -m venv DIR` makes DIR/bin/pip, another recorder
echo "$(basename "$0") $*" >> "$CALLS"
case "$*" in
  *version_info*) echo {version} ;;
  *"import torch"*) exit 1 ;;
  "-m venv"*) for d; do :; done; mkdir -p "$d/bin"; cp "$0" "$d/bin/pip"; cp "$0" "$d/bin/python" ;;
esac
"""


def _checkout(tmp_path, version="3.11"):
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    python = tmp_path / "bin" / f"python{version}"
    python.parent.mkdir()
    python.write_text(RECORDER.format(version=version))
    python.chmod(0o755)
    return python.name


def _make(tmp_path, *args):
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    for name in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS"):  # under `make test` the child would print make[1]: lines
        env.pop(name, None)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)


def test_an_old_python_is_named_before_anything_is_created(tmp_path):
    python = _checkout(tmp_path, "3.10")
    proc = _make(tmp_path, "setup", f"PYTHON={python}")
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if not ln.startswith("make:")]
    assert ours == ["make setup: python3.10 is Python 3.10; fastdpo needs 3.11+ (trl 1.16, transformers 5.23): "
                    "install one (pyenv install 3.11, uv python install 3.11, conda create -n fastdpo python=3.11, or "
                    "module load python/3.11 on a cluster), then make setup PYTHON=python3.11"], proc.stderr
    assert not (tmp_path / ".venv").exists() and proc.stdout == ""
    assert (tmp_path / "calls").read_text().splitlines() == [f"{python} -c import sys; print(\"%d.%d\" % "
                                                             "sys.version_info[:2])"]  # asked its version, nothing else
    proc = _make(tmp_path, "setup", "PYTHON=python3.99")
    assert proc.returncode != 0 and "make setup: no python3.99 here; fastdpo needs Python 3.11+" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_a_venv_a_failed_setup_left_is_rebuilt(tmp_path):
    python = _checkout(tmp_path)
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "half-installed").write_text("")  # no .installed marker: setup stopped midway
    proc = _make(tmp_path, "setup", f"PYTHON={python}", "TORCH_INDEX=cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removing .venv: an earlier setup did not finish" in proc.stdout
    assert not (tmp_path / ".venv" / "lib" / "half-installed").exists() and (tmp_path / ".venv" / ".installed").exists()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-2:] == ["pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0",
                          "pip install -q -r requirements.txt"], calls
    assert f"{python} -m venv .venv" in calls
    # done: the next make setup does nothing, whatever python3 is now (the check runs only to build .venv)
    old = tmp_path / "bin" / "python3.10"
    old.write_text(RECORDER.format(version="3.10"))
    old.chmod(0o755)
    proc = _make(tmp_path, "setup", "PYTHON=python3.10")
    assert proc.returncode == 0 and (tmp_path / "calls").read_text().splitlines() == calls


def test_help_clean_and_distclean(tmp_path):
    _checkout(tmp_path)
    proc = _make(tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: make TARGET")
    targets = [ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith("  ")]
    assert targets == ["help", "setup", "demo", "test", "test-fast", "lint", "clean", "distclean"]
    assert "TORCH_INDEX (cpu, or an index URL)" in proc.stdout
    for path in ("outputs/run/model.safetensors", "outputs/.gitkeep", "logs/dpo-think-7.out", "logs/.gitkeep",
                 "logs/.fastdpo-retries-7", ".venv/.installed"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    assert _make(tmp_path, "clean").returncode == 0
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and "bin" not in p.parts)
    assert left == [".venv/.installed", "Makefile", "logs/.gitkeep", "outputs/.gitkeep", "requirements.txt"]
    assert _make(tmp_path, "distclean").returncode == 0 and not (tmp_path / ".venv").exists()
