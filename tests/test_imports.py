"""`import mirai_plugin` stays light: no diffusers, transformers or vbench; the core loads no tooling."""

import subprocess
import sys


def test_import_pulls_no_heavy_packages_and_the_core_no_tooling():
    code = (
        "import sys, mirai_plugin\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'vbench', 'omegaconf') if m in sys.modules]\n"
        "import mirai_plugin.image, mirai_plugin.distributed, mirai_plugin.official\n"
        "import mirai_plugin.integrations.self_forcing, mirai_plugin.integrations.llamagen\n"
        "tooling = sorted(m for m in sys.modules if m.startswith(('mirai_plugin.tooling', 'PIL')))\n"
        "print(heavy, tooling)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[] []"


def test_public_names_resolve_and_cover_the_readme_imports():
    """Every name in ``__all__`` is defined, and every name the README imports from ``mirai_plugin`` is public."""
    import re
    from pathlib import Path

    import mirai_plugin

    assert [name for name in mirai_plugin.__all__ if not hasattr(mirai_plugin, name)] == []
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    imported = {name.strip() for line in re.findall(r"from mirai_plugin import ([\w, ]+)", readme)
                for name in line.split(",")}
    assert {"ForesightConfig", "ForesightHead", "FrozenEncoder", "capture_hidden"} <= imported  # the three lines
    assert sorted(imported - set(mirai_plugin.__all__)) == []
