"""fastdpo.frameworks: every private name of TRL, transformers, accelerate, DeepSpeed, torch and datasets it lists is
still there in the installed versions, each entry names a guard test that exists, and the versions installed are
the ones the entries were checked on (a bump fails here first, with what to re-check).

    .venv/bin/python -m pytest tests/unit/test_frameworks.py      # seconds
"""

import ast
import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest

from fastdpo import frameworks

REPO = Path(__file__).resolve().parents[2]
# pinned in requirements.txt; torch is not (a cluster brings its own build), so its entries are checked by name only
PINNED = sorted({e.checked.split()[0] for e in frameworks.PRIVATES} - {"torch"})


def resolve(dotted: str):
    """(owner, attribute name): the longest importable module prefix, then attributes down to the last one."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:-1]:
            owner = getattr(owner, name)
        return owner, parts[-1]
    raise ImportError(dotted)


def defined(owner, name: str) -> bool:
    """An attribute of the owner, a dataclass field, or one that its code (or a base's) assigns on self (annotated
    or not)."""
    if hasattr(owner, name) or name in getattr(owner, "__dataclass_fields__", {}):
        return True
    if not inspect.isclass(owner):
        return False
    for base in owner.__mro__:
        try:
            if re.search(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=", inspect.getsource(base)):
                return True
        except (OSError, TypeError):
            continue
    return False


@pytest.mark.parametrize("entry", frameworks.PRIVATES, ids=lambda e: e.name)
def test_private_names_exist_in_the_installed_versions(entry):
    owner, name = resolve(entry.name)
    assert defined(owner, name), (f"{entry.name} is gone ({entry.checked} had it; used for: {entry.use}); "
                                  "change fastdpo/frameworks.py, then run " + entry.guard)


@pytest.mark.parametrize("entry", frameworks.PRIVATES, ids=lambda e: e.name)
def test_every_entry_has_a_guard_test(entry):
    path, test = entry.guard.split("::")
    tree = ast.parse((REPO / path).read_text())
    assert test in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, entry.guard


@pytest.mark.parametrize("package", PINNED)
def test_installed_versions_are_the_checked_ones(package):
    checked = {e.checked.split()[1] for e in frameworks.PRIVATES if e.checked.split()[0] == package}
    installed = importlib.metadata.version(package)
    assert checked == {installed}, (f"{package} {installed} is installed, fastdpo/frameworks.py was checked on "
                                    f"{sorted(checked)}: run each entry's guard test, then update its version")

