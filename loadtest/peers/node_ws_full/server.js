// Peer: node_ws/server.js plus, per message and DM, the work wschat does (memory backend).
//
// The question it answers (issue 18, RESULTS.md twenty-second session): what does Node pay
// for wschat's features? Written as a Node developer would write them (Maps, objects mutated
// in place, prom-client), doing for each command what wschat.chat.Chat.receive does:
//
// - strict validation as wschat.protocol.parse_command: a JSON object, `id` (string of at
//   most 64 characters or an integer within +-2^53), `type`; room names by ROOM_NAME_RE,
//   `text` non-empty, not all whitespace (Python's isspace), at most MAX_TEXT_CHARS code
//   points; `client_msg_id` 1-64 code points without control characters; a DM's `to` by
//   valid_user_id; the strings well-formed (orjson refuses lone surrogates as bad JSON);
// - token buckets as wschat.ratelimit.take: a guest's own bucket (RATE_LIMIT,
//   RATE_LIMIT_BURST) then its address's (RATE_LIMIT_GUEST_IP[_BURST], 10x), per message,
//   DM and typing; the request buckets (RATE_LIMIT_REQUESTS[_BURST]) for every other command;
//   idle buckets swept; a refusal answers rate_limited and a flood closes with 4102;
// - membership and mute checks; the typing-state look (a message ends its author's
//   indicator); `typing` itself;
// - per room a ring of HISTORY_SIZE events (the encoded bytes), all rooms together bounded by
//   MEMORY_HISTORY_BYTES with wschat's per-entry overheads (least recently written rooms
//   shrink first), emptied rooms dropped after ROOM_TTL, their last id kept;
// - client_msg_id dedupe: (room or "", user, id) -> when, id, timestamp, kept an hour (at most
//   100,000), a retry answered with the stored event;
// - prom-client counters per command type, posted kind, delivered event type and error code,
//   and the fan-out latency histogram with wschat's buckets, served at GET /metrics;
// - per delivery, the slow-consumer bound (MAX_OUTBOUND_BYTES of ws's bufferedAmount: 4101).
//
// Guests get wschat's ids (`guest-` and 12 hex digits) and their events its `guest: true`.
// wschat's memory backend keeps no DM inbox (only persistence keeps DMs for the offline),
// so neither does this; what wschat has for Redis and recovery (the hub's max_seen, floors,
// held DMs) has no counterpart in a single process and is not imitated.
'use strict';
const http = require('http');
const crypto = require('crypto');
const { performance } = require('perf_hooks');
const { WebSocketServer } = require('ws');
const prom = require('prom-client');

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const env = process.env;
const num = (name, def) => (env[name] === undefined || env[name] === '' ? def : Number(env[name]));

// wschat's settings and defaults (wschat/config.py, README's configuration table).
const host = opt('--host', env.HOST || '127.0.0.1');
const port = Number(opt('--port', env.PORT || '8080'));
const HEARTBEAT = num('HEARTBEAT_INTERVAL', 30) * 1000;
const RATE = num('RATE_LIMIT', 10);
const BURST = num('RATE_LIMIT_BURST', 20);
const IP_RATE = num('RATE_LIMIT_GUEST_IP', 10 * RATE);
const IP_BURST = num('RATE_LIMIT_GUEST_IP_BURST', 10 * BURST);
const REQ_RATE = num('RATE_LIMIT_REQUESTS', RATE);
const REQ_BURST = num('RATE_LIMIT_REQUESTS_BURST', 5 * BURST);
const HISTORY_SIZE = num('HISTORY_SIZE', 100);
const HISTORY_BYTES = num('MEMORY_HISTORY_BYTES', 128 * 1024 * 1024);
const MAX_TEXT_CHARS = num('MAX_TEXT_CHARS', 4000);
const MAX_MESSAGE_BYTES = num('MAX_MESSAGE_BYTES', 65536);
const MAX_OUTBOUND = num('MAX_OUTBOUND_BYTES', 1024 * 1024);
const MAX_ROOMS = num('MAX_ROOMS_PER_CONNECTION', 100);
const ROOM_TTL = num('ROOM_TTL', 3600) * 1000;
const NUMBERING_TTL = Math.max(ROOM_TTL, num('ROOM_NUMBERING_TTL', 7 * 24 * 3600) * 1000);
const TYPING_TIMEOUT = num('TYPING_TIMEOUT', 5) * 1000;

