"""Token buckets: the pure maths, and the memory and Redis limiters run through the same cases.

The memory limiter gets an injected clock; the Redis one reads the Redis
server's TIME, so its cases really wait (tens of milliseconds) and allow for
the little time that passes between calls.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import TIMEOUT, first_start, free_port, listening, redis_url_or_skip, wait_until
from wschat.protocol import draft_dm, draft_message
from wschat.stores.redis.ratelimit import RedisRateLimiter
from wschat.ratelimit import (
    Charge, MemoryRateLimiter, RateLimited, RateLimiter, take,
)

DB = 12


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Bench:
    """A limiter factory plus a way to let time pass for it."""

    name: str
    make: Callable[[float, float], RateLimiter]
    advance: Callable[[float], None]
    slack_ms: int  # how far real time may move a figure between two calls


@pytest.fixture(scope="module")
def redis_url() -> str:
    return redis_url_or_skip(DB)


@pytest.fixture(scope="module")
def redis_client(redis_url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    with listening(redis_url, "bob"):  # the DMs below are to bob
        yield client
    client.flushdb()
    client.close()


@pytest.fixture(params=["memory", "redis"])
def bench(request: pytest.FixtureRequest) -> Bench:
    if request.param == "memory":
        clock = FakeClock()

        def forward(seconds: float) -> None:
            clock.now += seconds

        return Bench("memory", lambda rate, burst: MemoryRateLimiter(rate, burst, clock),
                     forward, 0)
    client = request.getfixturevalue("redis_client")
    prefix = f"test:{request.node.name}:{time.monotonic_ns()}:"
    return Bench("redis", lambda rate, burst: RedisRateLimiter(client, rate, burst, prefix),
                 time.sleep, 25)


# -- take(): the maths both limiters share ---------------------------------------------

def test_take_spends_one_token() -> None:
    """A full bucket gives a token and remembers when."""
    assert take(3.0, 0.0, 10.0, rate=1.0, burst=3.0) == (2.0, 10.0, 0)


def test_take_with_a_cost() -> None:
    assert take(3.0, 0.0, 10.0, rate=1.0, burst=3.0, cost=2.0) == (1.0, 10.0, 0)
    assert take(1.0, 10.0, 10.0, rate=1.0, burst=3.0, cost=2.0) == (1.0, 10.0, 1000)


def test_take_refills_at_rate_up_to_burst() -> None:
    """Tokens come back at ``rate`` per second but never beyond ``burst``."""
    assert take(0.0, 0.0, 0.5, rate=4.0, burst=3.0) == (1.0, 0.5, 0)
    assert take(0.0, 0.0, 100.0, rate=4.0, burst=3.0) == (2.0, 100.0, 0)


def test_take_refuses_with_time_to_next_token() -> None:
    """An empty bucket refuses and says how long until one token is back (rounded up)."""
    tokens, _, retry_ms = take(0.25, 0.0, 0.0, rate=2.0, burst=3.0)
    assert (tokens, retry_ms) == (0.25, 375)
    assert take(0.5, 0.0, 0.0, rate=3.0, burst=3.0)[2] == 167  # 166.67 ms, rounded up
    assert take(0.999999, 0.0, 0.0, rate=1000.0, burst=1.0)[2] == 1  # never 0 when refused


def test_take_ignores_a_clock_going_backwards() -> None:
    """A timestamp earlier than the last one adds no tokens."""
    assert take(0.0, 10.0, 9.0, rate=1.0, burst=3.0)[2] == 1000


# -- both limiters, same cases ---------------------------------------------------------

@pytest.mark.parametrize("variable", ["RATE_LIMIT", "RATE_LIMIT_GUEST_IP",
                                      "RATE_LIMIT_REQUESTS"])
def test_a_rate_is_at_most_a_billion_a_second(variable: str) -> None:
    """A rate past 1e9 is refused at start: RATE_LIMIT=1e308 made a guest address's
    default rate (10x) infinite, which take() and charge.lua answer differently, and
    Redis refused the bucket's zero expiry (every guest post failed)."""
    from wschat.config import MAX_RATE, ConfigError, Settings

    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: "1e308"})
    settings = Settings.from_env({variable: str(MAX_RATE)})
    assert settings.guest_ip_rate < float("inf") and settings.request_rate < float("inf")


