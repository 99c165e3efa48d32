"""The pinned upstream checkouts: where they are (``MIRAI_*_DIR``) and fresh copies of them.

Every integration test, every benchmark that runs an upstream trainer and every
``tools/`` script that regenerates reference data gets its checkout here::

    repo = checkout("self-forcing", tmp_path / "sf", "self-forcing")   # a patched copy at the pinned commit
    root = source("video-mirai")                                       # the checkout itself, read-only

The checkouts usually come from the archives in ``../shared/upstreams/``
(``eval "$(../shared/upstreams/unpack /tmp/up)"`` exports the variables). Their
history is cut at the pinned commit and their pictures and videos are left out,
so a copy is a clone by plain local path (``file://`` and ``--depth`` need the
history), without checkout, then a sparse checkout without ``assets/`` and
``docs/`` (which no trainer reads) at the pinned commit.

A variable that is not set raises ``CheckoutMissing``; ``conftest.py`` turns it
into a skip that names the variable (a failure under ``MIRAI_REQUIRE_UPSTREAMS=1``).
A variable that is set but wrong is an error, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mirai_plugin.tooling.patching import PATCHES

__all__ = ["UPSTREAMS", "CheckoutMissing", "Upstream", "checkout", "source"]

# Pictures and videos (absent from the archives); the trainers need none of them.
SPARSE = ("/*", "!/assets/", "!/docs/")


@dataclass(frozen=True)
class Upstream:
    name: str
    variable: str
    repository: str
    commit: str


def _patched(name: str, variable: str) -> Upstream:
    patch = PATCHES[name]  # the commit a patch targets is written once, with the patch
    return Upstream(name, variable, patch.repository, patch.commit)


UPSTREAMS = {
    u.name: u
    for u in (
        _patched("self-forcing", "MIRAI_SELF_FORCING_DIR"),
        _patched("causal-forcing", "MIRAI_CAUSAL_FORCING_DIR"),
        _patched("llamagen", "MIRAI_LLAMAGEN_DIR"),
        Upstream("video-mirai", "MIRAI_VIDEO_MIRAI_DIR", "y0urOy/Video-Mirai",
                 "281e47e46a0bb442437227fd8d664e8cb120d043"),
        Upstream("mirai-code", "MIRAI_MIRAI_CODE_DIR", "y0urOy/Mirai-Code",
                 "4e8611e54159c67fe31c29e6f922ba47c031c9df"),
        _patched("longlive", "MIRAI_LONGLIVE_DIR"),
        _patched("rolling-forcing", "MIRAI_ROLLING_FORCING_DIR"),
    )
}


class CheckoutMissing(LookupError):
    """The variable that names an upstream checkout is not set."""


def source(name: str) -> Path:
    """The checkout named by ``name``'s variable, checked to contain the pinned commit."""
    upstream = UPSTREAMS[name]
    value = os.environ.get(upstream.variable)
    if not value:
        raise CheckoutMissing(
            f"{upstream.variable} is not set (path to a {upstream.repository} checkout that has commit "
            f"{upstream.commit[:12]}; eval \"$(../shared/upstreams/unpack /tmp/up)\" sets it)")
    root = Path(value)
    found = subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{upstream.commit}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"{upstream.variable}={value} is not a git checkout that has {upstream.repository} "
                           f"commit {upstream.commit}: {found.stderr.strip()}")
    return root


def checkout(name: str, dest: str | os.PathLike, *patches: str) -> Path:
    """A fresh sparse copy of ``name`` at its pinned commit in ``dest``, with ``patches`` applied
    by the ``mirai-plugin patch apply`` command (names from ``mirai_plugin.tooling.patching.PATCHES``)."""
    upstream, dest = UPSTREAMS[name], Path(dest)
    _git("clone", "-q", "--no-checkout", str(source(name)), str(dest))
    _git("-C", str(dest), "sparse-checkout", "set", "--no-cone", *SPARSE)
    _git("-C", str(dest), "checkout", "-q", upstream.commit)
    for patch in patches:
        applied = subprocess.run(
            [sys.executable, "-m", "mirai_plugin.tooling.cli", "patch", "apply", "--upstream", patch, str(dest)],
            capture_output=True, text=True)
        if applied.returncode != 0 or "added:" not in applied.stdout:
            raise RuntimeError(f"patch {patch} did not apply to {dest} (exit {applied.returncode}):\n"
                               f"{applied.stdout}{applied.stderr}")
    return dest


def _git(*args: str) -> None:
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
