"""No room or DM id issued twice after Redis lost (or rolled back) its data.

Room and DM sequences live in Redis. When Redis restarts empty (or is flushed), each
worker raises the sequences of its rooms above the highest id it delivered
(:meth:`wschat.chat.Chat.resync`), but workers come back one by one: a post through a
worker that caught up first could take an id that a slower worker's members already
had, and they would never see that message.

So Redis holds an *epoch*, a name for the data it holds, and a gate every post passes
(``gate.lua``, the first lines of the post scripts):

* A worker remembers the epoch it last saw. When it (re)connects, before it raises its
  sequences, it compares (``epoch_begin.lua``). No epoch, or another one, means the
  data is gone; an epoch named before Redis restarted (Redis's ``run_id`` changed)
  means the data may be older than what workers delivered (restored from a snapshot,
  or a failover to a replica that was behind). The first worker to find either names
  a new epoch and lists itself, every other worker it knew of (the node registry as of
  its last heartbeat) and those the registry still lists as alive as *recovering*, and
  tells every worker on ``wschat:control`` to look now (a flush drops no connection, and
  would otherwise be found at each worker's next heartbeat); a later one that finds the
  new epoch adds itself.
* Posts are refused (``unavailable``) while the epoch is missing or any worker is
  recovering; each takes itself off once its sequences are raised
  (``epoch_done.lua``), and the last one opens the gate.
* A worker that never comes back (it died with Redis) is waited for at most
  ``PRESENCE_TTL`` (the recovering set's time limit): as long as a silent worker
  counts as alive.

A worker that saw no epoch (just started) raises nothing: on a Redis without an
epoch (a first start, or the data of a release without epochs) it opens the gate
itself. Left open (docs/delivery.md, "Limits"): a worker started after the others'
last heartbeat and before the loss, which none of them knew of, is waited for only
once it has found the new epoch itself; and after a restart that kept the data, the
gate (``ready``, restored with it) stays open until the first worker has looked,
which is also when the workers find their pub/sub connections lost and refuse posts
themselves.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable

import redis

from .keys import CONTROL, EPOCH, NODES, NUMBERED_BY_DATABASE, READY, RECOVERING, guarded, script

log = logging.getLogger("wschat.redis")

SAME, LOST, FRESH, LOST_AND_OPEN = 0, 1, 2, 3


class Epoch:
    """This worker's view of which data Redis holds (one per worker)."""

    def __init__(self, client: redis.Redis, node_id: str, recovering_ttl: float,
                 numbers_in_database: bool = False) -> None:
        self._client = client
        self._node_id = node_id
        #: ENABLE_PERSISTENCE: :meth:`begin` lists this worker in NUMBERED_BY_DATABASE (as
        #: its heartbeat does), and :meth:`done` never opens the gate: a loss of Redis's
        #: data took the list with it, and the recovery may end before the next heartbeat.
        self._database = "1" if numbers_in_database else "0"
        self._ttl_ms = max(1, int(recovering_ttl * 1000))
        self._begin = script(client, "epoch_begin")
        self._done = script(client, "epoch_done")
        self._metrics = None  # guarded's: the stores count their own errors
        self.seen = ""  # the epoch this worker last saw ("" before the first)
        #: Called when :meth:`begin` listed this database-numbering worker anew (as
        #: NodeKeeper.on_listed_anew): posts numbered in Redis may have been taken meanwhile.
        self.on_listed_anew: Callable[[], None] | None = None

    @guarded  # an outage (READONLY too, in a script on Redis 6): Unavailable
    def begin(self, peers: Iterable[str] = ()) -> bool:
        """Before this worker raises its sequences: whether Redis lost its data (or
        restarted, and may hold older sequences) since it last looked; this worker is
        then waited for until :meth:`done`. ``peers``: the other workers it knew of,
        waited for too if it is the first to find the loss."""
        others = [p for p in peers if p != self._node_id]
        state, epoch, anew = self._begin(
            keys=[EPOCH, READY, RECOVERING, NODES, CONTROL, NUMBERED_BY_DATABASE],
            args=[self._node_id, self.seen, secrets.token_hex(8), self._ttl_ms,
                  self._run_id(), self._database, *others])
        self.seen = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        if anew and self.on_listed_anew is not None:
            self.on_listed_anew()
        if state == LOST:
            log.warning("redis lost its data or restarted: posts wait until every worker "
                        "that knew it raised its sequences (epoch %s)", self.seen)
        elif state == LOST_AND_OPEN:
            log.warning("redis lost its data and posts were taken again before this worker "
                        "raised its sequences: its members may miss messages (epoch %s)",
                        self.seen)
        return state in (LOST, LOST_AND_OPEN)

    def _run_id(self) -> str:
        """This run of Redis (a restart, or a failover to another server, changes it);
        '' where INFO is refused (some managed services): then only a loss of the
        data is told, not a rollback."""
        try:
            return str(self._client.info("server").get("run_id", ""))
        except redis.ResponseError:
            return ""

    @guarded
    def done(self) -> bool:
        """This worker's sequences are raised; True if posts are taken now."""
        return bool(self._done(keys=[EPOCH, READY, RECOVERING, NUMBERED_BY_DATABASE],
                               args=[self._node_id, self.seen, self._database]))

