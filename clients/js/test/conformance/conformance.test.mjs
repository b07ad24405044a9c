// The shared conformance scenarios (clients/conformance/README.md), against real wschat
// servers and a real Redis started by the harness. Each asserts, from the app's side
// (the client's events), that every acknowledged message is delivered to every member
// exactly once and in id order.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import WebSocket from "ws";
import { ChatClient, memoryOutbox } from "../../dist/index.mjs";
import { assertExactlyOnce, next, recorder, startHarness, TIMEOUT, until } from "../helpers.mjs";

let harness;
const clients = [];

before(async () => {
  harness = await startHarness();
});

after(async () => {
  for (const c of clients) c.disconnect();
  await harness?.close();
});

/** A client with short reconnect delays (the defaults are 0.5 s .. 20 s). */
function client(url, options = {}) {
  const c = new ChatClient({ url, WebSocket, minReconnectDelay: 100, maxReconnectDelay: 1000, ...options });
  clients.push(c);
  return c;
}

async function signedIn(url, sub, options = {}) {
  const token = await harness.token(sub);
  const c = client(url, { token, ...options });
  const app = recorder(c);
  await c.connect();
  return { c, app };
}

/** Signed-in clients (`[url, sub]` each) joined to `room`, as `{name, c, app}`. */
async function members(room, ...specs) {
  const joined = [];
  for (const [url, sub] of specs) {
    const m = await signedIn(url, sub);
    await m.c.join(room);
    joined.push({ name: sub, ...m });
  }
  return joined;
}

/** `c` sends to `room` every `every` ms, each send awaited, until `stop()`; `acked` fills with the ids. */
function steady(c, room, label, every = 20) {
  const acked = [];
  let on = true;
  const done = (async () => {
    for (let i = 0; on; i++) {
      acked.push((await c.send(room, `${label} ${i}`)).id);
      await new Promise((r) => setTimeout(r, every));
    }
  })();
  return {
    acked,
    async stop() {
      on = false;
      await done;
      return acked;
    },
  };
}

/** Every member has the last acknowledged message, and all of them exactly once, in order. */
async function allDelivered(room, acked, who) {
  acked.sort((x, y) => x - y);
  for (const m of who) {
    await until(() => m.app.ids(room).at(-1) === acked.at(-1), `${m.name} up to date`);
    assertExactlyOnce(m.app, room, acked, 0, m.name);
  }
}

/** Sends `n` messages from `c` to `room`, all at once; resolves with their ids. */
async function burst(c, room, n, label) {
  const acks = await Promise.all(Array.from({ length: n }, (_, i) => c.send(room, `${label} ${i}`)));
  return acks.map((m) => m.id);
}

test("connect_and_welcome", async () => {
  const s = await harness.server();
  const token = await harness.token("alice");
  const c = client(s.url, { token });
  const states = [];
  c.on("state", (e) => states.push(e.state));
  const welcome = await c.connect();
  assert.equal(c.state, "connected");
  assert.deepEqual(states, ["connecting", "connected"]);
  assert.equal(c.userId, "alice");
  assert.equal(c.username, "ALICE");
  assert.equal(welcome.authenticated, true);
  assert.equal(c.authenticated, true);

  const guest = client(s.url, { username: "visitor" });
  await guest.connect();
  assert.equal(guest.username, "visitor");
  assert.match(guest.userId, /^guest-/);
  assert.equal(guest.authenticated, false);

  c.disconnect();
  guest.disconnect();
  assert.equal(c.state, "disconnected");
});

test("join_send_ack", async () => {
  const s = await harness.server();
  const a = await signedIn(s.url, "ann");
  const b = await signedIn(s.url, "bob");
  const joined = await a.c.join("general");
  assert.equal(joined.last_id, 0);
  assert.equal(a.c.roomState("general"), "joined");
  await b.c.join("general");

  const first = await a.c.send("general", "hello");
  assert.equal(first.id, 1);
  assert.equal(first.user_id, "ann");
  const ids = [first.id, ...(await burst(a.c, "general", 19, "ann"))];
  assert.deepEqual(ids, Array.from({ length: 20 }, (_, i) => i + 1));

  await until(() => b.app.ids("general").length >= 20, "bob's 20 messages");
  assertExactlyOnce(b.app, "general", ids, 0, "bob");
  assertExactlyOnce(a.app, "general", ids, 0, "ann (own echoes)");
  assert.equal(b.app.ids("general").length, 20);

  const history = await b.c.history("general", { limit: 5 });
  assert.deepEqual(history.map((m) => m.id), [16, 17, 18, 19, 20]);
  const users = await a.c.listUsers("general");
  assert.deepEqual(users.map((u) => u.user_id).sort(), ["ann", "bob"]);

  const err = await a.c.join("no spaces allowed").catch((e) => e);
  assert.equal(err.code, "invalid_room");
  assert.equal(a.c.roomState("no spaces allowed"), "left");
  await assert.rejects(a.c.send("elsewhere", "x"), { code: "not_in_room" });
  // Presence and typing, as the server words them.
  const online = next(a.c, "presence", (e) => e.user_id === "cid");
  const [cid] = await members("general", [s.url, "cid"]);
  assert.equal((await online).status, "online");
  const typing = next(b.c, "typing", (e) => e.user_id === "cid");
  cid.c.typing("general");
  assert.equal((await typing).status, true);
  const stopped = next(b.c, "typing", (e) => e.user_id === "cid");
  cid.c.stopTyping("general");
  assert.equal((await stopped).status, false);
  const offline = next(a.c, "presence", (e) => e.user_id === "cid");
  await cid.c.leave("general");
  assert.equal((await offline).status, "offline");

  const received = next(b.c, "dm");
  const dm = await a.c.dm("bob", "psst");
  assert.equal(dm.to, "bob");
  assert.deepEqual(await received, dm);
});

test("recovery_after_server_close", async () => {
  const s = await harness.server({ backend: "redis" });
  const p = await harness.server({ backend: "redis" });
  const room = "recovery";
  const [c, pub] = await members(room, [s.url, "carol"], [p.url, "pete"]);
  const acked = await burst(pub.c, room, 5, "before");
  await until(() => c.app.ids(room).length === 5, "the first five");

  const epoch = c.c.epoch(room);
  assert.equal(typeof epoch, "string", "joined names the room's numbering");
  const rejoined = next(c.c, "joined", (e) => e.room === room && e.rejoin);
  const closed = next(c.c, "connecting");
  await harness.call(`/servers/${s.id}/stop`, { signal: "TERM" });
  assert.equal((await closed).code, 1001);
  for (let i = 0; i < 20; i++) acked.push((await pub.c.send(room, `during ${i}`)).id);
  await harness.call(`/servers/${s.id}/start`);
  const joined = await rejoined;
  assert.equal(joined.recovered, true);
  assert.equal(joined.epoch, epoch, "Redis keeps the numbering: the rejoin's epoch is the room's");
  acked.push(...(await burst(pub.c, room, 5, "after")));
  await until(() => c.app.ids(room).at(-1) === acked.at(-1), "every message at carol");
  assertExactlyOnce(c.app, room, acked, 0, "carol");
  assert.equal(c.app.events.filter((e) => e.event === "recoveryFailed").length, 0);
});

