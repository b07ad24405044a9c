"""Every single-server behaviour of test_server.py again, on Redis with two workers.

The tests are collected from test_server.py; this module only swaps the
``server`` fixture. Tests that start servers of their own are left out.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest

import test_server
from conftest import Server, redis_url_or_skip

for _name, _test in vars(test_server).items():
    if _name.startswith("test_") and callable(_test):
        params = inspect.signature(_test).parameters
        if "server" in params or "client_factory" in params:
            globals()[_name] = _test


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A two-worker server on Redis with the same fast timers as test_server's."""
    url = redis_url_or_skip(9)
    with Server({"HEARTBEAT_INTERVAL": "30", "TYPING_TIMEOUT": "0.5", "RATE_LIMIT": "1000",
                 "RATE_LIMIT_BURST": "1000", "JWT_SECRET": test_server.SECRET,
                 "REDIS_URL": url}, workers=2) as srv:
        yield srv