// wschat.stores.memory's bounds.
const DEDUPE_TTL = 3600 * 1000;
const DEDUPE_MAX = 100000;
const MESSAGE_OVERHEAD = 100;
const ROOM_OVERHEAD = 400;
const RETIRED_OVERHEAD = 250;
const MAX_ID_CHARS = 64;
const MAX_USER_ID_CHARS = 128;
const EPSILON = 1e-9;

// ---- metrics (wschat.metrics' series, through prom-client) --------------------------------
const RECEIVED = new prom.Counter({ name: 'wschat_messages_received_total',
  help: 'Commands received, by type', labelNames: ['type'] });
const POSTED = new prom.Counter({ name: 'wschat_messages_posted_total',
  help: 'Room messages and DMs stored and published', labelNames: ['kind'] });
const DELIVERED = new prom.Counter({ name: 'wschat_messages_delivered_total',
  help: 'Events written to connections, by type', labelNames: ['type'] });
const ERRORS = new prom.Counter({ name: 'wschat_errors_total',
  help: 'error events sent, by code', labelNames: ['code'] });
const RATE_LIMITED = new prom.Counter({ name: 'wschat_rate_limited_total',
  help: 'Requests refused by a token bucket, by type', labelNames: ['type'] });
const CONNECTIONS = new prom.Gauge({ name: 'wschat_connections', help: 'Open connections' });
const FANOUT = new prom.Histogram({ name: 'wschat_fanout_seconds',
  help: "Time from a room message's arrival to its being stored and written to every member",
  buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0] });
// Children bound once, as a Node service would keep them (no label hashing per message).
const received = {};
for (const t of ['message', 'dm', 'typing', 'join', 'leave', 'ping', 'invalid']) {
  received[t] = RECEIVED.labels(t);
}
const posted = { room: POSTED.labels('room'), dm: POSTED.labels('dm') };
const delivered = {};
for (const t of ['message', 'dm', 'presence', 'typing']) delivered[t] = DELIVERED.labels(t);