test("rolling_restart", async () => {
  const a = await harness.server({ backend: "redis" });
  const b = await harness.server({ backend: "redis" });
  const room = "rolling";
  // The URL function: A first, then B (as a load balancer would once A is gone).
  const urlFor = () => {
    let calls = 0;
    return () => (calls++ === 0 ? a.url : b.url);
  };
  const movers = await members(room, [urlFor(), "m1"], [urlFor(), "m2"], [urlFor(), "m3"]);
  const [pub] = await members(room, [b.url, "publisher"]);
  const publisher = steady(pub.c, room, "tick");
  // A member that sends through the restart too: its sends wait in the outbox (not awaited
  // one by one, so they pile up while it moves).
  const memberSends = [];
  let sending = true;
  const sender = (async () => {
    for (let i = 0; sending; i++) {
      memberSends.push(movers[0].c.send(room, `member ${i}`));
      await new Promise((r) => setTimeout(r, 50));
    }
  })();
  await until(() => publisher.acked.length >= 10, "ten messages before the restart");
  const moved = movers.map((m) => next(m.c, "joined", (e) => e.room === room && e.rejoin));
  await harness.call(`/servers/${a.id}/stop`, { signal: "TERM" });
  const rejoins = await Promise.all(moved);
  for (const j of rejoins) assert.equal(j.recovered, true);
  const afterMove = publisher.acked.length;
  await until(() => publisher.acked.length >= afterMove + 10, "ten messages after the move");
  sending = false;
  const acked = await publisher.stop();
  await sender;
  for (const m of await Promise.all(memberSends)) acked.push(m.id);
  await allDelivered(room, acked, [...movers, pub]);
});

test("redis_restart", async () => {
  const s = await harness.server({ backend: "redis" });
  const room = "outage";
  const [a, b] = await members(room, [s.url, "alba"], [s.url, "bert"]);
  const before = await burst(a.c, room, 5, "before");

  await harness.call("/redis/stop");
  const during = Array.from({ length: 10 }, (_, i) => a.c.send(room, `during ${i}`));
  // The server answers `unavailable`; the sends stay in the outbox, retried.
  await until(() => a.c.pending.length === 10, "ten sends waiting");
  await new Promise((r) => setTimeout(r, 1000)); // an outage of a second at least
  assert.equal(a.c.pending.length, 10);
  await harness.call("/redis/start");
  const acked = [...before, ...(await Promise.all(during)).map((m) => m.id)];
  assert.equal(a.c.pending.length, 0);
  for (let i = 1; i < acked.length; i++) assert.ok(acked[i] > acked[i - 1], `ids went back: ${acked}`);
  const last = (await a.c.send(room, "after")).id;
  acked.push(last);
  for (const [name, m] of [["alba", a], ["bert", b]]) {
    await until(() => m.app.ids(room).at(-1) === last, `${name} up to date`);
    assertExactlyOnce(m.app, room, acked, 0, name, { contiguous: false });
  }
});

test("auth answered unavailable (Redis away): the client signs in again, its session kept", async () => {
  // The store goes away between the upgrade (admitted while Redis answered) and the client's
  // `auth`: the server registers nothing and answers `unavailable` (retry later). The socket
  // holds that first `auth` until Redis is stopped, so the answer is `unavailable` every time.
  // A fixed token, no getToken: the client must not take it for a refused token (4001, stop).
  const s = await harness.server({ backend: "redis" });
  const room = "signin";
  const [b] = await members(room, [s.url, "bob"]);
  let held = null;
  let release;
  class HoldFirstAuth extends WebSocket {
    send(data, ...rest) {
      if (release === undefined && JSON.parse(String(data)).type === "auth") {
        release = () => super.send(data, ...rest);
        held = String(data);
        return;
      }
      super.send(data, ...rest);
    }
  }
  const c = client(s.url, { token: await harness.token("ann"), WebSocket: HoldFirstAuth });
  const app = recorder(c);
  c.join(room).catch(() => {}); // wanted before connecting: joined once signed in
  const queued = c.send(room, "queued before signing in");
  const connected = c.connect();
  await until(() => held !== null, "the first auth on the wire");
  await harness.call("/redis/stop");
  await until(async () => (await fetch(`${s.http}/ready`)).status === 503, "the server seeing Redis away");
  const refused = next(c, "error", (e) => e.code === "unavailable");
  release();
  await refused;
  await harness.call("/redis/start");
  await connected;
  assert.equal(c.userId, "ann");
  assert.equal(c.authenticated, true);
  await until(() => c.roomState(room) === "joined", "the room joined");
  const sent = [(await queued).id, (await c.send(room, "after signing in")).id];
  await until(() => b.app.ids(room).includes(sent[1]), "bob has ann's messages");
  assertExactlyOnce(b.app, room, sent, 0, "bob", { contiguous: false });
  const stops = app.events.filter((e) => e.event === "disconnected" || (e.event === "error" && e.payload.code === "closed"));
  assert.deepEqual(stops, []);
});

test("kill_worker", async () => {
  const s = await harness.server({ backend: "redis", workers: 2 });
  const room = "crash";
  const all = await members(room, ...Array.from({ length: 8 }, (_, i) => [s.url, `k${i}`]));
  // A publisher keeps sending (every send awaited) through the kill and past the rejoins.
  const publisher = steady(all[0].c, room, "tick");
  await until(() => publisher.acked.length >= 5, "five messages before the kill");
  // The kernel may have handed every connection to one worker: if the first victim held
  // none, the next kill takes the other original worker (the harness kills the lowest pid).
  const cut = (m) => m.app.events.some((e) => e.event === "connecting" && e.payload.code === 1006);
  let moved = [];
  for (let kill = 0; kill < 2 && moved.length === 0; kill++) {
    await harness.call(`/servers/${s.id}/kill-worker`);
    const found = () => (all.some(cut) ? all.filter(cut) : null);
    moved = await until(found, "a client on the killed worker", 2000).catch(() => []);
  }
  assert.ok(moved.length >= 1, "no client was on either killed worker");
  await until(() => moved.every((m) => m.c.roomState(room) === "joined"), "the rejoins");
  const rejoined = publisher.acked.length;
  // Every member sends once more: those that were on the dead worker from a new connection.
  const sends = all.map((m) => m.c.send(room, `after from ${m.name}`));
  await until(() => publisher.acked.length >= rejoined + 10, "ten messages after the rejoins");
  const acked = await publisher.stop();
  for (const m of await Promise.all(sends)) acked.push(m.id);
  await allDelivered(room, acked, all);
});

