"""The rolling-forcing and causal-forcing-long-video patches (docs/rolling-forcing.md, "The patches"):
marked lines in model/dmd.py and trainer/distillation.py only, a ready config the glue's reader takes, and
`mirai-plugin patch check|apply|revert` on sparse copies of the pinned checkouts (skipped without
MIRAI_ROLLING_FORCING_DIR / MIRAI_CAUSAL_FORCING_DIR; CI sets both)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from mirai_plugin.integrations.resolve import resolve_rolling_forcing
from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.patching import PATCHES, parse_patch

# patch name -> (variable naming the checkout, trainer root inside it, L of the shipped config)
PATCHED = {
    "rolling-forcing": ("MIRAI_ROLLING_FORCING_DIR", "", 5),
    "causal-forcing-long-video": ("MIRAI_CAUSAL_FORCING_DIR", "long_video/", 4),
}
TRAINER_FILES = ("model/dmd.py", "trainer/distillation.py")
CONFIG = "configs/video_mirai_rolling_forcing_dmd.yaml"


def needs(*names: str):
    variables = sorted({PATCHED[name][0] for name in names})
    return pytest.mark.skipif(not set(variables) <= set(os.environ), reason=f"the pinned checkouts ({variables})")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def sparse_copy(name: str, dest: Path) -> Path:
    """A clone of the checkout at the patch's commit, without assets/ and docs/ (absent from the archives)."""
    subprocess.run(["git", "clone", "-q", "--no-checkout", os.environ[PATCHED[name][0]], str(dest)], check=True,
                   capture_output=True)
    git(dest, "sparse-checkout", "set", "--no-cone", "/*", "!/assets/", "!/docs/")
    git(dest, "checkout", "-q", PATCHES[name].commit)
    return dest


def tree_digest(repo: Path) -> dict[str, str]:
    return {str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(repo.rglob("*")) if path.is_file() and ".git" not in path.relative_to(repo).parts}


def ready_config(name: str) -> dict[str, str]:
    """The ready config's top-level keys and raw values, read from the patch text."""
    (config,) = [c for c in parse_patch(PATCHES[name].text()) if c.new_file]
    assert config.path == PATCHED[name][1] + CONFIG
    return dict(line.split(":", 1) for line in config.added if ":" in line and not line.startswith(("#", " ", "-")))


@pytest.mark.parametrize("name", sorted(PATCHED))
def test_the_patch_adds_marked_lines_to_the_two_trainer_files_and_one_config(name):
    root = PATCHED[name][1]
    changes = parse_patch(PATCHES[name].text())
    assert sorted(c.path for c in changes) == sorted([root + CONFIG, *(root + f for f in TRAINER_FILES)])
    assert all(not c.removed for c in changes)
    code = {c.path: c.added for c in changes if not c.new_file}
    assert all(line.endswith("  # mirai-plugin") for lines in code.values() for line in lines)
    glue = [line.strip() for line in code[root + "model/dmd.py"] if "RollingForcingForesight(" in line]
    named = ', upstream="causal-forcing-long-video"' if name == "causal-forcing-long-video" else ""
    assert glue == [f"self.foresight = RollingForcingForesight(self, args{named})  # mirai-plugin"]
    logged = "".join(code[root + "trainer/distillation.py"])
    assert "self.writer.add_scalar(name, value, self.step)" in logged and "wandb" not in logged


def test_the_two_patches_differ_only_in_the_root_and_the_name_the_glue_reports():
    rolling, long_video = (parse_patch(PATCHES[name].text()) for name in ("rolling-forcing",
                                                                          "causal-forcing-long-video"))
    for ours, theirs in zip(rolling, long_video, strict=True):
        assert "long_video/" + ours.path == theirs.path
        if not ours.new_file:
            assert [line.replace('args, upstream="causal-forcing-long-video")', "args)") for line in theirs.added] \
                == ours.added


@pytest.mark.parametrize("name", sorted(PATCHED))
def test_the_ready_config_is_the_shipped_one_plus_the_stage_3_recipe(name):
    keys = ready_config(name)
    assert keys["foresight_weight"].strip() == "0.2" and keys["foresight_teacher_layer"].strip() == "20"
    assert keys["distribution_loss"].strip() == "dmd" and keys["trainer"].strip() == "score_distillation"
    assert keys["foresight_window_blocks"].strip() == "all"
    assert keys["foresight_window_first_block"].strip() == "as_dmd"


