"""Flags bounded by what the run can use: `mirai-plugin patch --upstream NAME PATH` on a checkout of another
repository says it is the wrong repository (naming it when it can), not "check out commit X", which cannot
exist there."""

import os

import pytest
from toy_upstream import WITH_CONFIG, TextPatch, git, repository

from mirai_plugin.tooling.cli import main
from mirai_plugin.tooling.patching import PATCHES


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy patch's upstream (example/toy) and an unrelated repository."""
    commit = repository(tmp_path / "toy")
    monkeypatch.setitem(PATCHES, "toy", TextPatch("toy", "example/toy", commit, "toy.patch", "toy", WITH_CONFIG))
    repository(tmp_path / "other", {"train.py": "other = 1\n"})
    return tmp_path / "toy", tmp_path / "other"


def error_line(capsys, *argv):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("action", ["check", "apply", "revert"])
def test_a_checkout_of_another_repository_is_named_as_such(toy, capsys, action):
    _, other = toy
    line = error_line(capsys, "patch", action, "--upstream", "toy", str(other))
    assert f"{other} is a checkout of another repository, not of example/toy" in line
    assert "`git checkout` cannot fix it" in line and "git clone https://github.com/example/toy" in line
    assert "run: git" not in line  # the commit is not in that repository: checking it out cannot work
    assert git(other, "status", "--porcelain") == ""


def test_the_repository_is_named_from_a_known_patch_or_its_remote(toy, capsys, monkeypatch):
    _, other = toy
    other_commit = git(other, "rev-parse", "HEAD").strip()
    monkeypatch.setitem(PATCHES, "other-upstream",
                        TextPatch("other-upstream", "example/other", other_commit, "o.patch", "o", WITH_CONFIG))
    line = error_line(capsys, "patch", "check", "--upstream", "toy", str(other))
    assert "is a checkout of example/other, not of example/toy" in line
    assert "or, to patch this one, --upstream other-upstream" in line
    monkeypatch.delitem(PATCHES, "other-upstream")
    git(other, "remote", "add", "origin", "https://github.com/someone/else.git")
    line = error_line(capsys, "patch", "check", "--upstream", "toy", str(other))
    assert "is a checkout of https://github.com/someone/else.git, not of example/toy" in line


def test_a_clone_of_the_right_repository_without_the_commit_is_told_to_fetch_it(toy, capsys):
    _, other = toy
    git(other, "remote", "add", "origin", "git@github.com:example/toy.git")
    line = error_line(capsys, "patch", "check", "--upstream", "toy", str(other))
    commit = PATCHES["toy"].commit
    assert f"is a clone of example/toy (git@github.com:example/toy.git) without the commit the toy patch " \
           f"targets, {commit[:12]}" in line
    assert f"fetch origin {commit} && git -C {other} checkout {commit}" in line


def test_the_right_repository_at_another_commit_is_still_told_to_check_it_out(toy, capsys):
    repo, _ = toy
    commit = PATCHES["toy"].commit
    (repo / "train.py").write_text("import os\n\nloss = 2\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "moved on")
    line = error_line(capsys, "patch", "check", "--upstream", "toy", str(repo))
    assert f"but the toy patch targets example/toy at {commit[:12]}; run: git -C {repo} checkout {commit}" in line
    git(repo, "checkout", "-q", commit)  # the advice
    assert main(["patch", "check", "--upstream", "toy", str(repo)]) == 0


@pytest.mark.skipif(not {"MIRAI_LLAMAGEN_DIR", "MIRAI_SELF_FORCING_DIR"} <= set(os.environ),
                    reason="the pinned LlamaGen and Self-Forcing checkouts")
def test_the_pinned_upstreams_given_to_each_others_patch(capsys):
    llamagen, self_forcing = os.environ["MIRAI_LLAMAGEN_DIR"], os.environ["MIRAI_SELF_FORCING_DIR"]
    line = error_line(capsys, "patch", "check", "--upstream", "self-forcing", llamagen)
    assert "is a checkout of FoundationVision/LlamaGen, not of guandeh17/Self-Forcing" in line
    assert line.endswith("or, to patch this one, --upstream llamagen")
    line = error_line(capsys, "patch", "check", "--upstream", "llamagen", self_forcing)
    assert "is a checkout of guandeh17/Self-Forcing, not of FoundationVision/LlamaGen" in line
    assert line.endswith("or, to patch this one, --upstream self-forcing")