test("token_refresh", async () => {
  const s = await harness.server();
  const ttl = 4;
  const calls = [];
  const getToken = async () => {
    calls.push(Date.now());
    return harness.token("tess", ttl);
  };
  const c = client(s.url, { getToken });
  const app = recorder(c);
  await c.connect();
  await c.join("tokens");
  assert.equal(calls.length, 1);
  // Past the first token's expiry plus the server's 5 s JWT_LEEWAY: refreshed in time, never closed.
  const firstExpiry = calls[0] + ttl * 1000 + 5000;
  await until(() => calls.length >= 3, "two refreshes", 4 * ttl * 1000 + TIMEOUT);
  await until(() => Date.now() > firstExpiry + 1000, "the first token's end", 2 * TIMEOUT);
  assert.ok((await c.listUsers("tokens")).some((u) => u.user_id === "tess"), "the session still answers");
  const closes = app.events.filter((e) => e.event === "connecting" && e.payload.code !== undefined);
  assert.deepEqual(closes, []);
  assert.ok(!app.events.some((e) => e.event === "error" && e.payload.code === "token_expired"));
  assert.equal(c.state, "connected");
  assert.equal((await c.send("tokens", "still here")).user_id, "tess");

  // A reconnect asks the callback again.
  const before = calls.length;
  await harness.call(`/servers/${s.id}/stop`, { signal: "TERM" });
  await harness.call(`/servers/${s.id}/start`);
  await until(() => c.state === "connected" && calls.length > before, "a reconnect with a fresh token");
  assert.equal(c.userId, "tess");
});

test("user_changed_on_refresh", async () => {
  // The refresh's token is ben's (rooms claim ["open"]): the server left every room of the
  // connection, with no left. The client says so once and joins each room again with since:
  // open as ben, with what was posted from the refresh on exactly once; closed is refused.
  const s = await harness.server();
  let ready;
  const setUp = new Promise((r) => (ready = r));
  const issued = [];
  const getToken = async () => {
    issued.push(issued.length === 0 ? "ann" : "ben");
    if (issued.length === 1) return harness.token("ann", 4);
    await setUp; // ann has seen 1..3 of each room
    return harness.token("ben", 3600, "Ben", { rooms: ["open"] });
  };
  const c = client(s.url, { getToken });
  const app = recorder(c);
  const changed = [];
  const removed = [];
  c.on("userChanged", (w) => changed.push(w));
  c.on("removed", (e) => removed.push(e));
  await c.connect();
  assert.equal(c.userId, "ann");
  const { c: pub } = await signedIn(s.url, "pat");
  for (const room of ["open", "closed"]) {
    await c.join(room);
    await pub.join(room);
  }
  const before = await burst(pub, "open", 3, "open before");
  await burst(pub, "closed", 3, "closed before");
  await until(() => app.ids("open").length === 3 && app.ids("closed").length === 3, "1..3 of each room at ann");
  const publisher = steady(pub, "open", "across the refresh");
  ready();
  await until(() => removed.length === 1 && c.roomState("open") === "joined" && changed.length === 1, "the rejoins", 4 * TIMEOUT);
  assert.deepEqual(changed.map((w) => [w.user_id, w.username, w.authenticated]), [["ben", "Ben", true]]);
  assert.equal(c.userId, "ben");
  assert.deepEqual(removed.map((e) => [e.room, e.reason]), [["closed", "forbidden"]]);
  const users = (await c.listUsers("open")).map((u) => u.user_id);
  assert.ok(users.includes("ben") && !users.includes("ann"), `open's users: ${users}`);
  const rejoined = publisher.acked.length;
  await until(() => publisher.acked.length >= rejoined + 5, "five messages after the rejoin");
  const mine = await c.send("open", "as ben");
  assert.equal(mine.user_id, "ben");
  const acked = [...before, ...(await publisher.stop()), mine.id];
  await allDelivered("open", acked, [{ name: "ann/ben", app }]);
  assert.deepEqual(app.ids("closed"), [1, 2, 3]);
  assert.ok(!app.events.some((e) => e.event === "disconnected"), "the connection was kept");
});

test("outbox_resend", async () => {
  const s = await harness.server();
  const room = "outbox";
  // The test holds the client's sockets so it can cut them without a close handshake.
  const sockets = [];
  class Tapped extends WebSocket {
    constructor(url) {
      super(url);
      sockets.push(this);
    }
    send(data) {
      if (["message", "dm"].includes(JSON.parse(data).type)) framesSent++;
      super.send(data);
    }
  }
  let framesSent = 0;
  const a = await signedIn(s.url, "otto", { WebSocket: Tapped });
  const b = await signedIn(s.url, "olga");
  await a.c.join(room);
  await b.c.join(room);

  const bobDms = [];
  b.c.on("dm", (m) => bobDms.push(m.id));

  // Sends in flight when the socket is cut: some reach the server, their echo is lost.
  // A rejoin's replay acknowledges room messages that arrived; DMs have no replay, so
  // theirs are resent and the server's dedupe answers with the original.
  const dmsInFlight = Array.from({ length: 10 }, (_, i) => a.c.dm("olga", `dm ${i}`));
  const inFlight = Array.from({ length: 20 }, (_, i) => a.c.send(room, `cut ${i}`));
  await until(() => sockets.at(-1).bufferedAmount === 0, "the sends on the wire");
  const lost = next(a.c, "connecting");
  sockets.at(-1)._socket.destroy();
  const reconnected = next(a.c, "connected");
  // Sends made while disconnected wait in the outbox and go out in order after the reconnect.
  assert.equal((await lost).code, 1006);
  assert.equal(a.c.state, "connecting");
  const offline = Array.from({ length: 5 }, (_, i) => a.c.send(room, `offline ${i}`));
  await reconnected;
  const cut = await Promise.all(inFlight);
  const dms = (await Promise.all(dmsInFlight)).map((m) => m.id);
  assert.equal(new Set(dms).size, 10, "a DM acknowledged twice under two ids");
  await until(() => bobDms.length >= 10, "olga's ten DMs");
  assert.deepEqual([...bobDms].sort((x, y) => x - y), [...dms].sort((x, y) => x - y), "DMs lost or doubled");
  const queued = await Promise.all(offline);
  const acked = [...cut, ...queued].map((m) => m.id);
  assert.equal(new Set(acked).size, 25, "a send acknowledged twice under two ids");
  const offlineIds = queued.map((m) => m.id);
  assert.deepEqual(offlineIds, [...offlineIds].sort((x, y) => x - y), "offline sends out of order");
  assert.ok(Math.min(...offlineIds) > Math.max(...cut.map((m) => m.id)), "offline sends before older ones");
  assert.equal(a.c.pending.length, 0);
  const texts = (await b.c.history(room, { limit: 100 })).map((m) => m.text);
  assert.equal(texts.length, 25, `the server stored ${texts.length} messages: ${texts}`);
  // Resends happened (the cut lost echoes), and the server kept each message once.
  assert.ok(framesSent > 35, `nothing was resent (${framesSent} frames)`);
  for (const [name, m] of [["otto", a], ["olga", b]]) {
    await until(() => m.app.ids(room).length === 25, `${name}'s 25 messages`);
    assertExactlyOnce(m.app, room, acked, 0, name);
  }
});

