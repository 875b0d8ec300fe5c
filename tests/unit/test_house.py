"""The package's shape, read from its code with `ast`: imports run one way, rooms stay small, and the frameworks'
private names are used in one module.

    .venv/bin/python -m pytest tests/unit/test_house.py      # seconds

Over fastdpo/: no import cycle between the package's modules (an import inside a function counts, relative and
absolute forms alike); no function over 60 lines and no module over 600; no import inside a function without a
comment on its line saying why it is there (a heavy or optional dependency); and no private name of TRL,
transformers, accelerate, DeepSpeed, torch or datasets (`obj._name`, `getattr(obj, "_name")`, or a framework
class's private method overridden, read or written through `self`) outside fastdpo/frameworks.py. A subclass may
keep an overridden private method that is one line handing over to fastdpo.frameworks.

PENDING names each violation a change under way still has to remove; an entry that no longer occurs fails too, so
the list only shrinks.
"""

import ast
import importlib
import inspect
import io
import re
import tokenize
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fastdpo"
MAX_FUNCTION = 60
MAX_MODULE = 600
FRAMEWORKS = ("trl", "transformers", "accelerate", "deepspeed", "torch", "datasets", "peft", "tokenizers")
SEAM = "frameworks"
STDLIB_PRIVATE = {("os", "_exit"), ("sys", "_current_frames")}  # documented despite the underscore

# (module, rule, name): violations in modules other changes are rewriting (the data modules; logs and memory, with the
# entry points); it only shrinks, to nothing.
PENDING: set[tuple[str, str, str]] = set()


def modules() -> dict[str, Path]:
    """Dotted name inside the package (`ranks`, `data.tokens`; a package by its folder) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name or "__init__"] = path
    return out


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def commented_lines(path: Path) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}


def functions(node: ast.AST, inside: bool = False):
    """(function node, whether it sits inside another function) for every def, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child, inside
            yield from functions(child, True)
        else:
            yield from functions(child, inside)


def imports(node: ast.AST, in_function: bool = False):
    """(import node, whether it is inside a function) for every import in a module."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def targets(node, module: str, known: set[str]) -> list[str]:
    """The package modules an import statement loads (relative and absolute forms)."""
    if isinstance(node, ast.Import):
        return [a.name.removeprefix("fastdpo.") for a in node.names if a.name.removeprefix("fastdpo.") in known]
    if node.level:
        parts = module.split(".") if is_package(module) else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([p for p in parts if p != "__init__"] + ([node.module] if node.module else []))
    elif node.module and (node.module == "fastdpo" or node.module.startswith("fastdpo.")):
        base = node.module.removeprefix("fastdpo").lstrip(".")
    else:
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        out.append(sub if sub in known else base or "__init__")
    return [m for m in out if m in known]


def is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {m: {t for node, _ in imports(tree(p)) for t in targets(node, m, known) if t != m}
            for m, p in modules().items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def size_violations() -> set[tuple[str, str, str]]:
    found = set()
    for m, path in modules().items():
        if len(path.read_text().splitlines()) > MAX_MODULE:
            found.add((m, "module lines", m))
        for fn, _ in functions(tree(path)):
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION:
                found.add((m, "function lines", fn.name))
    return found


def import_violations() -> set[tuple[str, str, str]]:
    found = set()
    for m, path in modules().items():
        notes = commented_lines(path)
        for node, inner in imports(tree(path)):
            if inner and not notes & set(range(node.lineno, node.end_lineno + 1)):
                name = node.module if isinstance(node, ast.ImportFrom) and node.module else node.names[0].name
                found.add((m, "import in a function", name))
    return found


# ------------------------------------------------------------------------------------------ framework privates


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def module_names(module: ast.Module) -> set[str]:
    """Names this module binds to the package's own modules, and to the standard library's privates' owners."""
    out = set()
    for node, _ in imports(module):
        for alias in node.names:
            bound = alias.asname or alias.name.split(".")[0]
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fastdpo")):
                out.add(bound)
    return out