// ---- validation (wschat.protocol) ---------------------------------------------------------
const ROOM_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
// Python's \w, in Unicode: letters, digits (and numbers), marks, connectors.
const W = '\\p{L}\\p{N}\\p{Mn}\\p{Pc}';
const USERNAME_RE = new RegExp(`^[${W}](?:[${W} .-]{0,30}[${W}.-])?$`, 'u');
const CONTROL_RE = /[\x00-\x1f\x7f]/; // eslint-disable-line no-control-regex
const UNSAFE_ID_RE = /[\x00-\x1f\x7f-\x9f]/; // eslint-disable-line no-control-regex
const GUEST_ID_RE = /^guest-[0-9a-f]{12}$/;
// What Python's str.isspace() is true for, every character of it.
const ALL_SPACE_RE =
  /^[\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;
const MAX_SAFE = 2 ** 53;

class ProtocolError extends Error {
  constructor(code, message, rid, extra) {
    super(message);
    this.code = code;
    this.rid = rid;
    this.extra = extra;
  }
}

// Python's len(): code points. A string of n UTF-16 units has at most n code points.
function codePoints(s, limit) {
  if (s.length <= limit) return s.length;
  let n = 0;
  for (const _ of s) n++; // eslint-disable-line no-unused-vars
  return n;
}

function field(obj, name, kind, rid, required = true) {
  const value = obj[name];
  if (value === undefined || value === null) {
    if (required) throw new ProtocolError('invalid_message', `missing field '${name}'`, rid);
    return undefined;
  }
  if (typeof value !== kind) {
    throw new ProtocolError('invalid_message', `field '${name}' has the wrong type`, rid);
  }
  return value;
}

function roomOf(obj, rid) {
  const room = field(obj, 'room', 'string', rid);
  if (!ROOM_NAME_RE.test(room)) {
    throw new ProtocolError('invalid_room', 'room names are 1-64 characters: letters, digits '
      + 'and _ . : - (starting with a letter or digit)', rid);
  }
  return room;
}

function textOf(obj, rid) {
  const text = field(obj, 'text', 'string', rid);
  if (!text.isWellFormed()) throw new ProtocolError('invalid_json', 'frame is not valid JSON');
  if (ALL_SPACE_RE.test(text)) throw new ProtocolError('invalid_message', 'text is empty', rid);
  if (codePoints(text, MAX_TEXT_CHARS) > MAX_TEXT_CHARS) {
    throw new ProtocolError('message_too_large',
      `text is longer than ${MAX_TEXT_CHARS} characters`, rid);
  }
  return text;
}

function shortId(obj, name, rid) {
  const value = field(obj, name, 'string', rid, false);
  if (value === undefined) return undefined;
  if (!value.isWellFormed()) throw new ProtocolError('invalid_json', 'frame is not valid JSON');
  const n = codePoints(value, MAX_ID_CHARS);
  if (n === 0 || n > MAX_ID_CHARS || CONTROL_RE.test(value)) {
    throw new ProtocolError('invalid_message', `'${name}' must be 1-${MAX_ID_CHARS} `
      + 'characters, none of them control characters', rid);
  }
  return value;
}

function requestId(obj) {
  const rid = obj.id;
  if (rid === undefined || rid === null) return undefined;
  if (typeof rid === 'string') {
    if (!rid.isWellFormed()) throw new ProtocolError('invalid_json', 'frame is not valid JSON');
    if (codePoints(rid, MAX_ID_CHARS) > MAX_ID_CHARS) {
      throw new ProtocolError('invalid_message', `'id' is longer than ${MAX_ID_CHARS}`);
    }
    return rid;
  }
  if (!Number.isInteger(rid)) {
    throw new ProtocolError('invalid_message', "'id' must be a string or an integer");
  }
  if (!(-MAX_SAFE < rid && rid < MAX_SAFE)) {
    throw new ProtocolError('invalid_message', "'id' is out of range");
  }
  return rid;
}

function validUserId(id) {
  if (id.startsWith('guest-')) return GUEST_ID_RE.test(id);
  const n = codePoints(id, MAX_USER_ID_CHARS);
  return n > 0 && n <= MAX_USER_ID_CHARS && id !== 'system' && id !== 'api'
    && !UNSAFE_ID_RE.test(id) && id.isWellFormed();
}
const DM_TO_RULE = "'to' must be a user's id: 1-128 characters without control characters, "
  + "not 'system' or 'api', and one beginning with 'guest-' a guest's";

// One frame -> a command object, or a ProtocolError (parse_command).
function parseCommand(raw) {
  let obj;
  try {
    obj = JSON.parse(raw);
  } catch (e) {
    throw new ProtocolError('invalid_json', 'frame is not valid JSON');
  }
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
    throw new ProtocolError('invalid_message', 'frame must be a JSON object');
  }
  const rid = requestId(obj);
  const kind = obj.type;
  if (typeof kind !== 'string') {
    throw new ProtocolError('invalid_message', "missing field 'type'", rid);
  }
  switch (kind) {
    case 'message':
      return { type: kind, room: roomOf(obj, rid), text: textOf(obj, rid),
        clientMsgId: shortId(obj, 'client_msg_id', rid), rid };
    case 'dm': {
      const to = field(obj, 'to', 'string', rid);
      if (!validUserId(to)) throw new ProtocolError('invalid_message', DM_TO_RULE, rid);
      return { type: kind, to, text: textOf(obj, rid),
        clientMsgId: shortId(obj, 'client_msg_id', rid), rid };
    }
    case 'typing':
      return { type: kind, room: roomOf(obj, rid), status: field(obj, 'status', 'boolean', rid),
        rid };
    case 'ping':
      return { type: kind, rid };
    case 'join':
      return { type: kind, room: roomOf(obj, rid), rid };
    case 'leave':
      return { type: kind, room: roomOf(obj, rid), rid };
    default:
      throw new ProtocolError('unknown_type', `unknown message type '${kind.slice(0, 32)}'`, rid);
  }
}

// ---- token buckets (wschat.ratelimit.take) ------------------------------------------------
const buckets = new Map(); // key -> {tokens, last, fullAt} (ms since start)

