"""The package's layout (docs/ARCHITECTURE.md): imports flow one way, no file takes another's private names.

Every module under collapsediag/ is read with ``ast`` (nothing is imported). An import counts where it runs:
  - module level (also inside ``try``/``if`` at module level): the arrows of the import graph;
  - function level (inside a ``def``, run when the function is called): arrows too, for the circle check, since
    a circle through a lazy import is still a circle a reader has to untangle;
  - ``if TYPE_CHECKING:`` blocks: not arrows; they exist for annotations and never run. They may point up (a
    lower module naming a higher one's type), so they are left out of the circle and floor checks.
``from . import x`` points at module ``x`` when there is one, else at the package.
"""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "collapsediag"
MAX_LINES = 400

# Floors, lowest first: a module imports only modules on its own floor or below.
FLOORS = ["core", "data", "editors", "signals", "runs", "analysis", "plots", "experiments", "cli", "top"]
TOP = {"collapsediag", "collapsediag.__main__", "collapsediag.testing"}


def module_name(path: pathlib.Path) -> str:
    parts = ("collapsediag",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int:
    if module in TOP:
        return FLOORS.index("top")
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS):  # a subpackage, or its __init__
        return FLOORS.index(parts[1])
    return FLOORS.index("core")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, where: str = "module"):
    """(node, where) for every import in ``tree``; where is module, function or type_checking."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, where
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), "type_checking")
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), where)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _imports(node, "function")
        else:
            yield from _imports(node, where)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name a relative ``from`` import names."""
    if node.level == 0:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_arrows():
    """(importer, imported, where, names) for every import of a collapsediag module by a collapsediag module."""
    arrows = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, where in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "collapsediag":
                        arrows.append((module, alias.name, where, []))
                continue
            base = _resolve(module, node)
            if base.split(".")[0] != "collapsediag":
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                arrows.append((module, target, where, [alias.name]))
    return arrows


ARROWS = import_arrows()


def circles(kinds: set[str]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan) over the arrows of the given kinds."""
    graph = defaultdict(set)
    for src, dst, where, _ in ARROWS:
        if where in kinds and src != dst and dst in MODULES:
            graph[src].add(dst)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_every_import_resolves_to_a_module():
    missing = sorted({(src, dst) for src, dst, *_ in ARROWS if dst not in MODULES})
    assert not missing, f"imports of modules that do not exist: {missing}"


def test_no_import_circle_at_module_level():
    assert circles({"module"}) == []


def test_no_import_circle_through_function_level_imports():
    assert circles({"module", "function"}) == []


def test_no_file_imports_another_files_private_names():
    private = sorted({(src, dst, name) for src, dst, _, names in ARROWS for name in names
                      if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))})
    assert not private, f"underscore names imported across files: {private}"


def test_imports_go_down_the_floors():
    up = sorted({(src, dst) for src, dst, where, _ in ARROWS
                 if where != "type_checking" and dst in MODULES and floor(dst) > floor(src)})
    assert not up, f"imports that run up the floors {FLOORS}: {up}"


def test_analysis_imports_no_torch_and_no_plots():
    for module, path in MODULES.items():
        if not module.startswith("collapsediag.analysis"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, where in _imports(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] == "torch" for n in names), f"{module} imports torch"
        assert not any(src == module and floor(dst) >= floor("collapsediag.plots") for src, dst, *_ in ARROWS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_400_lines(module):
    n = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{module}: {n} lines"


OUTSIDE = [p for d in ("benchmarks", "scripts") for p in sorted((PACKAGE.parent / d).glob("*.py"))]


@pytest.mark.parametrize("script", OUTSIDE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_and_scripts_import_only_the_package(script):
    """A benchmark or script runs in an environment installed without [test]: it never imports tests/."""
    names = set()
    for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    bad = sorted(names & {"tests", "conftest", "pytest"})
    assert not bad, f"{script.name} imports {bad}"


# docs/ARCHITECTURE.md's "may import" column, floor by floor (module-level and function-level imports alike).
MAY_IMPORT = {"core": {"core"}, "data": {"core", "data"}, "editors": {"core", "editors"},
              "signals": {"core", "editors", "signals"}, "runs": {"core", "data", "editors", "signals", "runs"},
              "analysis": {"core", "signals", "runs", "analysis"}}


def test_each_floor_imports_only_what_the_architecture_page_allows():
    bad = sorted({(src, dst) for src, dst, where, _ in ARROWS if where != "type_checking" and dst in MODULES
                  and FLOORS[floor(src)] in MAY_IMPORT and FLOORS[floor(dst)] not in MAY_IMPORT[FLOORS[floor(src)]]})
    assert not bad, bad
