"""`import mirai_plugin` stays light: no diffusers, transformers or vbench."""

import subprocess
import sys


def test_import_pulls_no_heavy_packages():
    code = (
        "import sys, mirai_plugin\n"
        "heavy = [m for m in ('diffusers', 'transformers', 'vbench', 'omegaconf') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_public_surface():
    import mirai_plugin

    assert set(mirai_plugin.__all__) == {
        "CapturedHidden",
        "ForesightConfig",
        "ForesightHead",
        "FrozenEncoder",
        "HiddenRecord",
        "MiraiError",
        "SegmentTargets",
        "capture_hidden",
        "foresight_loss",
        "fuse_targets",
    }
    assert all(hasattr(mirai_plugin, name) for name in mirai_plugin.__all__)
