// Peer: a minimal chat-room server on Node.js + ws (protocol subset in peers/README.md).
// Fan-out serialises a message once (one Buffer) and sends it to every member.
'use strict';
const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const host = opt('--host', process.env.HOST || '127.0.0.1');
const port = Number(opt('--port', process.env.PORT || '8080'));
const heartbeat = Number(process.env.HEARTBEAT_INTERVAL || '30') * 1000;

const rooms = new Map(); // room -> Map<ws, user>
const seqs = new Map();
const users = new Map(); // user_id -> Set<ws> (DMs go to every connection of the user)
let nextId = 1;
let dmSeq = 0;

function send(ws, obj) { ws.send(JSON.stringify(obj)); }

const TEXT = { binary: false };
function broadcast(members, obj, skip) {
  const data = Buffer.from(JSON.stringify(obj)); // encoded once; sent as a text frame to each member
  for (const ws of members.keys()) if (ws !== skip && ws.readyState === 1) ws.send(data, TEXT);
}

function leave(ws, room) {
  ws.rooms.delete(room);
  const members = rooms.get(room);
  if (!members || !members.delete(ws)) return;
  broadcast(members, { type: 'presence', room, user: ws.user.username, user_id: ws.user.user_id, status: 'offline' });
  if (members.size === 0) rooms.delete(room);
}

const wss = new WebSocketServer({ host, port, backlog: 4096, maxPayload: 65536, perMessageDeflate: false });

wss.on('connection', (ws, req) => {
  const url = new URL(req.url, 'http://x');
  const userId = `u-${nextId++}`;
  ws.user = { user_id: userId, username: url.searchParams.get('username') || userId };
  ws.rooms = new Set();
  if (!users.has(userId)) users.set(userId, new Set());
  users.get(userId).add(ws);
  ws.alive = true;
  ws.on('pong', () => { ws.alive = true; });
  send(ws, { type: 'welcome', ...ws.user });
  ws.on('message', (raw, isBinary) => {
    let cmd;
    try { cmd = JSON.parse(raw); } catch (e) { return send(ws, { type: 'error', code: 'invalid_json', message: 'bad JSON' }); }
    switch (cmd && cmd.type) {
      case 'message': {
        const room = cmd.room;
        if (!ws.rooms.has(room)) return send(ws, { type: 'error', code: 'not_in_room', message: 'join first' });
        const seq = (seqs.get(room) || 0) + 1;
        seqs.set(room, seq);
        const ev = { type: 'message', room, id: seq, from: ws.user.username, user_id: ws.user.user_id,
          text: cmd.text || '', timestamp: Date.now() };
        if (cmd.client_msg_id !== undefined) ev.client_msg_id = cmd.client_msg_id;
        return broadcast(rooms.get(room), ev);
      }
      case 'dm': {
        const to = users.get(cmd.to);
        if (!to) return send(ws, { type: 'error', code: 'user_not_found', message: 'no such user online' });
        const ev = { type: 'dm', id: ++dmSeq, from: ws.user.username, user_id: ws.user.user_id, to: cmd.to,
          text: cmd.text || '', timestamp: Date.now() };
        if (cmd.client_msg_id !== undefined) ev.client_msg_id = cmd.client_msg_id;
        const data = Buffer.from(JSON.stringify(ev));
        for (const c of to) if (c.readyState === 1) c.send(data, TEXT);
        if (cmd.to !== ws.user.user_id) for (const c of users.get(ws.user.user_id)) if (c.readyState === 1) c.send(data, TEXT);
        return;
      }
      case 'join': {
        const room = String(cmd.room);
        let members = rooms.get(room);
        if (!members) { members = new Map(); rooms.set(room, members); }
        members.set(ws, ws.user);
        ws.rooms.add(room);
        const reply = { type: 'joined', room, users: [...members.values()] };
        if (cmd.id !== undefined) reply.id = cmd.id;
        send(ws, reply);
        return broadcast(members, { type: 'presence', room, user: ws.user.username, user_id: ws.user.user_id, status: 'online' }, ws);
      }
      case 'leave': {
        const room = String(cmd.room);
        leave(ws, room);
        return send(ws, { type: 'left', room });
      }
      case 'ping':
        return send(ws, { type: 'pong' });
      default:
        return send(ws, { type: 'error', code: 'unknown_type', message: String(cmd && cmd.type) });
    }
  });
  ws.on('close', () => {
    for (const room of [...ws.rooms]) leave(ws, room);
    const mine = users.get(userId);
    mine.delete(ws);
    if (mine.size === 0) users.delete(userId);
  });
});

// Heartbeat as wschat does it: ping every interval, drop a peer silent for a whole interval.
setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.alive) { ws.terminate(); continue; }
    ws.alive = false;
    ws.ping();
  }
}, heartbeat).unref();

wss.on('listening', () => console.log(`node-ws peer listening on ${host}:${port}`));