def test_burst_then_refused_with_retry_after(bench: Bench) -> None:
    """``burst`` requests pass at once; the next is refused with about 1/rate to wait."""
    limiter = bench.make(10, 3)
    assert [limiter.hit("a") for _ in range(3)] == [0, 0, 0]
    retry_ms = limiter.hit("a")
    assert 100 - bench.slack_ms <= retry_ms <= 100


def test_refill_after_retry_after(bench: Bench) -> None:
    """Waiting the advertised retry_after_ms is enough for exactly one more request."""
    limiter = bench.make(20, 2)
    limiter.hit("a"), limiter.hit("a")
    retry_ms = limiter.hit("a")
    assert retry_ms > 0
    bench.advance(retry_ms / 1000)
    assert limiter.hit("a") == 0
    assert limiter.hit("a") > 0


def test_idle_bucket_saves_at_most_burst(bench: Bench) -> None:
    """After a long pause only ``burst`` requests pass at once, not the whole pause's worth."""
    limiter = bench.make(50, 3)
    limiter.hit("a")
    bench.advance(0.3)  # 15 tokens' worth of time
    assert [limiter.hit("a") for _ in range(4)][:3] == [0, 0, 0]
    assert limiter.hit("a") > 0


def test_keys_are_independent(bench: Bench) -> None:
    """Emptying one bucket leaves another full."""
    limiter = bench.make(1, 2)
    limiter.hit("a"), limiter.hit("a")
    assert limiter.hit("a") > 0
    assert [limiter.hit("b"), limiter.hit("b")] == [0, 0]


def test_per_call_rate_and_burst(bench: Bench) -> None:
    """A call may give its bucket a larger rate and burst (the per-IP guest bucket): five
    pass at once (the default burst is one), and the sixth waits 100 ms for its token
    (the default rate would say a second), less what refilled while the calls ran (on
    Redis, real time: at 100/s a loaded machine once took the whole token's 10 ms)."""
    limiter = bench.make(1, 1)
    started = time.monotonic()
    assert [limiter.hit("ip", 10, 5) for _ in range(5)] == [0] * 5
    retry_ms = limiter.hit("ip", 10, 5)
    took_ms = (time.monotonic() - started) * 1000
    assert 100 - took_ms - 1 <= retry_ms <= 100
    assert limiter.hit("user") == 0 and limiter.hit("user") > 0


def test_a_request_may_cost_several_tokens(bench: Bench) -> None:
    """A cost above one spends that many tokens (the Redis script agrees with take());
    a cost above the burst costs the whole burst, so it is never refused forever."""
    limiter = bench.make(10, 10)
    assert limiter.hit("a", cost=6) == 0
    assert 200 - bench.slack_ms <= limiter.hit("a", cost=6) <= 200  # 4 left, 2 missing
    assert limiter.hit("a", cost=4) == 0
    bench.advance(1.0)
    assert limiter.hit("a", cost=50) == 0  # a full bucket pays for anything
    assert limiter.hit("a") > 0


def test_fractional_rate(bench: Bench) -> None:
    """Half a message per second means two seconds to wait for the next token."""
    limiter = bench.make(0.5, 1)
    assert limiter.hit("a") == 0
    assert 2000 - bench.slack_ms <= limiter.hit("a") <= 2000


