"""One worker's running parts, kept in ``app.extensions["wschat"]``.

:func:`wschat.factory.create_app` builds a :class:`Runtime` and wires it, opening
no connection and starting nothing; :meth:`Runtime.start` connects the stores
and starts the worker's background greenlets (gunicorn's ``post_worker_init``
calls it through :func:`wschat.factory.attach_worker`). The routes read it
with :func:`current`; gunicorn hooks and tests with :func:`of`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import gevent
from flask import Flask, current_app

from .admission import Admission
from .chat import Chat
from .config import Settings
from .metrics import refresh_scrape_gauges, sample_worker_gauges
from .stores.base import Stores, Unavailable
from .telemetry import Metrics
from .transport import Transport
from .version import __version__

# The name the start-up line has always been logged under.
log = logging.getLogger("wschat.app")

GAUGE_SAMPLE_SECONDS = 1.0
JWKS_RETRY_SECONDS = 5.0  # while no JWKS key set is loaded (and the worker is not ready)


@dataclass(eq=False)
class Runtime:
    """Everything one worker runs: what the routes, gunicorn hooks and tests reach."""

    settings: Settings
    stores: Stores
    chat: Chat
    transport: Transport
    admission: Admission
    metrics: Metrics
    prometheus: Any  # the registry /metrics and /metrics/json read (all workers)
    echo: bool = False  # WSCHAT_ECHO_ENDPOINT=1: /echo is served (conformance tests only)
    started: bool = False
    shutdown: gevent.Greenlet | None = None  # closes every connection when the worker stops
    stopping_since: float | None = None  # time.monotonic() when the worker was told to stop
    _sampler: gevent.Greenlet | None = field(default=None, repr=False)
    _jwks_loader: gevent.Greenlet | None = field(default=None, repr=False)

    def start(self) -> None:
        """Connect the stores (persistence: connect and migrate; Redis: subscribe) and start
        the timer, the gauge sampler and, with ``JWT_JWKS_URL``, the key set's loader. Once;
        a later call does nothing.

        Raises:
            ConfigError: the database named by ``DATABASE_URL`` cannot be used.
        """
        if self.started:
            return
        self.stores.start()
        self.chat.start()
        self.transport.start()
        self.metrics.started(self.stores.name, persistence=self.settings.enable_persistence)
        self._sampler = gevent.spawn(self._sample_gauges_forever)
        if self.admission.authenticator.jwks is not None:
            self._jwks_loader = gevent.spawn(self._load_jwks)
        self.started = True
        log.info("wschat %s ready: backend=%s persistence=%s", __version__, self.stores.name,
                 self.stores.persistence)

    def stop(self, timeout: float) -> None:
        """Close every connection with 1001 (waiting at most ``timeout`` seconds for their
        close handshakes), then the stores, then stop the background greenlets."""
        self.transport.shutdown(timeout=timeout)
        self.stores.close()
        self.transport.stop()
        if self._jwks_loader is not None:
            self._jwks_loader.kill(block=False)
        if self._sampler is not None:
            self._sampler.kill(block=False)
            self._sample_worker_gauges()  # its last word: the queues are gone

    def problems(self) -> list[str]:
        """Why this worker is not ready (``/ready``); empty when it is."""
        problems = []
        if not self.started:
            problems.append("starting")
        if self.transport.shutting_down:
            problems.append("shutting down")
        problems.extend(self.stores.problems())
        jwks = self.admission.authenticator.jwks
        if jwks is not None and not jwks.loaded:
            # Every token would be refused. Once a set is loaded, a failed refresh keeps
            # it in use: an identity provider's blip does not take every pod out at once.
            problems.append("jwks unreachable")
        return problems

    # -- gauges ------------------------------------------------------------------------
    def refresh_gauges(self) -> None:
        """Before an exposition: figures read from the store, and this worker's samples."""
        rooms: int | None
        memberships: int | None
        try:
            rooms, memberships = self.stores.rooms.totals()
        except Unavailable as exc:
            log.warning("room totals unavailable for this scrape: %s", exc)
            rooms = memberships = None
        except Exception:  # a scrape must still answer: the other series matter most now
            log.exception("room totals failed")
            rooms = memberships = None
        # Redis's memory only when the room totals came back: a Redis that did not answer
        # them would make the scrape wait for a second timeout.
        memory = self._store_memory() if rooms is not None else None
        refresh_scrape_gauges(rooms, memberships, memory)
        self._sample_worker_gauges()

    def _store_memory(self) -> tuple[str, int, int] | None:
        try:
            memory = self.stores.memory_bytes()
        except Exception:  # a scrape must still answer
            log.exception("store memory failed")
            return None
        return None if memory is None else (self.stores.name, *memory)

    def _sample_worker_gauges(self) -> None:
        sample_worker_gauges(sum(c.outbound_bytes for c in list(self.transport.connections)),
                             self.transport.inbound_held)

    def _load_jwks(self) -> None:
        """Fetch the JWKS key set at start, and again every few seconds until one is loaded
        (:class:`~wschat.auth.JwksKeys` logs the failures, backed off, and the success
        that ends them)."""
        jwks = self.admission.authenticator.jwks
        assert jwks is not None
        while not jwks.load():
            gevent.sleep(JWKS_RETRY_SECONDS)

    def _sample_gauges_forever(self) -> None:
        """Every worker refreshes its own share of the sampled gauges, scraped or not
        (a scrape is answered by one worker; the others' values must not go stale)."""
        while True:
            try:
                self._sample_worker_gauges()
            except Exception:
                log.exception("sampling worker gauges failed")
            gevent.sleep(GAUGE_SAMPLE_SECONDS)


def of(app: Flask) -> Runtime:
    """The runtime of ``app`` (built by :func:`wschat.factory.create_app`)."""
    runtime: Runtime = app.extensions["wschat"]
    return runtime


def current() -> Runtime:
    """The runtime of the app handling this request."""
    return of(current_app)
