"""Patch files: well-formed, only marked added lines, no inference code; the patch command on a toy repo."""

import subprocess
from dataclasses import dataclass

import pytest

from mirai_plugin import MiraiError
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.patching import PATCHES, UpstreamPatch, parse_patch, patch_problems


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_shipped_patches_follow_the_rules(name):
    patch = PATCHES[name]
    assert patch.commit[:12] in patch.filename
    changes = parse_patch(patch.text())
    assert patch_problems(patch.text()) == []
    assert all(not c.removed for c in changes)
    recipe = "scripts/autoregressive/train_c2i_mirai" if name == "llamagen" else "configs/video_mirai_"
    assert any(c.new_file and c.path.removeprefix("long_video/").startswith(recipe) for c in changes)
    code_lines = [line for c in changes if not c.new_file for line in c.added]
    assert code_lines and all(line.rstrip().endswith("# mirai-plugin") for line in code_lines)


# The video patches ship these recipe configs; the LlamaGen patch ships a launch script, no YAML.
RECIPE_CONFIGS = {
    "self-forcing": ["configs/video_mirai_dmd_chunkwise.yaml"],
    "causal-forcing": ["configs/video_mirai_dmd_chunkwise.yaml", "configs/video_mirai_dmd_framewise.yaml"],
    "causal-forcing-ode": ["configs/video_mirai_ode_chunkwise.yaml"],
    "rolling-forcing": ["configs/video_mirai_rolling_forcing_dmd.yaml"],
    "causal-forcing-long-video": ["long_video/configs/video_mirai_rolling_forcing_dmd.yaml"],
}


@pytest.mark.parametrize("name", sorted(RECIPE_CONFIGS))
def test_recipe_configs_carry_the_official_keys(name):
    changes = parse_patch(PATCHES[name].text())
    configs = [c for c in changes if c.new_file and c.path.endswith(".yaml")]
    assert [c.path for c in configs] == RECIPE_CONFIGS[name]
    for config in configs:
        keys = dict(line.split(":", 1) for line in config.added if ":" in line and not line.startswith(("#", " ", "-")))
        assert keys["foresight_weight"].strip() == "0.2"
        assert keys["foresight_student_layer"].strip() == "15"
        assert keys["foresight_projector_type"].strip() == "dit"


BASE = "diff --git a/model.py b/model.py\n--- a/model.py\n+++ b/model.py\n"


@pytest.mark.parametrize(
    "text, problem",
    [
        (BASE + "@@ -1,2 +1,2 @@\n x = 1\n-y = 2\n+y = 3  # mirai-plugin\n", "removes or edits 1 upstream line"),
        (BASE + "@@ -1 +1,2 @@\n x = 1\n+y = 3\n", "without the 'mirai-plugin' marker"),
        (
            "diff --git a/inference.py b/inference.py\n--- a/inference.py\n+++ b/inference.py\n"
            "@@ -1 +1,2 @@\n x = 1\n+y = 3  # mirai-plugin\n",
            "inference code must not be patched",
        ),
        (
            "diff --git a/wan/modules/model.py b/wan/modules/model.py\n--- a/wan/modules/model.py\n"
            "+++ b/wan/modules/model.py\n@@ -1 +1,2 @@\n x = 1\n+y = 3  # mirai-plugin\n",
            "inference code must not be patched",
        ),
        (
            "diff --git a/new.yaml b/new.yaml\nnew file mode 100644\n"
            "--- /dev/null\n+++ b/new.yaml\n@@ -0,0 +1 @@\n+a: 1\n",
            "must start with a 'mirai-plugin' comment",
        ),
    ],
)
def test_rule_violations_are_named(text, problem):
    assert any(problem in p for p in patch_problems(text))


def test_malformed_hunks_are_rejected():
    with pytest.raises(MiraiError, match="declares 1/3 lines, has 1/2"):
        parse_patch(BASE + "@@ -1 +1,3 @@\n x = 1\n+y = 3  # mirai-plugin\n")
    with pytest.raises(MiraiError, match="empty patch"):
        parse_patch("")


# --------------------------------------------------------------- the command


@dataclass(frozen=True)
class _ToyPatch(UpstreamPatch):
    body: str = ""

    def text(self) -> str:
        return self.body


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def toy(tmp_path, monkeypatch):
    repo = tmp_path / "upstream"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "train.py").write_text("import os\n\nloss = 1\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    body = (
        "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n"
        "@@ -3 +3,2 @@\n loss = 1\n+loss = loss + 0  # mirai-plugin\n"
    )
    commit = _git(repo, "rev-parse", "HEAD").strip()
    monkeypatch.setitem(PATCHES, "toy", _ToyPatch("toy", "example/toy", commit, "toy.patch", "toy", body))
    return repo


def test_apply_check_revert_round_trip(toy, capsys):
    assert main(["patch", "check", "--upstream", "toy", str(toy)]) == 0
    assert "applies cleanly" in capsys.readouterr().out
    assert main(["patch", "apply", "--upstream", "toy", str(toy)]) == 0
    assert "added: train.py (1 line(s))" in capsys.readouterr().out
    assert "loss = loss + 0  # mirai-plugin" in (toy / "train.py").read_text()
    assert main(["patch", "check", "--upstream", "toy", str(toy)]) == 0
    assert "patch is applied" in capsys.readouterr().out
    assert main(["patch", "revert", "--upstream", "toy", str(toy)]) == 0
    assert _git(toy, "status", "--porcelain") == ""


def test_clear_errors(toy, capsys):
    main(["patch", "apply", "--upstream", "toy", str(toy)])
    assert main(["patch", "apply", "--upstream", "toy", str(toy)]) == 2
    assert "already applied" in capsys.readouterr().err
    main(["patch", "revert", "--upstream", "toy", str(toy)])
    assert main(["patch", "revert", "--upstream", "toy", str(toy)]) == 2
    assert "not applied" in capsys.readouterr().err

    (toy / "train.py").write_text("import os\n\nloss = 2\n")
    assert main(["patch", "apply", "--upstream", "toy", str(toy)]) == 2
    assert "uncommitted changes in files the patch touches: ['train.py']" in capsys.readouterr().err
    _git(toy, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "moved on")
    assert main(["patch", "check", "--upstream", "toy", str(toy)]) == 2
    assert "but the toy patch targets example/toy at" in capsys.readouterr().err
    assert main(["patch", "check", "--upstream", "nope", str(toy)]) == 2
    assert "unknown upstream 'nope'" in capsys.readouterr().err
