"""Toy upstream repositories and patches for the `mirai-plugin patch` tests."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from mirai_plugin.tooling.patching import UpstreamPatch


@dataclass(frozen=True)
class TextPatch(UpstreamPatch):
    """An upstream patch whose text is given here instead of shipped with the package."""

    body: str = ""

    def text(self) -> str:
        return self.body


# Adds a config file and one marked line to each of model.py and train.py (see `repository`'s default files).
WITH_CONFIG = (
    "diff --git a/configs/mirai.yaml b/configs/mirai.yaml\nnew file mode 100644\n--- /dev/null\n"
    "+++ b/configs/mirai.yaml\n@@ -0,0 +1,2 @@\n+# mirai-plugin: recipe\n+foresight_weight: 0.2\n"
    "diff --git a/model.py b/model.py\n--- a/model.py\n+++ b/model.py\n"
    "@@ -1 +1,2 @@\n x = 1\n+y = 2  # mirai-plugin\n"
    "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n"
    "@@ -3 +3,2 @@\n loss = 1\n+loss = loss + 0  # mirai-plugin\n"
)
FILES = {"train.py": "import os\n\nloss = 1\n", "model.py": "x = 1\n"}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def repository(path: Path, files: dict[str, str] = FILES) -> str:
    """A new one-commit repository holding ``files``; returns its commit."""
    path.mkdir()
    git(path, "init", "-q")
    for name, text in files.items():
        (path / name).write_text(text)
    git(path, "add", ".")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    return git(path, "rev-parse", "HEAD").strip()