test("outbox_resend across a page reload (persisted outbox)", async () => {
  const s = await harness.server();
  const room = "reload";
  const store = memoryOutbox();
  const token = await harness.token("rita");
  const b = await signedIn(s.url, "rolf");
  await b.c.join(room);
  const before = client(s.url, { token, outboxStorage: store });
  await before.connect();
  await before.join(room);
  // The page sends, then goes away before any echo arrives (the sends did reach the server).
  for (let i = 0; i < 10; i++) void before.send(room, `reload ${i}`).catch(() => {});
  assert.equal(store.entries.length, 10);
  before.disconnect();

  const after = client(s.url, { token, outboxStorage: store });
  const app = recorder(after);
  const acks = [];
  after.on("ack", (m) => acks.push(m));
  await after.connect();
  await after.join(room);
  await until(() => acks.length === 10, "the restored sends acknowledged");
  assert.equal(store.entries.length, 0);
  assert.deepEqual(acks.map((m) => m.text), Array.from({ length: 10 }, (_, i) => `reload ${i}`));
  const ids = acks.map((m) => m.id);
  // The new page shows only what came after its join: each once, in order (the server may
  // have taken the old page's last sends after the new page joined, or only from the resend).
  const shown = app.ids(room);
  assert.deepEqual(shown, [...new Set(shown)].sort((x, y) => x - y));
  assert.ok(shown.every((id) => ids.includes(id)));
  await until(() => b.app.ids(room).length === 10, "rolf's ten messages");
  assertExactlyOnce(b.app, room, ids, 0, "rolf");
  assert.equal((await b.c.history(room)).length, 10, "the server stored a resend twice");
});

/** An HS256 JWT with extra claims (the harness's /token signs only sub, name and ttl). */
function signed(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
  return `${body}.${createHmac("sha256", harness.secret).update(body).digest("base64url")}`;
}

test("moderation against the server: kick is a removed room, mute rejects sends", async () => {
  const s = await harness.server();
  const room = "moderated";
  const mod = client(s.url, { token: signed({ sub: "mia", name: "Mia", mod_rooms: [room] }) });
  await mod.connect();
  await mod.join(room);
  const [user] = await members(room, [s.url, "ulf"]);
  const removed = next(user.c, "removed");
  assert.deepEqual(await mod.kick(room, "ulf", { reason: "spam" }), { action: "kick", room, user_id: "ulf" });
  const event = await removed;
  assert.equal(event.room, room);
  assert.equal(event.reason, "spam");
  assert.equal(event.by, "mia");
  assert.equal(user.c.roomState(room), "left");
  await assert.rejects(user.c.send(room, "still here?"), { code: "not_in_room" });

  await user.c.join(room); // a kick is not a ban
  const muted = next(user.c, "muted");
  const reply = await mod.mute(room, "ulf", { duration: 60 });
  assert.equal(reply.action, "mute");
  assert.ok(reply.until > Date.now());
  assert.equal((await muted).room, room);
  const err = await user.c.send(room, "let me speak").catch((e) => e);
  assert.equal(err.code, "muted");
  assert.equal(err.details.until, reply.until);
  assert.equal(user.c.pending.length, 0);
  await mod.unmute(room, "ulf");
  assert.equal((await user.c.send(room, "thanks")).text, "thanks");
  await assert.rejects(user.c.kick(room, "mia"), { code: "forbidden" });
});

test("memory server restart: its ids start over, and the clients follow", async () => {
  const s = await harness.server();
  const room = "amnesia";
  const [a, b] = await members(room, [s.url, "amy"], [s.url, "ben"]);
  await burst(a.c, room, 5, "before");
  await until(() => b.app.ids(room).length === 5, "ben's five");
  const forgotten = [a, b].map((m) => next(m.c, "recoveryFailed", (e) => e.room === room));
  await harness.call(`/servers/${s.id}/stop`, { signal: "TERM" });
  await harness.call(`/servers/${s.id}/start`);
  await Promise.all(forgotten);
  const after = await burst(a.c, room, 3, "after");
  assert.deepEqual(after, [1, 2, 3]);
  await until(() => b.app.ids(room).length === 8, "ben's three new messages");
  assert.deepEqual(b.app.ids(room), [1, 2, 3, 4, 5, 1, 2, 3]);
  assert.equal(b.app.text(room, 3), "after 2");
});

test("memory server restart while away: the rejoin's epoch tells the new numbering, none of it is replayed as ours", async () => {
  // Bea is away while the server restarts and Ann writes past Bea's last id in the new
  // numbering. Before epochs her rejoin (since 3) was answered recovered: true with the new
  // 4 and 5 as what followed her 3.
  const s = await harness.server();
  const room = "numbering";
  const [a, b] = await members(room, [s.url, "ann"], [s.url, "bea"]);
  await burst(a.c, room, 3, "old");
  await until(() => b.app.ids(room).length === 3, "bea's three");
  const oldEpoch = b.app.events.find((e) => e.event === "joined").payload.epoch;
  b.c.disconnect();
  const annBack = next(a.c, "joined", (e) => e.room === room && e.rejoin);
  await harness.call(`/servers/${s.id}/stop`, { signal: "TERM" });
  await harness.call(`/servers/${s.id}/start`);
  await annBack;
  assert.deepEqual(await burst(a.c, room, 5, "new"), [1, 2, 3, 4, 5]);
  const rejoined = next(b.c, "joined", (e) => e.room === room && e.rejoin);
  await b.c.connect();
  const joined = await rejoined;
  assert.deepEqual([joined.recovered, joined.last_id, joined.epochChanged], [false, 5, true]);
  assert.equal(b.c.lastId(room), 5, "the new numbering's last id");
  const [live] = await burst(a.c, room, 1, "live");
  assert.equal(live, 6);
  await until(() => b.app.ids(room).at(-1) === 6, "bea's next live message");
  assert.deepEqual(b.app.ids(room), [1, 2, 3, 6], "nothing of the new numbering taken for what followed 3");
  assert.equal(b.app.text(room, 3), "old 2");
  assert.equal(b.app.text(room, 6), "live 0");
  const failed = b.app.events.filter((e) => e.event === "recoveryFailed").map((e) => e.payload);
  assert.deepEqual(failed, [{ room, since: 3, last_id: 5, epochChanged: true }]);
  assert.equal(typeof oldEpoch, "string", "joined names the room's numbering");
  assert.notEqual(joined.epoch, oldEpoch);
  assert.equal(b.c.epoch(room), joined.epoch);
  assert.equal(b.c.lastId(room), 6);
});

