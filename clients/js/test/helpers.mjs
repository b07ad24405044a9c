// Shared by the tests: the conformance harness (real servers, real Redis), waiting with
// timeouts, and the app-side record of what each client delivered.
import { spawn } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const here = dirname(fileURLToPath(import.meta.url));
export const REPO = resolve(here, "..", "..", "..");
/** Every wait scales with WSCHAT_TEST_TIMEOUT_SCALE, as the Python suite's do. */
export const SCALE = Number(process.env.WSCHAT_TEST_TIMEOUT_SCALE || "1");
export const TIMEOUT = 20_000 * SCALE;

/**
 * Starts clients/conformance/harness.py with $WSCHAT_PYTHON (default python3). Its first
 * stdout line is {"control", "secret"}; closing its stdin stops it and all it started.
 */
export async function startHarness() {
  const python = process.env.WSCHAT_PYTHON || "python3";
  const child = spawn(python, [join(REPO, "clients", "conformance", "harness.py")], {
    stdio: ["pipe", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr = (stderr + d).slice(-8000);
  });
  const exited = new Promise((res) => child.on("exit", res));
  const first = await new Promise((res, rej) => {
    let out = "";
    const timer = setTimeout(() => rej(new Error(`harness did not start in time:\n${stderr}`)), 60_000 * SCALE);
    child.on("error", (err) => rej(new Error(`cannot run ${python}: ${err.message}`)));
    child.on("exit", (code) => rej(new Error(`harness exited (${code}) before it started:\n${stderr}`)));
    child.stdout.on("data", (d) => {
      out += d;
      const nl = out.indexOf("\n");
      if (nl >= 0) {
        clearTimeout(timer);
        res(JSON.parse(out.slice(0, nl)));
      }
    });
  });
  const { control, secret } = first;
  async function call(path, body = {}) {
    const r = await fetch(control + path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(120_000 * SCALE),
    });
    const reply = await r.json();
    if (!r.ok) throw new Error(`harness ${path}: ${r.status} ${reply.error}\n${stderr}`);
    return reply;
  }
  return {
    secret,
    call,
    server: (body = {}) => call("/servers", body),
    token: async (sub, ttl = 3600, name = sub.toUpperCase(), claims = {}) => (await call("/token", { sub, name, ttl, ...claims })).token,
    async close() {
      child.stdin.end();
      const timer = setTimeout(() => child.kill("SIGKILL"), 30_000 * SCALE);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** Polls `predicate` until it is truthy; fails with `what` after `timeout` ms. */
export async function until(predicate, what, timeout = TIMEOUT) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Resolves with the next `event` of `client` that satisfies `pred`. */
export function next(client, event, pred = () => true, timeout = TIMEOUT) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for ${event}`));
    }, timeout);
    const off = client.on(event, (payload) => {
      if (!pred(payload)) return;
      clearTimeout(timer);
      off();
      resolve(payload);
    });
  });
}

/** Every acknowledged room message's text by `room#id`, from every recorded client's `ack` events. */
const ACKED = new Map();

/** What the app saw: every `message` event's id (and text), per room, in arrival order. */
export function recorder(client) {
  const rooms = new Map();
  const texts = new Map();
  const events = [];
  client.on("message", (m) => {
    if (!rooms.has(m.room)) rooms.set(m.room, []);
    rooms.get(m.room).push(m.id);
    texts.set(`${m.room}#${m.id}`, m.text);
  });
  client.on("ack", (m) => {
    if (m.type === "message") ACKED.set(`${m.room}#${m.id}`, m.text);
  });
  for (const e of ["state", "connecting", "connected", "disconnected", "joined", "recoveryFailed", "rateLimited", "error"]) {
    client.on(e, (payload) => events.push({ event: e, payload, t: Date.now() }));
  }
  return { ids: (room) => rooms.get(room) ?? [], text: (room, id) => texts.get(`${room}#${id}`), events };
}

/**
 * Exactly once and in order, from the app's side: the ids `app` saw in `room` are strictly
 * increasing and, from `after` on, hold every id in `acked` (the acknowledged sends) with
 * the text that was sent under it (a reused id counts as lost), and nothing is missing in
 * between.
 */
export function assertExactlyOnce(app, room, acked, after, who, { contiguous = true } = {}) {
  const ids = app.ids(room);
  for (let i = 1; i < ids.length; i++) {
    assert.ok(ids[i] > ids[i - 1], `${who}: id ${ids[i]} after ${ids[i - 1]} (doubled or out of order): ${ids}`);
  }
  const seen = new Set(ids);
  const missing = [...acked].filter((id) => id > after && !seen.has(id));
  assert.deepEqual(missing, [], `${who}: acknowledged messages never delivered`);
  for (const id of acked) {
    const sent = ACKED.get(`${room}#${id}`);
    if (id > after && sent !== undefined) assert.equal(app.text(room, id), sent, `${who}: message ${id} is not the one sent`);
  }
  if (!contiguous) return;
  const expected = [];
  for (let id = after + 1; id <= Math.max(after, ...acked); id++) expected.push(id);
  assert.deepEqual(ids.filter((id) => id > after && id <= Math.max(...acked)), expected, `${who}: a gap`);
}