// Spend `cost` of each bucket of `charge` ([key, rate, burst]...), in order; 0 or the
// refusing bucket's milliseconds until it could pay.
function spend(charge, cost = 1) {
  const now = performance.now() / 1000;
  for (const [key, rate, burst] of charge) {
    let b = buckets.get(key);
    if (b === undefined) {
      b = { tokens: burst, last: now, fullAt: now };
      buckets.set(key, b);
    }
    const c = cost > burst ? burst : cost;
    let tokens = b.tokens;
    if (now > b.last) tokens += (now - b.last) * rate;
    if (tokens > burst) tokens = burst;
    b.last = now;
    if (tokens >= c - EPSILON) {
      tokens -= c;
      b.tokens = tokens > 0 ? tokens : 0;
      b.fullAt = now + (burst - b.tokens) / rate;
      continue;
    }
    b.tokens = tokens;
    b.fullAt = now + (burst - tokens) / rate;
    return Math.max(1, Math.ceil((c - tokens) / rate * 1000));
  }
  return 0;
}

// A full bucket is what a missing one means: forget them (wschat sweeps too).
setInterval(() => {
  const now = performance.now() / 1000;
  for (const [key, b] of buckets) if (b.fullAt <= now) buckets.delete(key);
}, 10000).unref();

// The client, not each address it may use (wschat.ratelimit.address_key).
function addressKey(addr) {
  if (!addr) return '';
  if (addr.startsWith('::ffff:') && addr.includes('.')) return addr.slice(7);
  if (!addr.includes(':')) return addr;
  const groups = addr.split('::');
  const head = groups[0] ? groups[0].split(':') : [];
  const tail = groups.length > 1 && groups[1] ? groups[1].split(':') : [];
  const zeros = new Array(Math.max(0, 8 - head.length - tail.length)).fill('0');
  const all = [...head, ...zeros, ...tail];
  return `${all.slice(0, 4).map((g) => parseInt(g, 16).toString(16)).join(':')}::/64`;
}

// ---- state ---------------------------------------------------------------------------------
const rooms = new Map(); // room -> Map<Session, true> (join order)
const users = new Map(); // user_id -> Set<Session>
const logs = new Map(); // room -> RoomLog, least recently written first
const idle = new Map(); // emptied room -> when (ms)
const retired = new Map(); // dropped room -> {at, lastId}
const dedupe = new Map(); // `${room}\0${user}\0${client_msg_id}` -> {at, id, ts}
const typists = new Map(); // room -> Map<user_id, Set<Session>>
const typingDeadlines = new Set(); // sessions with an indicator on
let historyBytes = 0;
let dmLastId = 0;

class RoomLog {
  constructor(lastId) {
    this.lastId = lastId;
    this.ids = new Array(HISTORY_SIZE);
    this.events = new Array(HISTORY_SIZE);
    this.start = 0; // the oldest entry
    this.count = 0;
  }

  append(id, event) {
    if (this.count === HISTORY_SIZE) {
      historyBytes -= this.events[this.start].length + MESSAGE_OVERHEAD;
      this.ids[this.start] = id;
      this.events[this.start] = event;
      this.start = (this.start + 1) % HISTORY_SIZE;
    } else {
      const at = (this.start + this.count) % HISTORY_SIZE;
      this.ids[at] = id;
      this.events[at] = event;
      this.count++;
    }
    historyBytes += event.length + MESSAGE_OVERHEAD;
  }

  dropOldest() {
    historyBytes -= this.events[this.start].length + MESSAGE_OVERHEAD;
    this.events[this.start] = undefined;
    this.start = (this.start + 1) % HISTORY_SIZE;
    this.count--;
  }

  find(id) {
    for (let k = this.count - 1; k >= 0; k--) {
      const at = (this.start + k) % HISTORY_SIZE;
      if (this.ids[at] === id) return this.events[at];
      if (this.ids[at] < id) return undefined;
    }
    return undefined;
  }

  bytes() {
    let n = ROOM_OVERHEAD;
    for (let k = 0; k < this.count; k++) {
      n += this.events[(this.start + k) % HISTORY_SIZE].length + MESSAGE_OVERHEAD;
    }
    return n;
  }
}

