// Peer: a minimal chat-room server on Bun's built-in WebSocket pub/sub (uWebSockets inside).
// Protocol subset in peers/README.md. Fan-out is server.publish(room, text): one frame, all subscribers.
const argv = process.argv.slice(2);
const opt = (name: string, def: string) => {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : def;
};
const hostname = opt("--host", process.env.HOST || "127.0.0.1");
const port = Number(opt("--port", process.env.PORT || "8080"));
const heartbeat = Number(process.env.HEARTBEAT_INTERVAL || "30");

type User = { user_id: string; username: string; rooms: Set<string> };
const rooms = new Map<string, Map<User, User>>();
const seqs = new Map<string, number>();
const users = new Map<string, Set<any>>(); // user_id -> its connections (DMs go to each)
let nextId = 1;
let dmSeq = 0;

const server = Bun.serve<User>({
  hostname,
  port,
  fetch(req, srv) {
    const url = new URL(req.url);
    const userId = `u-${nextId++}`;
    const data: User = { user_id: userId, username: url.searchParams.get("username") || userId, rooms: new Set() };
    if (srv.upgrade(req, { data })) return undefined;
    return new Response("websocket only", { status: 400 });
  },
  websocket: {
    maxPayloadLength: 65536,
    perMessageDeflate: false,
    // uWS closes a connection silent for idleTimeout s and pings it before that (sendPings).
    idleTimeout: Math.min(960, Math.max(8, Math.round(heartbeat * 2))),
    sendPings: true,
    open(ws) {
      let mine = users.get(ws.data.user_id);
      if (!mine) { mine = new Set(); users.set(ws.data.user_id, mine); }
      mine.add(ws);
      ws.send(JSON.stringify({ type: "welcome", user_id: ws.data.user_id, username: ws.data.username }));
    },
    message(ws, raw) {
      let cmd: any;
      try { cmd = JSON.parse(String(raw)); } catch { ws.send(JSON.stringify({ type: "error", code: "invalid_json", message: "bad JSON" })); return; }
      const me = ws.data;
      switch (cmd && cmd.type) {
        case "message": {
          const room = cmd.room;
          if (!me.rooms.has(room)) { ws.send(JSON.stringify({ type: "error", code: "not_in_room", message: "join first" })); return; }
          const seq = (seqs.get(room) || 0) + 1;
          seqs.set(room, seq);
          const ev: any = { type: "message", room, id: seq, from: me.username, user_id: me.user_id, text: cmd.text || "", timestamp: Date.now() };
          if (cmd.client_msg_id !== undefined) ev.client_msg_id = cmd.client_msg_id;
          server.publish(room, JSON.stringify(ev));
          return;
        }
        case "dm": {
          const to = users.get(cmd.to);
          if (!to) { ws.send(JSON.stringify({ type: "error", code: "user_not_found", message: "no such user online" })); return; }
          const ev: any = { type: "dm", id: ++dmSeq, from: me.username, user_id: me.user_id, to: cmd.to, text: cmd.text || "", timestamp: Date.now() };
          if (cmd.client_msg_id !== undefined) ev.client_msg_id = cmd.client_msg_id;
          const data = JSON.stringify(ev);
          for (const c of to) c.send(data);
          if (cmd.to !== me.user_id) for (const c of users.get(me.user_id)!) c.send(data);
          return;
        }
        case "join": {
          const room = String(cmd.room);
          let members = rooms.get(room);
          if (!members) { members = new Map(); rooms.set(room, members); }
          members.set(me, me);
          me.rooms.add(room);
          ws.subscribe(room);
          const reply: any = { type: "joined", room, users: [...members.values()].map((u) => ({ user_id: u.user_id, username: u.username })) };
          if (cmd.id !== undefined) reply.id = cmd.id;
          ws.send(JSON.stringify(reply));
          ws.publish(room, JSON.stringify({ type: "presence", room, user: me.username, user_id: me.user_id, status: "online" }));
          return;
        }
        case "leave": {
          const room = String(cmd.room);
          leave(ws, room);
          ws.send(JSON.stringify({ type: "left", room }));
          return;
        }
        case "ping":
          ws.send('{"type":"pong"}');
          return;
        default:
          ws.send(JSON.stringify({ type: "error", code: "unknown_type", message: String(cmd && cmd.type) }));
      }
    },
    close(ws) {
      for (const room of [...ws.data.rooms]) leave(ws, room, true);
      const mine = users.get(ws.data.user_id);
      if (mine) { mine.delete(ws); if (mine.size === 0) users.delete(ws.data.user_id); }
    },
  },
});

function leave(ws: any, room: string, closed = false) {
  const me: User = ws.data;
  me.rooms.delete(room);
  const members = rooms.get(room);
  if (!members || !members.delete(me)) return;
  if (!closed) ws.unsubscribe(room);
  server.publish(room, JSON.stringify({ type: "presence", room, user: me.username, user_id: me.user_id, status: "offline" }));
  if (members.size === 0) rooms.delete(room);
}

console.log(`bun peer listening on ${hostname}:${port}`);
