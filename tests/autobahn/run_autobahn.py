"""Autobahn|Testsuite conformance run of wschat's WebSocket layer, driven by kosoku.

Starts the real server (``gunicorn -c gunicorn.conf.py wschat:app``) with the
test-only echo endpoint (``WSCHAT_ECHO_ENDPOINT=1`` -> ``/echo``, the same
admission and frame handling as ``/ws``), runs the Autobahn cases against it
with kosoku (the Autobahn case files under a Python 3 runner), prints a
summary per section and, with ``--reports DIR``, writes Autobahn-format
reports (``index.json`` plus one JSON/HTML file per case).

    python tests/autobahn/run_autobahn.py                          # cases 1-10, wide limits
    python tests/autobahn/run_autobahn.py --limits default         # shipped MAX_MESSAGE_BYTES
    python tests/autobahn/run_autobahn.py --cases '*' --reports build/autobahn   # with 12.*/13.*

Exit status: 0 when no case is FAILED or ERROR (under ``--limits default``,
cases refused with 1009 because they exceed ``MAX_MESSAGE_BYTES`` count as
intended), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the Server fixture

from conftest import Server  # noqa: E402

# The cases that exercise RFC 6455 itself; 12.* and 13.* are permessage-deflate,
# which wschat never negotiates (they report UNIMPLEMENTED).
CORE_CASES = ("1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*")

# Section 9 sends messages up to 16 MiB: with "wide" limits they measure the
# frame layer; with "default" ones they meet MAX_MESSAGE_BYTES (64 KiB) and 1009.
LIMITS = {
    "wide": {"MAX_MESSAGE_BYTES": str(16 * 1024 * 1024),
             "MAX_OUTBOUND_BYTES": str(64 * 1024 * 1024)},
    "default": {},
}
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}


@dataclass(frozen=True)
class Outcome:
    case_id: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    duration_ms: int
    result: str

    @property
    def section(self) -> str:
        return self.case_id.split(".")[0]

    def by_policy(self, limits: str) -> bool:
        """A FAILED case that only met our configured message-size limit."""
        return limits == "default" and self.remote_close_code == 1009

    def passed(self, limits: str) -> bool:
        return self.behavior in PASSING or self.by_policy(limits)


def run_cases(cases: Sequence[str] = CORE_CASES, exclude: Sequence[str] = (),
              limits: str = "wide", parallelism: int = 2, reports: str | None = None,
              env: dict[str, str] | None = None) -> list[Outcome]:
    """Start a server with the echo endpoint, run the cases, return one outcome each."""
    import kosoku

    # Autobahn counts every frame the server sends as an event of the case, so a
    # heartbeat ping landing in one of the one-second waits of 6.4.* failed it ("actual
    # events differ": [ping] where [] was expected). The first ping of a connection comes
    # at a random moment of its first interval; a day makes that as good as never.
    server_env = {"WSCHAT_ECHO_ENDPOINT": "1", "LOG_LEVEL": "warning",
                  "HEARTBEAT_INTERVAL": "86400", **LIMITS[limits], **(env or {})}
    with Server(server_env) as server:
        url = f"ws://127.0.0.1:{server.port}/echo"
        try:
            results = asyncio.run(kosoku.run_fuzzingclient(
                url, list(cases), list(exclude) or None, concurrency=parallelism))
        except kosoku.FailureError as failure:
            results = failure.results
    if reports:
        _write_reports(results, reports)
    return sorted((Outcome(r.case_id, r.behavior.value, r.behavior_close.value,
                           r.remote_close_code, r.duration, r.result) for r in results),
                  key=lambda o: [int(p) for p in o.case_id.split(".")])


def _write_reports(results: list[Any], directory: str) -> None:
    try:  # kosoku's own Autobahn-format writer (what its CLI uses); optional
        from kosoku._report import write_reports
    except ImportError as exc:
        print(f"(no reports written: {exc})", file=sys.stderr)
        return
    write_reports(results, directory)


def summarize(outcomes: list[Outcome], limits: str) -> str:
    """A Markdown table of verdicts per section, then every case that is not OK."""
    verdicts = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR"]
    table: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        table[o.section][o.behavior] += 1
    lines = ["| section | cases | " + " | ".join(verdicts) + " |",
             "|---|---|" + "---|" * len(verdicts)]
    for section in sorted(table, key=int):
        counts = table[section]
        lines.append(f"| {section} | {sum(counts.values())} | "
                     + " | ".join(str(counts[v]) for v in verdicts) + " |")
    total: collections.Counter[str] = collections.Counter(o.behavior for o in outcomes)
    lines.append(f"| all | {len(outcomes)} | " + " | ".join(str(total[v]) for v in verdicts)
                 + " |")
    unusual = [o for o in outcomes if o.behavior != "OK" and o.behavior != "UNIMPLEMENTED"]
    if unusual:
        lines += ["", "| case | behavior | close | remote close code | note |",
                  "|---|---|---|---|---|"]
        for o in unusual:
            note = "over MAX_MESSAGE_BYTES (policy)" if o.by_policy(limits) else o.result
            lines.append(f"| {o.case_id} | {o.behavior} | {o.behavior_close} | "
                         f"{o.remote_close_code} | {note[:120]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", action="append", metavar="GLOB",
                        help="case ids or globs (repeatable; default: sections 1-10)")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    parser.add_argument("--limits", choices=sorted(LIMITS), default="wide")
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--reports", metavar="DIR", help="write Autobahn-format reports here")
    args = parser.parse_args(argv)
    outcomes = run_cases(args.cases or CORE_CASES, args.exclude, args.limits,
                         args.parallelism, args.reports)
    print(summarize(outcomes, args.limits))
    failed = [o for o in outcomes if not o.passed(args.limits)]
    print(f"\n{len(outcomes)} cases, {len(failed)} failed"
          + (f": {', '.join(o.case_id for o in failed)}" if failed else ""))
    return 1 if failed or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