function logFor(room) {
  let log = logs.get(room);
  if (log === undefined) {
    const old = retired.get(room);
    if (old !== undefined) {
      retired.delete(room);
      historyBytes -= RETIRED_OVERHEAD;
    }
    log = new RoomLog(old ? old.lastId : 0);
    logs.set(room, log);
    historyBytes += ROOM_OVERHEAD;
  }
  return log;
}

function dropLog(room, at) {
  const log = logs.get(room);
  if (log === undefined) return;
  logs.delete(room);
  historyBytes -= log.bytes();
  if (log.lastId) {
    retired.set(room, { at, lastId: log.lastId });
    historyBytes += RETIRED_OVERHEAD;
  }
}

function expireIdle(now) {
  for (const [room, at] of idle) {
    if (now - at < ROOM_TTL) break;
    idle.delete(room);
    dropLog(room, at);
  }
  for (const [room, r] of retired) {
    if (now - r.at < NUMBERING_TTL) break;
    retired.delete(room);
    historyBytes -= RETIRED_OVERHEAD;
  }
}

function shrink() {
  for (const [room, at] of idle) {
    if (historyBytes <= HISTORY_BYTES) return;
    idle.delete(room);
    dropLog(room, at);
  }
  for (const room of retired.keys()) {
    if (historyBytes <= HISTORY_BYTES) return;
    retired.delete(room);
    historyBytes -= RETIRED_OVERHEAD;
  }
  for (const log of logs.values()) { // least recently written first
    while (log.count && historyBytes > HISTORY_BYTES) log.dropOldest();
    if (historyBytes <= HISTORY_BYTES) return;
  }
}

// A retry of a stored post (the same client_msg_id within the hour): its entry, expired
// ones dropped first.
function seen(key, now) {
  for (const [k, v] of dedupe) {
    if (now - v.at < DEDUPE_TTL && dedupe.size <= DEDUPE_MAX) break;
    dedupe.delete(k);
  }
  return dedupe.get(key);
}

// ---- delivery ------------------------------------------------------------------------------
const TEXT = { binary: false };

class Session {
  constructor(ws, userId, username, addr) {
    this.ws = ws;
    this.userId = userId;
    this.username = username;
    this.guest = true;
    this.rooms = new Map(); // room -> the room's last id when this session joined
    this.muted = new Map(); // scope ('' everywhere) -> until (ms); moderation fills it
    this.typing = new Map(); // room -> deadline
    this.floodStrikes = 0;
    this.postsEmptyUntil = 0;
    this.alive = true;
    const ip = addressKey(addr);
    this.postCharge = [[`u:${userId}`, RATE, BURST]];
    this.requestCharge = [[`req:u:${userId}`, REQ_RATE, REQ_BURST]];
    if (ip) {
      this.postCharge.push([`ip:${ip}`, IP_RATE, IP_BURST]);
      this.requestCharge.push([`req:ip:${ip}`, 10 * REQ_RATE, 10 * REQ_BURST]);
    }
  }

  sendData(data) {
    const ws = this.ws;
    if (ws.readyState !== 1) return;
    if (ws.bufferedAmount > MAX_OUTBOUND) { // a slow consumer: dropped, as wschat does
      ws.close(4101, 'slow consumer');
      return;
    }
    ws.send(data, TEXT);
  }

  send(obj) { this.sendData(JSON.stringify(obj)); }
}

function withId(obj, rid) {
  if (rid !== undefined) obj.id = rid;
  return obj;
}

function sendError(s, code, message, rid, extra) {
  ERRORS.labels(code).inc();
  s.send(withId({ type: 'error', code, message, ...extra }, rid));
}

// One event, encoded once, to every member of `room` (but `skip`'s user).
function deliverRoom(room, data, kind, skipUser) {
  const members = rooms.get(room);
  if (!members) return;
  let n = 0;
  for (const s of members.keys()) {
    if (s.userId === skipUser) continue;
    s.sendData(data);
    n++;
  }
  if (n) delivered[kind].inc(n);
}

function deliverUser(userId, data) {
  const mine = users.get(userId);
  if (!mine) return;
  for (const s of mine) s.sendData(data);
  delivered.dm.inc(mine.size);
}

function presence(s, room, status) {
  const ev = { type: 'presence', room, user: s.username, user_id: s.userId, status };
  if (s.guest) ev.guest = true;
  deliverRoom(room, Buffer.from(JSON.stringify(ev)), 'presence', s.userId);
}

