"""Logging set-up: plain text for people, one JSON object per line for machines.

Connection open/close lines carry user, reason and duration as ``extra``
fields, which the JSON formatter turns into keys. No token and no message text
is ever logged; as a second line of defence both formatters blank any
``token=`` query parameter or ``Bearer`` credential that reaches a log line
(gunicorn's own messages quote request lines).

Standard library only: ``gunicorn.conf.py`` has the master (before any fork)
use :class:`JsonFormatter` for gunicorn's own lines when ``LOG_FORMAT=json``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .ratelimit import take

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
_SECRETS = re.compile(
    r"((?:[?&;]|\b)(?:access_)?token=)[^&\s\"']+|(\bBearer\s+)[\w.~+/=-]+", re.IGNORECASE)
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
_LINE_BREAKS = str.maketrans({"\n": "\\n", "\r": "\\r"})
# Other characters a terminal or a log viewer acts on: C0 controls (ESC starts
# terminal escape sequences), DEL, C1 controls (U+0085 is a line break to some
# tools) and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _json_escape_control(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"  # also valid inside a JSON string


def redact(line: str) -> str:
    """Blank credentials in a formatted log line."""
    if "oken=" not in line and "earer" not in line:
        return line
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", line)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One event, one line: a client's text in a message (a close reason) must not
        # be able to forge log lines, nor send a terminal escape sequence. Tracebacks
        # are appended after this, unescaped.
        return _CONTROLS.sub(_escape_control,
                             super().formatMessage(record).translate(_LINE_BREAKS))

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, pid, msg, then ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes C0 controls itself; C1 controls and U+2028/9 it leaves raw.
        return redact(_CONTROLS.sub(_json_escape_control,
                                    json.dumps(entry, default=str, ensure_ascii=False)))


# Lines a client's bad input causes, one per request: gunicorn's for a malformed request
# (it quotes the client's text: a request line, a header), wschat's for a refused upgrade
# (a foreign Origin, a bad token). Each kind, per worker: CLIENT_LINES_BURST lines at
# once, then one every CLIENT_LINES_EVERY seconds; each cut to MAX_CLIENT_TEXT characters.
CLIENT_LINES = {"gunicorn.error": ("Invalid request from",),
                "wschat.app": ("upgrade refused (401)", "upgrade refused (403)")}
CLIENT_LINES_BURST = 20
CLIENT_LINES_EVERY = 5.0
MAX_CLIENT_TEXT = 500


@dataclass(slots=True)
class _ClientLines:
    """One prefix's lines: its bucket, and those left out since the last one written."""

    tokens: float
    counted_at: float
    left_out: int = 0
    level: int = logging.INFO  # the last one left out's


class ClientLineThrottle(logging.Filter):
    """A logger's filter that keeps a flood of bad requests from becoming a flood of log
    lines: the lines whose message starts with one of ``prefixes`` get a token bucket
    per prefix (``burst`` lines, one more every ``every`` seconds); a line written after
    some were left out says how many. Their message is cut to ``max_text`` characters
    (the client's text in it is bounded only by gunicorn's header limit, 8 KB)."""

    def __init__(self, prefixes: tuple[str, ...], burst: int = CLIENT_LINES_BURST,
                 every: float = CLIENT_LINES_EVERY, max_text: int = MAX_CLIENT_TEXT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.burst, self.every, self.max_text, self.clock = burst, every, max_text, clock
        now = clock()
        self._lines = {p: _ClientLines(float(burst), now) for p in prefixes}

    def _take(self, lines: _ClientLines, now: float) -> tuple[float, float, int]:
        """The prefix's bucket after one more line at ``now`` (ratelimit.take's maths)."""
        return take(lines.tokens, lines.counted_at, now, 1 / self.every, self.burst)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, str) or not msg.startswith(self.prefixes):
            return True
        lines = self._lines[next(p for p in self.prefixes if msg.startswith(p))]
        lines.tokens, lines.counted_at, wait_ms = self._take(lines, self.clock())
        if wait_ms:
            lines.left_out += 1
            lines.level = record.levelno
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 (a bad format: the handler reports it as ever)
            return True
        if len(text) > self.max_text:
            text = f"{text[:self.max_text]}... ({len(text) - self.max_text} characters cut)"
        if lines.left_out:
            text += f" ({lines.left_out} more like this left out)"
            lines.left_out = 0
        record.msg, record.args = text, None
        return True

    def flush(self, logger: logging.Logger) -> None:
        """For each prefix with lines left out that may write a line again: one line,
        ``<prefix> ... (N more like this left out)``, at their level. Else the count of
        a flood that stopped was never written (it went out with the next line only)."""
        now = self.clock()
        for prefix, lines in self._lines.items():
            if lines.left_out and not self._take(lines, now)[2]:
                logger.log(lines.level, f"{prefix} ...")  # the count: filter() above


class RedactFilter(logging.Filter):
    """Blanks credentials in a record's message and traceback (:func:`redact`), for lines
    no formatter of ours writes: gunicorn's own with ``LOG_FORMAT=text``, which quote a
    malformed request line (``?token=...`` included) or, for an application error, its
    URI, and whose traceback may quote it again (an exception's message)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.exc_text:
            # What the handler's formatter would write (it uses exc_text when set).
            record.exc_text = redact(_TRACEBACKS.formatException(record.exc_info))
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 (a bad format: the handler reports it as ever)
            return True
        clean = redact(text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


_TRACEBACKS = logging.Formatter()


def throttle_client_lines() -> None:
    """Put a :class:`ClientLineThrottle` on each logger of :data:`CLIENT_LINES`, and a
    :class:`RedactFilter` after it on gunicorn's (once)."""
    for name, prefixes in CLIENT_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClientLineThrottle) for f in logger.filters):
            logger.addFilter(ClientLineThrottle(prefixes))
    logger = logging.getLogger("gunicorn.error")
    if not any(isinstance(f, RedactFilter) for f in logger.filters):
        logger.addFilter(RedactFilter())


def flush_client_lines() -> None:
    """Write the counts of client lines left out that no later line told
    (:meth:`ClientLineThrottle.flush`); the worker's timer calls this every step."""
    for name in CLIENT_LINES:
        logger = logging.getLogger(name)
        for throttle in logger.filters:
            if isinstance(throttle, ClientLineThrottle):
                throttle.flush(logger)


def configure_logging(fmt: str, level: str) -> None:
    """Give the ``wschat`` loggers one stderr handler in ``fmt`` (idempotent), and bound
    the lines clients' bad requests cause (:func:`throttle_client_lines`)."""
    throttle_client_lines()
    root = logging.getLogger("wschat")
    root.setLevel(level.upper())
    if any(getattr(h, "_wschat", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._wschat = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.propagate = False
