import { test } from "node:test";
import assert from "node:assert/strict";
import { ChatClient, Outbox, memoryOutbox, webStorageOutbox } from "../../dist/index.mjs";
import { FakeServer, fakeToken, tick } from "./fake-server.mjs";

const entry = (n, room = "r") => ({ kind: "message", room, text: `t${n}`, client_msg_id: `c${n}`, created: n });

/** A Web Storage stand-in (localStorage/sessionStorage have this shape). */
function fakeStorage() {
  const map = new Map();
  return {
    map,
    getItem: (k) => (map.has(k) ? map.get(k) : null),
    setItem: (k, v) => map.set(k, String(v)),
    removeItem: (k) => map.delete(k),
  };
}

test("outbox: bounded; send beyond the bound rejects with outbox_full, nothing is dropped", async () => {
  const server = new FakeServer();
  const c = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket, outboxLimit: 3 });
  void c.join("r").catch(() => {});
  const sends = [c.send("r", "1"), c.send("r", "2"), c.send("r", "3")];
  await assert.rejects(c.send("r", "4"), { code: "outbox_full" });
  assert.deepEqual(c.pending.map((e) => e.text), ["1", "2", "3"]);
  await c.connect();
  const acked = await Promise.all(sends);
  assert.deepEqual(acked.map((m) => m.id), [1, 2, 3]);
  assert.equal(c.pending.length, 0);
  assert.equal((await c.send("r", "5")).id, 4, "room again once acknowledged");
  c.disconnect();
});

test("outbox: at most maxInFlight sends on the wire without an acknowledgement", async () => {
  const server = new FakeServer();
  server.holdEchoes = true;
  const c = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket, maxInFlight: 2 });
  await c.connect();
  await c.join("r");
  const sends = Array.from({ length: 5 }, (_, i) => c.send("r", `m${i}`));
  await tick(20);
  const onWire = () => server.last.sent.filter((f) => f.type === "message").map((f) => f.text);
  assert.deepEqual(onWire(), ["m0", "m1"]);
  server.holdEchoes = false;
  // Echo the held ones: the window moves on, in order.
  for (const m of server.room("r").messages) server.push(server.last, m);
  await Promise.all(sends);
  assert.deepEqual(onWire(), ["m0", "m1", "m2", "m3", "m4"]);
  c.disconnect();
});

test("outbox: a rate_limited send waits retry_after_ms and goes again; a refused one rejects", async () => {
  const server = new FakeServer();
  let refused = 0;
  server.replies.push((ws, f) => {
    if (f.type !== "message" || refused++ > 0) return false;
    server.push(ws, { type: "error", id: f.id, code: "rate_limited", message: "slow down", retry_after_ms: 80 });
    return true;
  });
  server.replies.push((ws, f) => {
    if (f.type !== "message" || f.text !== "too big") return false;
    server.push(ws, { type: "error", id: f.id, code: "message_too_large", message: "too large" });
    return true;
  });
  const c = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket });
  const errors = [];
  c.on("error", (e) => errors.push(e.code));
  await c.connect();
  await c.join("r");
  const started = Date.now();
  const m = await c.send("r", "hello");
  assert.ok(Date.now() - started >= 75, "resent before retry_after_ms");
  assert.equal(m.id, 1);
  await assert.rejects(c.send("r", "too big"), { code: "message_too_large" });
  assert.equal(c.pending.length, 0);
  assert.deepEqual(errors, ["message_too_large"]);
  c.disconnect();
});

test("persistence: webStorageOutbox keeps sends across a reload and forgets them once acknowledged", async () => {
  const storage = fakeStorage();
  const server = new FakeServer();
  const token = fakeToken("u1");
  const first = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket, token, outboxStorage: webStorageOutbox("box", storage) });
  void first.join("r", { timeout: 50 }).catch(() => {});
  void first.send("r", "one").catch(() => {});
  void first.dm("u2", "two").catch(() => {});
  // Saved synchronously: a reload right now loses nothing.
  assert.deepEqual(JSON.parse(storage.map.get("box")).map((e) => e.text), ["one", "two"]);

  // The "reloaded page": a new client on the same storage.
  const second = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket, token, outboxStorage: webStorageOutbox("box", storage) });
  const acks = [];
  second.on("ack", (m) => acks.push(m.text));
  await second.connect();
  await second.join("r");
  for (let i = 0; i < 50 && acks.length < 2; i++) await tick();
  assert.deepEqual(acks.sort(), ["one", "two"]);
  assert.equal(storage.map.has("box"), false);
  second.disconnect();
});