function publishTyping(s, room, status) {
  const ev = { type: 'typing', room, user: s.username, user_id: s.userId, status };
  if (s.guest) ev.guest = true;
  deliverRoom(room, Buffer.from(JSON.stringify(ev)), 'typing', s.userId);
}

// ---- commands ------------------------------------------------------------------------------
function refuse(s, cmd, retryMs) {
  RATE_LIMITED.labels(cmd ? cmd.type : 'invalid').inc();
  s.floodStrikes++;
  const err = new ProtocolError('rate_limited', 'rate limit exceeded', cmd ? cmd.rid : undefined,
    { retry_after_ms: retryMs });
  if (s.floodStrikes > 2 * BURST) {
    sendError(s, err.code, err.message, err.rid, err.extra);
    s.ws.close(4102, 'flooding');
  }
  throw err;
}

function checkRate(s, cmd) {
  const now = performance.now();
  if (s.postsEmptyUntil > now) refuse(s, cmd, Math.max(1, Math.ceil(s.postsEmptyUntil - now)));
  const retryMs = spend(s.postCharge);
  if (!retryMs) {
    s.floodStrikes = 0;
    return;
  }
  s.postsEmptyUntil = now + retryMs - 1;
  refuse(s, cmd, retryMs);
}

function checkRequests(s, cmd) {
  const retryMs = spend(s.requestCharge);
  if (retryMs) refuse(s, cmd, retryMs);
  s.floodStrikes = 0;
}

function checkNotMuted(s, room, rid) {
  const muted = s.muted;
  if (!muted.size) return;
  const now = Date.now();
  for (const scope of room ? [room, ''] : ['']) {
    const until = muted.get(scope);
    if (until === undefined) continue;
    if (until <= now) {
      muted.delete(scope);
      continue;
    }
    throw new ProtocolError('muted', `you are muted ${scope ? `in ${room}` : 'everywhere'}`, rid,
      room ? { room, until } : { until });
  }
}

// wschat's event, fields in its order (protocol.draft_message).
function messageEvent(s, room, id, cmd, ts) {
  const ev = s.guest
    ? { type: 'message', id, room, from: s.username, user_id: s.userId, guest: true,
      text: cmd.text, timestamp: ts }
    : { type: 'message', id, room, from: s.username, user_id: s.userId, text: cmd.text,
      timestamp: ts };
  if (cmd.clientMsgId !== undefined) ev.client_msg_id = cmd.clientMsgId;
  return ev;
}

// The stored copy of message `id` of `room` while the history holds it.
function log0(room, id) {
  const log = logs.get(room);
  return log && log.find(id);
}

function onMessage(s, cmd) {
  const room = cmd.room;
  if (!s.rooms.has(room)) {
    throw new ProtocolError('not_in_room', `join ${room} before writing to it`, cmd.rid);
  }
  checkNotMuted(s, room, cmd.rid);
  const started = performance.now();
  const ts = Date.now();
  const key = cmd.clientMsgId !== undefined
    ? `${room}\0${s.userId}\0${cmd.clientMsgId}` : undefined;
  if (key !== undefined) {
    const hit = seen(key, ts);
    if (hit !== undefined) { // a retry: the original, unless the room brought it here
      if (hit.id > s.rooms.get(room)) return;
      const stored = log0(room, hit.id);
      return s.sendData(stored || JSON.stringify(messageEvent(s, room, hit.id, cmd, hit.ts)));
    }
  }
  expireIdle(ts);
  const log = logFor(room);
  const id = ++log.lastId;
  const data = Buffer.from(JSON.stringify(messageEvent(s, room, id, cmd, ts)));
  log.append(id, data);
  logs.delete(room); // the most recently written last
  logs.set(room, log);
  if (!rooms.has(room) && !idle.has(room)) idle.set(room, ts);
  if (historyBytes > HISTORY_BYTES) shrink();
  if (key !== undefined) dedupe.set(key, { at: ts, id, ts });
  deliverRoom(room, data, 'message');
  FANOUT.observe((performance.now() - started) / 1000);
  posted.room.inc();
  if (typists.size) endTypingOf(s, room);
}

