"""The core and the tooling: the core never imports the tooling; the tooling has one path (its paths before it
moved were never released, so nothing keeps them); a tooling command without its extra says what to install."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from mirai_plugin.tooling.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "mirai_plugin"
# The tooling's paths before it moved under mirai_plugin.tooling: never released, so no alias keeps them.
OLD_PATHS = ("mirai_plugin.cli", "mirai_plugin.probe", "mirai_plugin.flops", "mirai_plugin.memory",
             "mirai_plugin.patching", "mirai_plugin.demo", "mirai_plugin.eval", "mirai_plugin.fused")


def _core_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "tooling" not in p.parts]


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
    tooling = ("mirai_plugin.tooling",)
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imported(p) if n.startswith(tooling))
                 for p in files}
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize("old", OLD_PATHS)
def test_the_tooling_has_one_path(old):
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
    result = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, check=False, text=True)
    assert result.returncode != 0 and "No module named" in result.stderr


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
            assert not [name for name in names if name.startswith("mirai_plugin.tooling.demo")], path
