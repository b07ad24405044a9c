"""The documented contract and the code agree, checked offline (no server, no Redis).

README.md (configuration table, protocol tables, error and close codes, the server API's
error codes), docs/operations.md (the series table, ``/metrics/json``) and the chart's
alerts and dashboard name what operators and clients rely on. The rule
(shared/design/SPEC.md) is to keep every documented name exactly and only add: so a
name the code has and the docs lack, or the docs have and the code lacks, is drift.

The docs are read by structure, not wording: names in backticks in a table's first
column, under a known heading; a row's wording can change freely.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "wschat"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
HELM = ROOT / "helm"


# --------------------------------------------------------------------------
# Reading Markdown: sections, tables, backticked names
# --------------------------------------------------------------------------

def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line, e.g. ``## Configuration``) up to
    the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r}"
    start = lines.index(heading) + 1
    out = []
    for line in lines[start:]:
        match = re.match(r"(#+) ", line)
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


def first_column(rows: list[list[str]]) -> set[str]:
    """The names in backticks in the first column (a row may name several)."""
    return {name for row in rows for name in ticked(row[0])}


def without_fences(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.DOTALL)


def readme() -> str:
    return README.read_text()


# --------------------------------------------------------------------------
# Reading the code
# --------------------------------------------------------------------------

def sources(*skip: str) -> Iterator[tuple[Path, ast.Module]]:
    """Every module of the server (and gunicorn.conf.py), parsed; ``skip``: file names
    relative to the repository."""
    for path in sorted([*PACKAGE.rglob("*.py"), ROOT / "gunicorn.conf.py"]):
        if str(path.relative_to(ROOT)) not in skip:
            yield path, ast.parse(path.read_text(), str(path))


def _is_os_environ(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ"
            and isinstance(node.value, ast.Name) and node.value.id == "os")


def environment_reads(tree: ast.AST) -> set[str]:
    """Names read with ``os.environ.get("X")``, ``os.getenv("X")`` or ``os.environ["X"]``
    (reads only: an assignment to ``os.environ["X"]`` is no read)."""
    names = set()
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if ((isinstance(func, ast.Attribute) and func.attr in ("get", "pop")
                 and _is_os_environ(func.value))
                    or (isinstance(func, ast.Attribute) and func.attr == "getenv")
                    or (isinstance(func, ast.Name) and func.id == "getenv")):
                arg = node.args[0]
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and _is_os_environ(node.value)):
            arg = node.slice
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
    return names


def environment_writes(tree: ast.AST) -> set[str]:
    return {node.slice.value for node in ast.walk(tree)
            if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
            and _is_os_environ(node.value) and isinstance(node.slice, ast.Constant)}


def enum_members_used(enum: str, *skip: str) -> set[str]:
    """``Enum.MEMBER`` attribute uses in the server's code outside ``skip``."""
    return {node.attr for _, tree in sources(*skip) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == enum}


# ==========================================================================
# 1. Configuration: README's table <-> the variables the server reads
# ==========================================================================

# Read from the environment but no setting: the gunicorn master writes it for its
# workers (gunicorn.conf.py), so that uptime is the server's, not a worker's.
INTERNAL_VARIABLES = {"WSCHAT_STARTED_AT"}
# Defaults the table gives as a multiple of another variable: the property that applies
# it (the field itself defaults to None, "derive it").
DERIVED_DEFAULTS = {"RATE_LIMIT_GUEST_IP": "guest_ip_rate",
                    "RATE_LIMIT_GUEST_IP_BURST": "guest_ip_burst",
                    "RATE_LIMIT_REQUESTS": "request_rate",
                    "RATE_LIMIT_REQUESTS_BURST": "request_burst"}


def config_table() -> dict[str, list[str]]:
    """README's configuration table: variable -> its row's cells."""
    rows = table(section(readme(), "## Configuration"), "variable", "default")
    found = {}
    for row in rows:
        names = ticked(row[0])
        assert len(names) == 1 and re.fullmatch(r"[A-Z][A-Z0-9_]*", names[0]), row[0]
        found[names[0]] = row
    return found


def settings_fields() -> dict[str, dataclasses.Field[Any]]:
    from wschat.config import Settings

    return {f.metadata["env"]: f for f in dataclasses.fields(Settings)}


