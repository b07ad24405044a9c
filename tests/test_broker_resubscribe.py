"""The Redis broker's resubscription (broker.py ``_connect``/``_await_subscriptions``):
what another greenlet subscribes meanwhile, what arrives right behind the PONG, and the
messages that came before it when the connection is lost before the listener read them.

Each case runs in a monkey-patched subprocess (as a worker does) against a Redis of the
test's own; the race is staged by wrapping ``_await_subscriptions`` at the one point it
waits.
"""

from __future__ import annotations

import subprocess
import sys

from conftest import own_redis

RUN_TIMEOUT = 60  # seconds for one subprocess (every wait inside it has its own limit)

PRELUDE = """
from gevent import monkey; monkey.patch_all()
import socket, sys, time, gevent, gevent.event, redis
from wschat.stores.base import Unavailable
from wschat.stores.redis import RedisBroker
client = redis.Redis.from_url(sys.argv[1])
other = redis.Redis.from_url(sys.argv[1])
heard, arrived = [], gevent.event.Event()
def on_user(user_id, event):
    heard.append((user_id, event))
    arrived.set()
broker = RedisBroker(client)
broker.start(lambda *_: None, on_user)
broker.subscribe_user("bob")
reconnected = gevent.event.Event()
broker.on_reconnect = reconnected.set
def until(condition, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        gevent.sleep(0.005)  # polls a condition nothing signals (a socket's buffer)
def heard_dm(payload, timeout=5.0):
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if any(event == payload for _, event in heard):
            return True
        arrived.clear()
        arrived.wait(left)
    return any(event == payload for _, event in heard)
real_await = broker._await_subscriptions
def dm_to_bob(payload):
    if other.publish("wschat:user:bob", payload) != 1:
        raise SystemExit("bob's channel not subscribed")
# An _await_subscriptions that runs `before` and `after` around the PING it sends
# (`once`: for the next connection only).
def at_the_ping(before=lambda pubsub: None, after=lambda pubsub: None, once=False):
    def awaiting(pubsub):
        real_ping = pubsub.ping
        def ping(*args, **kwargs):
            before(pubsub)
            out = real_ping(*args, **kwargs)
            after(pubsub)
            return out
        pubsub.ping = ping
        if once:
            broker._await_subscriptions = real_await
        return real_await(pubsub)
    return awaiting
"""

SUBSCRIBED_MEANWHILE = PRELUDE + """
late = []
def awaiting(pubsub):
    # Another connection's user arrives while the resubscription is being confirmed.
    late.append(gevent.spawn(broker.subscribe_user, "carol"))
    gevent.sleep(0)  # let it run as far as it goes now
    return real_await(pubsub)
broker._await_subscriptions = awaiting
broker.reconnect()
if not reconnected.wait(10):
    raise SystemExit("no reconnect")
late[0].join(20)
if not late[0].ready():
    raise SystemExit("subscribe_user never returned")
late[0].get()
print("numsub", other.pubsub_numsub("wschat:user:carol")[0][1])
other.publish("wschat:user:carol", b"to-carol")
print("heard", heard_dm(b"to-carol"))
"""

BEHIND_THE_PONG = PRELUDE + """
def behind_the_pong(pubsub):
    sock = pubsub.connection._sock
    def peek():
        try:
            return sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b""
    # The PONG is on its way; a DM published now comes right behind it, in the same
    # read as the PONG.
    until(lambda: b"pong" in peek().lower(), "the pong")
    dm_to_bob(b"behind-the-pong")
    until(lambda: b"behind-the-pong" in peek(), "the DM in the socket")
broker._await_subscriptions = at_the_ping(after=behind_the_pong)
broker.reconnect()
if not reconnected.wait(10):
    raise SystemExit("no reconnect")
print("heard", heard_dm(b"behind-the-pong"))
"""

LOST_BEFORE_READ = PRELUDE + """
def early_dm(pubsub):
    # Subscribed (the SUBSCRIBE is made), the PONG not asked for yet: an early DM.
    until(lambda: other.pubsub_numsub("wschat:user:bob")[0][1] == 1, "bob subscribed")
    dm_to_bob(b"early")
refusals = []
def recover():
    if not refusals:  # the first recovery is refused (a Redis outage, READONLY)
        refusals.append(1)
        raise Unavailable("redis: refused")
    reconnected.set()
broker.recover = recover
broker._await_subscriptions = at_the_ping(before=early_dm, once=True)
broker.reconnect()
if not reconnected.wait(10):
    raise SystemExit("no second reconnect")
print("heard", heard_dm(b"early"))
"""

RECONNECT_MEANWHILE = PRELUDE + """
made = []
def awaiting(pubsub):
    made.append(pubsub)
    if len(made) == 1:
        broker.reconnect()  # a READONLY answered meanwhile: the address names another server
    return real_await(pubsub)
broker._await_subscriptions = awaiting
broker.reconnect()
if not reconnected.wait(10):
    raise SystemExit("no reconnect")
until(lambda: len(made) >= 2 and broker.healthy(), "the connection made again", 10)
print("connections", len(made))
"""