test("memory server restart: its DM ids start over, and the new DMs are delivered, not dropped as doubles", async () => {
  // Without persistence a restarted server numbers DMs from 1 again; the client kept the ids
  // of the DMs it had and dropped the new 1 and 2 as doubles of them, unannounced.
  const s = await harness.server();
  const amy = await signedIn(s.url, "dmamy");
  const ben = await signedIn(s.url, "dmben");
  const texts = [];
  amy.c.on("dm", (m) => texts.push(m.text));
  for (const text of ["before 0", "before 1"]) await ben.c.dm(amy.c.userId, text);
  await until(() => texts.length === 2, "amy's two DMs");
  const back = [amy, ben].map((m) => next(m.c, "connected"));
  await harness.call(`/servers/${s.id}/stop`, { signal: "TERM" });
  await harness.call(`/servers/${s.id}/start`);
  await Promise.all(back);
  const ids = [];
  for (const text of ["after 0", "after 1", "after 2"]) ids.push((await ben.c.dm(amy.c.userId, text)).id);
  assert.deepEqual(ids, [1, 2, 3], "the restarted server numbers DMs from 1");
  await until(() => texts.at(-1) === "after 2", "amy's last DM");
  assert.deepEqual(texts, ["before 0", "before 1", "after 0", "after 1", "after 2"]);
});

/** The server's count of `rate_limited` refusals so far (its `/metrics/json`). */
async function refusals(s) {
  const r = await fetch(`${s.metrics}/metrics/json`, { signal: AbortSignal.timeout(TIMEOUT) });
  return (await r.json()).rate_limited;
}

test("rate limit: a burst past it is paced after the first rate_limited, drawing few refusals; all arrive once, in order", async () => {
  // 20 at once, then 50 a second. Refilling the whole window after every pause drew ~15
  // refusals per message (over 1,100 for these 100).
  const s = await harness.server({ env: { RATE_LIMIT: "50", RATE_LIMIT_BURST: "20" } });
  const room = "pace";
  const [dora] = await members(room, [s.url, "dora"]);
  const before = await refusals(s);
  const sent = await Promise.all(Array.from({ length: 100 }, (_, i) => dora.c.send(room, `m${i}`)));
  const refused = (await refusals(s)) - before;
  assert.ok(refused <= 40, `${refused} rate_limited refusals for 100 sends`);
  assert.deepEqual(dora.app.events.filter((e) => e.event === "disconnected"), []);
  // The app is told, once per refusal, for how long sends wait (a page says "slow down").
  const told = dora.app.events.filter((e) => e.event === "rateLimited");
  assert.ok(told.length >= 1 && told.length <= refused, `${told.length} rateLimited events, ${refused} refusals`);
  for (const { payload, t } of told) {
    assert.ok(payload.retryAfterMs > 0 && Math.abs(payload.until - (t + payload.retryAfterMs)) <= 5, JSON.stringify(payload));
  }
  const ids = sent.map((m) => m.id);
  const upTo = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);
  assert.deepEqual([...ids].sort((x, y) => x - y), upTo(1, 100), "a send lost or stored twice");
  assert.deepEqual(ids, upTo(1, 100), "stored in another order than sent");
  await until(() => dora.app.ids(room).length >= 100, "every message delivered");
  assert.deepEqual(dora.app.ids(room), upTo(1, 100));
  for (const m of sent) assert.equal(dora.app.text(room, m.id), m.text);
});

test("rate limit: a refusal another connection of the user caused does not slow this one", async () => {
  // The bucket is the user's: a phone writes once and is quiet, a laptop of the same user
  // empties the bucket, the phone's next send is refused (retry_after 100 ms). The phone's
  // quiet spell is not the server's pace: its 4 sends go at about the server's 10 a second.
  const s = await harness.server({ env: { RATE_LIMIT: "10", RATE_LIMIT_BURST: "5" } });
  const room = "r";
  const [phone, laptop] = await members(room, [s.url, "ann"], [s.url, "ann"]);
  await phone.c.send(room, "hello", { timeout: TIMEOUT }); // the phone's write before the refused one
  await new Promise((r) => setTimeout(r, 1500)); // the scenario: a quiet spell (no event to await)
  const before = await refusals(s);
  await Promise.all(Array.from({ length: 5 }, (_, i) => laptop.c.send(room, `laptop ${i}`, { timeout: TIMEOUT })));
  const started = Date.now();
  for (let i = 0; i < 4; i++) await phone.c.send(room, `phone ${i}`, { timeout: TIMEOUT });
  const took = Date.now() - started;
  assert.ok((await refusals(s)) > before, "the phone was never refused");
  assert.ok(took < 1200, `4 sends took ${took} ms (pacer interval ${phone.c.pacer.interval} ms)`);
});

test("refused upgrade: a full server's 503 Retry-After is waited before reconnecting", async () => {
  // MAX_CONNECTIONS=1: the second client's upgrade gets 503 with Retry-After: 5. Its own
  // backoff (50 .. 200 ms) must not bring it back sooner, even once a slot is free.
  const retryAfter = 5000;
  const s = await harness.server({ env: { MAX_CONNECTIONS: "1" } });
  const first = client(s.url, { token: await harness.token("ann") });
  await first.connect();
  const second = client(s.url, { token: await harness.token("bea"), minReconnectDelay: 50, maxReconnectDelay: 200 });
  const refused = next(second, "connecting", (e) => e.attempt === 1);
  void second.connect();
  const refusal = await refused;
  const refusedAt = Date.now();
  assert.ok(refusal.delay >= retryAfter - 50, `reconnecting in ${refusal.delay} ms after ${refusal.code} ${refusal.reason}`);
  assert.equal(refusal.reason, "HTTP 503");
  const connected = next(second, "connected", () => true, retryAfter + TIMEOUT);
  first.disconnect(); // a slot is free now: only Retry-After holds the second back
  await connected;
  const waited = Date.now() - refusedAt;
  assert.ok(waited >= retryAfter - 5, `reconnected ${waited} ms after the 503`);
});