def variables_read() -> dict[str, set[str]]:
    """Every environment variable the server reads -> where (Settings, or the files)."""
    found: dict[str, set[str]] = {name: {"Settings"} for name in settings_fields()}
    for path, tree in sources():
        for name in environment_reads(tree):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_variable_the_server_reads_is_in_the_readme_table_and_back() -> None:
    """Settings' fields, and any other os.environ/getenv read in wschat/ or
    gunicorn.conf.py, are the README configuration table's variables, no more, no less."""
    documented = set(config_table())
    read = variables_read()
    assert {"PROMETHEUS_MULTIPROC_DIR", "WSCHAT_ECHO_ENDPOINT"} <= set(read)  # not vacuous
    missing = {n: sorted(w) for n, w in read.items()
               if n not in documented and n not in INTERNAL_VARIABLES}
    assert not missing, f"read by the server, missing from README's configuration table: {missing}"
    assert documented - set(read) == set(), "in README's configuration table, read by nothing"
    # The exemptions stay true: written by gunicorn.conf.py, never documented as settings.
    written = environment_writes(ast.parse((ROOT / "gunicorn.conf.py").read_text()))
    assert INTERNAL_VARIABLES <= written and not INTERNAL_VARIABLES & documented


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_documented_defaults_are_the_code_defaults() -> None:
    """The table's default of each setting is what Settings uses when it is unset: a
    literal (`8080`, `false`, `*`) parses to the field's default; "unset" is none; a
    multiple of another variable (10 x `RATE_LIMIT`) is what the setting then follows."""
    from wschat.config import Settings

    fields = settings_fields()
    checked = 0
    for name, row in config_table().items():
        default = row[1]
        literals = ticked(default)
        if name not in fields:  # read outside Settings, with .get(): unset by default
            assert default.lower().startswith("unset"), f"{name}: default {default!r}"
            continue
        field = fields[name]
        if default.lower().startswith("unset"):
            assert field.default in (None, ()), f"{name}: documented unset, code {field.default!r}"
        elif name in DERIVED_DEFAULTS:
            match = re.fullmatch(r"(?:(\d+) x )?`([A-Z_]+)`", default)
            assert match, f"{name}: default {default!r} is not 'N x `VARIABLE`'"
            factor, base = int(match.group(1) or 1), match.group(2)
            assert field.default is None, name
            prop = DERIVED_DEFAULTS[name]
            assert getattr(Settings(), prop) == factor * fields[base].default, name
            raw = "3"
            moved = Settings.from_env({base: raw})
            assert getattr(moved, prop) == factor * fields[base].metadata["parse"](raw), name
        elif len(literals) == 1 and default == f"`{literals[0]}`":
            parsed = field.metadata["parse"](literals[0])
            assert parsed == field.default, (
                f"{name}: README says {literals[0]!r}, the code's default is {field.default!r}")
        else:  # in words ("from the key"): computed at start, the field is unset
            assert field.default is None, f"{name}: default {default!r}, code {field.default!r}"
        checked += 1
    assert checked == len(fields), "a variable Settings reads is missing from the table"


_NUMBER = r"\d[\d,]*(?:\.\d+)?(?:e\d+)?"


def documented_ranges() -> dict[str, tuple[float | None, float | None]]:
    """variable -> (lowest, highest) the table's meaning column states: "A to B", "A-B",
    "at least A" (a number), with "(so are `X` and `Y`)" giving the same to others."""
    ranges: dict[str, tuple[float | None, float | None]] = {}
    for name, row in config_table().items():
        meaning = row[2]
        found: tuple[float | None, float | None] | None = None
        match = (re.search(rf"(?<![\w.\-/])({_NUMBER}) to ({_NUMBER})(?![\w\-])", meaning)
                 or re.search(r"(?<![\w.\-/])(\d+)-(\d+)(?![\w\-])", meaning))
        if match:
            found = (_number(match.group(1)), _number(match.group(2)))
        else:
            match = re.search(rf"\b[Aa]t least ({_NUMBER})(?![\w\-]| ?(?:characters|bytes))",
                              meaning)
            if match:
                found = (_number(match.group(1)), None)
        if found is None:
            continue
        ranges[name] = found
        also = re.search(r"\(so (?:is|are) ([^)]*)\)", meaning)
        for other in ticked(also.group(1)) if also else ():
            ranges[other] = found
    return ranges


def test_documented_ranges_are_the_validation() -> None:
    """Each range the table states is what start-up accepts: both ends parse, one step
    beyond either end stops the server naming the variable."""
    from wschat.config import ConfigError, Settings

    fields = settings_fields()
    ranges = documented_ranges()
    # Not vacuous: the ranges the table states today.
    assert {"RATE_LIMIT", "RATE_LIMIT_GUEST_IP", "RATE_LIMIT_REQUESTS", "RATE_LIMIT_BURST",
            "MAX_CONNECTIONS", "METRICS_PORT", "ROOM_TTL", "GRACEFUL_TIMEOUT"} <= set(ranges)
    problems = []
    for name, (low, high) in sorted(ranges.items()):
        assert name in fields, f"{name}: a range for a variable Settings does not read"
        integer = "int" in str(fields[name].type) and "float" not in str(fields[name].type)

        def raw(value: float, integer: bool = integer) -> str:
            return str(int(value)) if integer else repr(value)

        def accepted(value: float, name: str = name, raw: Any = raw) -> bool:
            try:
                Settings.from_env({name: raw(value)})
            except ConfigError as exc:
                assert str(exc).startswith(name), exc
                return False
            return True

        if low is not None:
            below = low - 1 if integer else low - (abs(low) / 2 or 1)
            if not accepted(low) or accepted(below):
                problems.append(f"{name}: README's lowest is {low:g}")
        if high is not None and (not accepted(high) or accepted(high * 2 if high else 1)):
            problems.append(f"{name}: README's highest is {high:g}")
    assert not problems, "\n".join(problems)
