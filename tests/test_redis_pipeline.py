"""The auto-pipelining layer (wschat.stores.redis.pipeline) and the reply reader under it and
under the pub/sub listener (replies.py), against a real Redis: batching, error replies,
NOSCRIPT after a script flush, a connection lost mid-batch, a restart, closing while a
reply is awaited, TLS, and the idle listener's PING.

The store contract tests (tests/test_stores.py, ``redis-pipelined``) run every store
operation through it too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from conftest import TIMEOUT, first_start, free_port, own_redis, redis_url_or_skip
from wschat.protocol import draft_message

DB = 4  # no other module uses it


@pytest.fixture
def client() -> Iterator[Any]:
    import redis

    from wschat.stores.redis.pipeline import Pipelined

    fast = Pipelined(redis.Redis.from_url(redis_url_or_skip(DB)))
    yield fast
    fast.close()


CONCURRENT = """
from gevent import monkey; monkey.patch_all()
import sys, gevent, redis
from wschat.protocol import draft_message
from wschat.stores.redis import RedisMessageStore
from wschat.stores.redis.epoch import Epoch
from wschat.stores.redis.pipeline import Pipelined
fast = Pipelined(redis.Redis.from_url(sys.argv[1]))
Epoch(fast, "t", 30).begin()  # the gate opened, as by a worker's first start
store = RedisMessageStore(fast, 100)
# One post first: the script is then loaded (another test flushes scripts; a NOSCRIPT
# for each of the hundred would send their SCRIPT LOADs and retries one by one).
store.post_room("warm-up", "u1", draft_message("warm-up", "a", "u1", "m", 1, None))
batches, commands = fast.pipeliner.batches, fast.pipeliner.commands
# A batch in flight for half a second (BLPOP on an empty list): whatever the machine's
# load, the hundred posts are issued while it waits.
waiting = gevent.spawn(fast.pipeliner.execute, "BLPOP", "pipe:nothing", 0.5)
jobs = [gevent.spawn(store.post_room, "batch", "u1",
                     draft_message("batch", "a", "u1", f"m{i}", 1, None)) for i in range(100)]
gevent.joinall([waiting, *jobs], raise_error=True)
print(sorted(j.value.msg_id for j in jobs) == list(range(1, 101)),
      fast.pipeliner.batches - batches, fast.pipeliner.commands - commands)
"""


def test_concurrent_greenlets_share_writes() -> None:
    """A hundred greenlets posting while a batch is in flight (monkey-patched, as in the
    server): each gets its own id, and their commands go out together as the next batch,
    not one write each. (Without a batch held in flight this depended on the machine's
    load: on a starved one each reply could be back before the next greenlet started, and
    a CI run saw 100 writes for the 100 commands.)"""
    out = subprocess.run([sys.executable, "-c", CONCURRENT, redis_url_or_skip(DB)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    ids_ok, batches, commands = out.split()
    assert ids_ok == "True" and int(commands) == 101 and int(batches) <= 5, out


def test_an_error_reply_fails_only_its_command(client: Any) -> None:
    import redis

    client.client.set("pipe:text", "not a number")
    calls = [("INCR", "pipe:n"), ("INCR", "pipe:text"), ("INCR", "pipe:n")]
    jobs = [gevent.spawn(client.pipeliner.execute, *c) for c in calls]
    gevent.joinall(jobs, timeout=TIMEOUT)
    assert (jobs[0].value, jobs[2].value) == (1, 2)
    assert isinstance(jobs[1].exception, redis.ResponseError)


UNPACKABLE = """
from gevent import monkey; monkey.patch_all()
import sys, gevent, redis
from wschat.stores.redis.pipeline import Pipelined
fast = Pipelined(redis.Redis.from_url(sys.argv[1]))
fast.client.delete("pipe:packed")
calls = [("BLPOP", "pipe:nothing", 0.1), ("INCR", "pipe:packed"),
         ("SET", "pipe:bad", {"a": 1}), ("INCR", "pipe:packed")]
jobs = [gevent.spawn(fast.pipeliner.execute, *c) for c in calls]
gevent.joinall(jobs, timeout=10)
print(repr([j.value if j.successful() else type(j.exception).__name__ for j in jobs]),
      fast.pipeliner.batches, fast.pipeliner.execute("EXISTS", "pipe:bad"))
