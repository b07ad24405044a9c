import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import http from "node:http";
import WebSocket from "ws";
import { ChatClient, jwtExpiry, randomId } from "../../dist/index.mjs";
import { FakeServer, fakeToken, tick } from "./fake-server.mjs";

function setup(options = {}) {
  const server = new FakeServer();
  const c = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket, minReconnectDelay: 10, random: () => 0.5, ...options });
  const log = [];
  for (const e of ["state", "connecting", "connected", "disconnected", "joined", "roomState", "recoveryFailed", "removed", "error"]) {
    c.on(e, (p) => log.push([e, p]));
  }
  const messages = [];
  c.on("message", (m) => messages.push(m.id));
  return { server, c, log, messages, events: (name) => log.filter(([e]) => e === name).map(([, p]) => p) };
}

const until = async (pred, what) => {
  for (let i = 0; i < 400; i++) {
    if (pred()) return;
    await tick(5);
  }
  throw new Error(`timed out waiting for ${what}`);
};

/** `p`, or a failure naming `what` if it is still pending after `ms`. */
const within = (p, ms, what) => {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
};

test("state machine: disconnected -> connecting -> connected, reconnect on 1006, stop on disconnect()", async () => {
  const { server, c, events } = setup();
  assert.equal(c.state, "disconnected");
  await c.connect();
  assert.deepEqual(events("state").map((e) => e.state), ["connecting", "connected"]);
  server.drop(server.last, 1006);
  assert.equal(c.state, "connecting");
  const [lost] = events("connecting").filter((e) => e.code === 1006);
  assert.equal(lost.attempt, 1);
  assert.equal(lost.delay, 15, "10 ms + full jitter: 0.5 x min(max, 10 ms x 2^0)");
  await until(() => c.state === "connected", "the reconnect");
  assert.equal(server.sockets.length, 2);
  c.disconnect();
  assert.equal(c.state, "disconnected");
  assert.deepEqual(events("disconnected"), [{ code: 1000, reason: "client disconnect", reconnect: false }]);
  assert.equal(server.last.closedWith.code, 1000);
  await tick(30);
  assert.equal(server.sockets.length, 2, "no reconnect after disconnect()");
});

test("state machine: terminal close codes stop, 41xx and 1001 reconnect", async () => {
  for (const [code, again] of [[1001, true], [4100, true], [1008, false], [1009, false], [4001, false], [4002, false], [4003, false]]) {
    const { server, c, events } = setup();
    await c.connect();
    server.drop(server.last, code, "why");
    await tick(40);
    if (again) {
      assert.equal(c.state, "connected", `${code} reconnects`);
      assert.equal(server.sockets.length, 2);
    } else {
      assert.equal(c.state, "disconnected", `${code} stops`);
      assert.equal(server.sockets.length, 1);
      assert.equal(events("error").at(-1).closeCode, code);
      assert.equal(events("disconnected").at(-1).code, code);
    }
    c.disconnect();
  }
});

test("state machine: exponential backoff while the server stays away; attempts counted", async () => {
  const { server, c, events } = setup({ random: () => 0.999 });
  await c.connect();
  // Every new socket is refused at once.
  server.accept = (ws) => {
    ws.readyState = 3;
    ws.onclose?.({ code: 1006, reason: "" });
  };
  server.drop(server.last, 1006);
  await until(() => events("connecting").length >= 4, "four attempts");
  c.disconnect();
  const delays = events("connecting").slice(0, 3).map((e) => e.delay);
  assert.deepEqual(delays, [19, 29, 49], "10 ms + 0.999 x 10, 20, 40 ms");
});

for (const code of [1013, 1001, 1011, 4100]) {
  test(`state machine: a server closing with ${code} right after welcome is retried with growing delays`, async () => {
    // Every welcome reset the backoff: a server that accepts and closes at once (1013 in an
    // outage, a draining pod's 1001) was tried again at the shortest delay for ever, by every
    // client together. Only a connection that stayed up stableAfter resets it now.
    const { server, c, events } = setup({ maxReconnectDelay: 1000, stableAfter: 150 });
    let closing = true;
    const accept = server.accept.bind(server);
    server.accept = (ws) => {
      accept(ws);
      if (closing) setTimeout(() => server.drop(ws, code, "at once"), 0);
    };
    try {
      c.connect().catch(() => {});
      await until(() => events("connecting").length >= 4, "four closes");
      closing = false;
      const delays = events("connecting").slice(0, 4).map((e) => e.delay);
      // 10 ms + 0.5 x 10, 20, 40, 80 ms; a 1001 at attempt 0 within 10 ms (going away).
      assert.deepEqual(delays, [code === 1001 ? 5 : 15, 20, 30, 50]);
      await until(() => c.state === "connected", "a connection that stays up");
      await tick(200); // longer than stableAfter
      server.drop(server.last, code, "after a while");
      assert.equal(events("connecting").at(-1).delay, code === 1001 ? 5 : 15, "the backoff starts again after a stable connection");
    } finally {
      c.disconnect();
    }
  });
}

test("state machine: 4102 waits the pause and the server's retry_after_ms", async () => {
  const { server, c, events } = setup();
  await c.connect();
  server.push(server.last, { type: "error", code: "rate_limited", message: "flood", retry_after_ms: 7000 });
  server.drop(server.last, 4102, "flooding");
  const e = events("connecting").at(-1);
  assert.equal(e.code, 4102);
  assert.ok(e.delay >= 6900, `delay ${e.delay}`);
  c.disconnect();
});

test("state machine: disconnect() and connect() forget the old connection's rate_limited wait", async () => {
  // connect() after disconnect() is the app asking for a fresh attempt now: the 7 s the old
  // connection was told (a floor for its reconnect after a 4102) does not hold the reconnect
  // after the new connection drops, as in the Python client (which forgets it whenever a
  // connection ends) and the Rust client's reconnect().
  const { server, c, events } = setup();
  await c.connect();
  server.push(server.last, { type: "error", code: "rate_limited", message: "flood", retry_after_ms: 7000 });
  c.disconnect();
  await c.connect();
  server.drop(server.last, 1006, "network");
  const e = events("connecting").at(-1);
  try {
    assert.equal(e.code, 1006);
    assert.ok(e.delay <= 500, `delay ${e.delay}`);
  } finally {
    c.disconnect();
  }
});

test("state machine: a wait longer than a timer holds (2^31-1 ms) is capped at a day, not run at once", async () => {
  // Node runs a setTimeout over 2^31-1 ms after 1 ms: the client reconnected at once. The
  // retry_after_ms is capped at a day where it is read (clients/conformance/retry-after-ms.json).
  const { server, c, events } = setup();
  await c.connect();
  server.push(server.last, { type: "error", code: "rate_limited", message: "flood", retry_after_ms: 3e9 });
  server.drop(server.last, 4102, "flooding");
  try {
    const delay = events("connecting").at(-1).delay;
    assert.ok(delay > 86_400_000 - 1000 && delay <= 86_400_000, `delay ${delay}`);
    await tick(100);
    assert.equal(server.sockets.length, 1, "no reconnect within 100 ms");
  } finally {
    c.disconnect();
  }
});

