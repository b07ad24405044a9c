"""gunicorn settings for wschat: ``gunicorn -c gunicorn.conf.py wschat:app``.

This file is read by the master before workers fork and before gevent
patches anything, so besides the standard library it imports only
``wschat.config`` (which loads neither gevent nor Flask): every value comes from
the same :class:`~wschat.config.Settings` the app reads, validated once here.
"""

import contextlib
import fcntl
import glob
import math
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.sharedctypes import RawArray


try:
    from wschat.config import ConfigError, Settings, report_config_error
except ImportError as exc:
    sys.exit(f"wschat: cannot import the package ({exc}); is it installed?")
try:
    # Every variable validated once, in the master, before any worker forks.
    _settings = Settings.from_env()
except ConfigError as exc:
    report_config_error(str(exc))
    sys.exit(1)

# An IPv6 address (HOST=::) is bracketed: gunicorn reads the text after the last colon as
# the port, and refused ":::8080" with "'' is not a valid port number".
_host = f"[{_settings.host}]" if ":" in _settings.host and not _settings.host.startswith("[") \
    else _settings.host
bind = [f"{_host}:{_settings.port}", f"{_host}:{_settings.metrics_port}"]
# gunicorn's gevent worker, with a bound on the sockets waiting for their request, per
# client address (MAX_HANDSHAKES_PER_IP) and in all (wschat/worker.py).
worker_class = "wschat.worker.Worker"
workers = _settings.web_concurrency
# gunicorn's pool (default 1000 per gevent worker) bounds requests in flight. An
# established WebSocket leaves it (wschat serves it in its own greenlet), but a
# reconnect storm of MAX_CONNECTIONS handshakes must not queue behind the default.
# Sockets still waiting for their request may hold all but 100 of it (wschat.worker).
worker_connections = _settings.max_connections + 100
# gunicorn counts whole seconds (its validator refuses a float): rounded up, so the
# master never SIGKILLs a worker before the GRACEFUL_TIMEOUT the worker budgets with.
graceful_timeout = math.ceil(_settings.graceful_timeout)
timeout = 30
# Also the handshake deadline: the gevent worker reads every HTTP request, the
# first included, under a gevent.Timeout of `keepalive` seconds, so a socket
# that sends nothing, or drips its headers (slowloris), is closed after 5 s (or
# sooner, past MAX_HANDSHAKES_PER_IP or the pool's budget: wschat/worker.py).
# 0 would mean no deadline at all.
keepalive = 5
# The upgrade request is small: refuse oversized request lines and headers early.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
# HTTP access log off: wschat logs each WebSocket's open and close itself, and
# probes and scrapes would drown the rest. If it is turned on (--access-logfile -),
# this format leaves out the query string, where ?token= travels.
accesslog = None
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms "%(a)s"'
loglevel = _settings.log_level
if _settings.log_format == "json":
    # gunicorn's own lines (boot, worker exits, errors) in the app's JSON shape;
    # the formatter is resolved by name, so only the standard library loads here.
    _level = loglevel.upper()
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "wschat.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "json",
                       "stream": "ext://sys.stderr"},
            "null": {"class": "logging.NullHandler"},
        },
        "root": {"level": _level, "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": _level, "handlers": ["stderr"],
                               "propagate": False},
            # A logging config switches gunicorn's access log on: keep it off (see above).
            "gunicorn.access": {"level": "WARNING", "handlers": ["null"], "propagate": False},
        },
    }
# gunicorn 27's control socket is one fixed path per user: two servers on one
# machine (tests, several pods' worth on a laptop) would fight over it.
control_socket_disable = True
preload_app = False  # the app must be imported after gevent patches the worker

def _split_rooms(workers):
    """Why ``workers`` workers cannot run, or None. Settings refuses WEB_CONCURRENCY > 1
    without REDIS_URL; gunicorn's own --workers (command line, GUNICORN_CMD_ARGS) overrides
    this file, and SIGTTIN adds workers at run time: the same rule holds for them."""
    if workers is not None and workers > 1 and not _settings.redis_url:
        return (f"{workers} workers need REDIS_URL; without it each worker would hold its "
                "own rooms and users would silently not see each other. Set REDIS_URL or "
                "run one worker (WEB_CONCURRENCY=1, no --workers)")
    return None


def nworkers_changed(server, new_value, old_value):
    problem = _split_rooms(new_value)
    if problem is None:
        return
    if old_value is None:  # at start (the arbiter's setup): refuse to run at all
        report_config_error(problem)
        sys.exit(1)
    server.log.error("wschat: refusing SIGTTIN: %s", problem)
    server.num_workers = old_value  # before gunicorn spawns anyone


MAX_WORKER_SLOTS = 512
_worker_slots = RawArray("q", MAX_WORKER_SLOTS)  # live connections per worker slot
_slots_ever_used = set()  # a worker forked into one of these replaces one that exited


