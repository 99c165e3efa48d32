"""The core and the tooling: the core never imports the tooling; the tooling's old paths warn and resolve
to the moved modules (for 0.2.x; removed in 0.3.0); a tooling command without its extra says what to install."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mirai_plugin.tooling.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "mirai_plugin"
MOVED = {
    "mirai_plugin.cli": "mirai_plugin.tooling.cli",
    "mirai_plugin.probe": "mirai_plugin.tooling.probe",
    "mirai_plugin.flops": "mirai_plugin.tooling.flops",
    "mirai_plugin.memory": "mirai_plugin.tooling.memory",
    "mirai_plugin.patching": "mirai_plugin.tooling.patching",
    "mirai_plugin.demo": "mirai_plugin.tooling.demo",
    "mirai_plugin.eval": "mirai_plugin.tooling.eval",
    # modules of the moved packages, as the tests and tools imported them
    "mirai_plugin.demo.run": "mirai_plugin.tooling.demo.run",
    "mirai_plugin.demo.models": "mirai_plugin.tooling.demo.models",
    "mirai_plugin.demo.pretrained": "mirai_plugin.tooling.demo.pretrained",
    "mirai_plugin.eval.runner": "mirai_plugin.tooling.eval.runner",
    "mirai_plugin.eval.bootstrap": "mirai_plugin.tooling.eval.bootstrap",
}
ALIASES = {PACKAGE / "_moved.py"} | {PACKAGE / f"{old.split('.')[1]}.py" for old in MOVED} | {
    PACKAGE / name / "__init__.py" for name in ("demo", "eval")}


def _core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "tooling" not in p.parts and p not in ALIASES]


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_the_core_imports_no_tooling():
    files = _core_files()
    assert {"capture.py", "head.py", "encoder.py"} <= {p.name for p in files}  # the walk found the core
    tooling = ("mirai_plugin.tooling",) + tuple(MOVED)
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported(p) if n.startswith(tooling))
                 for p in files}
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("old", MOVED)
def test_an_old_path_warns_and_is_the_moved_module(old, monkeypatch):
    new = importlib.import_module(MOVED[old])
    for name in [m for m in sys.modules if m == old or m.startswith(old + ".")] + [old.rpartition(".")[0]]:
        if name.startswith("mirai_plugin.") and not name.startswith("mirai_plugin.tooling"):
            monkeypatch.delitem(sys.modules, name, raising=False)  # import it afresh; restored afterwards
    with warnings.catch_warnings(record=True) as caught:  # a module of a package: the package warns too
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert [w for w in caught if w.category is DeprecationWarning and f"{old} moved to {MOVED[old]};" in str(w.message)]
    assert module is new
    public = [name for name in vars(new) if not name.startswith("__")]
    assert all(getattr(module, name) is getattr(new, name) for name in public)  # the package demo has none


def test_from_import_of_an_old_path_gives_the_same_objects():
    for name in ("mirai_plugin.flops", "mirai_plugin.eval"):
        sys.modules.pop(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mirai_plugin.eval import compare
        from mirai_plugin.flops import CycleShape
    from mirai_plugin.tooling.eval import compare as moved_compare
    from mirai_plugin.tooling.flops import CycleShape as moved_shape

    assert compare is moved_compare and CycleShape is moved_shape


def test_python_m_on_the_old_cli_path_warns_and_runs():
    result = subprocess.run([sys.executable, "-m", "mirai_plugin.cli", "patch", "list"],
                            capture_output=True, check=False, text=True)
    assert result.returncode == 0, result.stderr
    assert "self-forcing" in result.stdout
    assert "DeprecationWarning: mirai_plugin.cli moved to mirai_plugin.tooling.cli" in result.stderr


@pytest.mark.parametrize("argv", [["demo", "--quick"], ["demo", "--image", "--quick"]])
def test_the_demo_without_its_extra_exits_2_naming_the_install(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'mirai-plugin[demo]'" in err
    assert not (tmp_path / "out").exists()  # stopped before anything ran


def test_benchmarks_and_tools_import_no_tests_and_benchmarks_no_demo_models():
    import re

    root = PACKAGE.parent
    test_modules = {p.stem for p in (root / "tests").glob("*.py")}
    scripts = sorted(root.glob("benchmarks/**/*.py")) + sorted(root.glob("tools/*.py"))
    assert len(scripts) >= 10  # the walk found them
    for path in scripts:
        names = _imported(path)
        assert not {name.split(".")[0] for name in names} & test_modules, path
        assert not re.search(r"sys\.path\.\w+\(.*[\"']tests[\"']", path.read_text()), path
        if "benchmarks" in path.parts:
            demo_modules = ("mirai_plugin.tooling.demo", "mirai_plugin.demo")
            assert not [name for name in names if name.startswith(demo_modules)], path