def framework_bases(module: ast.Module) -> dict[str, tuple[str, str]]:
    """Local name -> (module, attribute) of every class this module imports from a framework."""
    out = {}
    for node, _ in imports(module):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in FRAMEWORKS:
            for alias in node.names:
                out[alias.asname or alias.name] = (node.module, alias.name)
    return out


@cache
def owned_privates(module: str, name: str) -> frozenset[str]:
    """Private names a framework class and its bases define: attributes, and what their code assigns on self."""
    cls = getattr(importlib.import_module(module), name)
    if not inspect.isclass(cls):
        return frozenset()
    names = {n for n in dir(cls) if private(n)}
    for base in cls.__mro__:
        if base.__module__.split(".")[0] not in FRAMEWORKS:
            continue
        try:
            names |= set(re.findall(r"self\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=", inspect.getsource(base)))
        except (OSError, TypeError):
            pass
    return frozenset(n for n in names if private(n))


def hands_over(stmt: ast.stmt) -> bool:
    """`_x = frameworks.f` or `def _x(...): return frameworks.f(...)`: an override that is one line to the seam."""
    def to_seam(node):
        target = node.func if isinstance(node, ast.Call) else node
        return (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == SEAM)

    if isinstance(stmt, ast.Assign):
        return to_seam(stmt.value)
    if isinstance(stmt, ast.FunctionDef):
        body = [s for s in stmt.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        return len(body) == 1 and isinstance(body[0], ast.Return) and to_seam(body[0].value)
    return False


def private_violations() -> set[tuple[str, str, str]]:
    found = set()
    for m, path in modules().items():
        if m == SEAM:
            continue
        module = tree(path)
        ours = module_names(module)
        for node in ast.walk(module):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name):
                owner = node.value.id
                if owner not in ("self", "cls") and owner not in ours and (owner, node.attr) not in STDLIB_PRIVATE:
                    found.add((m, "framework private", node.attr))
            elif isinstance(node, ast.Attribute) and private(node.attr) and not isinstance(node.value, ast.Name):
                found.add((m, "framework private", node.attr))  # a private reached through a chain: x.y._z
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                    and private(node.args[1].value)):
                found.add((m, "framework private", node.args[1].value))
        bases = framework_bases(module)
        for cls in (n for n in ast.walk(module) if isinstance(n, ast.ClassDef)):
            owned = set()
            for b in cls.bases:
                if isinstance(b, ast.Name) and b.id in bases:
                    owned |= owned_privates(*bases[b.id])
            for stmt in cls.body:
                defined = ([stmt.name] if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else
                           [t.id for t in getattr(stmt, "targets", []) if isinstance(t, ast.Name)])
                for name in defined:
                    if name in owned and not hands_over(stmt):
                        found.add((m, "framework private", name))
            for node in ast.walk(cls):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                        and node.attr in owned):
                    found.add((m, "framework private", node.attr))
    return found


# ---------------------------------------------------------------------------------------------------- tests


def check(found: set, rule: str) -> None:
    pending = {v for v in PENDING if v[1] == rule}
    new, gone = sorted(found - pending), sorted(pending - found)
    assert not new, f"{rule}: " + "; ".join(f"fastdpo/{m.replace('.', '/')}.py: {n}" for m, _, n in new)
    assert not gone, f"{rule}: no longer found, remove from PENDING: {gone}"


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (imports inside functions included): " + "; ".join(" <-> ".join(c)
                                                                                       for c in found)


def test_no_function_or_module_too_long():
    found = size_violations()
    check({v for v in found if v[1] == "module lines"}, "module lines")
    check({v for v in found if v[1] == "function lines"}, "function lines")


def test_imports_inside_functions_say_why():
    check(import_violations(), "import in a function")


def test_framework_privates_only_in_the_seam():
    check(private_violations(), "framework private")


def test_the_walk_sees_what_it_checks():
    """The checks above can fail: a cycle, a long function and an uncommented inner import are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "ranks" in graph["watchdog"] and "watchdog" not in graph["ranks"]  # the process floor, one way
    src = "def f():\n    import json\n" + "    x = 1\n" * MAX_FUNCTION
    module = ast.parse(src)
    (fn, _), = functions(module)
    assert fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION
    assert [inner for _, inner in imports(module)] == [True]
