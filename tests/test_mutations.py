"""Every deliberate break in ``tools/mutation_check.py`` that a unit test must catch is caught (its ``--fast``
subset: the named tests under tests/); the full list, with the integration tests, is run by hand
(integration_tests/README.md records the last run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import mutation_check  # noqa: E402


def test_each_mutation_names_text_that_occurs_once_and_tests_that_exist():
    for m in mutation_check.MUTATIONS:
        assert (ROOT / m.file).read_text().count(m.old) == 1, m.name
        assert m.old != m.new and m.tests, m.name
        for test in m.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).exists(), test
            assert not name or f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), test
    assert len({m.name for m in mutation_check.MUTATIONS}) == len(mutation_check.MUTATIONS)


@pytest.mark.slow
def test_the_unit_tests_catch_every_mutation_they_are_named_for():
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "mutation_check.py"), "--fast"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "MISSED" not in done.stdout and " mutations caught" in done.stdout