SHARED_WAIT_OUTLIVES_A_TIMEOUT = PRELUDE + """
import wschat.stores.redis.broker as broker_module
release = gevent.event.Event()
real_confirmed = broker._confirmed
def held_confirmed(channel):
    release.wait(10)  # Redis's confirmations reach the listener late (a busy worker)
    real_confirmed(channel)
broker._confirmed = held_confirmed
broker_module.SUBSCRIBE_TIMEOUT = 0.3
first = gevent.spawn(broker.subscribe_room, "r")
gevent.sleep(0)  # it sends its SUBSCRIBE and waits, 0.3 s
broker_module.SUBSCRIBE_TIMEOUT = 10.0
second = gevent.spawn(broker.subscribe_room, "r")  # a second joiner of the room, 10 s
gevent.sleep(0)
first.join(5)
print("first", type(first.exception).__name__)
release.set()
second.join(5)
print("second", "confirmed" if second.successful() else "waiting" if not second.ready()
      else type(second.exception).__name__)
"""

FAILED_WRITE = PRELUDE + """
conn = broker._pubsub.connection
real_send, real_connect = conn.send_packed_command, conn.connect
def broken(*args, **kwargs):  # this one write fails, as on a connection Redis dropped
    conn.send_packed_command = real_send
    raise redis.ConnectionError("Error 32 while writing to socket. Broken pipe.")
connects = []
def connect(*args, **kwargs):
    connects.append(1)
    return real_connect(*args, **kwargs)
conn.send_packed_command, conn.connect = broken, connect
try:
    broker.subscribe_user("carol")
    print("subscribe ok")
except Unavailable:
    print("subscribe unavailable")
print("connected again within the write", len(connects))
"""


def _run(script: str) -> list[str]:
    with own_redis() as server:
        out = subprocess.run([sys.executable, "-c", script, server.url], check=False,
                             capture_output=True,
                             text=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("\n")


def test_a_subscription_made_while_the_resubscription_is_confirmed_is_made() -> None:
    """A user arriving on the worker while its pub/sub connection waits for the PONG
    behind its SUBSCRIBE: its channel must be subscribed on the new connection, or
    nothing for it is ever heard here (and dm_heard.lua refuses every DM to it)."""
    lines = _run(SUBSCRIBED_MEANWHILE)
    assert "numsub 1" in lines, lines
    assert "heard True" in lines, lines


def test_a_message_right_behind_the_pong_is_delivered() -> None:
    """What arrived in the same read as the PONG (redis-py's parser holds it) reaches
    the hub: a DM has no history to be caught up from."""
    lines = _run(BEHIND_THE_PONG)
    assert "heard True" in lines, lines


def test_messages_before_the_pong_survive_a_connection_dropped_before_they_are_read() -> None:
    """A DM that came before the PONG, on a connection dropped before the listener read
    it (the recovery refused): it is still delivered, after the next connection."""
    lines = _run(LOST_BEFORE_READ)
    assert "heard True" in lines, lines


def test_a_reconnect_asked_while_the_connection_is_made_makes_it_again() -> None:
    """reconnect() (a failover: READONLY) while the listener's new connection waits for
    its PONG: that connection, looked up before the failover, is made again (before:
    reconnect() found no connection to drop, and the listener went on with one to the
    demoted server, where nothing published on the new primary arrives)."""
    lines = _run(RECONNECT_MEANWHILE)
    assert "connections 2" in lines, lines


def test_a_joiner_whose_wait_times_out_leaves_the_others_their_confirmation() -> None:
    """Two joiners of one room share the wait for Redis's confirmation. The first one's
    wait ends (SUBSCRIBE_TIMEOUT) before the confirmations come: the second, still
    within its time, is released by them. Before, the first one's timeout removed the
    shared wait, so the confirmations released nobody and the second joiner got
    ``unavailable`` too."""
    lines = _run(SHARED_WAIT_OUTLIVES_A_TIMEOUT)
    assert "first Unavailable" in lines, lines
    assert "second confirmed" in lines, lines


def test_a_failed_write_on_the_pubsub_connection_is_not_followed_by_redis_pys_reconnect() -> None:
    """A SUBSCRIBE whose write fails answers ``unavailable``, and the pub/sub connection
    is left to the listener, which finds it gone and makes it again with the recovery
    (before: redis-py's PubSub connected again at once behind the listener's back and
    subscribed every channel on a socket nobody read, which Redis counted as this
    worker's: a DM checked as heard and published there was acknowledged and lost)."""
    lines = _run(FAILED_WRITE)
    assert "subscribe unavailable" in lines, lines
    assert "connected again within the write 0" in lines, lines
