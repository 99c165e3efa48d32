"""Old module paths that keep working, with a DeprecationWarning, for one minor version.

A module that moved leaves a few lines at its old path::

    from mirai_plugin._moved import alias
    alias(__name__, "mirai_plugin.tooling.flops")

``import mirai_plugin.flops`` then warns and hands back the new module itself (the same
objects, the same private names, the same module to monkeypatch); for a package, its
submodules too (``mirai_plugin.demo.run`` is ``mirai_plugin.tooling.demo.run``).
``python -m`` on an old path warns and runs the new module as ``__main__``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import runpy
import sys
import warnings
from types import ModuleType

REMOVED_IN = "0.3.0"


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old path stops working in mirai-plugin {REMOVED_IN}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``old.x.y`` as ``new.x.y`` for a package that moved."""

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(self.old + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module: ModuleType) -> None:
        new = self.new + module.__name__[len(self.old):]
        _warn(module.__name__, new, 3)  # 1: _warn, 2: here, 3: the importer (import system frames do not count)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import system returns this one


def alias(old: str, new: str) -> None:
    """Warn that ``old`` moved to ``new``; make ``old`` the module ``new`` (or run it, under ``python -m``)."""
    if old == "__main__":  # python -m OLD: warn from __main__ (shown by default) and run NEW
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        _warn(getattr(spec, "name", None) or new, new, 3)
        runpy.run_module(new, run_name="__main__", alter_sys=True)
        return
    _warn(old, new, 4)  # 1: _warn, 2: alias, 3: the old module, 4: the importer
    module = importlib.import_module(new)
    if hasattr(module, "__path__") and not any(isinstance(f, _Submodules) and f.old == old for f in sys.meta_path):
        sys.meta_path.insert(0, _Submodules(old, new))  # old.x -> new.x
    sys.modules[old] = module  # the import system returns this one