function dmEvent(s, id, cmd, ts) {
  const ev = s.guest
    ? { type: 'dm', id, from: s.username, user_id: s.userId, guest: true, to: cmd.to,
      text: cmd.text, timestamp: ts }
    : { type: 'dm', id, from: s.username, user_id: s.userId, to: cmd.to, text: cmd.text,
      timestamp: ts };
  if (cmd.clientMsgId !== undefined) ev.client_msg_id = cmd.clientMsgId;
  return ev;
}

function onDm(s, cmd) {
  checkNotMuted(s, undefined, cmd.rid);
  if (!users.has(cmd.to)) {
    throw new ProtocolError('user_not_found', 'no such user online', cmd.rid);
  }
  const ts = Date.now();
  const key = cmd.clientMsgId !== undefined ? `\0${s.userId}\0${cmd.clientMsgId}` : undefined;
  if (key !== undefined) {
    const hit = seen(key, ts);
    if (hit !== undefined) { // a retry: the original again, to its sender
      return s.send(dmEvent(s, hit.id, cmd, hit.ts));
    }
  }
  const id = ++dmLastId;
  if (key !== undefined) dedupe.set(key, { at: ts, id, ts });
  const data = Buffer.from(JSON.stringify(dmEvent(s, id, cmd, ts)));
  deliverUser(cmd.to, data);
  if (cmd.to !== s.userId) deliverUser(s.userId, data);
  posted.dm.inc();
}

function onJoin(s, cmd) {
  const room = cmd.room;
  const member = s.rooms.has(room);
  if (!member && s.rooms.size >= MAX_ROOMS) {
    throw new ProtocolError('too_many_rooms', `at most ${MAX_ROOMS} rooms per connection`,
      cmd.rid);
  }
  let members = rooms.get(room);
  if (!members) {
    members = new Map();
    rooms.set(room, members);
    idle.delete(room);
  }
  let first = true;
  for (const other of members.keys()) if (other.userId === s.userId) first = false;
  const log = logs.get(room);
  const lastId = log ? log.lastId : (retired.get(room) || { lastId: 0 }).lastId;
  members.set(s, true);
  if (!member) s.rooms.set(room, lastId);
  const seenUsers = new Map();
  for (const m of members.keys()) {
    if (!seenUsers.has(m.userId)) {
      seenUsers.set(m.userId, { user_id: m.userId, username: m.username, guest: m.guest });
    }
  }
  s.send(withId({ type: 'joined', room, users: [...seenUsers.values()], last_id: lastId },
    cmd.rid));
  if (first && !member) presence(s, room, 'online');
}

function leaveRoom(s, room) {
  if (!s.rooms.delete(room)) return;
  if (s.typing.has(room)) stopTyping(s, room);
  const members = rooms.get(room);
  if (!members || !members.delete(s)) return;
  let last = true;
  for (const other of members.keys()) if (other.userId === s.userId) last = false;
  if (last) presence(s, room, 'offline');
  if (members.size === 0) {
    rooms.delete(room);
    if (logs.has(room)) {
      idle.delete(room);
      idle.set(room, Date.now());
    }
    expireIdle(Date.now());
  }
}

// The session's indicator in `room` goes off; true when it was its user's last one there.
function stopTyping(s, room) {
  if (!s.typing.delete(room)) return false;
  if (!s.typing.size) typingDeadlines.delete(s);
  const byUser = typists.get(room);
  const mine = byUser && byUser.get(s.userId);
  if (!mine) return true;
  mine.delete(s);
  if (mine.size) return false;
  byUser.delete(s.userId);
  if (!byUser.size) typists.delete(room);
  return true;
}

function endTypingOf(s, room) {
  const byUser = typists.get(room);
  const mine = byUser && byUser.get(s.userId);
  if (!mine || !mine.size) return;
  for (const t of [...mine]) stopTyping(t, room);
  publishTyping(s, room, false);
}