"""


def test_a_command_that_cannot_be_packed_fails_only_its_caller() -> None:
    """A bad argument (here a dict, which no Redis command takes) is its caller's error
    alone: the commands batched with it are sent and answered. (The first command keeps
    Redis busy for 0.1 s, so that the other three queue behind it and go out together.)"""
    out = subprocess.run([sys.executable, "-c", UNPACKABLE, redis_url_or_skip(DB)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    assert out.split("] ")[0] + "]" == "[None, 1, 'TypeError', 2]", out
    assert out.split("] ")[1].split() == ["2", "0"], out  # BLPOP's batch, then the rest


def test_scripts_survive_a_script_flush(client: Any) -> None:
    """NOSCRIPT (Redis restarted, SCRIPT FLUSH) is answered by loading the script again."""
    from wschat.stores.redis import RedisMessageStore

    store = RedisMessageStore(client, 100)
    first_start(client)
    draft = draft_message("flush", "a", "u1", "x", 1, None)
    assert store.post_room("flush", "u1", draft).msg_id == 1
    client.client.script_flush()
    jobs = [gevent.spawn(store.post_room, "flush", "u1", draft) for _ in range(3)]
    gevent.joinall(jobs, timeout=TIMEOUT, raise_error=True)
    assert sorted(j.value.msg_id for j in jobs) == [2, 3, 4]


MID_BATCH = """
from gevent import monkey; monkey.patch_all()
import sys, gevent, redis
from wschat.stores.redis.pipeline import Pipelined
fast = Pipelined(redis.Redis.from_url(sys.argv[1]))
execute = fast.pipeliner.execute
own_id = execute("CLIENT", "ID")
killer = redis.Redis.from_url(sys.argv[1])
def kill_soon():  # once the batch of the other two is written
    with gevent.Timeout(5):
        while fast.pipeliner.batches < 3:
            gevent.sleep(0.01)
    killer.client_kill_filter(_id=own_id)
# The first goes alone and waits 0.1 s in Redis, so the other two are queued while it is
# in flight, one batch (a PING first could be answered before the others even ran).
jobs = [gevent.spawn(execute, "BLPOP", "pipe:first", 0.1),
        gevent.spawn(execute, "BLPOP", "pipe:never", 10),
        gevent.spawn(execute, "PING"), gevent.spawn(kill_soon)]
gevent.joinall(jobs)
print(jobs[0].value, fast.pipeliner.batches,
      *(type(j.exception).__name__ for j in jobs[1:3]),
      execute("PING"), execute("CLIENT", "ID") != own_id)
"""


def test_connection_lost_mid_batch_fails_the_unanswered_then_reconnects() -> None:
    """Commands of a batch whose replies never came fail with ConnectionError (nothing
    is retried: a script may have run); the next batch connects again."""
    out = subprocess.run([sys.executable, "-c", MID_BATCH, redis_url_or_skip(DB)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    # Batches: CLIENT ID, the first BLPOP (None: timed out), then BLPOP + PING together.
    assert out.split() == ["None", "3", "ConnectionError", "ConnectionError", "b'PONG'",
                           "True"], out


def test_redis_restart_fails_fast_then_recovers() -> None:
    """Redis gone: commands fail (Unavailable in the stores), never hang; Redis back,
    the stale socket is replaced before the next batch and scripts are loaded again
    (the first post is refused by the gate: Redis came back without its data)."""
    import redis

    from wschat.stores.base import Unavailable
    from wschat.stores.redis import RedisMessageStore
    from wschat.stores.redis.pipeline import Pipelined

    with own_redis() as server:
        fast = Pipelined(redis.Redis.from_url(server.url, socket_connect_timeout=1))
        store = RedisMessageStore(fast, 100)
        first_start(fast)
        draft = draft_message("restart", "a", "u1", "x", 1, None)
        assert store.post_room("restart", "u1", draft).msg_id == 1
        server.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.post_room("restart", "u1", draft)
        assert time.monotonic() - started < TIMEOUT
        server.start()
        # Redis came back empty: the post scripts' gate refuses until a worker's
        # recovery names the data again (wschat.stores.redis.epoch)
        with pytest.raises(Unavailable):
            store.post_room("restart", "u1", draft)
        first_start(fast)
        assert store.post_room("restart", "u1", draft).msg_id == 1
        fast.close()


CLOSED_WHILE_WAITING = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent, redis
from wschat.stores.redis.pipeline import Pipelined
fast = Pipelined(redis.Redis.from_url(sys.argv[1]))
waiting = gevent.spawn(fast.pipeliner.execute, "BLPOP", "pipe:never", 10)
gevent.sleep(0.3)  # its BLPOP sent, its greenlet waiting for the reply
started = time.monotonic()
fast.close()
waiting.join(5)
print(type(waiting.exception).__name__, time.monotonic() - started < 2)
"""


