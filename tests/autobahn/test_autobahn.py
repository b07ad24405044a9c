"""The Autobahn|Testsuite core cases (sections 1-10) against the echo endpoint, via kosoku.

About 10 s on two cores; the documented full run is ``tests/autobahn/run_autobahn.py``
(see docs/conformance.md).
"""

from __future__ import annotations

import pytest

from run_autobahn import CORE_CASES, run_cases, summarize

kosoku = pytest.importorskip("kosoku", reason="kosoku (the Autobahn case runner) not installed")

# Sections 1-7, 9 and 10 of the Autobahn suite as kosoku 0.1 ships them.
EXPECTED_CASES = 301


def test_autobahn_core_cases_pass() -> None:
    """Every core Autobahn case is OK, NON-STRICT or INFORMATIONAL: none FAILED or ERROR."""
    outcomes = run_cases(CORE_CASES, limits="wide", parallelism=2)
    failed = [o for o in outcomes if not o.passed("wide")]
    assert not failed, summarize(outcomes, "wide")
    assert len(outcomes) == EXPECTED_CASES
    assert sum(o.behavior == "OK" for o in outcomes) >= EXPECTED_CASES - 3
