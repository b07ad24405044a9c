"""One load-generator process: a uvloop event loop driving many picows WebSocket clients.

The orchestrator (``loadtest.pool``) starts several of these and talks to each over a
``multiprocessing`` pipe: it sends ``(command, args)`` and gets one reply per command.
Commands: ``open`` (connect + join a batch of clients), ``dm_targets`` (whom each
client's DMs go to), ``publish`` (an open-loop, fixed-rate schedule of room messages
and DMs), ``slow`` (stop reading on some clients), ``churn``
(connect/join/leave/close cycles), ``stats`` / ``reset`` and ``exit``.

Latency is measured from the *intended* send time of the schedule, written at the
start of each message's text as integer nanoseconds of ``time.time_ns()``: every
process runs on the same machine, so the wall clock is shared and a receiver in any
process computes ``now - intended``. A send that happens late (the generator or the
network fell behind) is still charged from its intended time, so a stall shows up in
the latency instead of hiding behind it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
import time
import traceback
from typing import Any

import orjson
from picows import WSCloseCode, WSListener, WSMsgType, WSTransport, ws_connect

from .codec import make_codec
from .hist import Histogram

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), per 4-tuple
time_ns = time.time_ns
loads = orjson.loads
TEXT = WSMsgType.TEXT
CONT = WSMsgType.CONTINUATION
MEASURE_NEVER = 1 << 62
JOIN_ATTEMPTS = 5


class ServerError(RuntimeError):
    """The server answered a request with an ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"server error {code}: {message}")
        self.code = code


class Stats:
    """Counters of one worker; reset between measured phases."""

    def __init__(self) -> None:
        self.measure_from = MEASURE_NEVER
        self.measure_to = MEASURE_NEVER
        self.reset()

    def reset(self) -> None:
        self.hist = Histogram()  # healthy receivers, messages intended inside the window
        self.delivered = 0  # message events received by healthy clients
        self.delivered_in_window = 0
        self.delivered_slow = 0  # received by clients told to be slow
        self.delivered_dm = 0  # dm events (recipient's copy and sender's echo), inside delivered
        self.gaps = 0  # ids skipped in a room's sequence, as seen by one client
        self.dups = 0  # an id seen again or going backwards
        self.errors: dict[str, int] = {}
        self.unexpected_closes = 0
        self.closes_slow = 0
        self.other_events = 0
        self.bytes_in = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "hist": self.hist.to_wire(),
            "delivered": self.delivered,
            "delivered_in_window": self.delivered_in_window,
            "delivered_slow": self.delivered_slow,
            "delivered_dm": self.delivered_dm,
            "gaps": self.gaps,
            "dups": self.dups,
            "errors": dict(self.errors),
            "unexpected_closes": self.unexpected_closes,
            "closes_slow": self.closes_slow,
            "other_events": self.other_events,
            "bytes_in": self.bytes_in,
        }


