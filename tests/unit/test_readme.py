"""The README and docs/*.md say what is true: the README is at most 350 lines, its first screen's commands run as
written (own file, analyzer, evaluate) and print the numbers it quotes, the demo's table is what the demo prints,
every relative link and anchor resolves, every repository path named exists, and the quoted errors are the ones the
code raises.

Fast: the text checks and the quoted configuration errors. Slow (@slow): the first screen's own-file run (train,
analyze, evaluate: about 2 minutes on 2 CPU cores) and the demo's full run (about 1 to 3 minutes)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from ..helpers import PYTHON, REPO, read_json, run

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_LINES = 350
# Repository paths a doc may name; outputs/, data/ and the like are a user's own, and so is the file of a quoted
# error message (`recipes/mix.yaml:14: unknown key ...`).
PATH_RE = re.compile(r"(?<![\w./<-])((?:recipes|scripts|docs|tests|fastdpo)/[\w./-]*[\w/])(?![\w./-]|:\d)")
TOP_FILES_RE = re.compile(r"(?<![\w./-])((?:accelerate_config|ds_config)[\w]*\.(?:yaml|json)|train_(?:dpo|sft)\.py)")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def first_screen(text: str) -> str:
    """The README up to its second `## ` heading: what it is, the quick start (make demo, own file, make test)."""
    heads = [m.start() for m in re.finditer(r"^## ", text, re.M)]
    assert len(heads) >= 2, "the README needs a quick-start section and more"
    return text[:heads[1]]


def blocks(text: str, lang: str = "") -> list[str]:
    """Fenced code blocks of a language ("" = unlabelled: the output blocks), read fence by fence."""
    found, current, current_lang = [], None, None
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, current_lang = [], line[3:].strip()
            else:
                if current_lang == lang:
                    found.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "an unclosed code fence"
    return found


def commands(block: str) -> list[str]:
    """A bash block's commands, comments and continuation lines joined."""
    joined = block.replace("\\\n", " ")
    return [ln.split(" #")[0].strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    headings, fenced = [], False
    for line in _text(path).splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (m := re.match(r"#+ (.+)$", line)):
            headings.append(m.group(1))
    return {slug(h) for h in headings}


def table(text: str, first_cell: str) -> dict[str, list[str]]:
    """The markdown table whose header starts with `first_cell`: row name -> its other cells."""
    start = text.index(f"| {first_cell} |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# ------------------------------------------------------------------------------------------------------ fast


def test_the_readme_is_at_most_350_lines_and_opens_with_the_quick_start():
    text = _text(README)
    assert len(text.splitlines()) <= MAX_LINES, f"README.md has {len(text.splitlines())} lines; move depth to docs/"
    screen = first_screen(text)
    cmds = [c for b in blocks(screen, "bash") for c in commands(b)]
    assert cmds[0] == "make demo" and cmds[-1] == "make test", cmds
    assert any(c.startswith("python train_dpo.py --dataset_name ") for c in cmds), cmds


def test_make_demo_and_make_test_are_what_the_readme_says_and_the_demo_is_tested():
    """`make demo` is scripts/demo.py (the end-to-end test runs that script), `make test` the whole suite."""
    make = _text(REPO / "Makefile")
    demo = re.search(r"^demo:.*\n\t(.+)$", make, re.M).group(1)
    test = re.search(r"^test:.*\n\t(.+)$", make, re.M).group(1)
    assert demo.split() == ["$(PY)", "scripts/demo.py"] and test.split() == ["$(PY)", "-m", "pytest", "tests"]
    assert '"scripts/demo.py"' in _text(REPO / "tests" / "e2e" / "test_sft_lora_eval.py")


def test_install_notes_match_the_makefile_and_pyproject():
    text, make = _text(README), _text(REPO / "Makefile")
    torch = re.search(r"^TORCH \?= (\S+)$", make, re.M).group(1)
    cpu_index = re.search(r"filter cpu,\$\(TORCH_INDEX\)\),(\S+),", make).group(1)
    assert f"pip install {torch} --index-url {cpu_index}" in text
    assert "make setup TORCH_INDEX=cpu" in text
    minimum = re.search(r"^MIN_PYTHON := (\S+)$", make, re.M).group(1)
    assert f'requires-python = ">={minimum}"' in _text(REPO / "pyproject.toml")
    assert f"Python {minimum} or newer" in text


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(doc):
    bad = []
    for target in LINK_RE.findall(_text(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            bad.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading with anchor #{anchor} in {path.relative_to(REPO)}")
    assert not bad, f"{doc.relative_to(REPO)}: " + "; ".join(bad)


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_named_exists(doc):
    text = _text(doc)
    named = set(PATH_RE.findall(text)) | set(TOP_FILES_RE.findall(text))
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"


def test_every_recipe_is_documented():
    recipes_doc = _text(REPO / "docs" / "recipes.md")
    missing = [p.name for p in (REPO / "recipes").glob("*.yaml") if f"recipes/{p.name}" not in recipes_doc]
    assert not missing, f"docs/recipes.md does not list {missing}"


def test_the_quoted_configuration_errors_are_the_ones_raised(tmp_path, monkeypatch):
    """The README's error lines, raised by the same parse train_dpo.py runs (no model or data loads)."""
    from fastdpo import config as cfg

    text = _text(README)
    lines = [ln for b in blocks(text) for ln in b.splitlines()]
    typo = next(ln for ln in lines if "unknown key 'learning_rat'" in ln)
    beta = next(ln for ln in lines if ln.startswith("command line (--beta)"))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(_text(REPO / "recipes" / "tiny.yaml").replace("\nlearning_rate:", "\nlearning_rat:"))
    monkeypatch.chdir(tmp_path)  # the message names the recipe as given: mine.yaml
    with pytest.raises(SystemExit) as e:
        cfg.parse_args(["--config", "mine.yaml"])
    assert str(e.value) == typo
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        cfg.parse_args(["--beta", "-0.5"])
    assert beta in str(e.value)


# ------------------------------------------------------------------------------------------------------ slow


def _close(quoted: str, real: float) -> bool:
    """A quoted number is the real one to within one unit of its last digit (0.52 for 0.515625, not 0.50), or 0.1%
    (float sums differ a little between CPUs)."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return abs(float(quoted) - real) <= max(10.0 ** -decimals, 1e-3 * abs(real))


@pytest.mark.slow
def test_the_first_screen_runs_as_written_and_prints_what_it_quotes(tmp_path):
    """The own-file block of the quick start, command by command (its files moved into tmp_path), then the
    analyzer and evaluate.py commands the README shows on the same run: the numbers it quotes are theirs."""
    text = _text(README)
    screen = first_screen(text)
    own = next(b for b in blocks(screen, "bash") if "train_dpo.py --dataset_name" in b)
    moved = {"my_pairs.jsonl": str(tmp_path / "my_pairs.jsonl"), "outputs/mine": str(tmp_path / "mine")}

    def as_written(cmd: str) -> list[str]:
        for old, new in moved.items():
            cmd = cmd.replace(old, new)
        argv = shlex.split(cmd)
        assert argv[0] == "python", cmd  # after `source .venv/bin/activate`: the venv's python
        return [PYTHON, *argv[1:]]

    outputs = []
    for cmd in commands(own):
        if cmd == "source .venv/bin/activate":
            assert (REPO / ".venv" / "bin" / "activate").exists() or Path(PYTHON).parent.joinpath("activate").exists()
            continue
        proc = run(as_written(cmd))
        outputs.append(proc.stdout + proc.stderr)
    log = "\n".join(outputs)
    quoted = next(b for b in blocks(screen) if " rows read = " in b)
    accounting = next(ln for ln in quoted.splitlines() if " rows read = " in ln).split("data: ", 1)[1]
    assert accounting.replace("my_pairs.jsonl", moved["my_pairs.jsonl"]) in log
    steps = next(ln for ln in quoted.splitlines() if "optimizer steps:" in ln).split("INFO fastdpo: ", 1)[1]
    assert steps in log
    results = read_json(tmp_path / "mine" / "all_results.json")
    for name, (before, after) in table(quoted, "metric (held-out)").items():
        assert _close(before, results[f"before_{name}"]) and _close(after, results[name]), name

    # 1. Analyze: the README's command on the same file; token lengths are integers, quoted exactly
    analyze = next(c for b in blocks(text, "bash") for c in commands(b)
                   if c == "python scripts/analyze_dataset.py my_pairs.jsonl")
    out = run(as_written(analyze)).stdout
    quoted = next(b for b in blocks(text) if "tokenizer embedded:tiny-llama" in b)
    for line in quoted.splitlines():
        if line.startswith(("| total |", "**Recommended", "> no --recipe")):
            assert line in out, line

    # 5. Evaluate: the held-out count exactly, the metrics within rounding
    evaluate = next(c for b in blocks(text, "bash") for c in commands(b) if c.startswith("python scripts/evaluate.py"))
    out = run(as_written(evaluate)).stdout
    quoted = next(b for b in blocks(text) if "pairs the run held out" in b)
    assert quoted.splitlines()[0] in out
    real = table(out, "metric")
    for name, (value,) in table(quoted, "metric").items():
        assert _close(value, float(real[name][0])), (name, value, real[name])


@pytest.mark.slow
def test_the_demo_prints_the_table_the_readme_quotes(tmp_path):
    """`make demo` is scripts/demo.py with no flags but where it writes; seeded, so its table is the README's."""
    proc = subprocess.run([PYTHON, "scripts/demo.py", "--out", str(tmp_path / "demo")], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    quoted = next(b for b in blocks(_text(README)) if "| held-out prompts |" in b)
    real = table(proc.stdout, "held-out prompts")
    for name, (before, after) in table(quoted, "held-out prompts").items():
        assert _close(before, float(real[name][0])) and _close(after, float(real[name][1])), (name, real[name])
    margin_kl = next(ln for ln in quoted.splitlines() if ln.startswith("reward margin"))
    got = next(ln for ln in proc.stdout.splitlines() if ln.startswith("reward margin"))
    q, g = (re.findall(r"[\d.]+", s) for s in (margin_kl, got))
    assert all(_close(a, float(b)) for a, b in zip(q, g, strict=True)), (margin_kl, got)