@pytest.mark.parametrize("name", sorted(PATCHED))
def test_the_ready_config_is_read_by_the_glues_reader(name):
    omegaconf = pytest.importorskip("omegaconf")
    (config,) = [c for c in parse_patch(PATCHES[name].text()) if c.new_file]
    run = resolve_rolling_forcing(omegaconf.OmegaConf.create("\n".join(config.added)), upstream=name)
    assert run.trainer.rolling_window_blocks == PATCHED[name][2]
    assert run.glue["foresight_window_blocks"] == "all" and run.glue["foresight_window_first_block"] == "as_dmd"


@pytest.mark.parametrize("name", sorted(PATCHED))
def test_apply_then_revert_on_the_pinned_checkout(name, tmp_path, capsys, monkeypatch):
    pytest.importorskip("omegaconf")
    if PATCHED[name][0] not in os.environ:
        pytest.skip(f"the pinned checkout ({PATCHED[name][0]})")
    root = PATCHED[name][1]
    repo = sparse_copy(name, tmp_path / "checkout")
    before = tree_digest(repo)
    assert main(["patch", "check", "--upstream", name, str(repo)]) == 0
    assert "patch applies cleanly" in capsys.readouterr().out
    assert main(["patch", "apply", "--upstream", name, str(repo)]) == 0
    capsys.readouterr()

    # the checkout's own diff, not the patch text: the two trainer files gain marked lines, one config is new,
    # nothing else changes (no pipeline/, wan/, utils/ or inference code)
    status = sorted(git(repo, "status", "--porcelain", "--untracked-files=all").splitlines())
    assert status == sorted([f" M {root}{f}" for f in TRAINER_FILES] + [f"?? {root}{CONFIG}"])
    diff = git(repo, "diff", "-U0", "--", *(root + f for f in TRAINER_FILES)).splitlines()
    assert not [line for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert len(added) == 11 and all(line.endswith("  # mirai-plugin") for line in added)
    for file in TRAINER_FILES:
        compile((repo / root / file).read_text(), file, "exec")
    shipped = (repo / root / "configs/rolling_forcing_dmd.yaml").read_text()
    assert shipped.rstrip("\n") in (repo / root / CONFIG).read_text()

    monkeypatch.chdir(repo / root)  # merged over ./configs/default_config.yaml, as train.py does
    assert main(["config", "check", CONFIG, "--upstream", name]) == 0
    out = capsys.readouterr().out
    assert "foresight term: ON, weight 0.2" in out and "merged over configs/default_config.yaml" in out
    assert f"denoising_steps          {PATCHED[name][2]}" in out and "frames                   27" in out

    assert main(["patch", "check", "--upstream", name, str(repo)]) == 0
    assert "patch is applied" in capsys.readouterr().out
    assert main(["patch", "revert", "--upstream", name, str(repo)]) == 0
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert tree_digest(repo) == before


@needs("causal-forcing-long-video")
def test_the_long_video_patch_applies_beside_the_causal_forcing_patch(tmp_path, capsys):
    repo = sparse_copy("causal-forcing-long-video", tmp_path / "checkout")
    for name in ("causal-forcing", "causal-forcing-long-video"):
        assert main(["patch", "apply", "--upstream", name, str(repo)]) == 0
    assert main(["patch", "revert", "--upstream", "causal-forcing-long-video", str(repo)]) == 0
    capsys.readouterr()
    assert main(["patch", "check", "--upstream", "causal-forcing", str(repo)]) == 0
    assert "patch is applied" in capsys.readouterr().out
    assert not [line for line in git(repo, "status", "--porcelain").splitlines() if "long_video/" in line]


@needs("rolling-forcing", "causal-forcing-long-video")
def test_each_checkout_given_to_the_others_patch_is_named(capsys):
    rolling, causal = os.environ["MIRAI_ROLLING_FORCING_DIR"], os.environ["MIRAI_CAUSAL_FORCING_DIR"]
    assert main(["patch", "check", "--upstream", "rolling-forcing", causal]) == 2
    line = capsys.readouterr().err
    assert "is a checkout of thu-ml/Causal-Forcing, not of TencentARC/RollingForcing" in line
    assert "causal-forcing-long-video" in line
    assert main(["patch", "check", "--upstream", "causal-forcing-long-video", rolling]) == 2
    line = capsys.readouterr().err.strip()
    assert "is a checkout of TencentARC/RollingForcing, not of thu-ml/Causal-Forcing" in line
    assert line.endswith("or, to patch this one, --upstream rolling-forcing")
