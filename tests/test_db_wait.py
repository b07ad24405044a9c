"""wschat.db_wait: the database's socket is served before the clients' sockets."""

from __future__ import annotations

import hashlib
import socket
import time

import gevent
import gevent.socket
import pytest

from test_persistence import pg_url_or_skip
from wschat import db_wait
from wschat.db_wait import READ, WRITE, psycopg_connection_class, wait_first


def test_the_database_socket_runs_first_among_sockets_ready_together() -> None:
    """Twenty client sockets and one database socket become readable in the same loop turn:
    the greenlet waiting with wait_first runs before every client's."""
    pairs = [socket.socketpair() for _ in range(21)]
    order: list[str] = []

    def client(sock: socket.socket, name: str) -> None:
        gevent.socket.wait_read(sock.fileno())
        order.append(name)

    def database(sock: socket.socket) -> None:
        assert wait_first(sock.fileno(), READ)
        order.append("database")

    try:
        waiters = [gevent.spawn(client, pair[0], f"client{i}") for i, pair in
                   enumerate(pairs[:10])]
        waiters.append(gevent.spawn(database, pairs[10][0]))
        waiters += [gevent.spawn(client, pair[0], f"client{i}") for i, pair in
                    enumerate(pairs[11:], start=11)]
        gevent.sleep(0)  # every greenlet is waiting now
        for _, writer in pairs:  # no yield in between: all ready in one turn
            writer.send(b"x")
        gevent.joinall(waiters, timeout=5, raise_error=True)
        assert len(order) == 21 and order[0] == "database"
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_wait_first_times_out() -> None:
    a, b = socket.socketpair()
    try:
        started = time.monotonic()
        assert wait_first(a.fileno(), READ, timeout=0.05) is False
        assert 0.04 < time.monotonic() - started < 2
        b.send(b"x")
        assert wait_first(a.fileno(), READ, timeout=5) is True
    finally:
        a.close()
        b.close()


def test_postgres_connection_waits_first_and_carries_big_statements(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection class PostgresLog uses waits through db_wait, and a 4 MB parameter (whose
    sending may wait for the socket to be readable or writable) and its answer arrive intact."""
    psycopg = pytest.importorskip("psycopg")
    cls = psycopg_connection_class(psycopg)
    assert cls is not psycopg.Connection  # this psycopg's wait() is the one db_wait knows
    waits: list[int] = []
    ready = db_wait._ready
    monkeypatch.setattr(db_wait, "_ready", lambda fileno, events: (waits.append(events),
                                                                    ready(fileno, events))[1])
    big = "é" * 2_000_000
    with cls.connect(pg_url_or_skip(), autocommit=True) as conn:
        assert conn.execute("SELECT length(%s), md5(%s)", (big, big)).fetchone() == (
            len(big), hashlib.md5(big.encode()).hexdigest())
    assert READ in waits  # the reply was waited for here


def test_a_read_or_write_wait_reports_which_is_ready() -> None:
    """psycopg may wait for either; it must be told which one happened."""
    a, b = socket.socketpair()
    try:
        assert db_wait._ready(a.fileno(), READ | WRITE) == WRITE
        b.send(b"x")
        assert db_wait._ready(a.fileno(), READ | WRITE) == READ | WRITE
        assert db_wait._ready(a.fileno(), READ) == READ
    finally:
        a.close()
        b.close()
