"""Fan-out through Redis pub/sub: one connection per worker, subscribed only to the
rooms and users that have local connections (no pattern subscriptions). Payloads
on a room channel are ``<exclude_user_id>\\n<event JSON>`` (:func:`~.keys.room_payload`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock
import redis
import redis.client
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...telemetry import Metrics
from ..base import Broker, RoomHandler, Unavailable, UserHandler, new_node_id
from .keys import (
    CONTROL, PREFIX, guarded, room_channel, room_payload, script, split_room_payload,
    typists_key, user_channel,
)
from .replies import ReplyReader, connection_socket

log = logging.getLogger("wschat.redis")


class _Once(Retry):
    """The pub/sub connections' retry policy: a failed command raises, and nothing more.
    After any failed command (even with no retries) redis-py's PubSub connects again and
    subscribes every channel (its ``on_connect``): a socket the listener never reads,
    which Redis counts as this worker's, so a DM checked as heard (dm_heard.lua) and
    published there was acknowledged and lost. The listener finds the connection gone
    and makes it again itself, with the recovery."""

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 0)

    def call_with_retry(self, do: Callable[[], Any], fail: Any, is_retryable: Any = None,
                        with_failure_count: bool = False) -> Any:
        return do()


def pubsub_pool(pool: redis.ConnectionPool) -> redis.ConnectionPool:
    """A pool of the pub/sub connections, as ``pool``'s (address, TLS, timeouts) but
    with the :class:`_Once` policy, and apart from the commands' connections."""
    return redis.ConnectionPool(connection_class=pool.connection_class,
                                **{**pool.connection_kwargs, "retry": _Once()})

SUBSCRIBE_TIMEOUT = 15.0
IDLE_CHECK = 1.0  # seconds a listener waits for a message before it counts as idle
PING_AFTER = 10.0  # seconds of silence after which the listener PINGs Redis
# Seconds Redis has to answer the listener's PING, and a new connection's first
# SUBSCRIBE. A Redis that stops answering without closing its connections (frozen,
# cut off) is only noticed this way: the worker is not ready (and takes no message)
# until Redis answers again. The connection is kept: a Redis that resumes sends what
# was published to it meanwhile, which a new connection would never get.
ANSWER_TIMEOUT = 5.0
# Seconds without an answer after which the connection counts as lost and is made
# again: a half-open connection (the host gone, no reset) would never answer.
RECONNECT_AFTER = 30.0
# Seconds the listener may deliver without a wait before it lets the event loop poll the
# other sockets: a backlog (after a stall, a burst) read without a wait would otherwise go
# out in one stretch, with every connection's reads, heartbeats and timers behind it.
TURN = 0.005
_ROOM_PREFIX = (PREFIX + "room:").encode()
_USER_PREFIX = (PREFIX + "user:").encode()
_CONTROL = CONTROL.encode()