def test_sustained_rate_matches_configuration(bench: Bench) -> None:
    """Hammering for a while lets through burst + rate x elapsed, no more, no less."""
    rate, burst = 200.0, 5
    limiter = bench.make(rate, burst)
    allowed = 0
    if bench.name == "memory":
        for _ in range(600):  # 600 attempts, 1 ms apart: 0.6 s at 1000/s
            allowed += limiter.hit("a") == 0
            bench.advance(0.001)
        assert allowed == burst + int(rate * 0.6) - 1 or allowed == burst + int(rate * 0.6)
        return
    started = time.monotonic()
    attempts = 0
    while time.monotonic() - started < 0.5:
        allowed += limiter.hit("a") == 0
        attempts += 1
    elapsed = time.monotonic() - started
    # No more than the rate; as many as the rate, unless the round trips themselves were
    # slower than it (a loaded machine once made only 80 attempts in 0.5 s: all passed).
    assert min(attempts, burst + rate * elapsed * 0.9 - 2) <= allowed <= burst + rate * elapsed + 2


# -- memory only -----------------------------------------------------------------------

def test_spend_pays_each_bucket_in_order_and_stops_at_the_first_refusal(bench: Bench) -> None:
    """A guest's check: its own bucket, then its address's; one that refuses leaves the
    buckets after it untouched, and its retry_after_ms is the answer."""
    limiter = bench.make(1, 10)
    own, shared = ("u:g", 1.0, 1.0), ("ip:a", 1.0, 2.0)
    assert limiter.spend((own, shared)) == 0  # both paid: own empty, shared has 1 left
    assert limiter.spend((own, shared)) > 0  # refused by own: shared not touched...
    assert limiter.spend((("u:h", 1.0, 1.0), shared)) == 0  # ...so h still gets its last token
    assert limiter.spend((("u:i", 1.0, 5.0), shared)) > 0  # refused by shared, after i paid
    assert limiter.spend(()) == 0


def test_memory_forgets_buckets_that_are_full_again() -> None:
    """Buckets untouched until full again are swept, so idle users cost no memory."""
    clock = FakeClock()
    limiter = MemoryRateLimiter(10, 2, clock)
    for i in range(100):
        limiter.hit(f"user-{i}")
    assert len(limiter) == 100
    clock.now += 1.0  # full again after 0.2 s; sweeps run at most once a second
    limiter.hit("fresh")
    assert len(limiter) == 1


# -- Redis only ------------------------------------------------------------------------

def test_redis_bucket_expires_when_full_again(redis_client: Any) -> None:
    """A Redis bucket's TTL is the time to refill; then the key is gone (same as full)."""
    limiter = RedisRateLimiter(redis_client, 20, 3, prefix="test:ttl:")
    limiter.hit("a")
    pttl = redis_client.pttl("test:ttl:a")
    assert 0 < pttl <= 50  # one token at 20/s
    limiter.hit("a"), limiter.hit("a")
    assert 100 < redis_client.pttl("test:ttl:a") <= 150
    wait_until(lambda: not redis_client.exists("test:ttl:a"), message="the bucket to expire")


def test_redis_buckets_shared_between_workers(redis_url: str) -> None:
    """Two limiters (two workers or pods, each with its own client) spend the same bucket."""
    import redis

    clients = [redis.Redis.from_url(redis_url) for _ in range(2)]
    first, second = (RedisRateLimiter(c, 1, 4, prefix="test:shared:") for c in clients)
    results = [limiter.hit("u:alice") for limiter in (first, second, first, second, first)]
    assert results[:4] == [0, 0, 0, 0] and results[4] > 0
    for c in clients:
        c.close()


def _commands_sent(redis_url: str, worker: Any, act: Callable[[], None]) -> list[str]:
    """The commands ``worker`` (a single-connection client) sent while ``act`` ran, as
    MONITOR saw them."""
    import redis

    addr = worker.client_info()["addr"]
    marker = redis.Redis.from_url(redis_url)
    seen: list[str] = []
    started, done = threading.Event(), threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(redis_url).monitor() as monitor:
            for command in monitor.listen():
                text = command["command"]
                if "test:monitor:start" in text:
                    started.set()
                elif "test:monitor:stop" in text:
                    break
                elif f"{command['client_address']}:{command['client_port']}" == addr:
                    seen.append(text.split()[0].upper())
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    # MONITOR streams only once the server has registered it: knock until it answers.
    wait_until(lambda: marker.get("test:monitor:start") or started.wait(0.05),
               message="MONITOR to start")
    act()
    marker.get("test:monitor:stop")
    assert done.wait(TIMEOUT)
    marker.close()
    return seen