class Client(WSListener):
    """One WebSocket client; parses every event, times messages, answers transport pings."""

    def __init__(self, worker: "Worker", spec: dict[str, Any]) -> None:
        super().__init__()
        self.worker = worker
        self.stats = worker.stats
        self.spec = spec
        self.slow = bool(spec.get("slow"))
        self.transport: WSTransport | None = None
        loop = worker.loop
        self.welcome: asyncio.Future = loop.create_future()
        self.closed_fut: asyncio.Future = loop.create_future()
        self.pending: asyncio.Future | None = None
        self.pending_type = ""
        self.last_ids: dict[str, int] = {}  # room -> last message id seen
        self.last_dm_ids: dict[str, int] = {}  # sender user_id -> last dm id seen
        self.user_id = ""  # from welcome
        self.dm_to: str | None = None  # the user_id this client's DMs go to
        self.rooms: list[str] = []
        self.closing = False
        self.partial: list[bytes] = []
        self.encode = worker.codec.encode
        self.decode = worker.codec.decode

    # -- picows callbacks -------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closing:
            if self.slow:
                self.stats.closes_slow += 1
            else:
                self.stats.unexpected_closes += 1
        exc = ConnectionError("connection closed")
        for fut in (self.welcome, self.pending):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        if not self.closed_fut.done():
            self.closed_fut.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        mt = frame.msg_type
        if mt == TEXT or mt == CONT:
            if not frame.fin:
                self.partial.append(frame.get_payload_as_bytes())
                return
            payload = frame.get_payload_as_bytes()
            if self.partial:
                self.partial.append(payload)
                payload = b"".join(self.partial)
                self.partial = []
            self.on_payload(payload)
        elif mt == WSMsgType.BINARY:
            self.stats.errors["binary_frame"] = self.stats.errors.get("binary_frame", 0) + 1
        elif mt == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        # PING is answered by picows itself (enable_auto_pong)

    def on_payload(self, payload: bytes) -> None:
        now = time_ns()
        st = self.stats
        st.bytes_in += len(payload)
        data = self.decode(payload, self.send_raw)
        if data is None:
            return
        ev = loads(data)
        kind = ev.get("type")
        is_dm = kind == "dm"
        if kind == "message" or is_dm:
            rid = ev["id"]
            if is_dm:
                # DM ids are one sequence for all DMs, so only order per sender is checked.
                sender = ev["user_id"]
                last = self.last_dm_ids.get(sender)
                if last is not None and rid <= last:
                    st.dups += 1
                else:
                    self.last_dm_ids[sender] = rid
                st.delivered_dm += 1
            else:
                room = ev["room"]
                last = self.last_ids.get(room)
                if last is not None:
                    if rid > last + 1:
                        st.gaps += rid - last - 1
                    elif rid <= last:
                        st.dups += 1
                if last is None or rid > last:
                    self.last_ids[room] = rid
            if self.slow:
                st.delivered_slow += 1
                return
            st.delivered += 1
            text = ev["text"]
            sp = text.find(" ")
            try:
                intended = int(text[:sp] if sp > 0 else text)
            except ValueError:
                return
            if st.measure_from <= intended < st.measure_to:
                st.delivered_in_window += 1
                st.hist.record((now - intended) / 1000.0)
            if self.pending is not None and self.pending_type == kind and not self.pending.done():
                self.pending.set_result(ev)
            return
        if kind == "welcome":
            if not self.welcome.done():
                self.welcome.set_result(ev)
            return
        if kind == "presence" or kind == "typing":
            st.other_events += 1
            return
        if kind == "error":
            code = str(ev.get("code") or ev.get("message"))
            st.errors[code] = st.errors.get(code, 0) + 1
            if self.pending is not None and not self.pending.done() and (
                    "id" not in ev or ev.get("id") == self.spec.get("req_id")):
                self.pending.set_exception(ServerError(code, str(ev.get("message"))))
            return
        if self.pending is not None and kind == self.pending_type and not self.pending.done():
            self.pending.set_result(ev)
            return
        st.other_events += 1

    # -- sending ----------------------------------------------------------
    def send_raw(self, payload: bytes) -> None:
        if self.transport is not None:
            self.transport.send(TEXT, payload)

    def send_obj(self, obj: dict[str, Any]) -> None:
        self.send_raw(self.encode(orjson.dumps(obj)))

    async def request(self, obj: dict[str, Any], reply_type: str, timeout: float) -> dict[str, Any]:
        """Send ``obj`` and wait for the first event of ``reply_type`` (or an error)."""
        self.pending = self.worker.loop.create_future()
        self.pending_type = reply_type
        self.spec["req_id"] = obj.get("id")
        self.send_obj(obj)
        try:
            return await asyncio.wait_for(self.pending, timeout)
        finally:
            self.pending = None

    async def close(self, timeout: float = 2.0) -> None:
        """Close politely: send a close frame, let the server answer and drop TCP."""
        self.closing = True
        if self.transport is None or self.closed_fut.done():
            return
        self.transport.send_close(WSCloseCode.OK)
        try:
            await asyncio.wait_for(asyncio.shield(self.closed_fut), timeout)
        except asyncio.TimeoutError:
            self.transport.disconnect(graceful=False)