def on_starting(server):
    # Prometheus multiprocess mode: one fresh directory of sample files per server run.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        if os.path.isdir(directory):
            for entry in os.listdir(directory):
                path = os.path.join(directory, entry)
                if os.path.isfile(path) and entry.endswith(".db"):
                    os.unlink(path)
        else:
            os.makedirs(directory, exist_ok=True)
    else:
        _sweep_orphaned_metrics_dirs()
        directory = tempfile.mkdtemp(prefix=f"{_METRICS_DIR_PREFIX}{os.getpid()}-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        server._wschat_tmp_metrics_dir = directory
    os.environ["WSCHAT_STARTED_AT"] = repr(time.time())


def pre_fork(server, worker):
    used = {getattr(w, "_wschat_slot", None) for w in server.WORKERS.values()}
    slot = next(i for i in range(MAX_WORKER_SLOTS) if i not in used)
    _worker_slots[slot] = 0
    worker._wschat_slot = slot
    worker._wschat_replacement = slot in _slots_ever_used
    _slots_ever_used.add(slot)
    # Stop signals that reach the worker before it has its own handlers land here, in
    # its copy of this queue: wschat.worker.Worker.init_signals takes them from it.
    worker.arbiter_signals = server.SIG_QUEUE


def post_worker_init(worker):
    # worker.wsgi: the app gunicorn has just loaded (wschat:app), built but not started.
    from wschat.factory import attach_worker, freeze_startup_heap

    attach_worker(worker.wsgi, worker, _worker_slots, worker._wschat_slot,
                  worker._wschat_replacement)
    freeze_startup_heap(worker)


def worker_exit(server, worker):
    # Runs in the worker once gunicorn's loop has ended. WebSockets live outside
    # gunicorn's request pool, so wait here for their 1001 close handshakes.
    from wschat.factory import finish_worker

    finish_worker(getattr(worker, "wsgi", None), worker)


def child_exit(server, worker):
    slot = getattr(worker, "_wschat_slot", None)
    if slot is not None:
        _worker_slots[slot] = 0
    _forget_worker_gauges(worker.pid, server.log)
    _fold_worker_totals(worker.pid, server.log)


def _forget_worker_gauges(pid, log):
    """Delete a dead worker's Prometheus gauge files (what prometheus_client's
    ``mark_process_dead`` does for ``live*`` gauges, and every other gauge mode too:
    a dead worker has no present to report). Its counts are kept: see
    :func:`_fold_worker_totals`."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    for path in glob.glob(os.path.join(directory, f"gauge_*_{int(pid)}.db")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # never let bookkeeping take the master down
            log.warning("could not delete %s of dead worker %s: %s", path, pid, exc)


_TOTALS = ("counter", "histogram", "summary")  # additive: a sum per key merges them


def _fold_worker_totals(pid, log):
    """Add a dead worker's counter and histogram samples into one ``<type>_dead.db`` file
    per type and delete its own, so that server totals never go backwards and the
    directory (which every scrape reads whole) does not grow by two files per worker
    restart. The sum is written to a new file that replaces the old one (a scrape reads
    one or the other, whole); the dead worker's file is deleted right after."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    for kind in _TOTALS:
        dead = os.path.join(directory, f"{kind}_{int(pid)}.db")
        if not os.path.exists(dead):
            continue
        folded = os.path.join(directory, f"{kind}_dead.db")
        try:
            partial = _fold(dead, folded)
            # A scrape (wschat.factory.SampleFilesCollector) takes this lock shared: it
            # reads the files before or after both steps, never the worker's counts in
            # both files (a jump and a fall back, which Prometheus takes for a reset).
            with _fold_lock(directory):
                os.replace(partial, folded)
                os.unlink(dead)
        except Exception as exc:  # noqa: BLE001 (bookkeeping never takes the master down)
            log.warning("could not fold %s of dead worker %s into %s: %s", dead, pid,
                        folded, exc)


FOLD_LOCK_WAIT = 1.0  # seconds; a scrape holds the lock for one read of the files


@contextlib.contextmanager
def _fold_lock(directory):
    """wschat.fold_lock's lock, taken exclusive, or after FOLD_LOCK_WAIT s not at all: the
    master must never hang on a worker stopped (SIGSTOP) in the middle of a scrape, since
    it is the master that would kill that worker."""
    from wschat.fold_lock import FOLD_LOCK, flock_within

    fd = os.open(os.path.join(directory, FOLD_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        flock_within(fd, fcntl.LOCK_EX, FOLD_LOCK_WAIT, time.sleep)
        yield
    finally:
        os.close(fd)  # and the lock with it


def _mmaped_dict():
    """prometheus_client's sample-file class, loaded from its own file: importing the
    package would bring ssl, http.server and threading locks into the master, and so into
    every worker it forks afterwards, before gevent patches them. mmap_dict.py itself
    imports only json, mmap, os, struct and typing."""
    global _MmapedDict
    if _MmapedDict is None:
        import importlib.util

        package = importlib.util.find_spec("prometheus_client")  # found, not imported
        path = os.path.join(os.path.dirname(package.origin), "mmap_dict.py")
        spec = importlib.util.spec_from_file_location("_wschat_mmap_dict", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MmapedDict = module.MmapedDict
    return _MmapedDict


_MmapedDict = None


def _fold(dead, folded):
    """Write the sum of ``folded`` and ``dead`` to a file beside them; its path."""
    MmapedDict = _mmaped_dict()
    totals = {}
    for path in (folded, dead):
        if os.path.exists(path):
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(path):
                totals[key] = totals.get(key, 0.0) + value
    partial = folded + ".partial"  # not *.db: scrapes never read it
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    out = MmapedDict(partial)
    try:
        for key, value in totals.items():
            out.write_value(key, value, 0.0)
    finally:
        out.close()
    return partial


_METRICS_DIR_PREFIX = "wschat-prometheus-"


def _sweep_orphaned_metrics_dirs():
    """A master killed with SIGKILL never runs on_exit: delete the sample directories
    of masters that are gone (their names carry the master's pid). Runs before this
    master makes its own, so one with this master's pid is an earlier master's: in a
    container the master is PID 1 every time, and /tmp may outlive it (an emptyDir)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), _METRICS_DIR_PREFIX + "*")):
        pid = os.path.basename(path)[len(_METRICS_DIR_PREFIX):].split("-")[0]
        if not pid.isdigit():
            continue
        if int(pid) == os.getpid():
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


def on_exit(server):
    directory = getattr(server, "_wschat_tmp_metrics_dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