def test_redis_one_evalsha_per_check(redis_url: str) -> None:
    """Each check is exactly one EVALSHA from the worker (MONITOR shows every command)."""
    import redis

    worker = redis.Redis.from_url(redis_url, single_connection_client=True)
    limiter = RedisRateLimiter(worker, 100, 100, prefix="test:evalsha:")
    limiter.hit("warm-up")  # the first call may load the script

    def check() -> None:
        for _ in range(5):
            limiter.hit("k")

    assert _commands_sent(redis_url, worker, check) == ["EVALSHA"] * 5
    worker.close()


def test_redis_guest_check_of_two_buckets_is_one_evalsha(redis_url: str) -> None:
    """A guest's own bucket and its address's are spent in one script call."""
    import redis

    worker = redis.Redis.from_url(redis_url, single_connection_client=True)
    limiter = RedisRateLimiter(worker, 100, 100, prefix="test:evalsha2:")
    limiter.hit("warm-up")  # the first call may load the script
    # Slow refills: a bucket's key expires when it is full again, and three tokens
    # at 1000/s come back in 3 ms, before the EXISTS below on a loaded machine.
    buckets = (("u:guest", 0.01, 100.0), ("ip:127.0.0.9", 0.01, 1000.0))

    def check() -> None:
        for _ in range(3):
            assert limiter.spend(buckets) == 0

    assert _commands_sent(redis_url, worker, check) == ["EVALSHA"] * 3
    assert worker.exists("test:evalsha2:u:guest", "test:evalsha2:ip:127.0.0.9") == 2
    worker.close()


# -- Redis: a message pays inside the script that posts it -------------------------------

def _store(client: Any) -> Any:
    from wschat.stores.redis import RedisMessageStore

    first_start(client)
    return RedisMessageStore(client, 100)


def _post(store: Any, room: str, charge: Charge, dm: bool = False,
          to: str = "bob") -> Any:
    if dm:  # recipient_online=None: the script checks the recipient's presence itself
        return store.post_dm("alice", to, draft_dm(to, "alice", "alice", "hi", 0, None),
                             None, charge)
    return store.post_room(room, "alice", draft_message(room, "alice", "alice", "hi", 0, None),
                           charge)


def test_redis_post_with_its_charge_is_one_evalsha(redis_url: str) -> None:
    """A room message, or a DM with its recipient's presence check, with the rate limit:
    one round trip, one EVALSHA."""
    import redis

    worker = redis.Redis.from_url(redis_url, single_connection_client=True)
    store = _store(worker)
    room = f"one-trip-{time.monotonic_ns()}"
    worker.hset("wschat:presence", "bob", 1)
    charge: Charge = (("u:one-trip", 100.0, 100.0), ("ip:127.0.0.9", 1000.0, 1000.0))

    def post() -> None:
        for _ in range(3):
            _post(store, room, charge)
            _post(store, room, charge, dm=True)

    with listening(redis_url, "bob"):  # the DMs are to bob
        _post(store, room, charge), _post(store, room, charge, dm=True)  # load the scripts
        assert _commands_sent(redis_url, worker, post) == ["EVALSHA"] * 6
    worker.close()