for (const [what, header] of [
  ["an HTTP-date 30 days ahead", () => new Date(Date.now() + 30 * 86_400_000).toUTCString()],
  ["3000000 seconds (35 days)", () => "3000000"],
]) {
  test(`refused upgrades: a 503's Retry-After of ${what} waits a day, the cap`, async () => {
    let upgrades = 0;
    const refusing = http.createServer();
    refusing.on("upgrade", (_req, socket) => {
      upgrades++;
      socket.end(`HTTP/1.1 503 Service Unavailable\r\nRetry-After: ${header()}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
    });
    await new Promise((r) => refusing.listen(0, "127.0.0.1", r));
    const c = new ChatClient({ url: `ws://127.0.0.1:${refusing.address().port}/ws`, WebSocket, minReconnectDelay: 10, maxReconnectDelay: 50 });
    const delays = [];
    c.on("connecting", (e) => delays.push(e.delay));
    try {
      c.connect().catch(() => {});
      await until(() => delays.length > 0, "the refusal's reconnect");
      await tick(300);
      assert.equal(upgrades, 1, "upgrade attempts in 300 ms");
      assert.ok(delays[0] > 86_390_000 && delays[0] <= 86_400_000, `reconnect delay ${delays[0]} ms`);
    } finally {
      c.disconnect();
      refusing.close();
    }
  });
}

test("state machine: the URL function is asked for every attempt", async () => {
  const server = new FakeServer();
  const asked = [];
  const c = new ChatClient({
    url: ({ attempt }) => {
      asked.push(attempt);
      return `ws://fake/${asked.length}`;
    },
    WebSocket: server.WebSocket,
    minReconnectDelay: 1,
  });
  await c.connect();
  server.drop(server.last, 1001);
  await until(() => c.state === "connected" && server.sockets.length === 2, "the reconnect");
  assert.deepEqual(server.sockets.map((s) => s.url), ["ws://fake/1", "ws://fake/2"]);
  assert.deepEqual(asked, [0, 1]);
  c.disconnect();
});

test("guest username goes on the URL; a token goes in an auth message, never the URL", async () => {
  const g = setup({ username: "zoe" });
  await g.c.connect();
  assert.equal(new URL(g.server.last.url).searchParams.get("username"), "zoe");
  g.c.disconnect();
  const t = setup({ token: fakeToken("ada"), username: "ignored" });
  await t.c.connect();
  assert.equal(t.server.last.url, "ws://fake/ws");
  assert.equal(t.server.last.sent[0].type, "auth");
  assert.equal(t.c.userId, "ada");
  t.c.disconnect();
});

test("auth of a new connection: unavailable, internal_error, rate_limited, too_many_connections reconnect; auth_failed, token_expired are token refusals; forbidden stops", async () => {
  // The server could not sign the client in for now: a fixed token stays good, the client
  // signs in again on a new connection (a rate_limited not before its retry_after_ms),
  // keeping its rooms and outbox. Only a refused token needs a fresh one, else stops (4001).
  for (const code of ["unavailable", "internal_error", "rate_limited", "too_many_connections"]) {
    const { server, c, events } = setup({ token: fakeToken("ada") });
    let refusedAt = 0;
    let againAt = 0;
    server.replies.push((ws, f) => {
      if (f.type === "auth" && refusedAt) againAt ||= Date.now();
      if (f.type !== "auth" || refusedAt) return false;
      refusedAt = Date.now();
      server.push(ws, { type: "error", id: f.id, code, message: "not now", ...(code === "rate_limited" ? { retry_after_ms: 300 } : {}) });
      return true;
    });
    const joined = c.join("kept");
    const sent = c.send("kept", "queued");
    await within(c.connect(), 2000, `${code}: connect`);
    assert.equal(c.userId, "ada");
    assert.equal(server.sockets.length, 2, `${code}: a new connection signed in`);
    assert.equal(server.sockets[0].closedWith?.code, 4000, `${code}: the refused socket closed`);
    const [lost] = events("connecting").filter((e) => e.code !== undefined);
    assert.equal(lost.code, 1013, `${code}: ${JSON.stringify(lost)}`);
    assert.equal(events("error").map((e) => e.code).join(), code);
    assert.deepEqual(events("disconnected"), []);
    if (code === "rate_limited") {
      const waited = againAt - refusedAt;
      assert.ok(lost.delay >= 290 && waited >= 290, `reconnected ${waited} ms after retry_after_ms 300 (delay ${lost.delay})`);
    }
    await within(joined, 2000, `${code}: the join made before connecting`);
    assert.equal((await within(sent, 2000, `${code}: the queued send`)).text, "queued");
    c.disconnect();
  }
  for (const code of ["auth_failed", "token_expired"]) {
    const fixed = setup({ token: fakeToken("ada") });
    fixed.server.replies.push((ws, f) => f.type === "auth" && (fixed.server.push(ws, { type: "error", id: f.id, code, message: "no" }), true));
    const err = await within(fixed.c.connect().then(() => null, (e) => e), 2000, `${code}: a fixed token stops`);
    assert.equal(err?.closeCode, 4001, `${code}: ${err}`);
    assert.equal(fixed.server.sockets.length, 1);
    let calls = 0;
    const fresh = setup({ getToken: () => fakeToken(`ada${++calls}`) });
    fresh.server.replies.push((ws, f) => f.type === "auth" && calls === 1 && (fresh.server.push(ws, { type: "error", id: f.id, code, message: "no" }), true));
    await within(fresh.c.connect(), 2000, `${code}: getToken gives a fresh one`);
    assert.equal(fresh.events("connecting").find((e) => e.code !== undefined).code, 4002);
    assert.equal(fresh.c.userId, "ada2");
    fresh.c.disconnect();
  }
  // Banned everywhere: the server answers forbidden and closes with 4003; no token changes it.
  const banned = setup({ getToken: () => fakeToken("ada") });
  banned.server.replies.push((ws, f) => f.type === "auth" && (banned.server.push(ws, { type: "error", id: f.id, code: "forbidden", message: "banned", reason: "banned" }), true));
  const err = await within(banned.c.connect().then(() => null, (e) => e), 2000, "forbidden stops");
  assert.equal(err?.closeCode, 4003, `forbidden: ${err}`);
  await tick(50);
  assert.equal(banned.server.sockets.length, 1, "no reconnect after a ban");
});

test("auth of a new connection: invalid_message and a code this client does not know stop it (no token loop), rooms and outbox kept", async () => {
  // invalid_message: the server could not read the auth (its token not a string, empty or
  // over 8192 characters): a fresh token from the same source is no better, retrying only
  // loops. A code this client does not know (a newer server's) cannot be judged: the client
  // stops, as centrifuge-js does with a connect error not marked temporary, and tells the app.
  for (const code of ["invalid_message", "not_a_code_yet"]) {
    for (const how of ["token", "getToken"]) {
      let calls = 0;
      const opts = how === "token" ? { token: fakeToken("ada") } : { getToken: () => (calls++, fakeToken("ada")) };
      const { server, c, events } = setup(opts);
      server.replies.push((ws, f) => f.type === "auth" && (server.push(ws, { type: "error", id: f.id, code, message: "no" }), true));
      const joined = c.join("kept");
      c.send("kept", "queued").catch(() => {});
      const err = await within(c.connect().then(() => null, (e) => e), 2000, `${code} (${how}): connect`);
      assert.equal(err?.code, "closed", `${code} (${how}): ${err}`);
      assert.equal(err?.closeCode, 1008, `${code} (${how}): ${err}`);
      assert.match(err.message, new RegExp(`auth refused: ${code}`));
      await tick(50);
      assert.equal(server.sockets.length, 1, `${code} (${how}): no reconnect`);
      if (how === "getToken") assert.equal(calls, 1, `${code}: getToken asked again`);
      assert.ok(events("error").some((e) => e.code === code), `${code} (${how}): the server's error reaches the app`);
      assert.deepEqual(events("disconnected").map((e) => e.code), [1008]);
      assert.deepEqual(events("connecting").filter((e) => e.code !== undefined), [], `${code} (${how}): no reconnect scheduled`);
      assert.deepEqual(c.joinedRooms, ["kept"], "rooms kept for connect()");
      assert.equal(c.pending.length, 1, "the outbox kept for connect()");
      await joined.catch(() => {});
    }
  }
});

test("rooms: rejoined with since after a reconnect; joining/joined/left states", async () => {
  const { server, c, events, messages } = setup();
  await c.connect();
  const joined = await c.join("r");
  assert.equal(joined.last_id, 0);
  server.post("r", "a");
  server.post("r", "b");
  await tick();
  assert.deepEqual(messages, [1, 2]);
  server.drop(server.last, 1006);
  assert.equal(c.roomState("r"), "joining");
  server.post("r", "c"); // while the client is away
  await until(() => c.roomState("r") === "joined" && messages.length === 3, "the rejoin");
  const join = server.last.sent.find((f) => f.type === "join");
  assert.equal(join.since, 2);
  assert.deepEqual(messages, [1, 2, 3]);
  assert.equal(events("joined").at(-1).rejoin, true);
  assert.equal(events("joined").at(-1).recovered, true);
  await c.leave("r");
  assert.equal(c.roomState("r"), "left");
  assert.deepEqual(events("roomState").map((e) => e.state), ["joining", "joined", "joining", "joined", "left"]);
  c.disconnect();
});

test("gap detection: an id that is not last+1 rejoins with since; doubles are dropped", async () => {
  const { server, c, messages } = setup();
  await c.connect();
  await c.join("r");
  const ws = server.last;
  server.post("r", "1");
  server.post("r", "2");
  // 3 and 4 are stored but never reach this socket; 5 does.
  server.room("r").members.delete(ws);
  server.post("r", "3");
  server.post("r", "4");
  server.room("r").members.add(ws);
  server.post("r", "5");
  await until(() => messages.length === 5, "the replay");
  assert.deepEqual(messages, [1, 2, 3, 4, 5]);
  const joins = ws.sent.filter((f) => f.type === "join");
  assert.deepEqual(joins.map((j) => j.since), [undefined, 2]);
  // A double (a replayed message seen again) is never surfaced twice.
  server.push(ws, server.room("r").messages[3]);
  server.post("r", "6");
  await until(() => messages.length === 6, "message 6");
  assert.deepEqual(messages, [1, 2, 3, 4, 5, 6]);
  c.disconnect();
});

test("recovery: recovered:false is an event, and the stream resumes from the server's history", async () => {
  const { server, c, events, messages } = setup();
  server.replies.push((ws, f) => {
    if (f.type !== "join" || f.since === undefined) return false;
    server.push(ws, { type: "joined", id: f.id, room: f.room, users: [], last_id: 40, recovered: false });
    server.push(ws, { type: "message", id: 40, room: f.room, from: "x", user_id: "x", text: "kept", timestamp: 1 });
    return true;
  });
  await c.connect();
  await c.join("r", { since: 7 });
  await until(() => messages.length === 1, "the first kept message");
  assert.deepEqual(events("recoveryFailed"), [{ room: "r", since: 7, last_id: 40 }]);
  assert.deepEqual(messages, [40]);
  assert.equal(c.lastId("r"), 40);
  c.disconnect();
});

test("sends: resent after a lost echo, resolved once by the deduplicated echo", async () => {
  const { server, c } = setup({ token: fakeToken("u") });
  await c.connect();
  await c.join("r");
  server.holdEchoes = true;
  const p = c.send("r", "hello");
  await until(() => server.room("r").messages.length === 1, "the message stored");
  server.holdEchoes = false;
  server.room("r").messages.length = 0; // the replay will not carry it: only the dedupe can answer
  server.drop(server.last, 1006);
  const m = await p;
  assert.equal(m.id, 1);
  assert.equal(m.text, "hello");
  assert.equal(server.last.sent.filter((f) => f.type === "message").length, 1, "resent on the new socket");
  c.disconnect();
});

test("sends: a send before connect waits in the outbox; send to an unknown room rejects", async () => {
  const { c } = setup();
  await assert.rejects(c.send("nowhere", "x"), { code: "not_in_room" });
  const joining = c.join("r");
  const early = c.send("r", "early");
  assert.equal(c.pending.length, 1);
  void c.connect();
  await joining;
  assert.equal((await early).id, 1);
  c.disconnect();
});

test("sends: the timeout rejects the promise but the send stays queued and is still delivered", async () => {
  const { server, c } = setup({ sendTimeout: 20 });
  await c.connect();
  await c.join("r");
  server.holdEchoes = true;
  const acks = [];
  c.on("ack", (m) => acks.push(m.text));
  await assert.rejects(c.send("r", "slow"), { code: "timeout" });
  assert.equal(c.pending.length, 1);
  server.holdEchoes = false;
  server.push(server.last, server.room("r").messages[0]);
  assert.deepEqual(acks, ["slow"]);
  assert.equal(c.pending.length, 0);
  c.disconnect();
});

test("requests: history and listUsers answer; a timeout rejects with code timeout; errors carry the code", async () => {
  const { server, c } = setup({ requestTimeout: 50 });
  await c.connect();
  await c.join("r");
  await c.send("r", "x");
  assert.deepEqual((await c.history("r")).map((m) => m.text), ["x"]);
  assert.equal((await c.listUsers("r")).length, 1);
  server.replies.push((ws, f) => f.type === "history" && f.room === "silent");
  await assert.rejects(c.history("silent"), { code: "timeout" });
  server.replies.push((ws, f) => {
    if (f.type !== "list_users") return false;
    server.push(ws, { type: "error", id: f.id, code: "invalid_room", message: "bad" });
    return true;
  });
  await assert.rejects(c.listUsers("r"), (e) => e.code === "invalid_room" && e.name === "ChatError");
  c.disconnect();
});

test("token: refreshed before expiry with getToken, and fetched again for every connection", async () => {
  let calls = 0;
  const { server, c } = setup({
    getToken: () => {
      calls++;
      return fakeToken("tina", 1.2);
    },
    tokenRefreshMargin: 100,
  });
  await c.connect();
  assert.equal(calls, 1);
  // Refreshed 100 ms before it expires (never sooner than 1 s): within the 2 s of until().
  await until(() => server.last.sent.filter((f) => f.type === "auth").length >= 2, "a refresh");
  assert.ok(calls >= 2);
  server.drop(server.last, 4002, "token expired");
  await until(() => server.sockets.length === 2 && c.state === "connected", "a reconnect with a fresh token");
  assert.equal(c.userId, "tina");
  c.disconnect();
  assert.equal(jwtExpiry(fakeToken("x", 10)) > Date.now() + 9000, true);
  assert.equal(jwtExpiry("not a jwt"), null);
});

test("token: a refresh that signs in as another user joins every room again, with since", async () => {
  // The server left every room of the connection, without a `left`: the rooms stayed
  // "joined" and nothing of them arrived until a send was refused not_in_room.
  const tokens = [fakeToken("ann", 1.2), fakeToken("ben")];
  const { server, c, messages, events } = setup({ getToken: () => tokens.shift() ?? fakeToken("ben"), tokenRefreshMargin: 100 });
  const changed = [];
  c.on("userChanged", (w) => changed.push(w.user_id));
  await c.connect();
  await c.join("a");
  await c.join("b");
  server.post("a", "a1");
  server.post("b", "b1");
  await until(() => messages.length === 2, "the first messages");
  await until(() => changed.length === 1, "the refresh as ben");
  assert.deepEqual(changed, ["ben"]);
  assert.equal(c.userId, "ben");
  await until(() => c.roomState("a") === "joined" && c.roomState("b") === "joined", "the rejoins");
  const rejoins = server.last.sent.filter((f) => f.type === "join").slice(2);
  assert.deepEqual(rejoins.map((f) => [f.room, f.since]), [["a", 1], ["b", 1]]);
  assert.deepEqual(events("roomState").map((e) => `${e.room}:${e.state}`).slice(-4), ["a:joining", "b:joining", "a:joined", "b:joined"]);
  server.post("a", "a2");
  await until(() => messages.length === 3, "a message after the refresh");
  assert.deepEqual(messages, [1, 1, 2]);
  assert.equal((await c.send("b", "as ben")).user_id, "ben");
  c.disconnect();
});

test("token: a refresh that keeps the user joins nothing again", async () => {
  const { server, c } = setup({ getToken: () => fakeToken("tina", 1.2), tokenRefreshMargin: 100 });
  const changed = [];
  c.on("userChanged", (w) => changed.push(w));
  await c.connect();
  await c.join("a");
  await until(() => server.last.sent.filter((f) => f.type === "auth").length >= 2, "a refresh");
  await c.listUsers("a"); // the refresh's welcome came before this answer
  assert.deepEqual(changed, []);
  assert.equal(server.last.sent.filter((f) => f.type === "join").length, 1);
  assert.equal(c.roomState("a"), "joined");
  c.disconnect();
});

test("token: one already past its exp on our clock is not refreshed in a loop", async () => {
  // A clock ahead of the server's (whose leeway still takes the token): the refresh delay was
  // 0, and each refresh got such a token again, so auth went out in a tight loop. It is at
  // least a second now, and grows while the fresh tokens are no better.
  const { server, c } = setup({ getToken: () => fakeToken("tina", -30) });
  try {
    await c.connect();
    const auths = () => server.last.sent.filter((f) => f.type === "auth").length;
    await tick(1500);
    assert.ok(auths() <= 3, `${auths()} auth frames in 1.5 s`);
  } finally {
    c.disconnect();
  }
});

test("token: one valid for longer than a timer can wait (24.8 days) is not refreshed at once, nor in a loop", async () => {
  let calls = 0;
  const { server, c } = setup({
    getToken: () => {
      calls++;
      return fakeToken("tina", 30 * 86_400);
    },
  });
  await c.connect();
  const auths = () => server.last.sent.filter((f) => f.type === "auth").length;
  const sent = auths();
  try {
    await tick(200);
    assert.equal(calls, 1, "getToken called again: the refresh timer overflowed");
    assert.equal(auths(), sent, "a refresh was sent");
  } finally {
    c.disconnect(); // else a refresh loop would keep the test run from ever ending
  }
});

test("token: getToken returning null stops the client", async () => {
  const { c, events } = setup({ getToken: () => null });
  await assert.rejects(c.connect(), { code: "closed" });
  assert.equal(c.state, "disconnected");
  assert.equal(events("error").at(-1).code, "token");
});

test("token: getToken returning an empty string stops the client as null does, not a guest session", async () => {
  const { c, events } = setup({ getToken: () => "" });
  try {
    await assert.rejects(c.connect(), { code: "closed" });
    assert.equal(c.state, "disconnected");
    assert.equal(events("error").at(-1).code, "token");
  } finally {
    c.disconnect(); // a guest session (the defect) would keep the test run from ending
  }
});

test("typing: one true while typing goes on, false after the idle timeout; send ends it silently", async () => {
  const { server, c } = setup({ typingTimeout: 40 });
  await c.connect();
  await c.join("r");
  const typing = () => server.last.sent.filter((f) => f.type === "typing").map((f) => f.status);
  c.typing("r");
  c.typing("r");
  c.typing("r");
  assert.deepEqual(typing(), [true]);
  await until(() => typing().length === 2, "the idle timeout");
  assert.deepEqual(typing(), [true, false]);
  c.typing("r");
  await c.send("r", "done");
  await tick(60);
  assert.deepEqual(typing(), [true, false, true], "the server clears typing with the message");
  c.typing("r");
  c.stopTyping("r");
  assert.deepEqual(typing(), [true, false, true, true, false]);
  c.disconnect();
});

test("dm: doubles (same id) are surfaced once", async () => {
  const { server, c } = setup();
  const dms = [];
  c.on("dm", (m) => dms.push(m.id));
  await c.connect();
  const m = await c.dm("someone", "hi");
  server.push(server.last, m);
  await tick();
  assert.deepEqual(dms, [1]);
  c.disconnect();
});

test("dm: ids are kept across connections with persistence (dm_backlog), forgotten without it (a restarted memory server numbers from 1)", async () => {
  // dm_backlog counts by the rule for ids off the wire, as in the Python and Rust clients.
  const cases = [[0, true], [2.0, true], [1e2, true], [undefined, false], [null, false], ["2", false], [2.5, false], [-1, false]];
  for (const [backlog, persistence] of cases) {
    const { server, c } = setup();
    try {
      if (backlog !== undefined) server.welcomeExtra = { dm_backlog: backlog };
      const dms = [];
      c.on("dm", (m) => dms.push(m.text));
      await c.connect();
      const dm = (id, text) => ({ type: "dm", id, from: "ann", user_id: "ann", to: c.userId, text, timestamp: 1 });
      server.push(server.last, dm(1, "first"));
      await until(() => dms.length === 1, "the first dm");
      server.drop(server.last, 1001);
      await until(() => c.state === "connected" && server.sockets.length === 2, "the reconnect");
      // With persistence: the same DM again (a page of kept ones sent twice). Without: a
      // restarted server's first DM, whose id is 1 again.
      server.push(server.last, dm(1, persistence ? "first" : "new first"));
      server.push(server.last, dm(2, "second"));
      await until(() => dms.at(-1) === "second", "the second dm");
      const expected = persistence ? ["first", "second"] : ["first", "new first", "second"];
      assert.deepEqual(dms, expected, `dm_backlog: ${JSON.stringify(backlog)}`);
    } finally {
      c.disconnect();
    }
  }
});

test("dm: an echo whose id is not a whole number >= 0 resolves the send but is no dm event (the rule for ids off the wire)", async () => {
  const wrong = [];
  for (const raw of ["2.5", '"7"', "null", "-1", "1e400", "18446744073709551616", "9007199254740992", undefined]) {
    const { server, c } = setup({ ackTimeout: 10_000 });
    const dms = [];
    const acks = [];
    c.on("dm", (m) => dms.push(m.id));
    c.on("ack", (m) => acks.push(m.client_msg_id));
    // Raw JSON text, as a buggy server could write it: 1e400 is no JSON.stringify output.
    const rawDm = (id, extra) => {
      const body = JSON.stringify({ type: "dm", from: "x", user_id: "x", to: "someone", text: "hi", timestamp: 1, ...extra });
      return id === undefined ? body : `${body.slice(0, -1)}, "id": ${id}}`;
    };
    server.replies.push((ws, f) => {
      if (f.type !== "dm") return false;
      ws.onmessage?.({ data: rawDm(raw, { client_msg_id: f.client_msg_id, user_id: ws.user.user_id }) });
      ws.onmessage?.({ data: rawDm("2") }); // then a DM that counts
      return true;
    });
    await c.connect();
    const outcome = await within(c.dm("someone", "mine"), 1000, `dm echoed with id ${raw}`).then(
      (m) => `resolved (${m.text})`,
      (e) => `${e.name}: ${e.message}`,
    );
    await tick();
    const written = server.last.sent.filter((f) => f.type === "dm").length;
    const got = `${outcome}, written ${written}, ${acks.length} ack, dms ${JSON.stringify(dms)}`;
    if (got !== "resolved (hi), written 1, 1 ack, dms [2]") wrong.push(`id ${raw}: ${got}`);
    c.disconnect();
  }
  assert.deepEqual(wrong, []);
});

test("sends: an echo whose id is no message id resolves the send with id -1, as in Python (Rust: u64::MAX)", async () => {
  // The server stored the send (its echo names the client_msg_id), so it resolves, but with
  // the id the three clients agree on for "none" (never a message id), not the frame's own:
  // "7" typed as a number, 2.5, -5, 2^53 handed to the app as if they were ids.
  const wrong = [];
  const body = (type, extra) =>
    JSON.stringify(type === "message"
      ? { type, room: "r", from: "x", user_id: "x", text: "mine", timestamp: 1, ...extra }
      : { type, from: "x", user_id: "x", to: "someone", text: "mine", timestamp: 1, ...extra });
  const raw = (type, id, extra) => (id === undefined ? body(type, extra) : `${body(type, extra).slice(0, -1)}, "id": ${id}}`);
  for (const type of ["message", "dm"]) {
    for (const id of ["2.5", '"7"', "null", "-5", "1e400", "9007199254740992", "18446744073709551616", "true", undefined]) {
      const { server, c, messages } = setup({ ackTimeout: 10_000 });
      const acks = [];
      c.on("ack", (m) => acks.push(m.id));
      server.replies.push((ws, f) => {
        if (f.type !== type) return false;
        ws.onmessage?.({ data: raw(type, id, { client_msg_id: f.client_msg_id, user_id: ws.user.user_id }) });
        if (type === "message") ws.onmessage?.({ data: raw(type, "1", {}) }); // the room's next message counts
        return true;
      });
      await c.connect();
      if (type === "message") await c.join("r");
      const sending = type === "message" ? c.send("r", "mine") : c.dm("someone", "mine");
      const outcome = await within(sending, 1000, `${type} echoed with id ${id}`).then(
        (m) => `resolved id ${JSON.stringify(m.id)} (${m.text})`,
        (e) => `${e.name}: ${e.message}`,
      );
      await tick();
      const got = `${outcome}, acks ${JSON.stringify(acks)}, messages ${JSON.stringify(messages)}`;
      const want = `resolved id -1 (mine), acks [-1], messages ${type === "message" ? "[1]" : "[]"}`;
      if (got !== want) wrong.push(`${type} id ${id}: ${got}`);
      c.disconnect();
    }
  }
  assert.deepEqual(wrong, []);
});

test("randomId: UUID v4 shaped and distinct", () => {
  const ids = new Set(Array.from({ length: 100 }, () => randomId()));
  assert.equal(ids.size, 100);
  for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
});

test("rooms: a join the server refuses rejects with its code and leaves nothing behind", async () => {
  const { server, c, events } = setup();
  server.replies.push((ws, f) => {
    if (f.type !== "join") return false;
    server.push(ws, { type: "error", id: f.id, code: "too_many_rooms", message: "at most 100" });
    return true;
  });
  await c.connect();
  const queued = c.join("r101");
  const send = c.send("r101", "never");
  await assert.rejects(queued, { code: "too_many_rooms" });
  await assert.rejects(send, { code: "too_many_rooms" });
  assert.equal(c.roomState("r101"), "left");
  assert.deepEqual(c.pending, []);
  assert.equal(events("error").at(-1).code, "too_many_rooms");
  await assert.rejects(c.join("bad room"), { code: "invalid_room" });
  c.disconnect();
});

test("rooms: join's own since is taken only as a whole number >= 0 (the rule for ids off the wire), else rejected at once", async (t) => {
  const { server, c } = setup({ requestTimeout: 300 });
  t.after(() => c.disconnect());
  await c.connect();
  const joinsOf = (room) => server.last.sent.filter((f) => f.type === "join" && f.room === room);
  const bad = ["5", "", -1, -0.5, 2.5, 0.5, NaN, Infinity, -Infinity, 2 ** 53, 2 ** 53 + 2, 1e20, true, false, {}, [5], 5n];
  const wrong = [];
  for (const [i, since] of bad.entries()) {
    const room = `bad${i}`;
    // A synchronous throw would be wrong too: it is caught and reported.
    const outcome = await Promise.resolve()
      .then(() => c.join(room, { since }))
      .then((j) => `resolved ${JSON.stringify(j)}`, (e) => `${e.name} ${e.code ?? ""}: ${e.message}`);
    await tick(5);
    const got = { outcome, state: c.roomState(room), joins: joinsOf(room).length };
    const ok = outcome.startsWith("ChatError invalid_message: ") && outcome.includes("since") && got.state === "left" && got.joins === 0;
    if (!ok) wrong.push(`since ${typeof since} ${String(since)}: ${JSON.stringify(got)}`);
  }
  assert.deepEqual(wrong, []);
  // Whole numbers >= 0 up to 2^53 - 1 go out as they are; undefined and null are no since.
  for (const [room, since, want] of [["a", 0, 0], ["b", 7, 7], ["c", 2 ** 53 - 1, 2 ** 53 - 1], ["d", -0, 0], ["e", null, undefined], ["f", undefined, undefined]]) {
    await c.join(room, { since });
    assert.equal(joinsOf(room)[0].since, want, `since ${since}`);
  }
});

test("requests: history's before is taken only as a whole number >= 1 (the server's rule), else rejected at once", async (t) => {
  const { server, c } = setup({ requestTimeout: 300 });
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  const histories = () => server.last.sent.filter((f) => f.type === "history");
  const bad = [0, -0, "5", "", -1, -0.5, 2.5, 0.5, NaN, Infinity, -Infinity, 2 ** 53, 2 ** 53 + 2, 1e20, true, false, {}, [5], 5n];
  const wrong = [];
  for (const before of bad) {
    const written = histories().length;
    // A synchronous throw would be wrong too: it is caught and reported.
    const outcome = await Promise.resolve()
      .then(() => c.history("r", { before }))
      .then((m) => `resolved ${JSON.stringify(m)}`, (e) => `${e.name} ${e.code ?? ""}: ${e.message}`);
    await tick(5);
    const ok = outcome.startsWith("ChatError invalid_message: ") && outcome.includes("before") && histories().length === written;
    if (!ok) wrong.push(`before ${typeof before} ${String(before)}: ${outcome}, ${histories().length - written} written`);
  }
  assert.deepEqual(wrong, []);
  // Whole numbers >= 1 up to 2^53 - 1 go out as they are; undefined and null are no before.
  for (const [before, want] of [[1, 1], [7, 7], [2 ** 53 - 1, 2 ** 53 - 1], [null, undefined], [undefined, undefined]]) {
    await c.history("r", { before });
    const frame = histories().at(-1);
    assert.ok(Object.is(frame.before, want) || frame.before === want, `before ${before}: ${JSON.stringify(frame)}`);
    assert.equal("before" in frame, want !== undefined, `before ${before}: ${JSON.stringify(frame)}`);
  }
});

test("requests: history's limit is taken only as a whole number >= 1 (the server's rule), else rejected at once", async (t) => {
  const { server, c } = setup({ requestTimeout: 300 });
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  const histories = () => server.last.sent.filter((f) => f.type === "history");
  const bad = ["5", "", 0, -0, -1, 0.5, 2.5, NaN, Infinity, -Infinity, 2 ** 53, 1e20, true, false, {}, [5], 5n];
  const wrong = [];
  for (const limit of bad) {
    const written = histories().length;
    const outcome = await Promise.resolve()
      .then(() => c.history("r", { limit }))
      .then((m) => `resolved ${JSON.stringify(m)}`, (e) => `${e.name} ${e.code ?? ""}: ${e.message}`);
    await tick(5);
    const ok = outcome.startsWith("ChatError invalid_message: ") && outcome.includes("limit") && histories().length === written;
    if (!ok) wrong.push(`limit ${typeof limit} ${String(limit)}: ${outcome}, ${histories().length - written} written`);
  }
  assert.deepEqual(wrong, []);
  // Whole numbers >= 1 up to 2^53 - 1 go out as they are (the server caps them at HISTORY_SIZE);
  // undefined and null are no limit (the server's default, 50).
  for (const [limit, want] of [[1, 1], [50, 50], [1000, 1000], [2 ** 53 - 1, 2 ** 53 - 1], [null, undefined], [undefined, undefined]]) {
    await c.history("r", { limit });
    const frame = histories().at(-1);
    assert.equal(frame.limit, want, `limit ${limit}: ${JSON.stringify(frame)}`);
    assert.equal("limit" in frame, want !== undefined, `limit ${limit}: ${JSON.stringify(frame)}`);
  }
});

test("requests: historyPage carries the server's truncated, true only for the JSON true; history is its messages", async (t) => {
  const { server, c } = setup({ requestTimeout: 300 });
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  for (let i = 1; i <= 3; i++) server.post("r", `m${i}`);
  // The reply to the next history: the room's messages before `before`, the oldest of them left
  // out, with `truncated` set to `value` (undefined: absent), as the server's byte bound does.
  let value;
  const frames = [];
  server.replies.push((ws, f) => {
    if (f.type !== "history") return false;
    frames.push(f);
    const older = server.room("r").messages.filter((m) => f.before === undefined || m.id < f.before);
    const reply = { type: "history", id: f.id, room: "r", messages: older.slice(1) };
    if (value !== undefined) reply.truncated = value;
    server.push(ws, reply);
    return true;
  });
  value = true;
  const page = await c.historyPage("r", { limit: 3 });
  assert.deepEqual(Object.keys(page).sort(), ["messages", "truncated"]);
  assert.deepEqual(page.messages.map((m) => m.id), [2, 3]);
  assert.equal(page.truncated, true);
  assert.deepEqual(frames.at(-1), { type: "history", room: "r", limit: 3, id: frames.at(-1).id });
  // Paging back with `before` = the oldest id of the page.
  value = undefined;
  const older = await c.historyPage("r", { limit: 3, before: page.messages[0].id });
  assert.equal(frames.at(-1).before, 2);
  assert.deepEqual(older, { messages: [], truncated: false });
  // Anything but the JSON true is false: as `recovered` is read.
  for (const odd of ["true", 1, "yes", null, false, {}, [true]]) {
    value = odd;
    assert.equal((await c.historyPage("r")).truncated, false, `truncated ${JSON.stringify(odd)}`);
  }
  // history() is the page's messages, whatever its truncated.
  value = true;
  assert.deepEqual((await c.history("r", { limit: 3 })).map((m) => m.id), [2, 3]);
  // The same rules for before and limit: rejected at once, nothing written.
  const written = frames.length;
  await assert.rejects(c.historyPage("r", { before: 0 }), { code: "invalid_message" });
  await assert.rejects(c.historyPage("r", { limit: 2.5 }), { code: "invalid_message" });
  await tick(5);
  assert.equal(frames.length, written);
});

test("unhandled: promises an app forgets never crash it", async () => {
  const { c } = setup({ requestTimeout: 10 });
  void c.connect();
  void c.join("x y");
  void c.send("nowhere", "x");
  c.disconnect();
  await tick(30);
});

test("unhandled: a leave an app forgets, left unanswered past its timeout, does not crash it", async () => {
  const { server, c } = setup({ requestTimeout: 10 });
  try {
    await c.connect();
    await c.join("r");
    server.replies.push((_ws, f) => f.type === "leave"); // no answer
    const left = c.leave("r");
    void left; // fire and forget, as an unmount handler does
    await tick(40);
    await assert.rejects(left, (e) => e.code === "timeout", "it still rejects for whoever awaits it");
  } finally {
    c.disconnect();
  }
});

test("heartbeat: a socket that answers nothing is given up and replaced", async () => {
  const { server, c, events } = setup({ pongTimeout: 30 });
  server.handle = () => {}; // deaf: never answers again
  server.accept = function (ws) {
    ws.readyState = 1;
    this.push(ws, { type: "welcome", user_id: "g", username: "g", authenticated: false, auth_required: false, heartbeat_interval: 0.05 });
  };
  await c.connect();
  await until(() => events("connecting").some((e) => e.reason === "no answer to ping"), "the ping timeout");
  assert.ok(server.sockets[0].sent.some((f) => f.type === "ping"));
  assert.equal(server.sockets[0].closedWith.code, 4000);
  c.disconnect();
});

test("browser: the online event ends the backoff wait at once", async () => {
  const listeners = new Map();
  globalThis.window = globalThis;
  globalThis.addEventListener = (type, fn) => listeners.set(type, fn);
  globalThis.removeEventListener = (type) => listeners.delete(type);
  try {
    const { server, c } = setup({ minReconnectDelay: 60_000, random: () => 0.99 });
    await c.connect();
    assert.equal(typeof listeners.get("online"), "function");
    server.drop(server.last, 1006);
    await tick(20);
    assert.equal(server.sockets.length, 1, "waiting out the backoff");
    listeners.get("online")();
    await until(() => c.state === "connected", "the reconnect on online");
    assert.equal(server.sockets.length, 2);
    c.disconnect();
    assert.equal(listeners.has("online"), false, "the listener goes with disconnect()");
  } finally {
    delete globalThis.window;
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("browser: the offline event gives the socket up (a dead one is not kept until the heartbeat notices); online reconnects at once", async () => {
  const listeners = new Map();
  globalThis.window = globalThis;
  globalThis.addEventListener = (type, fn) => listeners.set(type, fn);
  globalThis.removeEventListener = (type) => listeners.delete(type);
  const { server, c, events } = setup({ minReconnectDelay: 60_000, random: () => 0.99 });
  try {
    await c.connect();
    await c.join("r");
    assert.equal(typeof listeners.get("offline"), "function");
    listeners.get("offline")();
    assert.equal(c.state, "connecting", "the socket is given up at once");
    assert.notEqual(server.sockets[0].closedWith, null, "and closed");
    assert.deepEqual(events("connecting").map((e) => [e.code, e.reason]), [[1006, "offline"]]);
    await tick(20);
    assert.equal(server.sockets.length, 1, "no reconnect before the backoff or online");
    listeners.get("online")();
    await until(() => c.state === "connected" && c.roomState("r") === "joined", "the reconnect on online");
    assert.equal(server.sockets.length, 2);
    c.disconnect();
    assert.equal(listeners.has("offline"), false, "the listener goes with disconnect()");
  } finally {
    c.disconnect();
    delete globalThis.window;
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("browser: with pauseWhenHidden the online event does not reconnect a hidden page; it does once visible", async () => {
  const listeners = new Map();
  const doc = { hidden: true, addEventListener: (t, fn) => listeners.set(t, fn), removeEventListener: (t) => listeners.delete(t) };
  globalThis.window = globalThis;
  globalThis.document = doc;
  globalThis.addEventListener = (type, fn) => listeners.set(type, fn);
  globalThis.removeEventListener = (type) => listeners.delete(type);
  const { server, c } = setup({ pauseWhenHidden: true, minReconnectDelay: 60_000, random: () => 0.99 });
  try {
    await c.connect();
    server.drop(server.last, 1006);
    await tick(20);
    listeners.get("online")();
    await tick(30);
    assert.equal(server.sockets.length, 1, "no reconnect while hidden");
    assert.equal(typeof listeners.get("visibilitychange"), "function", "it waits for the page");
    doc.hidden = false;
    listeners.get("visibilitychange")();
    await until(() => c.state === "connected", "the reconnect once visible");
    assert.equal(server.sockets.length, 2);
    c.disconnect();
  } finally {
    c.disconnect();
    delete globalThis.window;
    delete globalThis.document;
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("moderation: a left the client did not ask for removes the room for good", async () => {
  const { server, c, events } = setup();
  await c.connect();
  await c.join("r");
  server.holdEchoes = true;
  const inFlight = c.send("r", "on the wire");
  await tick(10);
  server.push(server.last, { type: "left", room: "r", reason: "kicked", by: "mod1" });
  assert.deepEqual(events("removed"), [{ room: "r", reason: "kicked", by: "mod1" }]);
  assert.equal(c.roomState("r"), "left");
  await assert.rejects(c.send("r", "after"), { code: "not_in_room" });
  // The send already on the wire is answered by the server: not_in_room, rejected.
  server.push(server.last, { type: "error", id: server.last.sent.find((f) => f.type === "message").id, code: "not_in_room", message: "no" });
  await assert.rejects(inFlight, { code: "not_in_room" });
  server.drop(server.last, 1006);
  await until(() => c.state === "connected", "the reconnect");
  await tick(10);
  assert.equal(server.last.sent.filter((f) => f.type === "join").length, 0, "a removed room is not rejoined");
  c.disconnect();
});

test("moderation: a refused rejoin (banned) is a removed event saying banned; muted errors carry until", async () => {
  const { server, c, events } = setup();
  await c.connect();
  await c.join("r");
  server.replies.push((ws, f) => {
    if (f.type === "join" && f.since !== undefined) {
      server.push(ws, { type: "error", id: f.id, code: "forbidden", message: "banned", room: f.room, reason: "banned", until: 123 });
      return true;
    }
    if (f.type === "message" && f.room === "quiet") {
      server.push(ws, { type: "error", id: f.id, code: "muted", message: "muted", room: "quiet", until: 456 });
      return true;
    }
    return false;
  });
  server.drop(server.last, 1006);
  await until(() => events("removed").length === 1, "the refused rejoin");
  assert.deepEqual(events("removed"), [{ room: "r", reason: "banned", until: 123 }]);
  assert.equal(c.roomState("r"), "left");
  await c.join("quiet");
  const err = await c.send("quiet", "shh").catch((e) => e);
  assert.equal(err.code, "muted");
  assert.equal(err.details.until, 456);
  const muted = [];
  c.on("muted", (m) => muted.push(m));
  server.push(server.last, { type: "muted", room: "quiet", until: null, by: "mod" });
  assert.deepEqual(muted, [{ type: "muted", room: "quiet", until: null, by: "mod" }]);
  c.disconnect();
});

test("moderation: a rejoin refused without a reason (a grant gone) is removed as forbidden", async () => {
  const { server, c, events } = setup();
  await c.connect();
  await c.join("r");
  server.replies.push((ws, f) => {
    if (f.type === "join" && f.since !== undefined) {
      server.push(ws, { type: "error", id: f.id, code: "forbidden", message: "not granted", room: f.room });
      return true;
    }
    return false;
  });
  server.drop(server.last, 1006);
  await until(() => events("removed").length === 1, "the refused rejoin");
  assert.deepEqual(events("removed"), [{ room: "r", reason: "forbidden" }]);
  c.disconnect();
});

test("moderation: kick/mute/unmute resolve with the moderated reply; a lost socket rejects them, and they are not written again", async () => {
  const { server, c } = setup();
  server.replies.push((ws, f) => {
    if (!["kick", "mute", "unmute"].includes(f.type)) return false;
    if (f.room === "black-hole") return true;
    server.push(ws, { type: "moderated", id: f.id, action: f.type, room: f.room, user_id: f.user_id, ...(f.duration ? { until: 99 } : {}) });
    return true;
  });
  await c.connect();
  assert.deepEqual(await c.kick("r", "bob", { reason: "spam" }), { action: "kick", room: "r", user_id: "bob" });
  assert.equal((await c.mute("r", "bob", { duration: 60 })).until, 99);
  assert.equal(server.last.sent.find((f) => f.type === "kick").reason, "spam");
  const lost = c.unmute("black-hole", "bob");
  const first = server.last;
  await until(() => first.sent.some((f) => f.type === "unmute"), "the unmute written");
  server.drop(first, 1006);
  await assert.rejects(lost, { code: "disconnected" });
  await until(() => server.last !== first && c.state === "connected", "the reconnect");
  await c.history("r"); // a round trip on the new socket: whatever was resent came before it
  assert.deepEqual(server.last.sent.map((f) => f.type).filter((t) => t !== "history"), [], "written again after the reconnect");
  c.disconnect();
});

test("sends: an echo lost on a live connection is asked for again after ackTimeout", async () => {
  const { server, c } = setup({ ackTimeout: 40 });
  await c.connect();
  await c.join("r");
  server.holdEchoes = true; // stored, the echo lost
  const p = c.send("r", "once");
  await until(() => server.room("r").messages.length === 1, "stored");
  server.holdEchoes = false;
  const m = await p; // the second write is deduplicated: the original comes back
  assert.equal(m.id, 1);
  assert.equal(server.last.sent.filter((f) => f.type === "message").length, 2);
  assert.equal(server.room("r").messages.length, 1);
  c.disconnect();
});

test("recovery: a server that lost its ids (numbers from 1 again) is followed, not filtered as doubles", async () => {
  const { server, c, events, messages } = setup();
  await c.connect();
  await c.join("r");
  for (let i = 0; i < 5; i++) server.post("r", `old ${i}`);
  await until(() => messages.length === 5, "five messages");
  server.rooms.clear(); // the server restarted without its memory
  server.drop(server.last, 1001);
  await until(() => events("recoveryFailed").length === 1, "the failed recovery");
  server.post("r", "new 1");
  server.post("r", "new 2");
  await until(() => messages.length === 7, "the new messages");
  assert.deepEqual(messages, [1, 2, 3, 4, 5, 1, 2]);
  assert.equal(c.lastId("r"), 2);
  c.disconnect();
});

test("epoch: a rejoin sends, with since, the epoch of the room's latest joined", async (t) => {
  const { server, c, events, messages } = setup();
  t.after(() => c.disconnect());
  await c.connect();
  const first = await c.join("r");
  assert.equal(first.epoch, "epoch-1");
  assert.equal(c.epoch("r"), "epoch-1");
  server.post("r", "a");
  server.post("r", "b");
  await until(() => messages.length === 2, "two messages");
  server.drop(server.last, 1006);
  server.post("r", "c"); // while the client is away
  await until(() => c.roomState("r") === "joined" && messages.length === 3, "the rejoin");
  const join = server.last.sent.find((f) => f.type === "join");
  assert.deepEqual([join.since, join.epoch], [2, "epoch-1"]);
  const rejoined = events("joined").at(-1);
  assert.deepEqual([rejoined.recovered, rejoined.epoch, rejoined.epochChanged], [true, "epoch-1", undefined]);
  assert.deepEqual(messages, [1, 2, 3]);
  // A gap's rejoin carries it too.
  const ws = server.last;
  server.room("r").members.delete(ws);
  server.post("r", "d");
  server.room("r").members.add(ws);
  server.post("r", "e");
  await until(() => messages.length === 5, "the gap's replay");
  assert.deepEqual(ws.sent.filter((f) => f.type === "join").map((f) => [f.since, f.epoch]), [[2, "epoch-1"], [3, "epoch-1"]]);
});

test("epoch: a numbering begun again while away (another member posted past our last id) replays nothing as ours; the next message is delivered", async (t) => {
  // Before: the rejoin carried no epoch, and a server whose ids had started again from 1
  // answered recovered: true and replayed its new 4 and 5 as what followed our 3 (the new
  // 1 to 3 missing unannounced, ids naming other messages), for the app to show as such.
  const { server, c, events, messages } = setup();
  t.after(() => c.disconnect());
  const texts = [];
  c.on("message", (m) => texts.push(m.text));
  await c.connect();
  await c.join("r");
  for (const text of ["old 1", "old 2", "old 3"]) server.post("r", text);
  await until(() => messages.length === 3, "three messages");
  server.drop(server.last, 1001);
  server.rooms.clear(); // the server restarted without its memory: a new numbering
  for (let i = 1; i <= 5; i++) server.post("r", `new ${i}`);
  await until(() => events("recoveryFailed").length === 1, "the failed recovery");
  assert.deepEqual(events("recoveryFailed"), [{ room: "r", since: 3, last_id: 5, epochChanged: true }]);
  const rejoined = events("joined").at(-1);
  assert.deepEqual([rejoined.rejoin, rejoined.recovered, rejoined.last_id, rejoined.epoch, rejoined.epochChanged],
    [true, false, 5, "epoch-2", true]);
  assert.equal(c.lastId("r"), 5, "the new numbering's last id");
  assert.equal(c.epoch("r"), "epoch-2");
  server.push(server.last, server.room("r").messages[4]); // the new 5 again: not delivered
  server.post("r", "new 6");
  await until(() => messages.length === 4, "the next live message");
  assert.deepEqual(texts, ["old 1", "old 2", "old 3", "new 6"]);
  assert.deepEqual(messages, [1, 2, 3, 6]);
  // Its sends go at once (nothing replayed to wait for), and the next rejoin is in the new epoch.
  const sent = await within(c.send("r", "mine"), 1000, "a send after the new numbering");
  assert.equal(sent.id, 7);
  server.drop(server.last, 1006);
  await until(() => c.roomState("r") === "joined", "the next rejoin");
  const join = server.last.sent.find((f) => f.type === "join");
  assert.deepEqual([join.since, join.epoch], [7, "epoch-2"]);
  assert.equal(events("recoveryFailed").length, 1);
});

test("epoch: a joined without epoch (a server of the release before) works as before, and none is sent", async (t) => {
  const { server, c, events, messages } = setup();
  t.after(() => c.disconnect());
  server.epochs = false;
  await c.connect();
  const first = await c.join("r");
  assert.equal("epoch" in first, false);
  assert.equal(c.epoch("r"), null);
  server.post("r", "a");
  server.post("r", "b");
  await until(() => messages.length === 2, "two messages");
  server.drop(server.last, 1006);
  server.post("r", "c");
  await until(() => c.roomState("r") === "joined" && messages.length === 3, "the rejoin");
  const join = server.last.sent.find((f) => f.type === "join");
  assert.equal(join.since, 2);
  assert.equal("epoch" in join, false);
  assert.equal(events("joined").at(-1).recovered, true);
  // A restart is still followed as before: recovered: false, the next message sets the baseline.
  server.rooms.clear();
  server.drop(server.last, 1001);
  await until(() => events("recoveryFailed").length === 1, "the failed recovery");
  assert.equal("epochChanged" in events("recoveryFailed")[0], false);
  server.post("r", "new 1");
  await until(() => messages.length === 4, "the new message");
  assert.deepEqual(messages, [1, 2, 3, 1]);
  // An epoch that is no string of 1-64 characters is as none: never sent back.
  for (const [i, bad] of [5, "", "x".repeat(65), "a\nb", null, true].entries()) {
    const room = `odd${i}`;
    server.replies.unshift((ws, f) => {
      if (f.type !== "join" || f.room !== room) return false;
      server.room(room).members.add(ws);
      server.push(ws, { type: "joined", id: f.id, room, users: [], last_id: 0, ...(f.since === undefined ? {} : { recovered: true }), epoch: bad });
      return true;
    });
    const joined = await c.join(room);
    assert.equal(joined.epoch, undefined, `epoch ${JSON.stringify(bad)}`);
    assert.equal(c.epoch(room), null);
  }
});

test("epoch: join's own since goes with the app's epoch; an epoch not of 1-64 characters without control characters is rejected at once", async (t) => {
  const { server, c, events } = setup({ requestTimeout: 300 });
  t.after(() => c.disconnect());
  await c.connect();
  const joinsOf = (room) => server.last.sent.filter((f) => f.type === "join" && f.room === room);
  const bad = ["", "x".repeat(65), "\u{1F600}".repeat(65), "a\nb", "\u0000", "tab\there", "del\u007f", 5, true, {}, ["e"], 5n];
  const wrong = [];
  for (const [i, epoch] of bad.entries()) {
    const room = `bad${i}`;
    const outcome = await Promise.resolve()
      .then(() => c.join(room, { since: 3, epoch }))
      .then((j) => `resolved ${JSON.stringify(j)}`, (e) => `${e.name} ${e.code ?? ""}: ${e.message}`);
    await tick(5);
    const got = { outcome, state: c.roomState(room), joins: joinsOf(room).length };
    const ok = outcome.startsWith("ChatError invalid_message: ") && outcome.includes("epoch") && got.state === "left" && got.joins === 0;
    if (!ok) wrong.push(`epoch ${typeof epoch} ${String(epoch)}: ${JSON.stringify(got)}`);
  }
  assert.deepEqual(wrong, []);
  // 64 characters (code points, as the server counts them) go out as they are.
  const long = "\u{1F600}".repeat(64);
  server.room("wide").epoch = long;
  const wide = await c.join("wide", { since: 0, epoch: long });
  assert.deepEqual([joinsOf("wide")[0].since, joinsOf("wide")[0].epoch, wide.epoch, wide.recovered], [0, long, long, true]);
  // An epoch without since is not sent (there are no ids it counts).
  await c.join("nosince", { epoch: "epoch-x" });
  assert.equal("epoch" in joinsOf("nosince")[0], false);
  // A persisted since with its epoch: the server's room numbers afresh, so nothing is replayed.
  for (let i = 0; i < 4; i++) server.post("kept", `m${i}`);
  const resumed = await c.join("kept", { since: 9, epoch: "epoch-gone" });
  assert.deepEqual([joinsOf("kept")[0].since, joinsOf("kept")[0].epoch], [9, "epoch-gone"]);
  assert.deepEqual([resumed.recovered, resumed.last_id, resumed.epochChanged], [false, 4, true]);
  assert.deepEqual(events("recoveryFailed").at(-1), { room: "kept", since: 9, last_id: 4, epochChanged: true });
  assert.equal(c.lastId("kept"), 4);
  assert.equal(c.epoch("kept"), server.room("kept").epoch);
});

test("browser: pauseWhenHidden holds a due reconnect until the page is visible", async () => {
  const listeners = new Map();
  const doc = { hidden: true, addEventListener: (t, fn) => listeners.set(t, fn), removeEventListener: (t) => listeners.delete(t) };
  globalThis.document = doc;
  try {
    const { server, c } = setup({ pauseWhenHidden: true });
    await c.connect();
    server.drop(server.last, 1006);
    await until(() => listeners.has("visibilitychange"), "the wait for visibility");
    await tick(30);
    assert.equal(server.sockets.length, 1, "no reconnect while hidden");
    assert.equal(c.state, "connecting");
    doc.hidden = false;
    listeners.get("visibilitychange")();
    await until(() => c.state === "connected", "the reconnect once visible");
    assert.equal(listeners.has("visibilitychange"), false);
    c.disconnect();
  } finally {
    delete globalThis.document;
  }
});

test("leave: written sends the server then refuses (rate_limited, unavailable) reject with left, never go out on a later join", async (t) => {
  const { server, c } = setup();
  server.replies.push((ws, f) => {
    if (f.type !== "message" || !["rate_limited", "unavailable"].includes(f.text)) return false;
    server.push(ws, { type: "error", id: f.id, code: f.text, message: "not now", ...(f.text === "rate_limited" ? { retry_after_ms: 30 } : {}) });
    return true;
  });
  t.after(() => c.disconnect()); // also when an assertion fails
  await c.connect();
  await c.join("r");
  await c.send("r", "first"); // the join's replay is in: sends go on the wire at once
  const sends = ["stored", "rate_limited", "unavailable"].map((text) => c.send("r", text));
  await c.leave("r"); // all three are on the wire: the server answers them before its `left`
  assert.equal((await sends[0]).id, 2);
  for (const p of sends.slice(1)) await assert.rejects(within(p, 1000, "a refused send"), { code: "left" });
  assert.deepEqual(c.pending, [], "nothing of the left room stays in the outbox");
  await c.join("r");
  assert.equal((await within(c.send("r", "later"), 1000, "a send after the join")).id, 3);
  const written = server.last.sent.filter((f) => f.type === "message").map((f) => f.text);
  assert.deepEqual(written, ["first", "stored", "rate_limited", "unavailable", "later"], "the refused sends are not posted on the join");
});

/** Joined "r", wrote "first" (acknowledged) and "lost" (never answered), then left "r". */
async function leftWithAnUnansweredSend(t, opts) {
  const { server, c } = setup(opts);
  server.replies.push((ws, f) => f.type === "message" && f.text === "lost"); // the answer never comes
  t.after(() => c.disconnect()); // also when an assertion fails
  await c.connect();
  await c.join("r");
  await c.send("r", "first"); // the join's replay is in: sends go on the wire at once
  const lost = c.send("r", "lost");
  await c.leave("r");
  return { server, c, lost };
}

test("leave: a written send whose answer goes with the connection rejects with left and is not resent", async (t) => {
  const { server, c, lost } = await leftWithAnUnansweredSend(t);
  server.drop(server.last, 1006);
  await assert.rejects(within(lost, 1000, "the send"), { code: "left" });
  assert.deepEqual(c.pending, []);
  await within(c.connect(), 1000, "the reconnect");
  await c.join("r");
  assert.equal((await within(c.send("r", "later"), 1000, "a send after the join")).text, "later");
  assert.deepEqual(server.last.sent.filter((f) => f.type === "message").map((f) => f.text), ["later"]);
});

test("leave: a written send of a left room without an echo in ackTimeout rejects with left, not written again", async (t) => {
  const { server, c, lost } = await leftWithAnUnansweredSend(t, { ackTimeout: 30 });
  await assert.rejects(within(lost, 1000, "the send"), { code: "left" });
  assert.deepEqual(c.pending, []);
  await c.join("r");
  assert.equal((await within(c.send("r", "later"), 1000, "a send after the join")).text, "later");
  assert.deepEqual(server.last.sent.filter((f) => f.type === "message").map((f) => f.text), ["first", "lost", "later"]);
});

test("disconnect: a pending join and a send with a timeout reject with disconnected at once; no timer of the client is left", async (t) => {
  const timers = () => process.getActiveResourcesInfo().filter((r) => r === "Timeout").length;
  const before = timers();
  const { server, c } = setup({ requestTimeout: 5000, sendTimeout: 5000 });
  t.after(() => c.disconnect()); // also when an assertion fails
  server.replies.push((ws, f) => f.type === "join" && f.room === "slow"); // never answered
  await c.connect();
  await c.join("r");
  await c.send("r", "first"); // the join's replay is in: sends go on the wire at once
  server.holdEchoes = true;
  const joining = c.join("slow");
  const timed = c.send("r", "timed");
  const untimed = c.send("r", "untimed", { timeout: 0 });
  await until(() => server.room("r").messages.length === 3, "both sends stored");
  c.disconnect();
  await assert.rejects(within(joining, 1000, "the join"), { code: "disconnected" });
  await assert.rejects(within(timed, 1000, "the send"), { code: "disconnected" });
  await until(() => timers() <= before, "the client's timers cleared (they keep Node alive)");
  // Rooms and the outbox are kept for a later connect().
  assert.deepEqual(c.joinedRooms, ["r", "slow"]);
  assert.deepEqual(c.pending.map((e) => e.text), ["timed", "untimed"]);
  server.holdEchoes = false;
  server.replies.length = 0;
  const acks = [];
  c.on("ack", (m) => acks.push(m.text));
  await within(c.connect(), 1000, "the connect");
  assert.equal((await within(untimed, 1000, "the send without a timeout")).text, "untimed");
  assert.deepEqual(acks, ["timed", "untimed"], "delivered once the client is back (the replay acknowledges them)");
  assert.equal(c.roomState("slow"), "joining");
  await within(c.join("slow"), 1000, "the join");
});

test("token: a refused refresh is tried again with a growing delay, not every second", async (t) => {
  t.mock.timers.enable({ apis: ["setTimeout", "Date"] });
  /** Moves the mocked clock on by `ms`, letting the fake server and the client run between steps. */
  const advance = async (ms) => {
    for (let i = 0; i < ms; i += 50) {
      t.mock.timers.tick(50);
      await new Promise((r) => setImmediate(r));
    }
  };
  let asked = 0;
  const { server, c } = setup({ getToken: () => (asked++, fakeToken("tina", 2)) }); // refreshed after 1 s
  t.after(() => c.disconnect()); // also when an assertion fails
  const refused = [];
  server.replies.push((ws, f) => {
    if (f.type !== "auth" || ws.sent.filter((s) => s.type === "auth").length === 1) return false; // the connect's auth passes
    refused.push(Date.now());
    server.push(ws, { type: "error", id: f.id, code: "auth_failed", message: "unknown key" });
    return true;
  });
  const connected = c.connect();
  await advance(100);
  await connected;
  // The server's notice before its close 4002: the reconnect asks for a token, not the notice.
  server.push(server.last, { type: "error", code: "token_expired", message: "token expired" });
  await advance(50);
  assert.equal(asked, 1, "getToken asked again for the notice of a close 4002");
  await advance(20_000);
  const gaps = refused.slice(1).map((at, i) => at - refused[i]);
  assert.ok(refused.length <= 7, `${refused.length} refused refreshes in 20 s (gaps ${gaps})`);
  for (let i = 1; i < gaps.length; i++) assert.ok(gaps[i] >= gaps[i - 1] - 50, `the delay shrank: ${gaps}`);
  assert.ok(gaps.at(-1) >= 4000, `the delay did not grow: ${gaps}`);
});

/** Delivers `text` (raw JSON, so `1e400` or `"5"` reach the client as a proxy would send them) to `ws`. */
const pushRaw = (ws, text) => ws.onmessage?.({ data: text });

test("retry_after_ms from the wire: the error's retryAfterMs follows the shared cases (clients/conformance/retry-after-ms.json)", async () => {
  const shared = JSON.parse(readFileSync(new URL("../../../conformance/retry-after-ms.json", import.meta.url), "utf8"));
  const { server, c } = setup();
  let next = null;
  server.replies.push((ws, f) => {
    if (f.type !== "history") return false;
    pushRaw(ws, `{"type": "error", "id": ${JSON.stringify(f.id)}, "code": "bad_request", "message": "no", "retry_after_ms": ${next}}`);
    return true;
  });
  await c.connect();
  const wrong = [];
  try {
    for (const [text, wait] of shared.cases) {
      next = text;
      const err = await c.history("r").then(() => null, (e) => e);
      if (err?.code !== "bad_request" || !Object.is(err.retryAfterMs, wait ?? undefined)) {
        wrong.push(`${text}: ${err?.code} ${err?.retryAfterMs}, not ${wait ?? undefined}`);
      }
    }
  } finally {
    c.disconnect();
  }
  assert.deepEqual(wrong, []);
});

test("retry_after_ms from the wire: a hostile value schedules no timer over a day, and the refused send still goes", async () => {
  // 1e400 is Infinity to JSON.parse: the pacer was paused until Infinity, and its flush timer
  // (setTimeout(Infinity) runs after 1 ms) fired again and again: a hot loop, the send stuck.
  const realSetTimeout = globalThis.setTimeout;
  const delays = [];
  globalThis.setTimeout = (fn, ms, ...args) => {
    delays.push(ms);
    return realSetTimeout(fn, ms, ...args);
  };
  const { server, c } = setup();
  const limited = [];
  c.on("rateLimited", (e) => limited.push(e.retryAfterMs));
  const hostile = ["1e400", "\"5\"", "-5"];
  server.replies.push((ws, f) => {
    if (f.type !== "message" || hostile.length === 0) return false;
    pushRaw(ws, `{"type": "error", "id": ${JSON.stringify(f.id)}, "code": "rate_limited", "message": "slow down", "retry_after_ms": ${hostile.shift()}}`);
    return true;
  });
  try {
    await c.connect();
    await c.join("r");
    delays.length = 0;
    const started = Date.now();
    const m = await within(c.send("r", "hello"), 8000, "the send, refused three times");
    assert.equal(m.text, "hello");
    // Each refusal without a usable wait: the default second (the pace may add to it).
    assert.deepEqual(limited, [1000, 1000, 1000]);
    assert.ok(Date.now() - started >= 2900, "not resent before the default wait");
    const huge = delays.filter((d) => !(d <= 86_400_000));
    assert.deepEqual(huge, [], "no timer over a day (nor NaN)");
    assert.ok(delays.length < 200, `${delays.length} timers: a hot loop`);
  } finally {
    globalThis.setTimeout = realSetTimeout;
    c.disconnect();
  }
});

/** A server whose greeting carries `heartbeat_interval` as the raw JSON text `text`, as a proxy could send it. */
function rawWelcome(server, text) {
  server.accept = function (ws) {
    if (ws.readyState !== 0) return;
    ws.readyState = 1;
    ws.onopen?.({});
    ws.user = { user_id: `guest-${this.sockets.length}`, username: "guest" };
    pushRaw(ws, `{"type": "welcome", "user_id": "${ws.user.user_id}", "username": "guest", "authenticated": false, "auth_required": false, "heartbeat_interval": ${text}}`);
  };
}

test("heartbeat_interval from the wire: the connected event's follows the shared cases (clients/conformance/heartbeat-interval.json)", async () => {
  const shared = JSON.parse(readFileSync(new URL("../../../conformance/heartbeat-interval.json", import.meta.url), "utf8"));
  const wrong = [];
  for (const [text, seconds] of shared.cases) {
    const { server, c, events } = setup();
    rawWelcome(server, text);
    try {
      await within(c.connect(), 2000, `connect with heartbeat_interval ${text.slice(0, 40)}`);
      const [welcome] = events("connected");
      const got = welcome.heartbeat_interval;
      // none: as if the field were absent
      if (!Object.is(got, seconds ?? undefined) || (seconds === null && "heartbeat_interval" in welcome)) {
        wrong.push(`${text.slice(0, 40)}: ${JSON.stringify(got)}, not ${seconds ?? undefined}`);
      }
    } finally {
      c.disconnect();
    }
  }
  assert.deepEqual(wrong, []);
});

test("heartbeat_interval from the wire: a hostile value runs no timer loop and no timer over a day", async () => {
  // A string or an object gave the ping timer a NaN delay (runs after 1 ms, then again: a hot
  // loop); 1e400 (JSON.parse: Infinity) and 1e20 a delay over 2^31-1 ms, which runs at once.
  const realSetTimeout = globalThis.setTimeout;
  const delays = [];
  globalThis.setTimeout = (fn, ms, ...args) => {
    delays.push(ms);
    return realSetTimeout(fn, ms, ...args);
  };
  const wrong = [];
  try {
    for (const text of ['"abc"', "{}", "[1, 2]", "1e400", "1e20", "-1", "0"]) {
      const { server, c } = setup();
      rawWelcome(server, text);
      try {
        delays.length = 0;
        await c.connect();
        await new Promise((resolve) => realSetTimeout(resolve, 200));
        const huge = delays.filter((d) => !(d <= 86_400_000));
        if (huge.length > 0 || delays.length > 20) wrong.push(`${text}: ${delays.length} timers in 200 ms, ${huge.length} over a day or NaN`);
        assert.equal(server.last.sent.filter((f) => f.type === "ping").length, 0, `${text}: no ping before an interval of silence`);
      } finally {
        c.disconnect();
      }
    }
  } finally {
    globalThis.setTimeout = realSetTimeout;
  }
  assert.deepEqual(wrong, []);
});

test("last_id from the wire: a joined whose last_id is not a whole number >= 0 never becomes the room's lastId", async (t) => {
  const wrong = [];
  for (const raw of ['"5"', "null", "1e400", "-1", "2.5", "true", "{}", "9007199254740993", "absent"]) {
    const { server, c, messages } = setup();
    t.after(() => c.disconnect());
    server.replies.push((ws, f) => {
      if (f.type !== "join" || f.since !== undefined) return false;
      server.room(f.room).members.add(ws);
      const lastId = raw === "absent" ? "" : `, "last_id": ${raw}`;
      pushRaw(ws, `{"type": "joined", "id": ${JSON.stringify(f.id)}, "room": "${f.room}", "users": []${lastId}}`);
      return true;
    });
    for (let i = 1; i <= 3; i++) server.post("r", `before ${i}`); // the room is at 3
    await c.connect();
    const joined = await c.join("r");
    // The next live messages are taken as they come (the first sets the baseline), never
    // dropped as "seen" nor taken for a gap; a reconnect then re-joins with `since` 5.
    server.post("r", "4");
    server.post("r", "5");
    await until(() => messages.length >= 2, "the live messages").catch(() => {});
    const lastId = c.lastId("r");
    const joins = server.last.sent.filter((f) => f.type === "join").length;
    const first = server.last;
    server.drop(first, 1006);
    await until(() => server.last !== first && server.last.sent.some((f) => f.type === "join"), "the rejoin").catch(() => {});
    const since = server.last === first ? "no rejoin" : server.last.sent.find((f) => f.type === "join").since;
    const got = { joined: joined.last_id, messages, lastId, joins, since };
    const want = { joined: 0, messages: [4, 5], lastId: 5, joins: 1, since: 5 };
    if (JSON.stringify(got) !== JSON.stringify(want)) wrong.push(`last_id ${raw}: ${JSON.stringify(got)}`);
    c.disconnect();
  }
  assert.deepEqual(wrong, []);
});

test("message ids from the wire: after recovered:false only a whole number >= 0 sets the new baseline", async (t) => {
  const { server, c, events, messages } = setup();
  t.after(() => c.disconnect());
  server.replies.push((ws, f) => {
    if (f.type !== "join" || f.since === undefined) return false;
    pushRaw(ws, `{"type": "joined", "id": ${JSON.stringify(f.id)}, "room": "r", "users": [], "last_id": 40, "recovered": false}`);
    for (const id of ["1e400", "2.5", "-1", '"40"', "null", "9007199254740993", "40", "41"]) {
      pushRaw(ws, `{"type": "message", "id": ${id}, "room": "r", "from": "x", "user_id": "x", "text": "t", "timestamp": 1}`);
    }
    return true;
  });
  await c.connect();
  await c.join("r", { since: 7 });
  await until(() => messages.length >= 2, "the kept messages").catch(() => {});
  assert.deepEqual(messages, [40, 41]);
  assert.equal(c.lastId("r"), 41);
  assert.deepEqual(events("recoveryFailed"), [{ room: "r", since: 7, last_id: 40 }]);
  c.disconnect();
});

test("last_id from the wire: a rejoin's recovered:false with an unreadable last_id reports a number", async (t) => {
  const { server, c, events } = setup();
  t.after(() => c.disconnect());
  server.replies.push((ws, f) => {
    if (f.type !== "join" || f.since === undefined) return false;
    pushRaw(ws, `{"type": "joined", "id": ${JSON.stringify(f.id)}, "room": "r", "users": [], "last_id": "40", "recovered": false}`);
    return true;
  });
  await c.connect();
  const joined = await c.join("r", { since: 7 });
  assert.equal(joined.last_id, 7, "the room's own lastId, as the server's is unreadable");
  assert.deepEqual(events("recoveryFailed"), [{ room: "r", since: 7, last_id: 7 }]);
  assert.equal(c.lastId("r"), 7);
  c.disconnect();
});

test("last_id from the wire: a joined's last_id and a message's id follow the shared cases (clients/conformance/last-id.json)", async (t) => {
  const shared = JSON.parse(readFileSync(new URL("../../../conformance/last-id.json", import.meta.url), "utf8"));
  const { server, c } = setup();
  t.after(() => c.disconnect());
  const delivered = new Map();
  c.on("message", (m) => delivered.set(m.room, [...(delivered.get(m.room) ?? []), m.id]));
  // Room j<i> is joined with last_id <text>; room m<i> with an unreadable last_id (no
  // position: the next message sets it), then gets a message whose id is <text>, then a ping.
  server.replies.push((ws, f) => {
    if (f.type !== "join") return false;
    const i = Number(f.room.slice(1));
    const lastId = f.room[0] === "j" ? shared.cases[i][0] : "null";
    pushRaw(ws, `{"type": "joined", "id": ${JSON.stringify(f.id)}, "room": "${f.room}", "users": [], "last_id": ${lastId}}`);
    if (f.room[0] === "m") {
      pushRaw(ws, `{"type": "message", "id": ${shared.cases[i][0]}, "room": "${f.room}", "from": "x", "user_id": "x", "text": "t", "timestamp": 1}`);
    }
    return true;
  });
  await c.connect();
  const wrong = [];
  for (const [i, [text, want]] of shared.cases.entries()) {
    const joined = await within(c.join(`j${i}`), 2000, `join with last_id ${text.slice(0, 40)}`);
    if (joined.last_id !== (want ?? 0) || c.lastId(`j${i}`) !== want) {
      wrong.push(`last_id ${text.slice(0, 40)}: joined ${JSON.stringify(joined.last_id)}, lastId ${JSON.stringify(c.lastId(`j${i}`))}, not ${want}`);
    }
    await within(c.join(`m${i}`), 2000, `join m${i}`);
    await tick(5);
    const got = delivered.get(`m${i}`) ?? [];
    if (JSON.stringify(got) !== JSON.stringify(want === null ? [] : [want]) || c.lastId(`m${i}`) !== want) {
      wrong.push(`message id ${text.slice(0, 40)}: delivered ${JSON.stringify(got)}, lastId ${JSON.stringify(c.lastId(`m${i}`))}, not ${want}`);
    }
  }
  assert.deepEqual(wrong, []);
});

test("rooms: a rejoin's ping refused (rate_limited: the request bucket ran dry at this join) still ends the replay, and the room's sends go", async (t) => {
  const { server, c, events } = setup();
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  // A rejoin whose replay has no known end (recovered: false, last_id above since) is
  // followed by a ping; the server answers it, like any request over RATE_LIMIT_REQUESTS,
  // with an error: it comes after the joined and the replay all the same.
  server.replies.push((ws, f) => {
    if (f.type !== "join" || f.since === undefined) return false;
    server.room(f.room).members.add(ws);
    server.push(ws, { type: "joined", id: f.id, room: f.room, users: [], last_id: f.since + 5, recovered: false });
    return true;
  });
  server.replies.push((ws, f) => {
    if (f.type !== "ping") return false;
    server.push(ws, { type: "error", id: f.id, code: "rate_limited", message: "slow down", retry_after_ms: 100 });
    return true;
  });
  server.drop(server.last, 1006);
  await until(() => c.roomState("r") === "joined" && server.sockets.length === 2, "the rejoin");
  assert.equal(server.last.sent.filter((f) => f.type === "ping").length, 1, "a ping behind the rejoin");
  const sent = await within(c.send("r", "after the rejoin"), 2000, "the send after a refused sync ping");
  assert.equal(sent.text, "after the rejoin");
  assert.deepEqual(events("error").filter((e) => e.code === "rate_limited"), [], "the ping's refusal is the client's own business");
});

/** The fake server answers joins with a replay of no known end (`recovered: false`, `last_id`
 * above `since`): the client writes a `ping` behind each. */
function joinsWithUnknownEnd(server) {
  server.replies.push((ws, f) => {
    if (f.type !== "join") return false;
    server.room(f.room).members.add(ws);
    const joined = { room: f.room, users: [], last_id: f.since + 5, recovered: false };
    server.push(ws, { type: "joined", id: f.id, ...joined });
    return true;
  });
}

test("rooms: the ping behind a join refused rate_limited holds the other requests back for "
  + "its retry_after_ms (the request bucket refused it), as in the Python and Rust clients",
async (t) => {
  const { server, c } = setup();
  t.after(() => c.disconnect());
  await c.connect();
  // A join whose replay has no known end (recovered: false, last_id above since): a ping
  // goes behind it, and the server, its request bucket empty, refuses that ping.
  joinsWithUnknownEnd(server);
  let refusedAt = 0;
  server.replies.push((ws, f) => {
    if (f.type !== "ping" || refusedAt) return false;
    refusedAt = Date.now();
    const refusal = { code: "rate_limited", message: "slow down", retry_after_ms: 150 };
    server.push(ws, { type: "error", id: f.id, ...refusal });
    return true;
  });
  let readAt = 0;
  server.replies.push((ws, f) => {
    if (f.type === "list_users") readAt = Date.now();
    return false; // answered as usual
  });
  await c.join("r", { since: 5 });
  await until(() => refusedAt > 0, "the ping behind the join refused");
  const read = c.listUsers("r", { timeout: 2000 });
  await tick(40);
  assert.equal(readAt, 0, "no request written before retry_after_ms");
  await within(read, 2000, "the read after the pause");
  assert.ok(readAt - refusedAt >= 145, `the read went ${readAt - refusedAt} ms after the refusal`);
});

/**
 * A token bucket of the fake server's, as the real server's per user: empty at the first charge,
 * one token per `tokenMs`, holding one at most. The frames of `types` spend it; over it, they
 * are refused `rate_limited` with the bucket's `retry_after_ms`, and what is not refused is
 * answered as usual. Returns the refused frames' types, in order, as they come.
 */
function chargeOneBucket(server, types, tokenMs) {
  let tokens = 0;
  let stamp = 0;
  const refused = [];
  server.replies.push((ws, f) => {
    if (!types.includes(f.type)) return false;
    const now = Date.now();
    tokens = stamp ? Math.min(1, tokens + (now - stamp) / tokenMs) : 0;
    stamp = now;
    if (tokens >= 1 - 1e-9) {
      tokens -= 1;
      return false; // answered as usual
    }
    refused.push(f.type);
    const retry = Math.ceil((1 - tokens) * tokenMs);
    const refusal = { code: "rate_limited", message: "slow", retry_after_ms: retry };
    server.push(ws, { type: "error", id: f.id, ...refusal });
    return true;
  });
  return refused;
}

test("requests: the ping behind a join spends a token of the pace the request pacer learnt "
  + "(the request bucket is charged for it): the next request waits for its refill, as in the "
  + "Python and Rust clients", async (t) => {
  const TOKEN = 400; // ms per token of the server's request bucket, which holds one at most
  const { server, c } = setup({ maxRequestsInFlight: 1 }); // a window, and a pacer, of one
  t.after(() => c.disconnect());
  await c.connect();
  // The user's request bucket, empty at the first read: the pings and the reads spend it, as
  // on the real server (the joins too there, but they are the join pacer's: not here).
  const refused = chargeOneBucket(server, ["ping", "list_users"], TOKEN);
  // A join whose replay has no known end (recovered: false, last_id above since): a ping
  // goes behind it.
  joinsWithUnknownEnd(server);
  await within(c.listUsers("r", { timeout: 5000 }), 5000, "the first read, after its refusal");
  assert.deepEqual(refused, ["list_users"], "the refusal the pace is learnt from");
  // Both buckets fill up again (one token each); there is no event to await.
  await tick(2 * TOKEN);
  await c.join("r", { since: 5 }); // and its ping, written at once, spends that token
  await within(c.listUsers("r", { timeout: 5000 }), 5000, "the read after the ping");
  assert.deepEqual(refused, ["list_users"], "the read after the ping waited for the refill");
});

test("joins and requests: one bucket on the server, so each pacer counts the other's writes "
  + "in the pace it learnt: a join then a read, a read then a join, neither refused, as in the "
  + "Python and Rust clients", async (t) => {
  const TOKEN = 400; // ms per token of the user's one bucket, which holds one at most
  // Windows, and pacers' buckets, of one.
  const { server, c } = setup({ maxRequestsInFlight: 1, maxJoinsInFlight: 1 });
  t.after(() => c.disconnect());
  await c.connect();
  // The user's bucket, empty at the first charge: joins, pings and reads spend it, as on the
  // real server (RATE_LIMIT_REQUESTS).
  const refused = chargeOneBucket(server, ["join", "ping", "list_users"], TOKEN);
  // The refusals the two paces are learnt from: the read's (the bucket empty), then the
  // join's, written right behind the read written again (which took the token).
  await within(c.listUsers("a", { timeout: 5000 }), 5000, "the first read, after its refusal");
  await within(c.join("a"), 5000, "the first join, after its refusal");
  const learnt = ["list_users", "join"];
  assert.deepEqual(refused, learnt, "the refusals the paces are learnt from");
  // The bucket fills up again (one token), and so does each pacer's; no event to await.
  await tick(2 * TOKEN);
  await within(c.join("b"), 5000, "a join"); // a first join: no replay, no ping behind it
  await within(c.listUsers("b", { timeout: 5000 }), 5000, "the read after the join");
  assert.deepEqual(refused, learnt, "the read after the join waited for the refill");
  await tick(2 * TOKEN);
  await within(c.listUsers("b", { timeout: 5000 }), 5000, "a read");
  await within(c.join("c"), 5000, "the join after the read");
  assert.deepEqual(refused, learnt, "the join after the read waited for the refill");
});

test("sends: another member's message or dm carrying our clientMsgId acknowledges nothing (ids are unique per sender only)", async (t) => {
  const { server, c } = setup({ maxInFlight: 1 });
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  server.holdEchoes = true; // the first send stored, its echo late: the second waits its turn
  const first = c.send("r", "first", { clientMsgId: "c1" });
  await until(() => server.room("r").messages.length === 1, "the first send stored");
  const second = c.send("r", "second", { clientMsgId: "c2" });
  const ws = server.last;
  // Bob's own message and dm, his client_msg_id "c2" too: every member gets it.
  const room = server.room("r");
  const bobs = { type: "message", id: ++room.seq, room: "r", from: "bob", user_id: "bob", text: "bob's", timestamp: 1, client_msg_id: "c2" };
  room.messages.push(bobs);
  server.push(ws, bobs);
  server.push(ws, { type: "dm", id: 1, from: "bob", user_id: "bob", to: ws.user.user_id, text: "hi", timestamp: 1, client_msg_id: "c2" });
  server.holdEchoes = false;
  server.push(ws, room.messages[0]); // the first one's echo: the window opens
  assert.equal((await within(first, 2000, "the first send")).text, "first");
  const mine = await within(second, 2000, "the second send");
  assert.deepEqual([mine.text, mine.user_id, mine.id], ["second", ws.user.user_id, 3]);
  assert.equal(ws.sent.filter((f) => f.type === "message" && f.client_msg_id === "c2").length, 1, "written once");
});

test("sends: a send again with the clientMsgId of one still pending waits for that send, as in the Python client; written once", async (t) => {
  // It was refused at once with invalid_message ("already pending"): an application retrying
  // a send that timed out, with the same id so that the server deduplicates, got an error.
  const { server, c } = setup();
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  server.holdEchoes = true; // stored, its echo late
  const first = c.send("r", "hello", { clientMsgId: "same", timeout: 20 });
  await assert.rejects(first, (e) => e.code === "timeout");
  const again = c.send("r", "hello", { clientMsgId: "same" });
  const third = c.dm("bob", "other text", { clientMsgId: "same" }); // the first one's room and text go
  const ws = server.last;
  server.holdEchoes = false;
  server.push(ws, server.room("r").messages[0]);
  const [a, b] = await within(Promise.all([again, third]), 2000, "the repeated sends");
  assert.deepEqual([a.id, a.text, a.client_msg_id], [1, "hello", "same"]);
  assert.equal(b, a, "the same echo");
  assert.equal(ws.sent.filter((f) => f.client_msg_id === "same").length, 1, "written once");
  assert.equal(server.room("r").messages.length, 1);
});

test("sends: a refusal rejects every caller waiting for the same clientMsgId; full outbox still takes the repeat", async (t) => {
  const { server, c } = setup({ outboxLimit: 1 });
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  server.replies.push((ws, f) => {
    if (f.type !== "message") return false;
    server.push(ws, { type: "error", id: f.id, code: "message_too_large", message: "too long" });
    return true;
  });
  const first = c.send("r", "x".repeat(10), { clientMsgId: "big" });
  const again = c.send("r", "x".repeat(10), { clientMsgId: "big" }); // the outbox (1) is full: not a new send
  for (const p of [first, again]) await assert.rejects(within(p, 2000, "the refusal"), (e) => e.code === "message_too_large");
  assert.equal(server.last.sent.filter((f) => f.type === "message").length, 1, "written once");
});

/** The first join of `room` gets no answer from the fake server: `held.frame` is that join. */
function holdJoinOf(server, room) {
  const held = { frame: null };
  server.replies.push((_ws, f) => {
    if (f.type !== "join" || f.room !== room || held.frame) return false;
    held.frame = f;
    return true;
  });
  return held;
}

test("rooms: a room's sends wait while its gap rejoin waits for the join pacer, as while it is on the wire", async (t) => {
  // The rejoin's replay may hold the very message a send would repeat; the sends of a room
  // whose rejoin was only queued (the join window full) went out before it.
  const { server, c, messages } = setup({ maxJoinsInFlight: 1 });
  t.after(() => c.disconnect());
  await c.connect();
  await c.join("r");
  const ws = server.last;
  server.post("r", "1");
  await until(() => messages.length === 1, "message 1");
  const held = holdJoinOf(server, "a");
  const a = c.join("a");
  await until(() => held.frame !== null, "the join of a, unanswered: the window is full");
  server.room("r").members.delete(ws);
  server.post("r", "2");  // a gap for this socket
  server.room("r").members.add(ws);
  server.post("r", "3");
  await tick(10);
  const sent = c.send("r", "during the queued rejoin");
  await tick(20);
  assert.equal(ws.sent.filter((f) => f.type === "message").length, 0, "a send before the room's rejoin");
  server.push(ws, { type: "joined", id: held.frame.id, room: "a", users: [], last_id: 0 });
  await within(a, 2000, "the join of a");
  const ack = await within(sent, 2000, "the send after the rejoin");
  assert.equal(ack.text, "during the queued rejoin");
  const order = ws.sent.filter((f) => f.type === "message" || (f.type === "join" && f.room === "r"));
  assert.deepEqual(order.map((f) => f.type), ["join", "join", "message"]);
  await until(() => messages.length === 4, "the replay and the send's message");
  assert.deepEqual(messages, [1, 2, 3, 4]);
});

test("rooms: a join answered after its room was left frees its place in the join window", async (t) => {
  // leave() (or a removed event) dropped the join's entry while it was on the wire: its late
  // joined (or error) was then ignored before the JoinPacer heard of it, the place stayed
  // taken for the life of the connection, and after maxJoinsInFlight of them no join was
  // written any more (every later join timed out).
  const { server, c } = setup({ maxJoinsInFlight: 1, requestTimeout: 1000 });
  t.after(() => c.disconnect());
  await c.connect();
  const ws = server.last;
  const held = holdJoinOf(server, "a");
  const first = c.join("a");
  await until(() => held.frame !== null, "the join of a");
  await c.leave("a");
  await assert.rejects(first, (e) => e.code === "left");
  server.push(ws, { type: "joined", id: held.frame.id, room: "a", users: [], last_id: 0 });
  await tick(5);
  const b = await within(c.join("b"), 2000, "the join of b");
  assert.equal(b.room, "b");
  assert.equal(ws.sent.filter((f) => f.type === "join" && f.room === "b").length, 1);
});

test("requests: at most maxRequestsInFlight on the wire, in the order of the calls; a rate_limited one goes again first, after its retry_after_ms, and is not rejected", async () => {
  const { server, c } = setup({ maxRequestsInFlight: 2 });
  await c.connect();
  let refused = 0;
  server.replies.push((ws, f) => {
    if (f.type !== "list_users" || refused++ > 0) return false;
    server.push(ws, { type: "error", code: "rate_limited", message: "slow down", retry_after_ms: 30, id: f.id });
    return true;
  });
  const rooms = ["a", "b", "c", "d", "e"];
  const calls = rooms.map((r) => c.listUsers(r, { timeout: 2000 }));
  const written = () => server.last.sent.filter((f) => f.type === "list_users").map((f) => f.room);
  assert.deepEqual(written(), ["a", "b"], "a window of two");
  const results = await within(Promise.allSettled(calls), 2000, "the reads");
  assert.deepEqual(results.map((r) => r.status), rooms.map(() => "fulfilled"));
  assert.equal(written()[0], "a");
  assert.deepEqual(written().slice(2), ["a", "c", "d", "e"], "the refused one first, then in order, one at a time");
  c.disconnect();
});

test("requests: a leave whose timeout ends on the wire and is then refused rate_limited is written again (the server must hear of it)", async () => {
  const { server, c } = setup({ requestTimeout: 250 });
  await c.connect();
  await c.join("r");
  let held = null;
  server.replies.push((ws, f) => {
    if (f.type !== "leave" || held) return false;
    held = f; // no answer until its caller gave up
    return true;
  });
  await assert.rejects(c.leave("r"), { code: "timeout" });
  assert.ok(held, "the leave was written");
  server.push(server.last, { type: "error", code: "rate_limited", message: "slow down", retry_after_ms: 20, id: held.id });
  const leaves = () => server.last.sent.filter((f) => f.type === "leave");
  await until(() => leaves().length === 2, "the refused leave written again");
  await until(() => !server.room("r").members.has(server.last), "the server has the user out of the room");
  c.disconnect();
});

test("requests: a late rate_limited for a read that timed out on the wire holds the next requests back for its retry_after_ms", async () => {
  const { server, c } = setup({ maxRequestsInFlight: 1 });
  await c.connect();
  let held = null;
  server.replies.push((ws, f) => {
    if (f.type !== "list_users" || held) return false;
    held = f;
    return true;
  });
  await assert.rejects(c.listUsers("a", { timeout: 30 }), { code: "timeout" });
  const next = c.listUsers("b", { timeout: 2000 });
  assert.equal(server.last.sent.filter((f) => f.type === "list_users").length, 1, "the window is still full");
  server.push(server.last, { type: "error", code: "rate_limited", message: "slow down", retry_after_ms: 150, id: held.id });
  await tick(40);
  assert.equal(server.last.sent.filter((f) => f.type === "list_users").length, 1, "nothing written before retry_after_ms");
  await within(next, 2000, "the read behind it");
  c.disconnect();
});

test("requests: a kick still waiting its turn when the connection drops was never written: it goes out on the next connection (as in the Python and Rust clients)", async () => {
  const { server, c } = setup({ maxRequestsInFlight: 1 });
  await c.connect();
  const first = server.last;
  server.replies.push((ws, f) => {
    if (f.type === "history" && ws === first) return true; // unanswered on the first socket
    if (f.type !== "kick") return false;
    server.push(ws, { type: "moderated", id: f.id, action: "kick", room: f.room, user_id: f.user_id });
    return true;
  });
  const read = c.history("r", { timeout: 2000 });
  const kick = c.kick("r", "bob", { timeout: 2000 });
  assert.deepEqual(first.sent.filter((f) => f.type === "kick"), [], "queued behind the read");
  server.drop(first, 1006);
  assert.deepEqual(await within(kick, 2000, "the kick"), { action: "kick", room: "r", user_id: "bob" });
  await within(read, 2000, "the read asked again");
  assert.equal(server.last.sent.filter((f) => f.type === "kick").length, 1);
  c.disconnect();
});

test("requests: made before connect() or after disconnect() they reject at once with "
  + "disconnected, nothing written (as in the Python and Rust clients)", async (t) => {
  // They waited out their requestTimeout (10 s by default), though no connection would come.
  const { server, c } = setup({ requestTimeout: 5000 });
  t.after(() => c.disconnect());
  const calls = () => [
    c.history("r"),
    c.historyPage("r", { limit: 5 }),
    c.listUsers("r"),
    c.kick("r", "bob"),
    c.mute("r", "bob", { duration: 60 }),
    c.unmute("r", "bob"),
  ];
  const settled = async (what) => {
    const results = await within(Promise.allSettled(calls()), 1000, what);
    for (const r of results) {
      assert.equal(r.status, "rejected", what);
      assert.equal(r.reason.code, "disconnected", what);
      assert.match(r.reason.message, /call connect\(\)/, what);
    }
    return results;
  };
  await settled("calls before connect()");
  await c.connect();
  await c.join("r");
  c.disconnect();
  await settled("calls after disconnect()");
  const written = server.last.sent.filter((f) => !["join", "ping"].includes(f.type));
  assert.deepEqual(written, [], "nothing written");
  assert.deepEqual(c.joinedRooms, ["r"], "the rooms are kept for a later connect()");
  await within(c.leave("r"), 1000, "a leave after disconnect()"); // the server has us out already
  await within(c.connect(), 1000, "the connect");
  assert.equal((await within(c.listUsers("r"), 1000, "a read once connected again")).length, 1);
  // Stopped for good by the server: the calls say why, as those waiting then were told.
  server.drop(server.last, 4003, "banned");
  const [read] = await settled("calls after a stop for good");
  assert.match(read.reason.message, /4003 banned/);
});

test("requests: an error answering a request after it timed out is no error event (its caller "
  + "had its timeout), as in the Python and Rust clients", async () => {
  const { server, c, events } = setup({ maxRequestsInFlight: 1 });
  await c.connect();
  const held = [];
  server.replies.push((ws, f) => {
    if (f.type !== "list_users" || f.room === "b") return false;
    held.push(f);
    return true;
  });
  await assert.rejects(c.listUsers("a", { timeout: 30 }), { code: "timeout" });
  const late = (i, fields) => {
    server.push(server.last, { type: "error", id: held[i].id, ...fields });
  };
  late(0, { code: "invalid_room", message: "no such room" });
  // The place it held is free: the next read goes.
  const users = await within(c.listUsers("b", { timeout: 2000 }), 1000, "the read behind it");
  assert.equal(users.length, 1);
  await assert.rejects(c.listUsers("a", { timeout: 30 }), { code: "timeout" });
  late(1, { code: "rate_limited", message: "slow down", retry_after_ms: 20 });
  await within(c.listUsers("b", { timeout: 2000 }), 1000, "the read after the pause");
  assert.deepEqual(events("error"), [], "no error event for either late answer");
  // An error naming no request of this client is still an error event.
  server.push(server.last, { type: "error", id: "r999999", code: "internal_error", message: "x" });
  assert.deepEqual(events("error").map((e) => e.code), ["internal_error"]);
  c.disconnect();
});
