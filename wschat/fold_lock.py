"""The lock between a scrape and the gunicorn master's fold of a dead worker's counts.

The master (gunicorn.conf.py) swaps a dead worker's counter and histogram totals into
``<type>_dead.db`` and then deletes the worker's own file, holding :data:`FOLD_LOCK`
exclusive; a scrape (:class:`wschat.factory.SampleFilesCollector`) reads the files holding
it shared. Read between the two steps, that worker's counts were in the totals twice.
Neither side waits for the other without bound: the master must never hang on a worker
stopped in the middle of a scrape (it is the master that would kill it), and a scrape is
never refused for a fold. Standard library only: the master imports it.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable

FOLD_LOCK = "fold.lock"  # in PROMETHEUS_MULTIPROC_DIR


def flock_within(fd: int, operation: int, seconds: float,
                 sleep: Callable[[float], object]) -> bool:
    """Take ``fcntl.flock(fd, operation)`` (``LOCK_EX`` or ``LOCK_SH``), trying every
    millisecond with ``sleep`` between (gevent's in a worker, time's in the master), for at
    most ``seconds``. Whether it was taken; either way the caller goes on."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            sleep(0.001)