test("persistence: webStorageOutbox ignores garbage and defaults to sessionStorage", () => {
  const storage = fakeStorage();
  storage.setItem("box", "not json");
  assert.deepEqual(webStorageOutbox("box", storage).load(), []);
  storage.setItem("box", JSON.stringify([entry(1), { kind: "nope" }, 7]));
  assert.deepEqual(webStorageOutbox("box", storage).load(), [entry(1)]);
  globalThis.sessionStorage = storage;
  try {
    webStorageOutbox("session").save([entry(2)]);
    assert.ok(storage.map.has("session"));
  } finally {
    delete globalThis.sessionStorage;
  }
});

test("persistence: asynchronous saves never overlap and the last one holds the final list", async () => {
  const saved = [];
  let running = 0;
  let overlapped = false;
  const storage = {
    load: async () => [entry(0)],
    save: async (entries) => {
      running++;
      if (running > 1) overlapped = true;
      await tick(10);
      saved.push(entries.map((e) => e.client_msg_id));
      running--;
    },
  };
  const box = new Outbox(10, storage, (err) => assert.fail(err));
  box.add(entry(1));
  box.add(entry(2));
  box.add(entry(3));
  box.remove("c2");
  const restored = await box.restore();
  assert.deepEqual(restored.map((e) => e.client_msg_id), ["c0"]);
  await box.flushed();
  assert.equal(overlapped, false);
  assert.deepEqual(saved.at(-1), ["c0", "c1", "c3"]);
  assert.ok(saved.length <= 3, `saves were coalesced: ${saved.length}`);
  const mem = memoryOutbox([entry(9)]);
  assert.deepEqual(mem.load(), [entry(9)]);
});

test("persistence: a failing storage is reported, the send still goes", async () => {
  const server = new FakeServer();
  const c = new ChatClient({
    url: "ws://fake/ws",
    WebSocket: server.WebSocket,
    outboxStorage: { load: () => [], save: () => { throw new Error("quota"); } },
  });
  const errors = [];
  c.on("error", (e) => errors.push(e.code));
  await c.connect();
  await c.join("r");
  assert.equal((await c.send("r", "x")).id, 1);
  assert.ok(errors.includes("storage"));
  c.disconnect();
});

const until = async (pred, what) => {
  for (let i = 0; i < 400; i++) {
    if (pred()) return;
    await tick(5);
  }
  throw new Error(`timed out waiting for ${what}`);
};

test("persistence: a send before connect (or before an asynchronous storage has loaded) keeps the previous run's outbox", async () => {
  const old = { kind: "dm", to: "u9", text: "left by the last page", client_msg_id: "old-1", created: 1 };
  // A synchronous storage, and one that reads a tick later (as IndexedDB would).
  const sync = memoryOutbox([old]);
  let kept = [old];
  const slow = { load: async () => (await tick(1), kept.map((e) => ({ ...e }))), save: (entries) => { kept = entries.map((e) => ({ ...e })); } };
  for (const [name, storage, connectFirst] of [["send before connect", sync, false], ["asynchronous load", slow, true]]) {
    const server = new FakeServer();
    const c = new ChatClient({ url: "ws://fake/ws", WebSocket: server.WebSocket, outboxStorage: storage });
    try {
      const connected = connectFirst ? c.connect() : null;
      const sending = c.dm("u9", "new");
      await (connected ?? c.connect());
      assert.equal((await sending).text, "new", name);
      await c.outboxSaved();
      await until(() => server.last.sent.filter((f) => f.type === "dm").length === 2, `${name}: both dms written`);
      assert.deepEqual(server.last.sent.filter((f) => f.type === "dm").map((f) => f.client_msg_id)[0], "old-1", name);
    } finally {
      c.disconnect();
    }
  }
});