test("refused upgrade: 403, 400 and 404 stop the client instead of reconnecting forever", async () => {
  // Retrying gets the same answer: an Origin not in ALLOWED_ORIGINS (403), a guest name the
  // server refuses (400), a path that is not the WebSocket endpoint (404). As the Python and
  // Rust clients do, the client stops: `disconnected` with the status, `error` and a rejected
  // `connect()` with `closed` and `closeCode`, and no second attempt (its 50 .. 200 ms backoff
  // would have made a few in the half second waited).
  const s = await harness.server({ env: { ALLOWED_ORIGINS: "http://chat.example" } });
  let attempts = 0;
  class FromElsewhere extends WebSocket {
    constructor(url) {
      super(url, { origin: "http://elsewhere.example" }); // what a browser on another site sends
      attempts++;
    }
  }
  const cases = [
    [403, s.url, { username: "ann", WebSocket: FromElsewhere }],
    [400, s.url, { username: "no/slashes" }],
    [404, s.url.replace(/\/ws$/, "/nowhere"), { username: "ann" }],
  ];
  for (const [status, url, options] of cases) {
    const c = client(url, { minReconnectDelay: 50, maxReconnectDelay: 200, ...options });
    const app = recorder(c);
    const err = await Promise.race([
      c.connect().then(() => assert.fail(`connected despite ${status}`), (e) => e),
      new Promise((r) => setTimeout(r, 5000)),
    ]);
    const retries = app.events.filter((e) => e.event === "connecting");
    assert.ok(err, `${status}: still trying after 5 s, ${retries.length} attempts, the last: ${JSON.stringify(retries.at(-1)?.payload)}`);
    assert.equal(err.code, "closed", `${status}: ${err}`);
    assert.equal(err.closeCode, status);
    await new Promise((r) => setTimeout(r, 500));
    const seen = app.events.filter((e) => ["connecting", "disconnected", "error"].includes(e.event));
    assert.deepEqual(
      seen.map((e) => [e.event, e.payload.code, e.payload.closeCode, e.payload.reconnect]),
      [["error", "closed", status, undefined], ["disconnected", status, undefined, false]],
      `${status}: ${JSON.stringify(seen)}`,
    );
    assert.equal(c.state, "disconnected");
  }
  assert.equal(attempts, 1, "upgrades sent with the refused Origin");
});

test("TLS: a certificate that fails verification stops the client with 1015 and its cause, no retry loop", async () => {
  // wss:// through the harness's TLS front (a certificate its CA signed, made at run time). A
  // certificate no retry changes, signed by a CA not trusted here or made for another host
  // name, stops the client at the first attempt, as in the Python and Rust clients:
  // `connect()` rejects with `closed` and closeCode 1015 (RFC 6455: a failed TLS handshake),
  // the message naming the problem, and a `join` waiting for the connection rejects too. It
  // used to reconnect with the backoff for ever, the cause nowhere.
  const s = await harness.server();
  const untrusted = await harness.call(`/servers/${s.id}/tls`);
  const otherHost = await harness.call(`/servers/${s.id}/tls`, { hostname: "wrong.invalid" });
  const ca = readFileSync(untrusted.ca);
  class TrustingTheCa extends WebSocket {
    constructor(url) {
      super(url, { ca }); // the README's way to trust a private CA
    }
  }
  const cases = [
    ["untrusted", untrusted.url, {}, /UNABLE_TO_VERIFY_LEAF_SIGNATURE/],
    ["another host name", otherHost.url, { WebSocket: TrustingTheCa }, /ERR_TLS_CERT_ALTNAME_INVALID.*wrong\.invalid/],
  ];
  for (const [what, url, options, cause] of cases) {
    const c = client(url, { username: "ann", minReconnectDelay: 50, maxReconnectDelay: 200, ...options });
    const app = recorder(c);
    const connecting = c.connect().then(() => assert.fail(`${what}: connected`), (e) => e);
    const joining = c.join("general").then(() => assert.fail(`${what}: joined`), (e) => e);
    const timeUp = new Promise((r) => setTimeout(r, 5000, null));
    const err = await Promise.race([connecting, timeUp]);
    const retries = app.events.filter((e) => e.event === "connecting");
    assert.ok(err, `${what}: still trying after 5 s, ${retries.length} attempts, the last: ${JSON.stringify(retries.at(-1)?.payload)}`);
    assert.equal(err.code, "closed", `${what}: ${err}`);
    assert.equal(err.closeCode, 1015, `${what}: ${err}`);
    assert.match(err.message, /TLS certificate verification failed/, what);
    assert.match(err.message, cause, what);
    const joinErr = await Promise.race([joining, timeUp]);
    assert.ok(joinErr, `${what}: the join still waits`);
    assert.match(joinErr.message, cause, `${what}: ${joinErr}`);
    await new Promise((r) => setTimeout(r, 500));
    const seen = app.events.filter((e) => ["connecting", "disconnected", "error"].includes(e.event));
    assert.deepEqual(
      seen.map((e) => [e.event, e.payload.code, e.payload.closeCode, e.payload.reconnect]),
      [["error", "closed", 1015, undefined], ["disconnected", 1015, undefined, false]],
      `${what}: ${JSON.stringify(seen)}`,
    );
    assert.match(seen[1].payload.reason, cause, what);
    assert.equal(c.state, "disconnected");
  }
});

test("TLS: a private CA given to ws as `ca` is trusted", async () => {
  const s = await harness.server();
  const front = await harness.call(`/servers/${s.id}/tls`);
  const ca = readFileSync(front.ca);
  class TrustingTheCa extends WebSocket {
    constructor(url) {
      super(url, { ca });
    }
  }
  const c = client(front.url, { username: "ann", WebSocket: TrustingTheCa });
  await c.connect();
  await c.join("general");
  const sent = await c.send("general", "over TLS");
  assert.equal(sent.text, "over TLS");
});