@pytest.mark.parametrize("dm", [False, True], ids=["room", "dm"])
def test_redis_post_refused_by_an_empty_bucket(redis_client: Any, dm: bool) -> None:
    """Past the burst the post is refused with retry_after_ms and nothing is stored or
    sent; the bucket is the one RedisRateLimiter spends (typing shares it)."""
    store = _store(redis_client)
    redis_client.hset("wschat:presence", "bob", 1)
    user = f"u:refused-{dm}-{time.monotonic_ns()}"
    room = f"refused-{time.monotonic_ns()}"
    charge: Charge = ((user, 20.0, 2.0),)
    first, second = _post(store, room, charge, dm), _post(store, room, charge, dm)
    assert second.msg_id == first.msg_id + 1
    with pytest.raises(RateLimited) as refused:
        _post(store, room, charge, dm)
    assert 1 <= refused.value.retry_after_ms <= 1000 // 20 + 1
    if not dm:
        assert store.last_id(room) == second.msg_id  # no id taken, nothing stored
    assert RedisRateLimiter(redis_client, 20, 2).hit(user) > 0
    time.sleep(refused.value.retry_after_ms / 1000)
    assert _post(store, room, charge, dm).msg_id == second.msg_id + 1


def test_redis_dm_to_an_offline_user_refused_in_the_same_call(redis_client: Any,
                                                              redis_url: str) -> None:
    """user_not_found from the post script: no id taken, nothing published; an empty
    bucket answers first (rate_limited, as with the separate checks before)."""
    from wschat.stores.base import RecipientOffline

    store = _store(redis_client)
    tag = time.monotonic_ns()
    seq = int(redis_client.get("wschat:dm:seq") or 0)
    with pytest.raises(RecipientOffline):
        _post(store, "", ((f"u:off-{tag}", 10.0, 1.0),), dm=True, to=f"nobody-{tag}")
    assert int(redis_client.get("wschat:dm:seq") or 0) == seq
    with pytest.raises(RateLimited):  # the one token went to the refused DM
        _post(store, "", ((f"u:off-{tag}", 10.0, 1.0),), dm=True, to=f"nobody-{tag}")
    redis_client.hset("wschat:presence", f"somebody-{tag}", 1)
    with listening(redis_url, f"somebody-{tag}"):
        assert _post(store, "", (), dm=True, to=f"somebody-{tag}").msg_id > seq


def test_redis_post_charges_buckets_in_order(redis_client: Any) -> None:
    """A guest's message spends its own bucket, then its address's; an empty address
    bucket refuses it (the guest's token is spent, as with two separate checks)."""
    store = _store(redis_client)
    tag = time.monotonic_ns()
    room, ip = f"order-{tag}", f"ip:order-{tag}"
    limiter = RedisRateLimiter(redis_client, 1, 1)
    assert limiter.hit(ip, 1, 1) == 0  # the address's only token
    with pytest.raises(RateLimited):
        _post(store, room, ((f"u:a-{tag}", 1.0, 5.0), (ip, 1.0, 1.0)))
    assert float(redis_client.get(f"wschat:rl:u:a-{tag}").split()[0]) == pytest.approx(4, 0.05)
    assert limiter.hit(f"u:b-{tag}") == 0  # b's only token
    with pytest.raises(RateLimited):  # refused by the first: the second is not touched
        _post(store, room, ((f"u:b-{tag}", 1.0, 1.0), (f"ip:untouched-{tag}", 1.0, 1.0)))
    assert not redis_client.exists(f"wschat:rl:ip:untouched-{tag}")
    assert store.last_id(room) == 0


def test_redis_unreachable_falls_back_to_local_buckets(tmp_path: Path) -> None:
    """With Redis down, limiting goes on per worker without retrying Redis on every
    message, and the shared buckets are used again once Redis is back."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if not shutil.which("redis-server"):
        pytest.skip("needs the redis-server binary to start and stop a Redis")
    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))
    limiter = RedisRateLimiter(client, 1, 2, prefix="test:fallback:")
    started = time.monotonic()
    assert [limiter.hit("u"), limiter.hit("u")] == [0, 0]
    assert limiter.hit("u") > 0
    assert time.monotonic() - started < 0.5  # one failed connect, then no retry per message
    server = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(client), message="redis-server to start")
        wait_until(lambda: limiter.hit("v") == 0 and client.exists("test:fallback:v"),
                   timeout=limiter.RETRY_AFTER + TIMEOUT, message="the shared buckets again")
    finally:
        server.terminate()
        server.wait(TIMEOUT)


def _answers(client: Any) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
