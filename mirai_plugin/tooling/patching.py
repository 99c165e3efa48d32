"""Applying, checking and reverting the patch files that splice mirai_plugin into upstream trainers.

Each patch targets one upstream repository at one pinned commit (written in its
file name). Its added lines are ours and marked ``mirai-plugin``; it removes
nothing and never touches inference code.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from mirai_plugin.errors import MiraiError

MARKER = "mirai-plugin"
# Inference code the patches must never touch (files, or folders ending in "/").
PROTECTED = ("inference.py", "pipeline/causal_inference.py", "wan/modules/",
             # LongLive 2.0
             "inference_sp.py", "pipeline/causal_diffusion_inference.py", "pipeline/causal_diffusion_inference_sp.py",
             "wan_5b/modules/",
             # Rolling Forcing, and the same trainer in Causal-Forcing's long_video/
             "app.py", "pipeline/rolling_forcing_inference.py", "long_video/app.py", "long_video/inference.py",
             "long_video/pipeline/rolling_forcing_inference.py", "long_video/wan/modules/")


@dataclass(frozen=True)
class UpstreamPatch:
    name: str
    repository: str
    commit: str
    filename: str
    description: str

    def text(self) -> str:
        return resources.files("mirai_plugin.patches").joinpath(self.filename).read_text()


PATCHES = {
    p.name: p
    for p in (
        UpstreamPatch(
            "self-forcing",
            "guandeh17/Self-Forcing",
            "33593df3e81fa3ec10239271dd2c100facac6de1",
            "self-forcing-33593df3e81f-dmd.patch",
            "Stage-3 DMD (chunk-wise); config configs/video_mirai_dmd_chunkwise.yaml",
        ),
        UpstreamPatch(
            "causal-forcing",
            "thu-ml/Causal-Forcing",
            "1fc7bbc19a503c1bce80ecef08158b20e702f386",
            "causal-forcing-1fc7bbc19a50-dmd.patch",
            "Stage-3 DMD; configs configs/video_mirai_dmd_{chunkwise,framewise}.yaml",
        ),
        UpstreamPatch(
            "causal-forcing-ode",
            "thu-ml/Causal-Forcing",
            "1fc7bbc19a503c1bce80ecef08158b20e702f386",
            "causal-forcing-1fc7bbc19a50-ode.patch",
            "Stage-2 causal ODE distillation, target from the ground-truth future (optional); "
            "config configs/video_mirai_ode_chunkwise.yaml",
        ),
        UpstreamPatch(
            "llamagen",
            "FoundationVision/LlamaGen",
            "ce98ec41803a74a90ce68c40ababa9eaeffeb4ec",
            "llamagen-ce98ec41803a-c2i.patch",
            "class-conditional GPT training (train_c2i.py): Mirai-E / Mirai-I with --mirai E|I",
        ),
        UpstreamPatch(
            "longlive",
            "NVlabs/LongLive",
            "7860ad9685686bc3edfd407eb4d12579ca47d689",
            "longlive-7860ad968568-dmd.patch",
            "LongLive 2.0 DMD (Wan2.2-TI2V-5B, T2V and I2V, LoRA or full); configs "
            "configs/video_mirai_longlive_{dmd,i2v_dmd}.yaml",
        ),
        UpstreamPatch(
            "rolling-forcing",
            "TencentARC/RollingForcing",
            "a1477d09e85dc759a6a6728f55f77f59342ce388",
            "rolling-forcing-a1477d09e85d-dmd.patch",
            "Rolling Forcing DMD (rolling-window rollouts); config configs/video_mirai_rolling_forcing_dmd.yaml",
        ),
        UpstreamPatch(
            "causal-forcing-long-video",
            "thu-ml/Causal-Forcing",
            "1fc7bbc19a503c1bce80ecef08158b20e702f386",
            "causal-forcing-1fc7bbc19a50-long-video-dmd.patch",
            "long_video/: Rolling Forcing DMD from Causal-Forcing's ODE initialisation; config "
            "long_video/configs/video_mirai_rolling_forcing_dmd.yaml",
        ),
    )
}


# ------------------------------------------------------------------ parsing


@dataclass
class FileChange:
    path: str
    new_file: bool = False
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_patch(text: str) -> list[FileChange]:
    """Split a ``git diff`` into per-file changes, checking every hunk's line counts."""
    changes: list[FileChange] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            match = re.match(r"diff --git a/(\S+) b/(\S+)$", line)
            if not match or match.group(1) != match.group(2):
                raise MiraiError(f"malformed file header (renames are not allowed): {line!r}")
            changes.append(FileChange(match.group(2)))
            i += 1
            continue
        if not changes:
            raise MiraiError(f"text before the first 'diff --git' header: {line!r}")
        current = changes[-1]
        if line.startswith("new file mode"):
            current.new_file = True
        elif line.startswith(("index ", "--- ", "+++ ", "old mode", "new mode")):
            pass
        elif match := _HUNK.match(line):
            old_count = int(match.group(2) or 1)
            new_count = int(match.group(4) or 1)
            i += 1
            seen_old = seen_new = 0
            while i < len(lines) and (seen_old < old_count or seen_new < new_count):
                body = lines[i]
                if body.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                tag, content = body[:1], body[1:]
                if tag == " ":
                    seen_old += 1
                    seen_new += 1
                elif tag == "-":
                    seen_old += 1
                    current.removed.append(content)
                elif tag == "+":
                    seen_new += 1
                    current.added.append(content)
                else:
                    raise MiraiError(f"{current.path}: unexpected line in hunk: {body!r}")
                i += 1
            if (seen_old, seen_new) != (old_count, new_count):
                raise MiraiError(
                    f"{current.path}: hunk {line!r} declares {old_count}/{new_count} lines, has {seen_old}/{seen_new}"
                )
            continue
        elif line.startswith("\\"):
            pass
        else:
            raise MiraiError(f"{current.path}: unexpected line outside a hunk: {line!r}")
        i += 1
    if not changes:
        raise MiraiError("empty patch: no 'diff --git' header")
    return changes