test("TLS: once connected, a certificate failure on a reconnect is an outage: retried, and the client is back by itself when it is fixed", async () => {
  // A client that has had a `welcome` since `connect()` takes a certificate that fails
  // verification on a reconnect for a server-side incident (a certificate expired or rotated
  // wrongly): each attempt is an `error` (`tls_certificate`, closeCode 1015) and a
  // `connecting` with code 1015, the reason naming the problem; rooms and outbox are kept,
  // and once the front's certificate is trusted again it reconnects, re-joins with `since`
  // and sends what was queued, once. It used to stop for good (`closed` 1015), the queued
  // send waiting for a restart of the app. A `connect()` after `disconnect()` is a first
  // connection again: a failure stops it.
  const s = await harness.server();
  const front = await harness.call(`/servers/${s.id}/tls`);
  const swap = `/fronts/${front.front}/certificate`;
  const ca = readFileSync(front.ca);
  class TrustingTheCa extends WebSocket {
    constructor(url) {
      super(url, { ca });
    }
  }
  const { c: bob, app: seen } = await signedIn(s.url, "bob");
  await bob.join("general");
  const c = client(front.url, { username: "ann", WebSocket: TrustingTheCa, minReconnectDelay: 50, maxReconnectDelay: 200 });
  const app = recorder(c);
  await c.connect();
  await c.join("general");
  const before = await c.send("general", "before");

  await harness.call(swap, { issuer: "unknown", drop: true });
  const failures = () => app.events.filter((e) => e.event === "connecting" && e.payload.code === 1015);
  await until(() => failures().length >= 2, "two failed attempts");
  assert.match(failures()[0].payload.reason, /TLS certificate verification failed: UNABLE_TO_VERIFY_LEAF_SIGNATURE/);
  const errors = app.events.filter((e) => e.event === "error").map((e) => e.payload);
  assert.ok(errors.length >= 1, "no error event");
  assert.ok(errors.every((e) => e.code === "tls_certificate" && e.closeCode === 1015), JSON.stringify(errors));
  assert.match(errors[0].message, /UNABLE_TO_VERIFY_LEAF_SIGNATURE/);
  assert.deepEqual(app.events.filter((e) => e.event === "disconnected"), []);
  assert.equal(c.state, "connecting");
  const during = c.send("general", "during");
  await until(() => c.pending.length === 1, "the send queued");
  assert.deepEqual(c.pending.map((p) => p.text), ["during"]);

  await harness.call(swap, { issuer: "ca" });
  const sent = await during;
  assert.equal(sent.text, "during");
  assert.equal(sent.id, before.id + 1);
  await until(() => seen.ids("general").includes(sent.id), "during at bob");
  assert.equal(c.state, "connected");
  assert.deepEqual(app.events.filter((e) => e.event === "joined").map((e) => e.payload.rejoin), [false, true]);
  const history = await bob.history("general");
  assert.deepEqual(history.map((m) => [m.id, m.text]), [[before.id, "before"], [sent.id, "during"]]);
  assert.deepEqual(seen.ids("general"), [before.id, sent.id]);

  // A new start: never connected since this connect(), so the failure stops it again.
  c.disconnect();
  await harness.call(swap, { issuer: "unknown" });
  const err = await c.connect().then(() => assert.fail("connected"), (e) => e);
  assert.equal(err.closeCode, 1015, String(err));
  assert.equal(app.events.at(-1).event, "disconnected");
  assert.equal(app.events.at(-1).payload.code, 1015);
});

test("many rooms: joining 80 rooms at once stays within the request bucket (no 4102 flooding close), at connect and after a reconnect", async () => {
  // RATE_LIMIT_REQUESTS_BURST is 100 by default (5 x RATE_LIMIT_BURST) and MAX_ROOMS_PER_CONNECTION
  // 100: a join and a ping written per room drew over 2 x RATE_LIMIT_BURST refusals in a row,
  // and the server closed the connection with 4102, on every attempt again.
  const s = await harness.server({ env: { RATE_LIMIT: "10", RATE_LIMIT_BURST: "20" } }); // the defaults
  const { c, app } = await signedIn(s.url, "manny");
  const rooms = Array.from({ length: 80 }, (_, i) => `many-${i}`);
  const closes = [];
  c.on("connecting", (e) => closes.push(e.code));
  const refused = [];
  c.on("error", (e) => refused.push(e.code));
  const joins = await Promise.allSettled(rooms.map((r) => c.join(r, { timeout: 4 * TIMEOUT })));
  assert.deepEqual({ closes, failed: joins.filter((j) => j.status === "rejected").length, refused: refused.length },
    { closes: [], failed: 0, refused: 0 }, "joined without a close");
  const sent = await c.send(rooms.at(-1), "after 80 joins");
  assert.equal(sent.id, 1);
  // A rolling restart moves the client: it joins all 80 again, with since.
  const rejoined = rooms.map((r) => next(c, "joined", (e) => e.room === r && e.rejoin, 8 * TIMEOUT));
  await harness.call(`/servers/${s.id}/stop`, { signal: "TERM" });
  await harness.call(`/servers/${s.id}/start`);
  await Promise.all(rejoined);
  assert.deepEqual(closes.filter((code) => code === 4102), [], "no flooding close after the restart");
  assert.equal((await c.send(rooms[0], "after the rejoins")).text, "after the rejoins");
  assert.ok(app.events.length > 0);
});

test("many rooms, two tabs: 70 rooms joined and rejoined after a cut by two connections of one user are paced, never closed with 4102", async () => {
  // They share the user's request bucket (RATE_LIMIT_REQUESTS_BURST 5 here). Every join was
  // written at once: 5 joined, then over 2 x RATE_LIMIT_BURST (20) refusals in a row and the
  // server closed the connection with 4102, reconnected and did it again. Now at most 4 joins
  // are on the wire, and a refused one holds them all back until its retry_after_ms. The
  // refusals in a row: the window's 4, and a few more when the other tab keeps taking the
  // tokens (each doubles the pause).
  const s = await harness.server({ env: { RATE_LIMIT_BURST: "10", RATE_LIMIT_REQUESTS: "50", RATE_LIMIT_REQUESTS_BURST: "5" } });
  const rooms = Array.from({ length: 70 }, (_, i) => `tabs-${i}`);
  const tabs = [];
  for (let n = 0; n < 2; n++) {
    const sockets = [];
    const seen = []; // "r" a rate_limited refusal, "j" a joined, in arrival order
    class Tapped extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols);
        sockets.push(this);
        this.addEventListener("message", (e) => {
          const type = JSON.parse(String(e.data));
          if (type.type === "error" && type.code === "rate_limited") seen.push("r");
          else if (type.type === "joined") seen.push("j");
        });
      }
    }
    const tab = await signedIn(s.url, "tabby", { WebSocket: Tapped });
    const closes = [];
    tab.c.on("connecting", (e) => closes.push(e.code));
    tabs.push({ ...tab, sockets, seen, closes });
  }
  const joins = tabs.flatMap(({ c }) => rooms.map((r) => c.join(r, { timeout: 4 * TIMEOUT })));
  assert.equal((await Promise.all(joins)).length, 140);
  const rejoined = tabs.flatMap(({ c }) => rooms.map((r) => next(c, "joined", (e) => e.room === r && e.rejoin, 4 * TIMEOUT)));
  for (const { sockets } of tabs) sockets.at(-1)._socket.destroy();
  await Promise.all(rejoined);
  for (const { c, closes, seen } of tabs) {
    assert.deepEqual(closes.filter((code) => code !== 1006), [], "no close but the cut");
    assert.equal(c.state, "connected");
    assert.deepEqual(rooms.filter((r) => c.roomState(r) !== "joined"), []);
    const longest = Math.max(...seen.join("").split("j").map((run) => run.length));
    assert.ok(seen.includes("r"), "the bucket was never empty: the test tests nothing");
    assert.ok(longest < 20, `${longest} refusals in a row: ${seen.join("")}`);
  }
});

