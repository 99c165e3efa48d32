"""The package's structure, read from its source: no import cycle, no reach into another module's privates."""

import ast
from pathlib import Path

import pytest

import mirai_plugin

PACKAGE = Path(mirai_plugin.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = ["mirai_plugin", *file.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


MODULES = _modules()


def _owner(name: str) -> str:
    """The module a dotted import name lives in (``mirai_plugin.config.X`` -> ``mirai_plugin.config``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> dict[str, str]:
    """``{imported module: the names it gives}`` for every import in ``module``, also inside functions."""
    file = MODULES[module]
    package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mirai_plugin"):
                    found[_owner(alias.name)] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            if base.startswith("mirai_plugin"):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.setdefault(full if full in MODULES else _owner(base), alias.name)
                    if full not in MODULES:
                        found[_owner(base)] = alias.name
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: set(_imports(module)) - {module} for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_imports_inside_functions():
    assert "mirai_plugin.official.trainer_config" in import_graph()["mirai_plugin.config"]  # inside a function


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, module globals and attributes it sets."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _on_self(node):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if _is_private(name)}


def _on_self(node: ast.Attribute) -> bool:
    return isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def private_reaches() -> list[str]:
    """``module: what`` for each private name a module imports from, or reads or writes on, another module's objects."""
    trees = {module: ast.parse(file.read_text()) for module, file in MODULES.items()}
    defined = {module: _private_names(tree) for module, tree in trees.items()}
    found = []
    for module, tree in trees.items():
        elsewhere = set().union(*(names for other, names in defined.items() if other != module)) - defined[module]
        for name, imported in _imports(module).items():
            if _is_private(imported) and name != module:
                found.append(f"{module}: imports {imported} from {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in elsewhere and not _on_self(node):
                found.append(f"{module}: {ast.unparse(node)} (line {node.lineno})")
    return found


def test_no_module_reaches_into_another_modules_private_attributes():
    assert private_reaches() == []


def test_the_private_check_finds_a_planted_reach(tmp_path, monkeypatch):
    planted = {**MODULES, "mirai_plugin.planted": tmp_path / "planted.py"}
    (tmp_path / "planted.py").write_text("def f(head):\n    head.replay_cache._generator = None\n")
    monkeypatch.setitem(globals(), "MODULES", planted)
    assert private_reaches() == ["mirai_plugin.planted: head.replay_cache._generator (line 2)"]


def test_every_package_ships():
    """A non-editable install holds only the packages pyproject.toml lists: every folder with an
    ``__init__.py`` must be among them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module for module, file in MODULES.items() if file.name == "__init__.py"}
    assert packages - listed == set()
