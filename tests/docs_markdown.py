"""Reading the docs' Markdown by structure: sections under a heading, tables (header and
rows of cells), names in backticks. Shared by the tests that hold the docs to the code
(tests/test_contract.py, tests/test_packaging.py)."""

from __future__ import annotations

import re


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line, e.g. ``## Configuration``) up to
    the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r}"
    start = lines.index(heading) + 1
    out, fenced = [], False
    for line in lines[start:]:
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"(#+) ", line)  # a shell comment is no heading
        if match and len(match.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def cells(line: str) -> list[str]:
    """A Markdown table row's cells (``\\|`` is a literal bar, not a separator)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table in ``text``: (header cells, rows of cells)."""
    found, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if (lines[i].startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip())):
            header, rows = cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            found.append((header, rows))
        else:
            i += 1
    return found


def table(text: str, *header: str) -> list[list[str]]:
    """The rows of the one table in ``text`` whose header starts with ``header``."""
    found = [rows for head, rows in tables(text)
             if [h.lower() for h in head[:len(header)]] == list(header)]
    assert len(found) == 1, f"{len(found)} tables with header {header}"
    return found[0]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)