class Worker:
    """The state of one generator process."""

    def __init__(self, conn, worker_id: int, config: dict[str, Any]) -> None:
        self.conn = conn
        self.worker_id = worker_id
        self.config = config
        self.host = config["host"]
        self.port = config["port"]
        self.codec = make_codec(config["codec"])
        self.stats = Stats()
        self.clients: dict[int, Client] = {}
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.tasks: set[asyncio.Task] = set()
        self.join_retries = 0

    # -- plumbing ---------------------------------------------------------
    def reader(self) -> None:
        """Thread: block on the pipe, hand each command to the loop (pipes stay blocking)."""
        while True:
            try:
                cmd, args = self.conn.recv()
            except (EOFError, OSError):
                self.loop.call_soon_threadsafe(self.finish)
                return
            self.loop.call_soon_threadsafe(self.start_command, cmd, args)
            if cmd == "exit":
                return

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def start_command(self, cmd: str, args: dict[str, Any]) -> None:
        task = self.loop.create_task(self.dispatch(cmd, args))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def dispatch(self, cmd: str, args: dict[str, Any]) -> None:
        try:
            result = await getattr(self, "cmd_" + cmd)(**args)
            reply = ("ok", result)
        except Exception as exc:  # report, never die silently
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        self.conn.send(reply)

    async def run(self) -> None:
        threading.Thread(target=self.reader, name="commands", daemon=True).start()
        await self.done

    # -- connections ------------------------------------------------------
    async def connect(self, spec: dict[str, Any], timeout: float) -> tuple[WSTransport, Client]:
        src_ip = spec["ip"]
        rcvbuf = spec.get("rcvbuf")
        loop = self.loop
        host, port = self.host, self.port

        async def socket_factory(_parsed_url):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind((src_ip, 0))
                await loop.sock_connect(sock, (host, port))
            except BaseException:
                sock.close()
                raise
            return sock

        url = self.codec.url(host, port, spec["user"])
        return await asyncio.wait_for(
            ws_connect(lambda: Client(self, spec), url, socket_factory=socket_factory,
                       websocket_handshake_timeout=timeout, enable_auto_pong=True,
                       read_buffer_init_size=4096, max_frame_size=64 * 1024 * 1024,
                       use_aiofastnet=False),
            timeout)

    async def open_one(self, spec: dict[str, Any], timeout: float, conn_hist: Histogram,
                       join_hist: Histogram) -> None:
        t0 = time_ns()
        transport, client = await self.connect(spec, timeout)
        client.transport = transport
        try:
            welcome = await asyncio.wait_for(client.welcome, timeout)
            client.user_id = str(welcome.get("user_id", ""))
            conn_hist.record((time_ns() - t0) / 1000.0)
            for n, room in enumerate(spec["rooms"]):
                t1 = time_ns()
                for attempt in range(JOIN_ATTEMPTS):
                    try:
                        await client.request({"type": "join", "room": room, "id": f"j{n}"}, "joined", timeout)
                        break
                    except ServerError as exc:
                        # The server says "unavailable ... retry": do what a client would, and count it.
                        if exc.code != "unavailable" or attempt == JOIN_ATTEMPTS - 1:
                            raise
                        self.join_retries += 1
                        await asyncio.sleep(0.2 * (attempt + 1))
                join_hist.record((time_ns() - t1) / 1000.0)
                client.rooms.append(room)
        except BaseException:
            client.closing = True
            transport.disconnect(graceful=False)
            raise
        self.clients[spec["i"]] = client

    async def cmd_open(self, specs: list[dict[str, Any]], concurrency: int = 64,
                       timeout: float = 30.0) -> dict[str, Any]:
        """Connect every spec (welcome + join its rooms), ``concurrency`` at a time."""
        sem = asyncio.Semaphore(concurrency)
        conn_hist, join_hist = Histogram(), Histogram()
        failures: dict[str, int] = {}

        async def one(spec):
            async with sem:
                try:
                    await self.open_one(spec, timeout, conn_hist, join_hist)
                except Exception as exc:
                    key = f"{type(exc).__name__}: {exc}"[:160]
                    failures[key] = failures.get(key, 0) + 1

        self.join_retries = 0
        await asyncio.gather(*(one(s) for s in specs))
        return {"opened": len(specs) - sum(failures.values()), "failures": failures,
                "join_retries": self.join_retries, "errors": dict(self.stats.errors),
                "connect_hist": conn_hist.to_wire(), "join_hist": join_hist.to_wire(),
                "clients": len(self.clients),
                "user_ids": {s["i"]: self.clients[s["i"]].user_id for s in specs if s["i"] in self.clients}}

    async def cmd_dm_targets(self, targets: dict[int, str]) -> dict[str, Any]:
        """Tell clients whom their DMs go to (``i -> user_id``)."""
        n = 0
        for i, user_id in targets.items():
            c = self.clients.get(int(i))
            if c is not None:
                c.dm_to = user_id
                n += 1
        return {"set": n}

    async def cmd_close_all(self) -> dict[str, Any]:
        clients = list(self.clients.values())
        self.clients.clear()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        return {"closed": len(clients)}

    # -- measured phases --------------------------------------------------
    async def cmd_reset(self, measure_from: int = MEASURE_NEVER,
                        measure_to: int = MEASURE_NEVER) -> None:
        self.stats.reset()
        self.stats.measure_from = measure_from
        self.stats.measure_to = measure_to

    async def cmd_stats(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out = self.stats.to_wire()
        out["cpu_s"] = ru.ru_utime + ru.ru_stime
        out["maxrss_kb"] = ru.ru_maxrss
        out["clients"] = len(self.clients)
        out["alive"] = sum(1 for c in self.clients.values() if not c.closed_fut.done())
        alive_rooms: dict[str, list[int]] = {}
        for c in self.clients.values():
            if not c.closed_fut.done():
                for room in c.rooms:
                    counts = alive_rooms.setdefault(room, [0, 0])
                    counts[1 if c.slow else 0] += 1
        out["alive_members"] = alive_rooms  # room -> [healthy, slow] still connected
        return out

    async def cmd_slow(self) -> dict[str, Any]:
        """Stop reading on every client whose spec says ``slow``."""
        n = 0
        for c in self.clients.values():
            if c.slow and c.transport is not None and not c.closed_fut.done():
                c.transport.underlying_transport.pause_reading()
                n += 1
        return {"paused": n}

    async def cmd_resume(self) -> dict[str, Any]:
        """Read again on paused clients (so a connection the server dropped is noticed)."""
        n = 0
        for c in self.clients.values():
            if c.slow and c.transport is not None and not c.closed_fut.done():
                c.transport.underlying_transport.resume_reading()
                n += 1
        return {"resumed": n}

    async def cmd_publish(self, pubs: list[int], t0: int, end: int, rate_per_pub: float,
                          size: int, phase: float, client_msg_id: bool = False,
                          dm_share: float = 0.0) -> dict[str, Any]:
        """Send from each publisher at a fixed rate between ``t0`` and ``end`` (ns, wall clock).

        The worker's publishers share one merged schedule: send ``j`` is due at
        ``t0 + (phase + j) * spacing`` with ``spacing = 1 / (rate_per_pub * len(pubs))``
        and goes out from publisher ``j % len(pubs)``. Whatever is due is sent at once on
        each wake-up, each message stamped with its own due time. With ``dm_share`` that
        share of the sends (spread evenly) is a ``dm`` to the client's ``dm_to`` instead;
        they are counted under ``sent["dm"]``.
        """
        clients = [self.clients[i] for i in pubs if i in self.clients]
        sent: dict[str, int] = {}
        skipped = 0
        if not clients or rate_per_pub <= 0:
            return {"sent": sent, "skipped": 0, "late_max_ms": 0.0}
        n = len(clients)
        spacing = 1e9 / (rate_per_pub * n)
        pad = "x" * max(0, size - 20)
        j = 0
        due = t0 + int(phase * spacing)
        late_max = 0
        sleep = asyncio.sleep
        dumps = orjson.dumps
        while due < end:
            now = time_ns()
            if due > now:
                await sleep((due - now) / 1e9)
                now = time_ns()
            late = now - due
            if late > late_max:
                late_max = late
            while due <= now and due < end:
                c = clients[j % n]
                if c.closed_fut.done():
                    skipped += 1
                elif dm_share and c.dm_to and int((j + 1) * dm_share) > int(j * dm_share):
                    msg = {"type": "dm", "to": c.dm_to, "text": f"{due} {pad}"}
                    if client_msg_id:
                        msg["client_msg_id"] = f"{c.spec['i']}-{j}"
                    c.transport.send(TEXT, c.encode(dumps(msg)))
                    sent["dm"] = sent.get("dm", 0) + 1
                else:
                    room = c.rooms[0]
                    msg = {"type": "message", "room": room, "text": f"{due} {pad}"}
                    if client_msg_id:
                        msg["client_msg_id"] = f"{c.spec['i']}-{j}"
                    c.transport.send(TEXT, c.encode(dumps(msg)))
                    sent[room] = sent.get(room, 0) + 1
                j += 1
                due = t0 + int((phase + j) * spacing)
        return {"sent": sent, "skipped": skipped, "late_max_ms": late_max / 1e6}

    async def cmd_churn(self, specs: list[dict[str, Any]], t0: int, rate: float,
                        concurrency: int, timeout: float) -> dict[str, Any]:
        """Run one connect/join/leave/close cycle per spec, cycle ``k`` due at ``t0 + k/rate``.

        Every timing is charged from the cycle's due time when it waits for a free
        slot; ``connect`` is the TCP + WebSocket handshake, ``welcome`` the time to the
        first server event, ``cycle`` due time to the closed socket.
        """
        hists = {k: Histogram() for k in ("connect", "welcome", "join", "leave", "cycle", "start_lag")}
        failures: dict[str, int] = {}
        sem = asyncio.Semaphore(concurrency)
        done = 0

        async def cycle(spec, due):
            nonlocal done
            async with sem:
                t_start = time_ns()
                hists["start_lag"].record(max(0, t_start - due) / 1000.0)
                client = None
                try:
                    transport, client = await self.connect(spec, timeout)
                    client.transport = transport
                    t_open = time_ns()
                    hists["connect"].record((t_open - due) / 1000.0)
                    await asyncio.wait_for(client.welcome, timeout)
                    hists["welcome"].record((time_ns() - due) / 1000.0)
                    room = spec["rooms"][0]
                    t1 = time_ns()
                    await client.request({"type": "join", "room": room, "id": "j"}, "joined", timeout)
                    t2 = time_ns()
                    hists["join"].record((t2 - t1) / 1000.0)
                    await client.request({"type": "leave", "room": room}, "left", timeout)
                    hists["leave"].record((time_ns() - t2) / 1000.0)
                    await client.close(timeout)
                    hists["cycle"].record((time_ns() - due) / 1000.0)
                    done += 1
                except Exception as exc:
                    key = f"{type(exc).__name__}: {exc}"[:160]
                    failures[key] = failures.get(key, 0) + 1
                    if client is not None and client.transport is not None:
                        client.closing = True
                        client.transport.disconnect(graceful=False)

        tasks = []
        for k, spec in enumerate(specs):
            due = t0 + int(k * 1e9 / rate)
            now = time_ns()
            if due > now:
                await asyncio.sleep((due - now) / 1e9)
            tasks.append(asyncio.ensure_future(cycle(spec, due)))
        await asyncio.gather(*tasks)
        return {"completed": done, "failures": failures,
                "hists": {k: h.to_wire() for k, h in hists.items()},
                "end": time_ns()}

    async def cmd_exit(self) -> None:
        self.loop.call_soon(self.finish)


def worker_main(conn, worker_id: int, config: dict[str, Any]) -> None:
    """Process entry point (multiprocessing target)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.environ.setdefault("PYTHONHASHSEED", "0")

    async def main():
        await Worker(conn, worker_id, config).run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