def test_close_fails_a_command_waiting_for_its_reply() -> None:
    """Closing the pipeline (a worker's shutdown) wakes the greenlet that waits on the
    socket for its reply, with ConnectionError, at once: not after its 10 s BLPOP."""
    out = subprocess.run([sys.executable, "-c", CLOSED_WHILE_WAITING, redis_url_or_skip(DB)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert out.stdout.split() == ["ConnectionError", "True"], out


OVER_TLS = """
from gevent import monkey; monkey.patch_all()
import sys, gevent.event, redis
from wschat.protocol import draft_message
from wschat.stores.redis import RedisBroker, RedisMessageStore
from wschat.stores.redis.epoch import Epoch
from wschat.stores.redis.pipeline import Pipelined
fast = Pipelined(redis.Redis.from_url(sys.argv[1]))
Epoch(fast, "t", 30).begin()  # the gate opened, as by a worker's first start
heard, arrived = [], gevent.event.Event()
broker = RedisBroker(fast)
broker.start(lambda room, event, exclude: (heard.append(event), arrived.set()), lambda *_: None)
broker.subscribe_room("tls")
store = RedisMessageStore(fast, 100)
posted = [store.post_room("tls", "u1", draft_message("tls", "a", "u1", f"m{i}", 1, None)).msg_id
          for i in range(3)]
arrived.wait(10)
gevent.sleep(0.2)  # the other two, if they come
print(posted, len(heard), b'"text":"m0"' in heard[0], type(fast.pipeliner._replies._raw).__name__)
broker.close()
fast.close()
"""


def _self_signed(directory: Any) -> tuple[str, str]:
    """A certificate and key for 127.0.0.1, made by ``cryptography`` (PyJWT[crypto]'s)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_pipeline_and_pub_sub_over_tls(tmp_path: Any) -> None:
    """rediss:// (the Helm chart's external Redis may be one): the hot path reads and
    writes through the TLS socket, never the TCP socket under it. Posts get their ids
    and the broker hears them, decrypted."""
    cert, key = _self_signed(tmp_path)
    tls_port = free_port()
    with own_redis("--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                   "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=none"
        out = subprocess.run([sys.executable, "-c", OVER_TLS, url],
                             capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert out.stdout.split() == ["[1,", "2,", "3]", "3", "True", "NoneType"], out


IDLE_PING = """
from gevent import monkey; monkey.patch_all()
import sys, gevent, redis
from wschat.stores.redis import broker as broker_module
from wschat.stores.redis.pipeline import Pipelined
broker_module.IDLE_CHECK, broker_module.PING_AFTER = 0.1, 0.3
fast = Pipelined(redis.Redis.from_url(sys.argv[1]))
broker = broker_module.RedisBroker(fast)
broker.start(lambda *_: None, lambda *_: None)
broker.subscribe_room("quiet")
admin = redis.Redis.from_url(sys.argv[1])
def pinged():
    return any(c.get("cmd") == "ping" and int(c.get("sub", 0)) > 0 for c in admin.client_list())
deadline = gevent.get_hub().loop.now() + 10
while not pinged() and gevent.get_hub().loop.now() < deadline:
    gevent.sleep(0.05)
print(pinged(), broker.healthy())
broker.close()
"""


def test_a_quiet_pub_sub_connection_pings_redis() -> None:
    """With nothing published for PING_AFTER seconds the listener PINGs over its
    subscribed connection (a dead one then fails the write and reconnects), and the
    PING's reply, which is no message, leaves it healthy."""
    out = subprocess.run([sys.executable, "-c", IDLE_PING, redis_url_or_skip(DB)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert out.stdout.split() == ["True", "True"], out


BACKLOG = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent, redis
from wschat.stores.redis import RedisBroker
from wschat.stores.redis.keys import PREFIX
N, BUSY = 400, 0.0002  # each delivery holds the loop 0.2 ms: 80 ms for the whole backlog
heard = []
def on_room(room, event, exclude):
    until = time.monotonic() + BUSY
    while time.monotonic() < until:
        pass
    heard.append(event)
broker = RedisBroker(redis.Redis.from_url(sys.argv[1]))
broker.start(on_room, lambda *_: None)
broker.subscribe_room("busy")
seen = set()  # how far the backlog was whenever another greenlet got a turn
def watch():
    deadline = time.monotonic() + 20
    while len(heard) < N and time.monotonic() < deadline:
        seen.add(len(heard))
        gevent.sleep(0.0005)
watcher = gevent.spawn(watch)
# One script publishes the whole backlog at once; Redis sends it straight on.
redis.Redis.from_url(sys.argv[1]).eval(
    "for i = 1, tonumber(ARGV[1]) do redis.call('publish', KEYS[1], ARGV[2] .. i) end",
    1, PREFIX + "room:busy", N, "x" * 200)
watcher.join(30)
print(len(heard), len([k for k in seen if 0 < k < N]) >= 5)
broker.close()
"""


def test_the_listener_lets_others_run_while_it_delivers_a_backlog() -> None:
    """A backlog of pub/sub messages (after a stall, a burst) is delivered in turns of a
    few milliseconds with the event loop polling between them, not in one stretch with
    every connection's reads, heartbeats and timers waiting behind it. Here 400 messages
    take 80 ms to deliver; another greenlet must get turns in the middle."""
    out = subprocess.run([sys.executable, "-c", BACKLOG, redis_url_or_skip(DB)],
                         capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert out.stdout.split() == ["400", "True"], out


HUNG = """
from gevent import monkey; monkey.patch_all()
import logging, os, signal, sys, gevent, redis
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="LOG %(message)s")
from wschat.stores.redis import broker as broker_module
broker_module.IDLE_CHECK, broker_module.PING_AFTER, broker_module.ANSWER_TIMEOUT = 0.1, 0.3, 0.5
broker_module.RECONNECT_AFTER = 1.0
broker_module.RedisBroker.RECONNECT_DELAYS = (0.05,)
url, pid = sys.argv[1], int(sys.argv[2])
broker = broker_module.RedisBroker(redis.Redis.from_url(url, socket_timeout=0.5,
                                                        socket_connect_timeout=0.5))
broker.start(lambda *_: None, lambda *_: None)
broker.subscribe_room("quiet")
def until(healthy):
    deadline = gevent.get_hub().loop.now() + 10
    while broker.healthy() != healthy and gevent.get_hub().loop.now() < deadline:
        gevent.sleep(0.02)
    return broker.healthy() == healthy
def stays(healthy, seconds):  # sampled through several reconnect attempts
    for _ in range(int(seconds / 0.02)):
        if broker.healthy() != healthy:
            return False
        gevent.sleep(0.02)
    return True
print(until(True), end=" ")
os.kill(pid, signal.SIGSTOP)
try:
    print(until(False), stays(False, 2.0), end=" ")
finally:
    os.kill(pid, signal.SIGCONT)
print(until(True))
broker.close()
"""


def test_a_hung_redis_turns_the_listener_unhealthy_until_it_answers() -> None:
    """A Redis that stops answering without closing its connections (SIGSTOP: a frozen
    VM, a cut network) was never noticed: the listener's PING went unanswered forever,
    so /ready stayed green while every post timed out. Now an unanswered PING makes the
    worker unhealthy (and /ready 503) until Redis answers again; past RECONNECT_AFTER
    the connection counts as lost, and a reconnect whose SUBSCRIBE is not confirmed
    keeps it unhealthy: no flapping on the way, through both."""
    with own_redis() as server:
        assert server.proc is not None
        out = subprocess.run([sys.executable, "-c", HUNG, server.url, str(server.proc.pid)],
                             capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True", "True", "True"], out
    logs = [line for line in out.stderr.splitlines() if line.startswith("LOG")]
    for said in ("has not answered PING for 0.5 s; not ready", "redis pub/sub lost",
                 "redis pub/sub reconnected"):  # the operations guide's words
        assert any(said in line for line in logs), (said, logs)


BUSY = """
from gevent import monkey; monkey.patch_all()
import socket, sys, gevent, redis
from wschat.stores.redis import broker as broker_module
broker_module.IDLE_CHECK, broker_module.PING_AFTER, broker_module.ANSWER_TIMEOUT = 0.1, 0.3, 0.5
url, port = sys.argv[1], int(sys.argv[2])
redis.Redis.from_url(url).config_set("busy-reply-threshold", 100)
broker = broker_module.RedisBroker(redis.Redis.from_url(url, socket_timeout=0.5,
                                                        socket_connect_timeout=0.5))
broker.start(lambda *_: None, lambda *_: None)
broker.subscribe_room("quiet")
script = socket.create_connection(("127.0.0.1", port))
script.sendall(b"*3\\r\\n$4\\r\\nEVAL\\r\\n$17\\r\\nwhile true do end\\r\\n$1\\r\\n0\\r\\n")
def until(healthy):
    deadline = gevent.get_hub().loop.now() + 10
    while broker.healthy() != healthy and gevent.get_hub().loop.now() < deadline:
        gevent.sleep(0.02)
    return broker.healthy() == healthy
print(until(False), end=" ")
redis.Redis.from_url(url, socket_timeout=5).script_kill()
print(until(True))
broker.close()
"""


def test_a_redis_busy_with_a_script_is_not_an_answer() -> None:
    """A script running past busy-reply-threshold makes Redis answer every command,
    the listener's PING included, with -BUSY, and run none: posts fail. That error
    reply counted as an answer, so /ready stayed green (found by a second review). The
    worker is now unready until Redis answers for real (SCRIPT KILL here)."""
    with own_redis() as server:
        out = subprocess.run([sys.executable, "-c", BUSY, server.url, str(server.port)],
                             capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"], out


STALL = """
from gevent import monkey; monkey.patch_all()
import os, signal, socket, sys, gevent, redis
from wschat.stores.redis import broker as broker_module
from wschat.stores.redis.keys import user_channel
broker_module.IDLE_CHECK, broker_module.PING_AFTER, broker_module.ANSWER_TIMEOUT = 0.1, 0.3, 0.5
broker_module.RECONNECT_AFTER = 30.0
url, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
got = gevent.event.Event()
broker = broker_module.RedisBroker(redis.Redis.from_url(url, socket_timeout=0.5,
                                                        socket_connect_timeout=0.5))
broker.start(lambda *_: None, lambda user, data: data == b"hello" and got.set())
broker.subscribe_user("ann")
publisher = socket.create_connection(("127.0.0.1", port), timeout=10)
os.kill(pid, signal.SIGSTOP)
try:
    deadline = gevent.get_hub().loop.now() + 10
    while broker.healthy() and gevent.get_hub().loop.now() < deadline:
        gevent.sleep(0.02)
    print(broker.healthy(), end=" ")  # not ready while Redis does not answer
    channel = user_channel("ann")  # a DM published during the stall, run when Redis resumes
    publisher.sendall(f"*3\\r\\n$7\\r\\nPUBLISH\\r\\n${len(channel)}\\r\\n{channel}"
                      "\\r\\n$5\\r\\nhello\\r\\n".encode())
finally:
    os.kill(pid, signal.SIGCONT)
print(publisher.recv(100).strip() == b":1", got.wait(10), end=" ")
deadline = gevent.get_hub().loop.now() + 10
while not broker.healthy() and gevent.get_hub().loop.now() < deadline:
    gevent.sleep(0.02)
print(broker.healthy())
broker.close()
"""


def test_a_redis_stall_keeps_the_connection_and_what_was_published_meanwhile() -> None:
    """A Redis that stalls (a fork, a slow command) for longer than ANSWER_TIMEOUT but
    less than RECONNECT_AFTER: the worker is not ready meanwhile, and keeps its pub/sub
    connection, so a DM Redis accepted during the stall (its sender acknowledged, the
    subscriber counted) reaches it when Redis resumes. (Found by review: dropping the
    connection at ANSWER_TIMEOUT lost it.)"""
    with own_redis() as server:
        assert server.proc is not None
        out = subprocess.run([sys.executable, "-c", STALL, server.url, str(server.port),
                              str(server.proc.pid)],
                             capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True", "True", "True"], out


def test_a_full_redis_is_unavailable_not_an_internal_error() -> None:
    """At ``maxmemory`` with ``noeviction`` Redis refuses writes (OOM): posts are refused
    as ``Unavailable`` (the client is told to retry), not as an internal error, without
    leaving a gap in the room's ids, and rate limits (which reads such as ``history``
    spend) go on per worker."""
    import redis

    from wschat.stores.base import Unavailable
    from wschat.stores.redis.ratelimit import RedisRateLimiter
    from wschat.stores.redis.stores import RedisMessageStore

    with own_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as server:
        client = redis.Redis.from_url(server.url)
        try:
            messages = RedisMessageStore(client, 100)
            first_start(client)
            posted = 0
            with pytest.raises(Unavailable):
                for i in range(100_000):  # 2 MB of dedupe keys and history, then OOM
                    messages.post_room(f"r{i % 50}", "ann", draft_message(
                        "r", "ann", "ann", "x" * 100, 1, f"c{i}"))
                    posted += 1
            assert posted > 100  # it was full, not broken
            limiter = RedisRateLimiter(client, 1.0, 2.0)
            spent = [limiter.hit("u:ann") for _ in range(3)]
            assert spent[:2] == [0, 0] and 0 < spent[2] <= 1000  # per worker, still limited
            # Redis refuses a script at its first write when full, so the refused post
            # took no id: the room's numbers go on without a gap once there is room.
            refused, taken = f"r{posted % 50}", len(range(posted % 50, posted, 50))
            assert messages.last_id(refused) == taken
            client.config_set("maxmemory", "0")
            assert messages.post_room(refused, "ann", draft_message(
                refused, "ann", "ann", "again", 1, "again")).msg_id == taken + 1
        finally:
            client.close()


def test_a_refusal_inside_a_script_as_redis_6_reports_it_is_an_outage() -> None:
    """Redis 6 reports a command refused inside a Lua script wrapped in the script's own
    error ("Error running script ...: -READONLY ..."), Redis 7 as the command's error. Both
    are outages (``unavailable``), and a wrapped READONLY still means a demoted server, which
    makes the worker connect again (before: a plain ResponseError, so ``internal_error`` and
    no reconnect; Redis 7.0 here, so the text is written out)."""
    import redis

    from wschat.stores.redis.keys import is_outage, is_read_only

    read_only = redis.ResponseError(
        "Error running script (call to f_3b1d6c0f): @user_script:7: -READONLY You can't "
        "write against a read only replica. ")
    assert is_outage(read_only) and is_read_only(read_only)
    oom = redis.ResponseError("Error running script (call to f_3b1d6c0f): @user_script:3: "
                              "-OOM command not allowed when used memory > 'maxmemory'. ")
    assert is_outage(oom) and not is_read_only(oom)
    assert is_read_only(redis.ReadOnlyError("You can't write against a read only replica."))
    bug = redis.ResponseError("Error running script (call to f_3b1d6c0f): @user_script:3: "
                              "user_script:3: attempt to compare nil with number")
    assert not is_outage(bug) and not is_read_only(bug)


def test_the_gate_spells_out_the_key_names_keys_py_gives() -> None:
    """gate.lua names its three keys itself (the post scripts' KEYS keep their layout):
    they must be the ones the epoch's scripts are given (keys.py)."""
    from wschat.stores.redis.keys import EPOCH, READY, RECOVERING, _source

    gate = _source("gate")
    for key in (EPOCH, READY, RECOVERING):
        assert f"'{key}'" in gate, key