/** A WebSocket class that records the frames it sends and the rate_limited refusals it gets ("r"; "a" any other). */
function tapped() {
  const tap = { written: [], seen: [] };
  tap.WebSocket = class extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      this.addEventListener("message", (e) => {
        const msg = JSON.parse(String(e.data));
        tap.seen.push(msg.type === "error" && msg.code === "rate_limited" ? "r" : "a");
      });
    }
    send(data, ...rest) {
      tap.written.push({ at: Date.now(), type: JSON.parse(String(data)).type });
      return super.send(data, ...rest);
    }
  };
  return tap;
}

test("requests: 120 reads at once against a request burst of 25 are paced, all answered, never closed with 4102", async () => {
  // Every request was written at once: 25 answered, then over 2 x RATE_LIMIT_BURST (20)
  // refusals in a row and the server closed the connection with 4102; the refused ones
  // rejected with rate_limited, the reads cut off were written again at once on the next
  // connection, flooding again. Now at most 4 are on the wire, a refused one holds the rest
  // back until its retry_after_ms and goes again first.
  const s = await harness.server({ env: { RATE_LIMIT_BURST: "10", RATE_LIMIT_REQUESTS: "50", RATE_LIMIT_REQUESTS_BURST: "25" } });
  const tap = tapped();
  const { c } = await signedIn(s.url, "reader", { WebSocket: tap.WebSocket });
  await c.join("lobby");
  const closes = [];
  c.on("connecting", (e) => closes.push(e.code));
  const calls = Array.from({ length: 120 }, (_, i) =>
    i % 2 ? c.history("lobby", { limit: 1, timeout: 6 * TIMEOUT }) : c.listUsers("lobby", { timeout: 6 * TIMEOUT }));
  const results = await Promise.allSettled(calls);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.code);
  assert.deepEqual({ closes, failed: failed.slice(0, 3), count: failed.length }, { closes: [], failed: [], count: 0 });
  const longest = Math.max(...tap.seen.join("").split("a").map((run) => run.length));
  assert.ok(tap.seen.includes("r"), "the bucket was never empty: the test tests nothing");
  assert.ok(longest < 20, `${longest} refusals in a row`);
});

test("requests: one that waits too long in the queue rejects with timeout and is never written", async () => {
  // A request bucket of 5 filled at 2 a second: 12 histories with a 1 s timeout. They were
  // all written at once, the refused ones rejecting with rate_limited.
  const s = await harness.server({ env: { RATE_LIMIT_BURST: "10", RATE_LIMIT_REQUESTS: "2", RATE_LIMIT_REQUESTS_BURST: "5" } });
  const tap = tapped();
  const { c } = await signedIn(s.url, "waiter", { WebSocket: tap.WebSocket });
  await c.join("lobby");
  const closes = [];
  c.on("connecting", (e) => closes.push(e.code));
  const results = await Promise.allSettled(Array.from({ length: 12 }, (_, i) => c.history("lobby", { limit: i + 1, timeout: 1000 })));
  const gaveUp = Date.now();
  const codes = results.filter((r) => r.status === "rejected").map((r) => r.reason.code);
  assert.ok(codes.length > 0 && codes.length < 12, `${codes.length} rejected`);
  assert.deepEqual([...new Set(codes)], ["timeout"]);
  assert.ok((await c.listUsers("lobby", { timeout: 6 * TIMEOUT })).length > 0);
  assert.deepEqual([...new Set(tap.written.filter((w) => w.at > gaveUp).map((w) => w.type))], ["list_users"]);
  assert.deepEqual(closes, []);
});

test("requests: a leave that times out in the request queue is written all the same: the others see the user go", async () => {
  // The room is gone for the app already; a leave dropped from the queue with its timeout
  // left the user in the room on the server.
  const s = await harness.server({ env: { RATE_LIMIT_BURST: "10", RATE_LIMIT_REQUESTS: "2", RATE_LIMIT_REQUESTS_BURST: "5" } });
  const { c: alice } = await signedIn(s.url, "alice", { requestTimeout: 50 });
  await alice.join("lobby", { timeout: TIMEOUT });
  const { c: bob } = await signedIn(s.url, "bob");
  await bob.join("lobby");
  const gone = new Promise((resolve) => bob.on("presence", (p) => p.user_id === "alice" && p.status === "offline" && resolve(p)));
  const reads = Array.from({ length: 8 }, (_, i) => alice.history("lobby", { limit: i + 1, timeout: 6 * TIMEOUT }).catch(() => {}));
  await assert.rejects(alice.leave("lobby"), (err) => err.code === "timeout");
  await Promise.race([gone, new Promise((_, reject) => setTimeout(() => reject(new Error("no offline presence for alice")), 3 * TIMEOUT))]);
  await Promise.all(reads);
});

test("history_truncated", async () => {
  // 20 messages of ~60 kB: 1.2 MB, past the 1 MiB a history reply holds (HISTORY_MAX_BYTES).
  const s = await harness.server({ env: { MAX_TEXT_CHARS: "60000" } });
  const { c } = await signedIn(s.url, "paula");
  await c.join("big");
  const texts = Array.from({ length: 20 }, (_, i) => `${String(i + 1).padStart(2, "0")} ${"x".repeat(59_990)}`);
  const ids = [];
  for (const text of texts) ids.push((await c.send("big", text)).id);
  assert.deepEqual(ids, Array.from({ length: 20 }, (_, i) => i + 1));

  const newest = await c.historyPage("big", { limit: 20 });
  const got = newest.messages.map((m) => m.id);
  assert.equal(newest.truncated, true, `${got.length} messages`);
  assert.ok(got.length >= 1 && got.length < 20, `${got.length} messages`);
  assert.deepEqual(got, Array.from({ length: got.length }, (_, i) => 21 - got.length + i), "the newest that fit");
  assert.deepEqual(newest.messages.map((m) => m.text), texts.slice(20 - got.length));
  assert.deepEqual((await c.history("big", { limit: 20 })).map((m) => m.id), got, "history: the same messages");
  assert.deepEqual(await c.historyPage("big", { limit: 2 }), { messages: newest.messages.slice(-2), truncated: false });

  // Paging back until a page is short of the limit without `truncated` gets every message.
  const pages = [newest];
  while (pages.at(-1).truncated || pages.at(-1).messages.length === 20) {
    const before = pages.at(-1).messages[0].id;
    pages.push(await c.historyPage("big", { limit: 20, before }));
  }
  assert.deepEqual(pages.reverse().flatMap((p) => p.messages.map((m) => m.id)), ids);
  assert.equal(pages[0].truncated, false);
});
