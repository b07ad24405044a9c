// An in-process stand-in for a wschat server behind a fake WebSocket class, for the unit
// tests of timing and faults that a real server cannot be made to produce on demand
// (a gap, a lost echo, a given close code). The conformance tests use the real server.

export class FakeServer {
  constructor() {
    this.sockets = [];
    this.rooms = new Map(); // room -> { seq, messages }
    this.dedupe = new Map(); // cmid -> original event
    this.dmSeq = 0;
    this.holdEchoes = false; // true: messages are stored but not echoed (a lost echo)
    this.replies = []; // [(socket, frame) => true if handled], tried first
    this.users = new Map(); // token -> { user_id, username }
    // As the real server: each room's numbering has a name, in every joined; a room made
    // again (rooms.clear(): a restart) numbers from 1 under a new one. false: a server of
    // the release before epochs (no epoch in joined, join's epoch ignored).
    this.epochs = true;
    this.epochCount = 0;
    this.welcomeExtra = {}; // more fields of every connection's welcome ({dm_backlog: 0}: persistence on)
    const server = this;
    this.WebSocket = class FakeWebSocket {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        this.sent = [];
        this.closedWith = null;
        this.onopen = this.onmessage = this.onclose = this.onerror = null;
        server.sockets.push(this);
        setTimeout(() => server.accept(this), 0);
      }
      send(data) {
        const frame = JSON.parse(data);
        this.sent.push(frame);
        if (this.readyState === 1) setTimeout(() => server.handle(this, frame), 0);
      }
      close(code, reason) {
        this.closedWith = { code, reason };
        this.readyState = 3;
      }
    };
  }

  get last() {
    return this.sockets.at(-1);
  }

  accept(ws) {
    if (ws.readyState !== 0) return;
    ws.readyState = 1;
    ws.onopen?.({});
    ws.user = { user_id: `guest-${this.sockets.length}`, username: "guest" };
    this.push(ws, { type: "welcome", ...ws.user, authenticated: false, auth_required: false, heartbeat_interval: 30, ...this.welcomeExtra });
  }

  push(ws, event) {
    if (ws.readyState === 1) ws.onmessage?.({ data: JSON.stringify(event) });
  }

  /** The server closes `ws` with `code`. */
  drop(ws = this.last, code = 1006, reason = "") {
    ws.readyState = 3;
    ws.onclose?.({ code, reason });
  }

  room(name) {
    if (!this.rooms.has(name)) {
      this.rooms.set(name, { seq: 0, messages: [], members: new Set(), epoch: `epoch-${++this.epochCount}` });
    }
    return this.rooms.get(name);
  }

  /** Posts a message from someone else; every member socket gets it (unless `to` is given). */
  post(roomName, text, { user_id = "other", id, to } = {}) {
    const room = this.room(roomName);
    room.seq = id ?? room.seq + 1;
    const event = { type: "message", id: room.seq, room: roomName, from: user_id, user_id, text, timestamp: Date.now() };
    room.messages.push(event);
    for (const ws of to ? [to] : room.members) this.push(ws, event);
    return event;
  }

  handle(ws, f) {
    for (const reply of this.replies) if (reply(ws, f)) return;
    const reply = (type, fields) => this.push(ws, { type, id: f.id, ...fields });
    switch (f.type) {
      case "auth": {
        const claims = JSON.parse(atob(f.token.split(".")[1]));
        // As the real server: signed in as another user, the connection has left every
        // room, with no `left`.
        if (claims.sub !== ws.user.user_id) for (const room of this.rooms.values()) room.members.delete(ws);
        ws.user = { user_id: claims.sub, username: claims.name ?? claims.sub };
        return reply("welcome", { ...ws.user, authenticated: true, auth_required: false, heartbeat_interval: 30 });
      }
      case "join": {
        const room = this.room(f.room);
        room.members.add(ws);
        const epoch = this.epochs ? { epoch: room.epoch } : {};
        if (f.since === undefined) return reply("joined", { room: f.room, users: [ws.user], last_id: room.seq, ...epoch });
        if (this.epochs && f.since > 0 && f.epoch !== undefined && f.epoch !== room.epoch) {
          // As the real server: a since counted in another numbering replays nothing.
          return reply("joined", { room: f.room, users: [ws.user], last_id: room.seq, recovered: false, ...epoch });
        }
        if (f.since > room.seq) {
          // As the real server answers when its ids went back (a restarted memory backend).
          return reply("joined", { room: f.room, users: [ws.user], last_id: f.since, recovered: false, ...epoch });
        }
        const replay = room.messages.filter((m) => m.id > f.since);
        // As the real server: last_id is where the replay ends (since, when there is none).
        reply("joined", { room: f.room, users: [ws.user], last_id: replay.at(-1)?.id ?? f.since, recovered: true, ...epoch });
        for (const m of replay) this.push(ws, m);
        return;
      }
      case "leave":
        this.room(f.room).members.delete(ws);
        return reply("left", { room: f.room });
      case "message": {
        if (this.dedupe.has(f.client_msg_id)) return this.push(ws, this.dedupe.get(f.client_msg_id));
        const room = this.room(f.room);
        room.seq++;
        const event = { type: "message", id: room.seq, room: f.room, from: ws.user.username, user_id: ws.user.user_id, text: f.text, timestamp: Date.now(), client_msg_id: f.client_msg_id };
        room.messages.push(event);
        this.dedupe.set(f.client_msg_id, event);
        if (!this.holdEchoes) for (const m of room.members) this.push(m, event);
        return;
      }
      case "dm": {
        if (this.dedupe.has(f.client_msg_id)) return this.push(ws, this.dedupe.get(f.client_msg_id));
        const event = { type: "dm", id: ++this.dmSeq, from: ws.user.username, user_id: ws.user.user_id, to: f.to, text: f.text, timestamp: Date.now(), client_msg_id: f.client_msg_id };
        this.dedupe.set(f.client_msg_id, event);
        if (!this.holdEchoes) this.push(ws, event);
        return;
      }
      case "history":
        return reply("history", { room: f.room, messages: this.room(f.room).messages.slice(-(f.limit ?? 50)) });
      case "list_users":
        return reply("users", { room: f.room, users: [ws.user] });
      case "ping":
        return reply("pong", {});
      default:
        return;
    }
  }
}

/** An unsigned JWT-shaped token (the fake server reads its claims; nothing checks a signature). */
export function fakeToken(sub, ttlSeconds = 3600) {
  const b64 = (o) => btoa(JSON.stringify(o)).replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_");
  return `${b64({ alg: "none" })}.${b64({ sub, name: sub, exp: Date.now() / 1000 + ttlSeconds })}.sig`;
}

/** Resolves after the event loop has run every pending timer up to `ms`. */
export const tick = (ms = 5) => new Promise((r) => setTimeout(r, ms));