class RedisBroker(Broker):
    """One pub/sub connection per worker; a listener greenlet delivers to the local hub."""

    RECONNECT_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0)

    def __init__(self, client: redis.Redis, metrics: Metrics | None = None,
                 node_id: str | None = None) -> None:
        self._client = client
        self._node_id = node_id or new_node_id()  # its field in the typists (typing.lua)
        self._typing = script(client, "typing")
        self._pool = pubsub_pool(client.connection_pool)
        self._metrics = metrics
        self._on_room: RoomHandler | None = None
        self._on_user: UserHandler | None = None
        self._channels: set[bytes] = set()  # what this worker wants to hear
        # channel -> (event set once confirmed, SUBSCRIBEs sent and not yet confirmed):
        # every joiner waiting on a channel waits on the same event, released by the
        # confirmation of the last SUBSCRIBE sent for it.
        self._pending: dict[bytes, list[Any]] = {}
        self._pubsub: Any = None
        self._early: list[tuple[bytes, bytes]] = []  # (channel, data): see _await_subscriptions
        self._replies: ReplyReader | None = None  # its reader, for the listener to go on with
        self._lock = gevent.lock.RLock()
        self._listener: gevent.Greenlet | None = None
        self._healthy = False
        self._stopping = False
        self._connecting = False  # the listener is making its connection
        self._connect_again = False  # reconnect() asked meanwhile
        #: Run after a reconnect instead of ``on_reconnect`` when set: the factory's
        #: wrapping of it in the epoch's check (epoch.py).
        self.recover: Callable[[], None] | None = None
        #: Told of each message on the control channel (epoch.py: "look at the epoch now").
        self.on_control: Callable[[bytes], None] | None = None

    def start(self, on_room: RoomHandler, on_user: UserHandler) -> None:
        self._on_room, self._on_user = on_room, on_user
        try:
            self._connect()
            self._healthy = True
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            # A worker (re)started during an outage must still boot: gunicorn stops
            # the whole server when a worker fails to. /ready stays 503 meanwhile.
            log.warning("redis unreachable at start (%s); retrying in the background", exc)
            self._healthy = False
        self._listener = gevent.spawn(self._listen_forever)

    def _connect(self) -> None:
        pubsub = redis.client.PubSub(self._pool, ignore_subscribe_messages=False)
        for key, pending in list(self._pending.items()):
            if key in self._channels:
                pending[1] = 1  # one SUBSCRIBE each, sent now
            else:  # unsubscribed meanwhile: nobody waits for it any more
                del self._pending[key]
                pending[0].set()
        # A pub/sub connection needs at least one subscription before it can listen (the
        # control channel's); the PONG awaited after the SUBSCRIBE is also the proof that
        # Redis answers (a hung Redis accepts the TCP connection and the write, and never
        # replies).
        try:
            pubsub.subscribe(CONTROL, *self._channels)
            early, self._replies = self._await_subscriptions(pubsub)
        except BaseException:
            pubsub.reset()  # no connection stays behind, subscribed and never read
            raise
        # After those of a connection dropped before the listener read them (its
        # recovery refused): a DM among them has no history to come back from.
        self._early += early
        self._pubsub = pubsub

    def _await_subscriptions(self, pubsub: Any) -> tuple[list[tuple[bytes, bytes]], ReplyReader]:
        """Wait until Redis has made every subscription just sent (the PONG to a PING
        sent after them): only then may the recovery read what was published meanwhile
        from the history; a message published after that read reaches this worker
        live. Returns the messages that came before the PONG (the listener delivers
        them first) and the reader it read them with, which the listener goes on
        with: what came in the same read as the PONG is in its buffer (redis-py's
        get_message would keep it in a parser the listener never reads)."""
        pubsub.ping()
        replies = ReplyReader(pubsub.connection, read_timeout=IDLE_CHECK)
        early: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + ANSWER_TIMEOUT
        try:
            while deadline - time.monotonic() > 0:
                try:
                    response = replies.read()
                except TimeoutError:
                    continue
                if isinstance(response, list) and len(response) >= 3:
                    kind, channel = response[0], response[1]
                    if kind == b"message":
                        early.append((channel, response[2]))
                        continue
                    pubsub.handle_message(response)
                    if kind == b"subscribe":
                        self._confirmed(channel)
                elif _is_pong(response):
                    return early, replies
        except BaseException:
            replies.close()
            raise
        replies.close()
        pubsub.reset()
        raise redis.TimeoutError("redis did not confirm the subscriptions")

    def healthy(self) -> bool:
        return self._healthy

    def reconnect(self) -> None:
        """Make the pub/sub connection again (a failover moved Redis's address): not
        ready until then; the listener reconnects and runs the recovery."""
        if self._pubsub is not None:
            self._healthy = False
            self._drop_pubsub()
        elif self._connecting:  # one being made: it was looked up before, made again
            self._connect_again = True

    def _listen_forever(self) -> None:
        attempt = 0
        while not self._stopping:
            try:
                if self._pubsub is None:
                    with self._lock:
                        self._connecting, self._connect_again = True, False
                        try:
                            self._connect()
                        finally:
                            self._connecting = False
                    if self._connect_again:  # reconnect() meanwhile: not this one
                        self._drop_pubsub()
                        continue
                    log.warning("redis pub/sub reconnected; resubscribed %d channels",
                                len(self._channels))
                    pubsub = self._pubsub
                    if self.recover is not None:
                        self.recover()
                    elif self.on_reconnect is not None:
                        self.on_reconnect()
                    if self._pubsub is not pubsub:
                        # Dropped while the recovery ran (reconnect(): a READONLY answered
                        # meanwhile): not ready; made again, and recovered again, at once.
                        continue
                    # Healthy only now: until its connections are registered again and
                    # its sequences raised, this worker takes no message (see Chat).
                    self._healthy = True
                    attempt = 0  # only now: a recovery refused each time backs off too
                self._listen()
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError,
                    redis.ReadOnlyError, Unavailable) as exc:
                # ValueError: redis-py dropped the socket under us ("Invalid file object").
                # READONLY (Unavailable: a store's word for it): the recovery was refused
                # by a read-only server (a failover whose address has not moved yet, a
                # replica): an outage, made again with the back-off, not a listener bug.
                if self._stopping:
                    return
                if self._healthy:
                    log.warning("redis pub/sub lost (%s); reconnecting", exc)
                    if self._metrics is not None:
                        self._metrics.store_error("redis")
                elif isinstance(exc, (redis.ReadOnlyError, Unavailable)):
                    log.warning("redis refused this worker's recovery (%s); reconnecting", exc)
                self._healthy = False
                self._drop_pubsub()
                gevent.sleep(self.RECONNECT_DELAYS[min(attempt, len(self.RECONNECT_DELAYS) - 1)])
                attempt += 1
            except Exception:
                log.exception("redis listener failed; restarting it")
                self._healthy = False
                self._drop_pubsub()
                gevent.sleep(1.0)

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()
        if pubsub is not None:
            try:
                pubsub.reset()
            except Exception:
                pass

    def _listen(self) -> None:
        # Replies are read straight off the pub/sub connection by hiredis
        # (ReplyReader): the greenlet waits on the socket, and a message costs no poll
        # and none of redis-py's per-reply path (issue 24's profile). Subscription
        # replies still go through redis-py's handle_message, which keeps its channel
        # bookkeeping.
        pubsub = self._pubsub
        replies, self._replies = self._replies, None
        if replies is None or replies.sock is not connection_socket(pubsub.connection):
            if replies is not None:
                replies.close()
            replies = ReplyReader(pubsub.connection, read_timeout=IDLE_CHECK)
        try:
            self._read(pubsub, replies)
        finally:
            replies.close()

    def _read(self, pubsub: Any, replies: ReplyReader) -> None:
        early, self._early = self._early, []
        for channel, data in early:  # what came while the subscriptions were confirmed
            self._deliver(channel, data)
        idle = 0.0
        pinged = False
        waits, turn_began = replies.waits, time.monotonic()
        while not self._stopping and pubsub is self._pubsub:
            if replies.waits != waits:  # read() waited: a new turn
                waits, turn_began = replies.waits, time.monotonic()
            elif time.monotonic() - turn_began > TURN:
                # A timer, not sleep(0): gevent runs its callbacks without polling.
                gevent.sleep(0.000001)
                turn_began = time.monotonic()
                continue  # (dropped or stopped meanwhile?)
            try:
                response = replies.read()
            except TimeoutError:  # nothing for IDLE_CHECK seconds
                idle += IDLE_CHECK
                if pinged and idle >= RECONNECT_AFTER:
                    # (unhealthy since ANSWER_TIMEOUT, so the reconnect loop says nothing)
                    log.warning("redis pub/sub lost (no answer to PING for %g s); reconnecting",
                                idle)
                    raise redis.TimeoutError("redis did not answer PING") from None
                if pinged and idle >= ANSWER_TIMEOUT:
                    self._not_answering(f"has not answered PING for {idle:g} s")
                if not pinged and idle >= PING_AFTER:
                    pubsub.ping()  # a closed connection fails the write; a hung Redis the wait
                    idle, pinged = 0.0, True
                continue
            if isinstance(response, Exception):
                # An error reply to the PING: -BUSY (a script running past
                # busy-reply-threshold), -LOADING. Redis runs no command meanwhile: not an
                # answer. PING again after the next quiet IDLE_CHECK.
                self._not_answering(f"answered PING with an error ({response})")
                idle, pinged = PING_AFTER, False
                continue
            if not self._healthy:
                log.warning("redis answered again; ready")
                self._healthy = True
            idle, pinged = 0.0, False
            if not isinstance(response, list) or len(response) < 3:
                continue  # a PING's reply
            kind, channel = response[0], response[1]
            if kind == b"message":
                self._deliver(channel, response[2])
                continue
            pubsub.handle_message(response)
            if kind == b"subscribe":
                self._confirmed(channel)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        if channel.startswith(_ROOM_PREFIX):
            if self._on_room is not None:
                exclude, event = split_room_payload(data)
                self._on_room(channel[len(_ROOM_PREFIX):].decode(), event, exclude)
        elif channel.startswith(_USER_PREFIX):
            if self._on_user is not None:
                self._on_user(channel[len(_USER_PREFIX):].decode(), data)
        elif channel == _CONTROL and self.on_control is not None:
            self.on_control(data)

    def _confirmed(self, channel: bytes) -> None:
        """Redis confirmed a SUBSCRIBE: release the joiners waiting for the last one."""
        pending = self._pending.get(channel)
        if pending is not None:
            pending[1] -= 1
            if pending[1] <= 0:
                del self._pending[channel]
                pending[0].set()

    def _not_answering(self, why: str) -> None:
        """Not ready (posts refused, /ready 503) until Redis answers on this connection."""
        if self._healthy:
            log.warning("redis %s; not ready until it answers", why)
            self._healthy = False
            if self._metrics is not None:
                self._metrics.store_error("redis")

    def _subscribe(self, channel: str, wait: bool = True) -> None:
        key = channel.encode()
        try:
            # Under the lock: while the listener (re)connects (it holds the lock), a
            # channel added after its SUBSCRIBE went out would be in _channels but never
            # subscribed on the new connection; this waits for it to be made instead.
            with self._lock:
                self._channels.add(key)
                if self._pubsub is None:
                    return  # the reconnect resubscribes everything in _channels
                pending = self._pending.get(key)
                if pending is None:
                    pending = self._pending[key] = [gevent.event.Event(), 0]
                pending[1] += 1
                self._pubsub.subscribe(key)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise Unavailable(f"redis: {exc.__class__.__name__}") from exc
        # Wait until Redis confirms, so nothing published after this returns is missed.
        # Generous: during a reconnect storm the listener greenlet queues behind
        # thousands of handshakes on a saturated worker.
        if wait:
            self._await(pending[0])

    def _await(self, waiter: gevent.event.Event) -> None:
        # On a timeout the shared wait stays: other joiners of the channel may still be
        # within their time, and the confirmations (or the next connection's, which
        # _connect counts afresh) release them.
        if not waiter.wait(timeout=SUBSCRIBE_TIMEOUT):
            raise Unavailable("redis: subscription not confirmed")

    def _unsubscribe(self, channel: str) -> None:
        key = channel.encode()
        with self._lock:  # as in _subscribe: not between a reconnect's SUBSCRIBE and its end
            self._channels.discard(key)
            if self._pubsub is not None:
                try:
                    self._pubsub.unsubscribe(key)
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass  # the reconnect subscribes only what is still wanted

    def subscribe_room(self, room: str) -> None:
        self._subscribe(room_channel(room), wait=True)

    def await_room(self, room: str) -> None:
        key = room_channel(room).encode()
        pending = self._pending.get(key)
        if pending is not None:
            self._await(pending[0])

    def unsubscribe_room(self, room: str) -> None:
        self._unsubscribe(room_channel(room))

    def subscribe_user(self, user_id: str) -> None:
        # Confirmed before the user counts as online: a DM accepted for them must arrive.
        self._subscribe(user_channel(user_id), wait=True)

    def unsubscribe_user(self, user_id: str) -> None:
        self._unsubscribe(user_channel(user_id))

    @guarded
    def publish_room(self, room: str, event: bytes, exclude_user: str | None = None) -> None:
        self._client.publish(room_channel(room), room_payload(event, exclude_user))

    @guarded
    def publish_typing(self, room: str, user_id: str, event: bytes, typing_for: float | None,
                       first_here: bool) -> bool:
        """Told when it changes for every worker and pod (typing.lua): every ``true`` of
        this worker's renews its time, so its ``first_here`` says nothing here."""
        for_ms = 0 if typing_for is None else max(1, round(typing_for * 1000))
        return bool(self._typing(keys=[typists_key(room, user_id), room_channel(room)],
                                 args=[self._node_id, for_ms, room_payload(event, user_id)]))

    @guarded
    def publish_user(self, user_id: str, event: bytes) -> None:
        self._client.publish(user_channel(user_id), event)

    def close(self) -> None:
        self._stopping = True
        if self._listener is not None:
            self._listener.kill(block=False)
        self._drop_pubsub()
        self._pool.disconnect()


def _is_pong(response: Any) -> bool:
    """The reply to the PING of _await_subscriptions: ``PONG`` (RESP3) or ``[pong, ""]``
    (RESP2, subscribed); not redis-py's health check (``[pong, redis-py-health-check]``)."""
    if isinstance(response, bytes):
        return response.upper() == b"PONG"
    return (isinstance(response, list) and len(response) == 2
            and response[0].lower() == b"pong" and not response[1])