function onTyping(s, cmd) {
  const room = cmd.room;
  if (!s.rooms.has(room)) throw new ProtocolError('not_in_room', `not in room ${room}`, cmd.rid);
  if (cmd.status) {
    checkNotMuted(s, room, cmd.rid);
    s.typing.set(room, Date.now() + TYPING_TIMEOUT);
    typingDeadlines.add(s);
    let byUser = typists.get(room);
    if (!byUser) typists.set(room, (byUser = new Map()));
    let mine = byUser.get(s.userId);
    if (!mine) byUser.set(s.userId, (mine = new Set()));
    const first = mine.size === 0;
    mine.add(s);
    if (first) publishTyping(s, room, true);
  } else if (stopTyping(s, room)) {
    publishTyping(s, room, false);
  }
}

setInterval(() => { // indicators past their deadline go off
  const now = Date.now();
  for (const s of [...typingDeadlines]) {
    for (const [room, deadline] of s.typing) {
      if (deadline <= now && stopTyping(s, room)) publishTyping(s, room, false);
    }
  }
}, 250).unref();

const RATE_LIMITED_KINDS = new Set(['message', 'dm', 'typing']);

function receive(s, raw) {
  let cmd;
  try {
    try {
      cmd = parseCommand(raw);
    } catch (bad) {
      if (bad instanceof ProtocolError) checkRequests(s, undefined);
      throw bad;
    }
    received[cmd.type].inc();
    if (RATE_LIMITED_KINDS.has(cmd.type)) checkRate(s, cmd);
    else checkRequests(s, cmd);
    switch (cmd.type) {
      case 'message': return onMessage(s, cmd);
      case 'dm': return onDm(s, cmd);
      case 'typing': return onTyping(s, cmd);
      case 'join': return onJoin(s, cmd);
      case 'leave':
        leaveRoom(s, cmd.room);
        return s.send(withId({ type: 'left', room: cmd.room }, cmd.rid));
      case 'ping': return s.send(withId({ type: 'pong' }, cmd.rid));
    }
  } catch (err) {
    if (err instanceof ProtocolError) {
      return sendError(s, err.code, err.message, err.rid, err.extra);
    }
    console.error('error handling a frame:', err);
    return sendError(s, 'internal_error', 'internal error', cmd && cmd.rid);
  }
}

// ---- server --------------------------------------------------------------------------------
const server = http.createServer(async (req, res) => {
  if (req.url === '/health') {
    res.end('ok');
  } else if (req.url === '/metrics') {
    res.setHeader('Content-Type', prom.register.contentType);
    res.end(await prom.register.metrics());
  } else {
    res.statusCode = 404;
    res.end();
  }
});
const wss = new WebSocketServer({ server, maxPayload: MAX_MESSAGE_BYTES,
  perMessageDeflate: false });

wss.on('connection', (ws, req) => {
  const url = new URL(req.url, 'http://x');
  const asked = url.searchParams.get('username');
  if (asked !== null && !USERNAME_RE.test(asked)) {
    ws.close(1008, 'bad username');
    return;
  }
  const userId = `guest-${crypto.randomBytes(6).toString('hex')}`;
  const s = new Session(ws, userId, asked || `guest-${userId.slice(-6)}`,
    req.socket.remoteAddress);
  let mine = users.get(userId);
  if (!mine) users.set(userId, (mine = new Set()));
  mine.add(s);
  ws.session = s;
  CONNECTIONS.inc();
  ws.on('pong', () => { s.alive = true; });
  s.send({ type: 'welcome', user_id: userId, username: s.username, authenticated: false,
    auth_required: false, heartbeat_interval: HEARTBEAT / 1000 });
  ws.on('message', (raw, isBinary) => {
    s.alive = true;
    if (isBinary) {
      ws.close(1003, 'binary frames are not supported');
      return;
    }
    receive(s, raw.toString());
  });
  ws.on('close', () => {
    CONNECTIONS.dec();
    for (const room of [...s.rooms.keys()]) leaveRoom(s, room);
    typingDeadlines.delete(s);
    mine.delete(s);
    if (mine.size === 0) users.delete(userId);
  });
});

// Heartbeat as wschat does it: ping every interval, drop a peer silent for a whole interval.
setInterval(() => {
  for (const ws of wss.clients) {
    const s = ws.session;
    if (!s) continue;
    if (!s.alive) { ws.terminate(); continue; }
    s.alive = false;
    ws.ping();
  }
}, HEARTBEAT).unref();

server.listen({ host, port, backlog: 4096 }, () => {
  console.log(`node-ws-full peer listening on ${host}:${port}`);
});
