"""Integration tests skip, naming the variable, when a checkout is missing; CI forbids that.

``MIRAI_REQUIRE_UPSTREAMS=1`` (set by ``.ci/run`` when the archives are there)
fails the run if any test here is skipped or deselected, so none can silently
drop out. ``MIRAI_UPSTREAM_REPORT=PATH`` writes the counts as JSON for ``.ci/run``
to check against the number of integration tests that must run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# Appended, not prepended: tests/ import their own `conftest` module by name.
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))
from checkouts import CheckoutMissing  # noqa: E402

REQUIRED = os.environ.get("MIRAI_REQUIRE_UPSTREAMS") == "1"
_outcomes: dict[str, str] = {}  # nodeid -> passed / failed / skipped: reason
_deselected: list[str] = []
_root = Path.cwd()


def pytest_configure(config):
    global _root
    _root = config.rootpath


def _here(path) -> bool:
    return (_root / path).resolve().is_relative_to(HERE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    try:
        return (yield)
    except CheckoutMissing as missing:  # raised by a fixture that makes a checkout
        pytest.skip(str(missing))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except CheckoutMissing as missing:
        pytest.skip(str(missing))


def pytest_deselected(items):
    _deselected.extend(item.nodeid for item in items if _here(item.path))


def pytest_runtest_logreport(report):
    if not _here(report.fspath):
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _outcomes[report.nodeid] = f"skipped: {reason}"
    elif report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def _counts() -> dict:
    skipped = {k: v for k, v in _outcomes.items() if v.startswith("skipped")}
    return {"passed": sum(v == "passed" for v in _outcomes.values()),
            "failed": sum(v == "failed" for v in _outcomes.values()),
            "skipped": skipped, "deselected": list(_deselected)}


def pytest_sessionfinish(session):
    counts = _counts()
    if os.environ.get("MIRAI_UPSTREAM_REPORT"):
        Path(os.environ["MIRAI_UPSTREAM_REPORT"]).write_text(json.dumps(counts, indent=1))
    if REQUIRED and (counts["skipped"] or counts["deselected"]):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    counts = _counts()
    if not REQUIRED or not (counts["skipped"] or counts["deselected"]):
        return
    terminalreporter.section("MIRAI_REQUIRE_UPSTREAMS=1: integration tests that did not run", red=True)
    for nodeid, outcome in {**counts["skipped"], **{n: "deselected" for n in counts["deselected"]}}.items():
        terminalreporter.line(f"{nodeid}: {outcome}")