def patch_problems(text: str) -> list[str]:
    """Why a patch breaks the rules (empty when it follows them)."""
    problems = []
    for change in parse_patch(text):
        if any(change.path == p or (p.endswith("/") and change.path.startswith(p)) for p in PROTECTED):
            problems.append(f"{change.path}: inference code must not be patched")
        if change.removed:
            problems.append(f"{change.path}: removes or edits {len(change.removed)} upstream line(s)")
        if change.new_file:
            if not change.added or MARKER not in change.added[0]:
                problems.append(f"{change.path}: a new file must start with a '{MARKER}' comment")
        else:
            unmarked = [line for line in change.added if MARKER not in line]
            if unmarked:
                problems.append(f"{change.path}: added lines without the '{MARKER}' marker: {unmarked}")
    return problems


# ---------------------------------------------------------------- checkouts


def _git(path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise MiraiError(f"git {' '.join(args)} failed in {path}: {result.stderr.strip() or result.stdout.strip()}")
    return result


@dataclass(frozen=True)
class CheckoutState:
    patch: UpstreamPatch
    path: Path
    applied: bool
    files: tuple[str, ...]
    lacking: tuple[str, ...] = ()  # applied, but these files no longer hold the patch (restored or deleted)
    deleted: tuple[str, ...] = ()  # the lacking files that no longer exist

    def lacking_details(self) -> str:
        """What became of each file that no longer holds the patch, and how to get it back."""
        new_files = {c.path for c in parse_patch(self.patch.text()) if c.new_file}
        parts = []
        for file in self.lacking:
            if file in new_files:
                parts.append(f"{file} (added by the patch) was deleted since; revert, then apply, to add it again")
            elif file in self.deleted:
                parts.append(f"{file} (patched) was deleted since; git -C {self.path} checkout -- {file} brings "
                             f"back the upstream file")
            else:
                parts.append(f"{file} holds none of the patch's lines (restored since)")
        return "; ".join(parts)


def inspect_checkout(name: str, path: str | Path) -> CheckoutState:
    """Verify the checkout (commit, touched files clean or exactly patched) and say whether the patch is applied."""
    if name not in PATCHES:
        raise MiraiError(f"unknown upstream {name!r}; choose one of {sorted(PATCHES)}")
    patch = PATCHES[name]
    path = Path(path).resolve()
    if not (path / ".git").exists():
        raise MiraiError(f"{path} is not a git checkout; clone {patch.repository} and check out {patch.commit[:12]}")
    head = _git(path, "rev-parse", "HEAD").stdout.strip()
    if head != patch.commit:
        if not _has_commit(path, patch.commit):
            raise MiraiError(_other_repository_message(name, patch, path))
        raise MiraiError(
            f"{path} is at commit {head[:12]}, but the {name} patch targets {patch.repository} at {patch.commit[:12]}; "
            f"run: git -C {path} checkout {patch.commit}"
        )
    changes = parse_patch(patch.text())
    files = tuple(change.path for change in changes)
    with _patch_file(patch) as patch_path:
        if _git(path, "apply", "--check", "-R", str(patch_path), check=False).returncode == 0:
            return CheckoutState(patch, path, True, files)
        holding, lacking, changed = _file_states(path, patch_path, changes)
        if holding:  # applied, at least in part
            if changed:
                raise MiraiError(_changed_since_message(name, path, changed, {c.path for c in changes if c.new_file}))
            deleted = tuple(file for file in lacking if not (path / file).exists())
            return CheckoutState(patch, path, True, files, tuple(lacking), deleted)
        dirty = [line[3:] for line in _git(path, "status", "--porcelain", "--", *files).stdout.splitlines()]
        if dirty:
            raise MiraiError(
                f"uncommitted changes in files the patch touches: {dirty}; commit or stash them "
                f"(git -C {path} stash -u), then try again"
            )
        result = _git(path, "apply", "--check", str(patch_path), check=False)
        if result.returncode != 0:
            raise MiraiError(f"the {name} patch does not apply to {path}: {result.stderr.strip()}")
    return CheckoutState(patch, path, False, files)


def _has_commit(path: Path, commit: str) -> bool:
    return _git(path, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0


def _other_repository_message(name: str, patch: UpstreamPatch, path: Path) -> str:
    """Why ``patch.commit`` is missing from ``path``: another repository (named when known), or a clone
    without that commit. ``git checkout`` cannot help in either case."""
    remotes = _git(path, "remote", "-v", check=False).stdout.split()
    urls = sorted({word for word in remotes[1::3]})  # "name url (fetch|push)" triples
    wanted = patch.repository.lower()
    same = [url for url in urls if wanted in url.lower().removesuffix(".git")]
    if same:
        return (
            f"{path} is a clone of {patch.repository} ({same[0]}) without the commit the {name} patch targets, "
            f"{patch.commit[:12]} (a shallow or partial clone?); run: git -C {path} fetch origin {patch.commit} "
            f"&& git -C {path} checkout {patch.commit}"
        )
    others = [p for p in PATCHES.values() if p.repository != patch.repository and _has_commit(path, p.commit)]
    if others:
        what = f"a checkout of {others[0].repository}"
        instead = f"or, to patch this one, --upstream {' or '.join(p.name for p in others)}"
    else:
        what = f"a checkout of {urls[0]}" if urls else "a checkout of another repository"
        instead = "or, if it is another patched upstream, its --upstream (`mirai-plugin patch list`)"
    return (
        f"{path} is {what}, not of {patch.repository}: it lacks the commit the {name} patch targets "
        f"({patch.commit[:12]}), so `git checkout` cannot fix it. Pass a checkout of {patch.repository} "
        f"(git clone https://github.com/{patch.repository}), {instead}"
    )


def _file_states(path: Path, patch_path: Path, changes: list[FileChange]) -> tuple[list[str], list[str], list[str]]:
    """The patch's files that hold its version, that lack it (never patched, restored or removed), and
    that are in neither state (changed since the patch was applied)."""
    holding, lacking, changed = [], [], []
    for change in changes:
        include = f"--include={change.path}"
        if not (path / change.path).exists():  # deleted (a tracked file too): revert leaves it deleted
            lacking.append(change.path)
        elif _git(path, "apply", "--check", "-R", include, str(patch_path), check=False).returncode == 0:
            holding.append(change.path)
        elif _git(path, "apply", "--check", include, str(patch_path), check=False).returncode == 0:
            lacking.append(change.path)
        else:
            changed.append(change.path)
    return holding, lacking, changed


def _changed_since_message(name: str, path: Path, changed: list[str], new_files: set[str]) -> str:
    steps = []
    for file in changed:
        if file in new_files:
            steps.append(f"move {file} aside (mv {path / file} {path / file}.mine)")
        else:
            steps.append(f"save your edits (git -C {path} diff -- {file} > {file.replace('/', '_')}.diff), then "
                         f"git -C {path} checkout -- {file}")
    return (
        f"the {name} patch is applied in {path}, but {changed} changed since (edited after the patch was applied), "
        f"so the patch cannot be removed exactly; `git stash` would stash the patch along with your edits. "
        f"To keep your version: {'; '.join(steps)}; then run the command again: it removes the rest of the patch "
        f"and skips files that no longer hold it"
    )


def apply_patch(name: str, path: str | Path) -> CheckoutState:
    state = inspect_checkout(name, path)
    if state.applied:
        partly = f" (in part: {state.lacking_details()})" if state.lacking else ""
        raise MiraiError(
            f"the {name} patch is already applied in {state.path}{partly}; "
            f"`mirai-plugin patch revert --upstream {name} {state.path}` removes it"
        )
    with _patch_file(state.patch) as patch_path:
        _git(state.path, "apply", str(patch_path))
    return CheckoutState(state.patch, state.path, True, state.files)


def revert_patch(name: str, path: str | Path) -> CheckoutState:
    """Remove the patch; files that no longer hold it (restored or removed by hand) are skipped."""
    state = inspect_checkout(name, path)
    if not state.applied:
        raise MiraiError(f"the {name} patch is not applied in {state.path}; nothing to revert")
    skip = [f"--exclude={file}" for file in state.lacking]
    with _patch_file(state.patch) as patch_path:
        _git(state.path, "apply", "-R", *skip, str(patch_path))
    return CheckoutState(state.patch, state.path, False, state.files, state.lacking, state.deleted)


class _patch_file:
    """The patch text as a real file for git (package data may live in a zip)."""

    def __init__(self, patch: UpstreamPatch) -> None:
        self.patch = patch

    def __enter__(self) -> Path:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="mirai-patch-")
        path = Path(self._dir.name) / self.patch.filename
        path.write_text(self.patch.text())
        return path

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()
