"""The Autobahn|Testsuite core cases (sections 1-10) against the echo endpoint, via kosoku.

About 10 s on two cores; the documented full run is ``tests/autobahn/run_autobahn.py``
(see docs/conformance.md).
"""

from __future__ import annotations

import warnings

import pytest

from run_autobahn import CORE_CASES, run_cases, summarize

kosoku = pytest.importorskip("kosoku", reason="kosoku (the Autobahn case runner) not installed")

# Sections 1-7, 9 and 10 of the Autobahn suite as kosoku 0.1 ships them.
EXPECTED_CASES = 301


def test_autobahn_core_cases_pass() -> None:
    """Every core Autobahn case is OK, NON-STRICT or INFORMATIONAL: none FAILED or ERROR."""
    outcomes = run_cases(CORE_CASES, limits="wide", parallelism=2)
    failed = [o for o in outcomes if not o.passed("wide")]
    if failed:
        # A verdict is deterministic; a case that fails once under load and passes alone
        # is timing, not conformance, so it is retried alone and reported, never ignored.
        # (The one such failure seen, 6.4.* under load, was a heartbeat ping inside the
        # case's waits; run_cases now sets a day-long HEARTBEAT_INTERVAL.)
        retried = run_cases([o.case_id for o in failed], limits="wide", parallelism=1)
        still = [o for o in retried if not o.passed("wide")]
        assert len(retried) == len(failed) and not still, summarize(outcomes, "wide")
        warnings.warn(f"Autobahn cases passed only when retried alone: "
                      f"{', '.join(o.case_id for o in failed)}\n{summarize(failed, 'wide')}",
                      stacklevel=1)
        # The counts below are of verdicts: a case that passed alone counts as it passed.
        verdicts = {o.case_id: o for o in retried}
        outcomes = [verdicts.get(o.case_id, o) for o in outcomes]
    assert len(outcomes) == EXPECTED_CASES
    assert sum(o.behavior == "OK" for o in outcomes) >= EXPECTED_CASES - 3
