// wschat's browser page, on the wschat JavaScript client library (clients/js, bundled as
// wschat-client.js). The library keeps the connection, rejoins rooms with `since`, and keeps
// unacknowledged sends in an outbox (sessionStorage: it survives a reload). This file keeps
// the view: conversations (rooms and DMs), members, typing, pending sends, sends the server
// refused (kept for the tab too), drafts.
import { ChatClient, memoryOutbox, randomId, webStorageOutbox } from "./wschat-client.js";

const $ = (id) => document.getElementById(id);
const PAGE = 50; // history page size
const MAX_TEXT = 4000; // the server's default MAX_TEXT_CHARS
const TYPING_SHOWN_MS = 6000; // a typing indicator nobody cleared goes after this
const ROOM_RE = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const NAME_RE = /^[\p{L}\p{N}_](?:[\p{L}\p{N}_ .-]{0,30}[\p{L}\p{N}_.-])?$/u;

// ---- saved settings ------------------------------------------------------------------------
// localStorage: a guest's name, rooms, DM peers and drafts, per browser. A token is kept
// for the tab only (sessionStorage): never in the address bar, history or localStorage.
// A `?username=` or `?token=` in the address picks an identity for this tab only.
function webStorage(name) {
  try {
    const storage = window[name];
    storage.getItem("wschat.probe"); // throws where the browser blocks site data
    return storage;
  } catch { return null; }
}
const local = webStorage("localStorage");
const tab = webStorage("sessionStorage");
function store(storage) {
  return {
    get(key, fallback) {
      try { return JSON.parse(storage.getItem(`wschat.${key}`)) ?? fallback; } catch { return fallback; }
    },
    set(key, value) {
      try { storage.setItem(`wschat.${key}`, JSON.stringify(value)); } catch { /* full or disabled */ }
    },
    remove(key) {
      try { storage.removeItem(`wschat.${key}`); } catch { /* disabled */ }
    },
  };
}
const saved = store(local);
const tabSaved = store(tab);

function identityFromAddress() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {
    params.delete("token"); // out of the address bar and the history
    const search = params.toString();
    history.replaceState(history.state, "", `${location.pathname}${search ? `?${search}` : ""}${location.hash}`);
    return { kind: "token", token };
  }
  if (params.get("username")) return { kind: "guest", name: params.get("username") };
  return null;
}
const fromAddress = identityFromAddress();
if (saved.get("identity", null)?.kind === "token") saved.remove("identity"); // kept there before

function tokenSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")));
    return claims.sub ? String(claims.sub) : null;
  } catch { return null; }
}
const identityKey = (id) => (id.kind === "token" ? `token:${tokenSubject(id.token) ?? "?"}` : `guest:${id.name}`);

// ---- the view's state ----------------------------------------------------------------------
/** One conversation: a room or the DMs with one user. */
function newConversation(key, kind, name, peerId = null) {
  return {
    key, kind, name, peerId,
    messages: new Map(), // room: message id -> message; DM: `${id}:${timestamp}` -> dm
    pending: new Map(), // client_msg_id -> {text, error, created}
    notices: [], // {afterId, text, warn, kind}
    unread: 0,
    members: new Map(), // user_id -> {username, guest}
    typing: new Map(), // user_id -> {name, timer}
    // Before the oldest message held: "start" (it is the room's first), "gone" (the server
    // no longer keeps the older ones), "more" (scrolling up or the "Load older messages" button loads them); null: not known yet.
    // loadingOlder: the client whose older page is on its way, else false.
    older: null, olderCheck: null, loadingOlder: false, loaded: false,
    loading: null, // the client whose first history load is on its way (the library resends it after a reconnect)
    baseId: 0, // the first `joined` reply's last_id (raised to `since` by a `recovered: false` reset): ids up to it were written
    joinState: "joining", // then "joined", or "removed" (kicked, banned: not rejoined)
    mutedUntil: 0, // ms; Infinity: until lifted
    replay: null, // after a rejoin, while the missed messages come: see replayStarts
    resets: 0, // how often the view started again (startRoomAgain): older replies are not for it
  };
}

const state = {
  identity: null,
  me: null, // the latest welcome
  myIds: new Set(), // every user_id this identity had (a guest gets a new one per connection)
  conversations: new Map(), // "room:general", "dm:<user_id>"
  current: null,
  client: null,
  generation: 0, // one per ChatClient; events of an older client are ignored
  drafts: {},
  status: { state: "connecting", text: "Connecting…" },
};

const conv = (key) => state.conversations.get(key);
const roomKey = (room) => `room:${room}`;
const dmKey = (userId) => `dm:${userId}`;
const isGuest = (u) => u.guest === true || (u.guest === undefined && String(u.user_id).startsWith("guest-"));
const isMine = (m) => state.myIds.has(m.user_id);

function persistConversations() {
  const rooms = [], dms = [];
  for (const c of state.conversations.values()) {
    if (c.kind === "room") { if (c.joinState !== "removed") rooms.push(c.name); }
    else dms.push({ user_id: c.peerId, username: c.name, messages: [...c.messages.values()].slice(-100) });
  }
  saved.set("rooms", rooms);
  saved.set(`dms:${identityKey(state.identity)}`, dms);
  saved.set("current", state.current);
}

// ---- connection ----------------------------------------------------------------------------
function socketUrl() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  return url.toString();
}

/**
 * Per tab and per identity: a reload keeps the sends, another tab or user never sends them.
 * Where the browser keeps no site data they are kept in memory, for as long as the page:
 * a client replaced by restartClient hands its unsent sends to the next one.
 */
const memoryOutboxes = new Map(); // identity key -> memoryOutbox()
function outboxStorage(id) {
  const key = identityKey(id);
  if (tab) return webStorageOutbox(`wschat-outbox:${key}`, tab);
  if (!memoryOutboxes.has(key)) memoryOutboxes.set(key, memoryOutbox());
  return memoryOutboxes.get(key);
}

function startClient() {
  const gen = ++state.generation;
  const id = state.identity;
  const client = new ChatClient({
    url: socketUrl(),
    ...(id.kind === "token" ? { token: id.token } : { username: id.name }),
    outboxStorage: outboxStorage(id),
  });
  state.client = client;
  const on = (event, fn) => client.on(event, (payload) => { if (gen === state.generation) fn(payload); });

  on("state", ({ state: s }) => { if (s === "connected") setStatus("connected", "Online"); });
  on("connecting", ({ attempt, delay, code }) => reconnecting(attempt, delay, code));
  on("connected", welcomed);
  on("disconnected", ({ code, reason }) => stopped(code, reason));
  on("joined", joined);
  on("message", (m) => addMessage(roomKey(m.room), m));
  on("dm", receivedDm);
  on("ack", acknowledged);
  on("rateLimited", ({ retryAfterMs }) => slowDown(retryAfterMs)); // the send waits, then retries
  on("presence", presence);
  on("typing", typing);
  on("error", clientError);
  on("removed", removed);
  on("muted", (e) => muted(e, true));
  on("unmuted", (e) => muted(e, false));

  for (const c of state.conversations.values()) {
    if (c.kind !== "room") continue;
    joinRoom(c.name).catch((err) => { if (gen === state.generation) joinFailed(c.name, err); });
  }
  client.connect().catch(() => { /* reported by the "disconnected" event */ });
  // The outbox is restored from its storage as connect() starts: show what waits in it.
  setTimeout(() => gen === state.generation && showRestoredPending(), 0);
  setStatus("connecting", "Connecting…");
}

/** Replaces the client (a new identity, or a server that lost its ids: see checkRejoin). */
function restartClient() {
  const old = state.client;
  state.generation++;
  old?.disconnect();
  startClient();
}

let slowUntil = 0;
let slowTimer = null;
/** "Slow down: you can send again in N s", counting down, gone when the wait is over. */
function slowDown(retryAfterMs) {
  const ms = Number.isFinite(retryAfterMs) ? retryAfterMs : 1000;
  slowUntil = Math.max(slowUntil, Date.now() + ms);
  showSlowDown();
}
function showSlowDown() {
  clearTimeout(slowTimer);
  const left = slowUntil - Date.now();
  if (left <= 0) { setText($("slow-down"), ""); return; }
  setText($("slow-down"), `Slow down: you can send again in ${Math.ceil(left / 1000)} s.`);
  slowTimer = setTimeout(showSlowDown, left % 1000 || 1000);
}

const CLOSE_WORDS = {
  1001: "The server is restarting",
  1006: "The connection was lost",
  1011: "The server had a problem",
  4001: "Sign-in timed out",
  4002: "Your sign-in expired",
  4003: "The server ended this session", // reason "banned": see stopped
  4100: "The connection went quiet",
  4101: "The connection was too slow",
  4102: "Too many messages at once",
};
let countdown = null;
let outage = null; // why the connection went, kept in words until it is back
function reconnecting(attempt, delay, code) {
  clearInterval(countdown);
  clearAllTyping();
  // A close frame from the server (any code but 1005/1006) proves the network works: its
  // words win over navigator.onLine, which also says false with only a loopback route.
  const serverSaid = Boolean(code) && code !== 1005 && code !== 1006;
  if (serverSaid && !outage) outage = CLOSE_WORDS[code] ?? "Disconnected";
  else if (!serverSaid && navigator.onLine === false) outage = outage ?? "No network";
  else if (!outage && !state.me) outage = "Cannot reach the server";
  else if (!outage && code) outage = CLOSE_WORDS[code] ?? "Disconnected";
  const until = Date.now() + delay;
  // The words are a live region, said once; the seconds are not (they change every second).
  setStatus("reconnecting", outage ? `${outage}; reconnecting` : "Connecting…");
  const show = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    const when = left > 0 ? ` in ${left} s…` : "…";
    setText($("status-countdown"), outage ? when : ` (reconnecting${when})`);
    $("retry").hidden = left <= 1;
    if (left <= 0) clearInterval(countdown);
  };
  show();
  if (delay > 1000) countdown = setInterval(show, 1000);
}

/** "Retry now": a new connection at once instead of waiting out the backoff. */
function retryNow() {
  $("retry").hidden = true;
  state.client.disconnect();
  state.client.connect().catch(() => { /* reported by the "disconnected" event */ });
}

function stopped(code, reason) {
  clearInterval(countdown);
  clearAllTyping();
  if (code === 1000 && reason === "client disconnect") return;
  const why = code === 4003 && reason === "banned"
    ? `You are banned from this server${bannedUntil ? ` until ${time(bannedUntil)}` : ""}`
    : CLOSE_WORDS[code] ?? `The server closed the connection (${reason || code})`;
  setStatus("failed", `${why}. Not reconnecting.`);
  $("retry").hidden = false;
  if (code === 4001 || code === 4002 || /auth/.test(reason)) showSignin("Your token was refused or expired: paste a new one, or pick a name.");
}

function setStatus(kind, text) {
  const wasConnected = state.status.state === "connected";
  state.status = { state: kind, text };
  $("status").dataset.state = kind;
  setText($("status-text"), text);
  if (kind !== "reconnecting") {
    clearInterval(countdown);
    setText($("status-countdown"), "");
    $("retry").hidden = true;
  }
  if (kind === "connected") outage = null;
  // Pending sends say "Sending…" or "Waiting for the connection…": only they are redrawn.
  if (wasConnected !== (kind === "connected")) render(state.current);
  else renderComposer();
}

function welcomed(welcome) {
  state.me = welcome;
  bannedUntil = null;
  state.myIds.add(welcome.user_id);
  const key = `myIds:${identityKey(state.identity)}`;
  saved.set(key, [...new Set([...saved.get(key, []), welcome.user_id])].slice(-50));
  $("me").replaceChildren(welcome.username, ...(welcome.authenticated ? [] : [badge("guest")]));
  showRestoredPending();
  renderAll();
}

let bannedUntil = null; // a ban everywhere's end (Unix ms), said when the server closes 4003

function clientError(err) {
  // The connection closed for good: stopped() says so in the status, in words.
  if (err.code === "closed") return;
  // A ban everywhere comes as `forbidden` with no room, just before the close.
  if (err.code === "forbidden" && err.details?.reason === "banned" && !err.details.room) {
    bannedUntil = err.details.until ?? null;
  }
  // Errors that belong to a request reach its promise (shown next to it); these are the rest.
  if (["invalid_room", "too_many_rooms", "left", "user_not_found", "message_too_large",
    "invalid_message", "outbox_full", "forbidden", "muted"].includes(err.code)) { syncPending(err); return; }
  if (err.code === "rate_limited") { slowDown(err.retryAfterMs); return; }
  if (err.code === "auth_failed" || err.code === "token_expired") {
    showSignin("Your token was refused: paste a new one, or pick a name.");
    return;
  }
  showSendError(describe(err));
}

// ---- rooms ---------------------------------------------------------------------------------
function joinRoom(room) {
  let c = conv(roomKey(room));
  if (!c) {
    c = newConversation(roomKey(room), "room", room);
    state.conversations.set(c.key, c);
  }
  c.joinState = "joining";
  return state.client.join(room);
}

async function joinFromForm(room) {
  const error = $("join-error");
  error.hidden = true;
  if (!ROOM_RE.test(room)) {
    showError(error, "Room names are 1-64 letters, digits and _ . : - (starting with a letter or digit).");
    return;
  }
  const known = conv(roomKey(room));
  if (known && known.joinState !== "removed") { open(known.key); $("join-room").value = ""; return; }
  const joining = joinRoom(room);
  renderSidebar();
  try {
    await joining;
    // What was typed meanwhile (the next room's name) stays.
    if ($("join-room").value.trim() === room) $("join-room").value = "";
    open(roomKey(room));
  } catch (err) {
    joinFailed(room, err);
  }
}

/** The server took this client out of a room (kicked, banned): say so there; no rejoin. */
function removed({ room, reason, until }) {
  const c = conv(roomKey(room));
  if (!c) return;
  c.joinState = "removed";
  c.members.clear();
  clearTyping(c);
  // A rejoin refused for a ban (banned while away) says `banned` too, with its `until`.
  const text = reason === "banned" ? `You were banned from # ${room}${until ? ` until ${time(until)}` : ""}.`
    : reason === "forbidden" ? `You may no longer use # ${room}.`
    : reason === "kicked" ? `You were removed from # ${room}.` : `You were removed from # ${room}: ${reason}.`;
  addNotice(c, text, true);
  persistConversations();
  renderAll();
}

/** `muted`/`unmuted`: for one room, or (no room) everywhere. */
function muted({ room, until }, on) {
  const rooms = room ? [conv(roomKey(room))].filter(Boolean)
    : [...state.conversations.values()].filter((c) => c.kind === "room");
  for (const c of rooms) {
    c.mutedUntil = on ? until ?? Infinity : 0;
    addNotice(c, on ? `You are muted here${until ? ` until ${time(until)}` : ""}: you can read but not post.`
      : "You can post here again.", on);
    render(c.key);
  }
  if (on && until) atTime(until + 100, () => muteEnded(rooms, until));
}

const MAX_TIMEOUT_MS = 2 ** 31 - 1; // setTimeout's longest delay

/** Runs `fn` at `when` (Unix ms). setTimeout takes at most 2^31 - 1 ms (24.8 days): a longer
 * delay (a mute for a month) wraps around, and ran `fn` at once. */
function atTime(when, fn) {
  const left = when - Date.now();
  if (left > MAX_TIMEOUT_MS) setTimeout(() => atTime(when, fn), MAX_TIMEOUT_MS);
  else setTimeout(fn, Math.max(0, left));
}

/** A mute that ran out (the server sends no `unmuted` then): said as a lifted one is. */
function muteEnded(rooms, until) {
  for (const c of rooms) {
    if (c.mutedUntil !== until || conv(c.key) !== c) continue; // lifted, or muted anew since
    c.mutedUntil = 0;
    addNotice(c, "Your mute ended: you can post here again.", false);
    render(c.key);
  }
  renderComposer();
}

/** A join the server refused (invalid_room, too_many_rooms): the room leaves the list. */
function joinFailed(room, err) {
  if (err.code === "timeout" || err.code === "left" || err.code === "disconnected") return; // still wanted, or gone
  state.conversations.delete(roomKey(room));
  if (state.current === roomKey(room)) state.current = [...state.conversations.keys()][0] ?? null;
  showError($("join-error"), `Could not join ${room}: ${describe(err)}`);
  persistConversations();
  persistFailed();
  renderAll();
}

async function leaveRoom(room) {
  closeConversation(roomKey(room));
  try { await state.client.leave(room); } catch { /* the room is gone from the view anyway */ }
}

function joined({ room, users, recovered, rejoin, last_id: lastId, epochChanged }) {
  const c = conv(roomKey(room));
  if (!c) return;
  c.joinState = "joined";
  c.members = new Map(users.map((u) => [u.user_id, { username: u.username, guest: isGuest(u) }]));
  clearTyping(c);
  if (!rejoin) {
    c.baseId = lastId ?? 0;
    loadLatest(c);
  } else if (epochChanged) {
    numberingBegunAgain(c, lastId);
  } else {
    // Also when the first history load has not come back yet (the connection went first):
    // what was missed meanwhile is checked all the same, and the load still comes.
    replayStarts(c, lastId, recovered === false);
    checkRejoin(c, recovered, lastId);
    if (!c.loaded && c.loading !== state.client) loadLatest(c);
  }
  persistConversations();
  renderAll();
}

async function loadLatest(c) {
  const client = state.client;
  c.loading = client;
  try {
    const messages = await client.history(c.name, { limit: PAGE });
    if (client !== state.client || conv(c.key) !== c) return;
    for (const m of messages) c.messages.set(m.id, m);
    // An earlier load that failed (timed out during a long cut, say) is no longer true.
    c.notices = c.notices.filter((n) => n.kind !== "history");
    const first = !c.loaded; // else a reload after a rejoin said what lies before
    c.loaded = true;
    render(c.key, { toBottom: true });
    if (first) settleOlder(c, messages.length, PAGE);
  } catch (err) {
    if (client !== state.client || conv(c.key) !== c) return;
    addNotice(c, `History could not be loaded: ${describe(err)}`, true, lastKnownId(c), "history");
    render(c.key);
  } finally {
    if (c.loading === client) c.loading = null;
  }
}

/**
 * Whether a reply `client` was asked for while `c` had started `resets` times is still for what
 * the page shows: the same client (restartClient replaces it), the same conversation, and the
 * same numbering (startRoomAgain counts each start; the library resends a request a cut took
 * with it, so its answer may come after one).
 */
function stillShown(c, client, resets) {
  return client === state.client && conv(c.key) === c && c.resets === resets;
}

/**
 * After a reconnect the library rejoined with `since` and replayed what was missed. Two
 * things it cannot see are checked here: `recovered: false` (some messages are gone: the
 * view is reloaded from history) and a server whose ids started again at 1 (a restarted
 * memory backend: the message we hold as id N is not the server's N, or the server's last
 * id, the `joined` reply's `lastId`, is below N). Then the view is reset, and the client
 * replaced, because the library skips every id up to the one it saw last. A server that
 * names its numbering (`joined.epoch`) says the second itself, with `epochChanged`
 * (numberingBegunAgain): these checks are for one of the release before. A history with
 * nothing at or above N is no such proof: a room empty longer than ROOM_TTL loses its
 * history but numbers on (ROOM_NUMBERING_TTL), and its `joined` says so with a `lastId`
 * at or above N.
 */
async function checkRejoin(c, recovered, lastId) {
  const client = state.client;
  const resets = c.resets;
  const since = seenUpTo(c);
  if (!since && recovered !== false) return;
  try {
    const [atSince] = await client.history(c.name, { before: since + 1, limit: 1 });
    const latest = recovered === false ? await client.history(c.name, { limit: PAGE }) : [];
    // The library resends a request the connection took with it: the answer may come after
    // a later rejoin reset the room to a new numbering (numberingBegunAgain), when `since`,
    // `lastId` and the ids held no longer count in the same numbering. Not for this view.
    if (!stillShown(c, client, resets)) return;
    const ours = c.messages.get(since);
    const differs = atSince && ours && atSince.id === since &&
      (atSince.timestamp !== ours.timestamp || atSince.user_id !== ours.user_id);
    if (differs || (recovered === false && !(lastId >= since))) {
      serverForgot(c);
      return;
    }
    if (recovered === false) {
      c.messages = new Map(latest.map((m) => [m.id, m]));
      // Ids up to `since` were written: with none of them held the room does not start
      // here (its history may have expired while it was empty, its ids going on).
      c.baseId = Math.max(c.baseId, since);
      c.loaded = true;
      restartNotices(c, "Some messages were missed while you were away; showing the latest.");
      render(c.key, { toBottom: true });
      settleOlder(c, latest.length, PAGE);
    }
  } catch { /* the next reconnect checks again */ }
}

/**
 * The room's ids started again from 1 since the view's were counted: the rejoin's `joined`
 * names another `epoch` than the one the library sent (a memory server restarted, Redis lost
 * its data, the room was unused past ROOM_NUMBERING_TTL), and nothing was replayed. The
 * messages held name other messages of the new numbering: merged with its ids they would
 * replace or sit among them, so the view starts again from the new numbering's history. The
 * library already counts in the new numbering (its baseline is `lastId`): no new client.
 */
function numberingBegunAgain(c, lastId) {
  startRoomAgain(c, BEGUN_AGAIN);
  c.baseId = lastId ?? 0;
  loadLatest(c);
}

/**
 * What the page knows when a room's ids started again: not why (a memory server restarted,
 * Redis lost the room's keys, the room went unused past ROOM_NUMBERING_TTL), only that the
 * server's history of it began again, and that the messages shown before are gone from view.
 */
const BEGUN_AGAIN = "This room's history began again on the server: earlier messages may be"
  + " missing, and are no longer shown.";

/** A room's view starts again, with a notice (`why`): the messages it held name other ones now. */
function startRoomAgain(c, why) {
  c.resets++;
  if (c.replay) replayEnds(c, true);
  c.messages.clear();
  restartNotices(c, why);
  c.older = null;
  c.olderCheck = null;
  c.loaded = false;
  c.unread = 0;
}

/**
 * The ids of room `seen` started again (the server's message at the id held is another, or
 * its last id is below it), found by checkRejoin where there is no epoch to tell (a server
 * of the release before): every room starts afresh, as the new client joins them anew. Only
 * `seen` is known to have begun again; the others are reloaded in case (their notice says so).
 */
function serverForgot(seen) {
  for (const c of state.conversations.values()) {
    if (c.kind !== "room") continue;
    startRoomAgain(c, c === seen ? BEGUN_AGAIN : `Reloaded from the server: the history of`
      + ` # ${seen.name} began again there, so this room's may have too; earlier messages may`
      + ` be missing.`);
  }
  restartClient();
  renderAll();
}

/**
 * Says what lies before the oldest message held, after a history page of `got` messages
 * (`asked` were asked for). Room ids start at 1 with no gaps (docs/delivery.md): the start
 * is where id 1 is, or an empty room that never had a message. A short page is no proof of
 * the start: a server keeps only its latest HISTORY_SIZE messages, and answers a page of 50
 * with fewer although older ones were written; one more look (`before` the oldest) tells
 * whether they are gone.
 */
async function settleOlder(c, got, asked) {
  const check = (c.olderCheck = {});
  const settled = (older) => {
    if (c.olderCheck !== check || conv(c.key) !== c) return;
    c.olderCheck = null;
    if (c.older !== older) { c.older = older; render(c.key, { keepFromBottom: true }); }
  };
  const oldest = c.messages.size ? Math.min(...c.messages.keys()) : 0;
  if (oldest === 1) return settled("start");
  if (!oldest) return settled(c.baseId > 0 ? "gone" : "start"); // nothing kept, or nothing written
  if (got >= asked) return settled("more");
  c.older = null; // not known yet: neither said
  const client = state.client;
  try {
    const [before] = await client.history(c.name, { before: oldest, limit: 1 });
    if (client === state.client) settled(before ? "more" : "gone");
  } catch {
    if (client === state.client) settled("more"); // scrolling up asks again
  }
}

/**
 * Loads the page before the oldest message held: on scrolling to the top, or with the "Load
 * older messages" button (the only way when the list is too short to scroll, and for a
 * keyboard). A reply that comes for a client since replaced (restartClient), or for a view
 * since started again (startRoomAgain), is ignored.
 */
async function loadOlder(c) {
  if (c.kind !== "room" || c.older !== "more" || c.loadingOlder || !c.loaded) return;
  const oldest = Math.min(...c.messages.keys());
  if (!Number.isFinite(oldest)) return;
  const client = state.client;
  const resets = c.resets;
  const button = $("load-older");
  const fromButton = document.activeElement === button; // pressed: keep the reader's place after
  c.loadingOlder = client;
  renderOlder();
  try {
    const messages = await client.history(c.name, { before: oldest, limit: PAGE });
    // Resent after a cut, it may be answered after the room was reset to a new numbering:
    // `oldest` was the old one's, and the page before it in the new one leaves a gap.
    if (!stillShown(c, client, resets)) return;
    for (const m of messages) c.messages.set(m.id, m);
    if (!messages.length) c.older = "gone";
    render(c.key, { keepFromBottom: true });
    if (messages.length) await settleOlder(c, messages.length, PAGE);
  } catch { /* the button, or scrolling up again, retries */ } finally {
    if (c.loadingOlder === client) c.loadingOlder = false;
    renderOlder();
    // The button stays focused while it says it is busy (aria-disabled, not disabled: a
    // disabled button would drop the focus). When it goes (the start, or nothing older kept),
    // the focus goes to the line that took its place, at the top of the list.
    if (fromButton && state.current === c.key && (document.activeElement === button
        || document.activeElement === document.body || !document.activeElement)) {
      const target = button.hidden ? $("messages").querySelector("li[tabindex]") : button;
      target?.focus({ preventScroll: true });
    }
  }
}

/** The "Load older messages" button: shown while the open room may have older messages. */
function renderOlder() {
  const c = conv(state.current);
  const button = $("load-older");
  const busy = !!c?.loadingOlder;
  button.hidden = !(c?.kind === "room" && c.loaded && (c.older === "more" || busy));
  setText(button, busy ? "Loading older messages…" : "Load older messages");
  if (busy) button.setAttribute("aria-disabled", "true");
  else button.removeAttribute("aria-disabled");
}

const lastKnownId = (c) => (c.messages.size ? Math.max(...c.messages.keys()) : 0);
/**
 * The id a rejoin's `since` is (the library's last id): the newest shown or, before any
 * came (the first history load may not have come either), the first `joined`'s last_id.
 */
const seenUpTo = (c) => Math.max(lastKnownId(c), c.baseId);

const REPLAY_GAP_MS = 2000; // a replay that stops short (the connection went again) is summed up after this

/**
 * After a rejoin the server replays what was missed, up to `upTo` (the `joined` reply's
 * last_id), as ordinary messages arriving all at once: said one by one, a screen reader
 * would read out 50 in a row. They are counted instead, and said in one line when the last
 * has come ("12 new messages in # general while you were away."; a single one is said as
 * it is); what comes after it is said as it comes. After `recovered: false` (`quiet`) the
 * "Some messages were missed" notice says it instead.
 */
function replayStarts(c, upTo, quiet) {
  if (!(upTo > seenUpTo(c))) return; // nothing was missed
  c.replay ??= { heard: [], quiet: false, timer: null };
  c.replay.upTo = upTo;
  c.replay.quiet ||= quiet;
  replayWaits(c);
}
function replayWaits(c) {
  clearTimeout(c.replay.timer);
  c.replay.timer = setTimeout(() => replayEnds(c), REPLAY_GAP_MS);
}
function replayEnds(c, silently = false) {
  const { heard, quiet, timer } = c.replay;
  clearTimeout(timer);
  c.replay = null;
  if (silently || quiet || state.current !== c.key || !heard.length) return;
  announce(heard.length === 1 ? said(heard[0])
    : `${heard.length} new messages in # ${c.name} while you were away.`);
}

/** A notice after the latest message; said aloud if `c` is open. `kind` marks one that a later event takes back. */
function addNotice(c, text, warn, afterId = lastKnownId(c), kind = null) {
  c.notices.push({ afterId, text, warn, kind });
  if (state.current === c.key) announce(text);
}

/** The view of `c` starts again: its old notices go, this warning heads it (and is said if `c` is open). */
function restartNotices(c, text) {
  c.notices = [];
  addNotice(c, text, true, 0);
}

// ---- messages ------------------------------------------------------------------------------
/**
 * A room message or DM for conversation `key`. `acked`: the library took it for the echo of
 * one of this tab's sends (the `ack` event: its outbox names that client_msg_id, and the
 * sender is this identity, or the send is a room message restored from storage).
 */
function addMessage(key, m, acked = false) {
  const c = conv(key);
  if (!c) return;
  const id = c.kind === "room" ? m.id : dmId(m);
  const fresh = !c.messages.has(id);
  c.messages.set(id, m);
  // A client_msg_id is the sender's: someone else's message naming it (a client that reuses
  // ids, or copies them) is not one of ours, and leaves our pending or refused send alone.
  if (m.client_msg_id && (acked || isMine(m))) c.pending.delete(m.client_msg_id);
  const t = c.typing.get(m.user_id);
  if (t) { clearTimeout(t.timer); c.typing.delete(m.user_id); }
  if (fresh && !isMine(m) && (state.current !== key || document.hidden)) c.unread++;
  const replayed = c.replay && c.kind === "room" && m.id <= c.replay.upTo;
  if (fresh && !isMine(m)) {
    if (replayed) c.replay.heard.push(m); // said at the end of the replay, in one line
    else if (state.current === key) announce(said(m));
  }
  if (replayed) {
    if (m.id >= c.replay.upTo) replayEnds(c);
    else replayWaits(c);
  }
  if (c.kind === "dm") persistConversations();
  render(key);
  if (t) renderMembers();
}

const dmId = (m) => `${m.id}:${m.timestamp}`;
const said = (m) => `${m.from}: ${m.text}`;

function receivedDm(m, acked = false) {
  // The sender tells the side, not `acked`: the library takes for a DM's echo only a copy
  // from the user this client is (welcomed, so in myIds, before it writes a send), and
  // another user's DM naming the id of one of our sends is filed with that user.
  const mine = isMine(m);
  const peerId = mine ? m.to : m.user_id;
  let c = conv(dmKey(peerId));
  if (!c) {
    const member = findUser(peerId);
    c = newConversation(dmKey(peerId), "dm", mine ? (member?.username ?? peerId) : m.from, peerId);
    state.conversations.set(c.key, c);
  }
  if (!mine) c.name = m.from;
  addMessage(c.key, m, acked);
  renderSidebar();
}

function acknowledged(m) {
  if (m.type === "dm") receivedDm(m, true);
  else addMessage(roomKey(m.room), m, true);
}

function send(c, text) {
  const client = state.client;
  const clientMsgId = randomId();
  c.pending.set(clientMsgId, { text, created: Date.now(), error: null });
  const promise = c.kind === "room"
    ? client.send(c.name, text, { clientMsgId })
    : client.dm(c.peerId, text, { clientMsgId });
  promise.catch((err) => {
    const p = c.pending.get(clientMsgId);
    if (client !== state.client || !p) return;
    refused(c, p, err);
    persistFailed();
    render(c.key);
  });
  render(c.key, { toBottom: true });
}

/** Sends restored from the outbox storage (a reload, a new client) are shown as pending where they belong. */
function showRestoredPending() {
  for (const e of state.client.pending) {
    const key = e.kind === "message" ? roomKey(e.room) : dmKey(e.to);
    let c = conv(key);
    if (!c && e.kind === "dm") {
      c = newConversation(key, "dm", findUser(e.to)?.username ?? e.to, e.to);
      state.conversations.set(key, c);
    }
    if (c && !c.pending.has(e.client_msg_id)) c.pending.set(e.client_msg_id, { text: e.text, created: e.created, error: null });
  }
  renderAll();
}

/** A send restored from storage has no promise: when it is refused, it just leaves the outbox. */
function syncPending(err) {
  const waiting = new Set(state.client.pending.map((e) => e.client_msg_id));
  for (const c of state.conversations.values()) {
    for (const [cmid, p] of c.pending) {
      if (!waiting.has(cmid) && !p.error) refused(c, p, err);
    }
  }
  persistFailed();
  renderAll();
}

/** A send the server refused: it says why in its conversation, and aloud if that is open. */
function refused(c, p, err) {
  p.error = describe(err, c);
  if (state.current === c.key) announce(`Not sent: ${p.error}`);
  // Muted while away: no `muted` event came, the refusal is the news (and says until when).
  if (err?.code === "muted" && c.kind === "room" && !(c.mutedUntil > Date.now())) {
    muted({ room: c.name, until: err.details?.until ?? null }, true);
  }
}

function retry(c, cmid) {
  const p = c.pending.get(cmid);
  if (!p) return;
  c.pending.delete(cmid);
  send(c, p.text);
  persistFailed();
  $("draft").focus(); // the focused button went with its message
}

function discard(c, cmid) {
  c.pending.delete(cmid);
  persistFailed();
  render(c.key);
  $("draft").focus();
}

/**
 * Sends the server refused are the page's, not the library's (it has dropped them from its
 * outbox): they are kept for the tab beside it, per identity, so a reload still shows them
 * with Retry, Edit and Discard. Where the browser keeps no site data they live in memory only,
 * as the outbox does.
 */
const failedKey = () => `failed:${identityKey(state.identity)}`;
function persistFailed() {
  if (!state.identity) return;
  const failed = [];
  for (const c of state.conversations.values()) {
    for (const [cmid, p] of c.pending) {
      if (p.error) failed.push({ conv: c.key, name: c.name, cmid, text: p.text, created: p.created, error: p.error });
    }
  }
  if (failed.length) tabSaved.set(failedKey(), failed.slice(-100));
  else tabSaved.remove(failedKey());
}

/** Brings back the refused sends kept for this tab (their room or DM must still be listed). */
function restoreFailed() {
  for (const f of tabSaved.get(failedKey(), [])) {
    if (typeof f?.text !== "string" || typeof f.cmid !== "string" || typeof f.conv !== "string") continue;
    let c = conv(f.conv);
    if (!c && f.conv.startsWith("dm:")) {
      c = newConversation(f.conv, "dm", String(f.name ?? f.conv.slice(3)), f.conv.slice(3));
      state.conversations.set(c.key, c);
    }
    if (c && !c.pending.has(f.cmid)) c.pending.set(f.cmid, { text: f.text, created: f.created, error: String(f.error) });
  }
}

function edit(c, cmid) {
  const p = c.pending.get(cmid);
  if (!p) return;
  c.pending.delete(cmid);
  persistFailed();
  const draft = $("draft");
  draft.value = draft.value ? `${p.text}\n${draft.value}` : p.text;
  saveDraft();
  fitDraft();
  render(c.key);
  draft.focus();
}

// ---- members, presence, typing -------------------------------------------------------------
function presence({ room, user, user_id, status, guest }) {
  const c = conv(roomKey(room));
  if (!c) return;
  if (status === "online") c.members.set(user_id, { username: user, guest: isGuest({ user_id, guest }) });
  else {
    c.members.delete(user_id);
    const t = c.typing.get(user_id);
    if (t) { clearTimeout(t.timer); c.typing.delete(user_id); }
  }
  if (state.current === c.key || currentRoom() === c) { renderMembers(); renderTyping(); }
}

function typing({ room, user, user_id, status, guest }) {
  const c = conv(roomKey(room));
  if (!c || state.myIds.has(user_id)) return;
  const t = c.typing.get(user_id);
  if (t) clearTimeout(t.timer);
  if (status) {
    const timer = setTimeout(() => { c.typing.delete(user_id); renderTyping(); renderMembers(); }, TYPING_SHOWN_MS);
    // Guests choose their own names: "(guest)" keeps one from passing for a signed-in user.
    c.typing.set(user_id, { name: isGuest({ user_id, guest }) ? `${user} (guest)` : user, timer });
  } else c.typing.delete(user_id);
  renderTyping();
  renderMembers();
}

function clearTyping(c) {
  for (const t of c.typing.values()) clearTimeout(t.timer);
  c.typing.clear();
}
function clearAllTyping() {
  for (const c of state.conversations.values()) clearTyping(c);
  renderTyping();
  renderMembers();
}

function findUser(userId) {
  for (const c of state.conversations.values()) {
    const u = c.members.get(userId);
    if (u) return u;
  }
  return null;
}

function openDm(userId, username) {
  if (state.myIds.has(userId)) return;
  const key = dmKey(userId);
  if (!conv(key)) state.conversations.set(key, newConversation(key, "dm", username, userId));
  persistConversations();
  open(key);
}

// ---- rendering -----------------------------------------------------------------------------
// The view is updated in place, never rebuilt: each list keeps its nodes by key, and only
// entries whose content changed are touched. So a focused button keeps the focus, a reader
// scrolled up stays where they are, and an event costs the same with 50 messages shown as
// with 5,000 (a rebuild took 0.4 s each at 1,500).
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "data") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.flat().filter((x) => x !== null && x !== undefined && x !== false));
  return node;
}
const badge = (text) => el("span", { class: `badge ${text}` }, text);
/** "14:05" today; "3 Dec, 14:05" another day (older history, a ban for a week); the year too in another year. */
function time(ms) {
  const at = new Date(ms);
  const now = new Date();
  const format = { hour: "2-digit", minute: "2-digit" };
  if (at.toDateString() !== now.toDateString()) Object.assign(format, { month: "short", day: "numeric" });
  if (at.getFullYear() !== now.getFullYear()) format.year = "numeric";
  return at.toLocaleString([], format);
}
const byName = new Intl.Collator().compare;

/** Sets a text only when it differs: an equal write would still re-announce a live region. */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

const ANNOUNCED_KEPT_MS = 10_000; // then a line leaves #arrivals (it was said when it came)

/**
 * Says `text` to screen readers (#arrivals, a polite live region): what arrives in the open
 * conversation. #messages is no live region: opening a conversation or loading history
 * would read out every message in it. A line goes some seconds later: one reading the page
 * through would meet old arrivals after the conversation (a removal is not announced).
 */
function announce(text) {
  const log = $("arrivals");
  const line = el("p", {}, text);
  log.append(line);
  while (log.childElementCount > 20) log.firstElementChild.remove();
  setTimeout(() => line.remove(), ANNOUNCED_KEPT_MS);
}

const keyedNodes = new WeakMap(); // list element -> Map(key -> node)
const signatures = new WeakMap(); // node -> the signature it was drawn from

/**
 * Makes `list`'s children the nodes of `entries`, in order. An entry is `{key, sig, make,
 * update?, alias?}`: the node of a known key is kept, and redrawn in place (`update(node)`,
 * else its attributes and children are taken from a fresh `make()`) only when `sig` changed;
 * a new key's node is `make()`'s, or the node of `alias` when that key is no longer wanted
 * (a pending send becoming the stored message). Nodes of keys not in `entries` are removed.
 */
function reconcile(list, entries) {
  let nodes = keyedNodes.get(list);
  if (!nodes) keyedNodes.set(list, (nodes = new Map()));
  const wanted = new Set(entries.map((e) => e.key));
  for (const e of entries) {
    if (e.alias && !nodes.has(e.key) && nodes.has(e.alias) && !wanted.has(e.alias)) {
      nodes.set(e.key, nodes.get(e.alias));
      nodes.delete(e.alias);
    }
  }
  for (const [key, node] of nodes) {
    if (!wanted.has(key)) { node.remove(); nodes.delete(key); }
  }
  let cursor = list.firstChild;
  for (const e of entries) {
    let node = nodes.get(e.key);
    if (!node) {
      node = e.make();
      nodes.set(e.key, node);
      signatures.set(node, e.sig);
    } else if (signatures.get(node) !== e.sig) {
      if (e.update) e.update(node);
      else redraw(node, e.make());
      signatures.set(node, e.sig);
    }
    if (node === cursor) cursor = node.nextSibling;
    else list.insertBefore(node, cursor);
  }
}

/** Gives `node` the attributes and children of `fresh`, keeping the node itself. */
function redraw(node, fresh) {
  for (const name of node.getAttributeNames()) if (!fresh.hasAttribute(name)) node.removeAttribute(name);
  for (const name of fresh.getAttributeNames()) node.setAttribute(name, fresh.getAttribute(name));
  node.replaceChildren(...fresh.childNodes);
}

/** Empties `list` and forgets its nodes (another conversation is shown). */
function resetList(list) {
  list.replaceChildren();
  keyedNodes.delete(list);
}

/** The room whose members the sidebar shows: the open room, else the last one opened. */
let membersRoom = null;
function currentRoom() {
  const c = conv(state.current);
  if (c?.kind === "room") membersRoom = c.key;
  return conv(membersRoom);
}

function renderAll() {
  renderSidebar();
  renderMembers();
  render(state.current);
}

function renderSidebar() {
  const all = [...state.conversations.values()];
  reconcile($("rooms"), all.filter((c) => c.kind === "room").map(conversationEntry));
  reconcile($("dms"), all.filter((c) => c.kind === "dm").map(conversationEntry));
  $("dm-hint").hidden = all.some((c) => c.kind === "dm");
  const others = all.filter((c) => c.key !== state.current).reduce((n, c) => n + c.unread, 0);
  const shown = conv(state.current);
  const unread = all.reduce((n, c) => n + c.unread, 0);
  const where = shown ? `${shown.kind === "room" ? "#" + shown.name : shown.name} – ` : "";
  const title = `${unread ? `(${unread}) ` : ""}${where}wschat`;
  if (document.title !== title) document.title = title;
  $("menu-unread").hidden = !others;
  setText($("menu-unread"), String(others));
}

/**
 * A conversation in the sidebar: its "open" button and its "×" stay the same elements for
 * as long as the conversation is listed (a focused one keeps the focus); what they show is
 * redrawn inside them.
 */
function conversationEntry(c) {
  const { key, kind, name } = c;
  const label = kind === "room" ? `# ${name}` : name;
  const guest = kind === "dm" && isGuest({ user_id: c.peerId });
  const current = state.current === key;
  const update = (li) => {
    li.setAttribute("aria-current", current ? "true" : "false");
    const [openButton, leave] = li.children;
    openButton.replaceChildren(...[el("span", { class: "name" }, label), guest ? badge("guest") : null,
      kind === "room" && c.joinState === "joining" ? el("span", { class: "muted" }, "…") : null,
      c.joinState === "removed" ? el("span", { class: "muted" }, "(removed)") : null,
      c.unread ? el("span", { class: "unread", title: `${c.unread} unread` }, String(c.unread)) : null].filter(Boolean));
    const words = kind === "room" ? `Leave ${name}` : `Close the conversation with ${name}`;
    leave.setAttribute("aria-label", words);
    leave.title = words;
  };
  return {
    key,
    sig: [current, label, guest, c.joinState, c.unread].join("|"),
    make() {
      const li = el("li", { data: { conv: key } },
        el("button", { type: "button", class: "open", onclick: () => open(key) }),
        el("button", { type: "button", class: "leave",
          onclick: () => (kind === "room" ? leaveRoom(name) : closeConversation(key)) }, "×"));
      update(li);
      return li;
    },
    update,
  };
}

function renderMembers() {
  const c = currentRoom();
  setText($("members-room"), c ? `in # ${c.name}` : "");
  const list = c ? [...c.members.entries()].sort((a, b) => byName(a[1].username, b[1].username)) : [];
  reconcile($("members"), list.map(([userId, u]) => memberEntry(c, userId, u)));
}

/** A member: the name's button stays the same element (a focused one keeps the focus). */
function memberEntry(c, userId, u) {
  const self = state.myIds.has(userId);
  const typingNow = c.typing.has(userId);
  const update = (li) => {
    li.className = self ? "self" : "";
    const button = li.firstChild;
    setText(button, u.username);
    button.title = self ? "You" : `Message ${u.username}`;
    while (button.nextSibling) button.nextSibling.remove();
    li.append(...[u.guest ? badge("guest") : null, self ? el("span", { class: "muted" }, "(you)") : null,
      typingNow ? el("span", { class: "typing-dots" }, "typing…") : null].filter(Boolean));
  };
  return {
    key: userId,
    sig: [self, u.username, u.guest, typingNow].join("|"),
    make() {
      const li = el("li", { data: { userId } }, el("button", { type: "button",
        onclick: () => openDm(userId, findUser(userId)?.username ?? li.firstChild.textContent) }));
      update(li);
      return li;
    },
    update,
  };
}

function renderTyping() {
  const c = conv(state.current);
  const names = c ? [...c.typing.values()].map((t) => t.name) : [];
  setText($("typing"), names.length === 0 ? ""
    : names.length === 1 ? `${names[0]} is typing…`
      : names.length <= 3 ? `${names.join(", ")} are typing…` : "Several people are typing…");
}

function messageEntry(id, m) {
  const mine = isMine(m);
  const guest = !mine && isGuest(m);
  const head = () => el("div", { class: "head" },
    el("span", { class: "from" }, mine ? "You" : m.from), guest ? badge("guest") : null,
    el("time", { datetime: new Date(m.timestamp).toISOString() }, time(m.timestamp)));
  return {
    key: `m:${id}`,
    alias: m.client_msg_id ? `p:${m.client_msg_id}` : undefined,
    sig: [mine, guest, m.user_id, m.timestamp].join("|"),
    make: () => el("li", { class: `msg${mine ? " mine" : ""}`, data: { id: String(m.id), cmid: m.client_msg_id ?? "" } },
      head(), el("div", { class: "text" }, m.text)),
    // A pending send acknowledged, or a message that became one's own: the text stays as it
    // is, the rest is redrawn.
    update(li) {
      li.className = `msg${mine ? " mine" : ""}`;
      Object.assign(li.dataset, { id: String(m.id), cmid: m.client_msg_id ?? "" });
      let text = li.querySelector(":scope > .text");
      for (const child of [...li.children]) if (child !== text) child.remove();
      if (!text) li.append((text = el("div", { class: "text" })));
      setText(text, m.text);
      li.prepend(head());
    },
  };
}

function pendingEntry(c, cmid, p) {
  const stateText = p.error ? "Not sent" : state.status.state === "connected" ? "Sending…" : "Waiting for the connection…";
  return {
    key: `p:${cmid}`,
    sig: [stateText, p.error].join("|"),
    make: () => el("li", { class: `msg mine ${p.error ? "failed" : "pending"}`, data: { cmid } },
      el("div", { class: "head" }, el("span", { class: "from" }, "You"), el("span", { class: "state" }, stateText)),
      el("div", { class: "text" }, p.text),
      p.error ? el("div", { class: "error" }, p.error) : null, // said when it came: refused()
      p.error ? el("div", { class: "actions" },
        el("button", { type: "button", onclick: () => retry(c, cmid) }, "Retry"),
        el("button", { type: "button", onclick: () => edit(c, cmid) }, "Edit"),
        el("button", { type: "button", onclick: () => discard(c, cmid) }, "Discard")) : null),
  };
}

let noticeCount = 0;
const noticeIds = new WeakMap(); // notice -> a key of its own (notices have no id)
function noticeEntry(n) {
  if (!noticeIds.has(n)) noticeIds.set(n, ++noticeCount);
  return { key: `n:${noticeIds.get(n)}`, sig: "", make: () => el("li", { class: `notice${n.warn ? " warn" : ""}` }, n.text) };
}
const fixedEntry = (key, cls, text, props = {}) => ({ key, sig: text, make: () => el("li", { class: cls, ...props }, text) });

/** The conversation whose messages #messages holds (its nodes are keyed by message id). */
let shownKey;

/**
 * Brings the open conversation's view up to date (other conversations: only the sidebar).
 * The view sticks to the bottom only if the reader was there (or `toBottom`);
 * `keepFromBottom` keeps what the reader sees when older messages come in above.
 */
function render(key, { toBottom = false, keepFromBottom = false } = {}) {
  if (key !== state.current) { renderSidebar(); return; }
  const c = conv(key);
  const scroller = $("scroller");
  const list = $("messages");
  if (shownKey !== key) {
    shownKey = key;
    resetList(list);
    toBottom = true;
  }
  const nearBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 60;
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  setText($("title"), !c ? "wschat" : c.kind === "room" ? `# ${c.name}` : `${c.name} (direct)`);
  const entries = [];
  if (!c) {
    entries.push(fixedEntry("empty", "empty", state.conversations.size ? "Pick a conversation." : "Join a room to start chatting."));
  } else {
    // Focusable from script only: where the focus goes when they replace the button (loadOlder).
    if (c.kind === "room" && c.loaded && c.older === "start") entries.push(fixedEntry("start", "notice", `This is the start of # ${c.name}.`, { tabindex: "-1" }));
    if (c.kind === "room" && c.loaded && c.older === "gone") entries.push(fixedEntry("gone", "notice", "Older messages are no longer kept.", { tabindex: "-1" }));
    if (c.kind === "dm") entries.push(fixedEntry("intro", "notice", `Direct messages with ${c.name}; they reach ${c.name} while online.`));
    const ordered = [...c.messages.entries()].sort((a, b) => (c.kind === "room" ? a[0] - b[0] : a[1].timestamp - b[1].timestamp));
    let n = 0;
    for (const [id, m] of ordered) {
      while (n < c.notices.length && c.kind === "room" && c.notices[n].afterId < id) entries.push(noticeEntry(c.notices[n++]));
      entries.push(messageEntry(id, m));
    }
    while (n < c.notices.length) entries.push(noticeEntry(c.notices[n++]));
    for (const [cmid, p] of c.pending) entries.push(pendingEntry(c, cmid, p));
  }
  reconcile(list, entries);
  renderOlder();
  if (toBottom || nearBottom) scroller.scrollTop = scroller.scrollHeight;
  else if (keepFromBottom) scroller.scrollTop = scroller.scrollHeight - fromBottom;
  renderSidebar();
  renderTyping();
  renderComposer();
}

function renderComposer() {
  const c = conv(state.current);
  const draft = $("draft");
  const mutedNow = c?.mutedUntil > Date.now();
  const usable = !!c && !mutedNow && c.joinState !== "removed" && (c.kind === "dm" || c.joinState === "joined" || c.loaded);
  draft.disabled = $("send").disabled = !usable;
  draft.placeholder = !c ? "Join a room to chat"
    : c.joinState === "removed" ? "You are no longer in this room"
    : mutedNow ? "You are muted here"
    // A room not joined yet (after a reload while offline, say) takes no message yet.
    : !usable ? (state.status.state === "failed" ? "Not connected" : `Joining # ${c.name}…`)
    : state.status.state === "failed" ? "Not connected: messages wait until you connect again (Retry now)"
    : state.status.state !== "connected" ? "Offline: messages wait and go out when the connection is back"
      : c.kind === "room" ? `Message # ${c.name}` : `Message ${c.name}`;
}

function open(key) {
  const previous = conv(state.current);
  if (previous?.kind === "room" && previous.key !== key) state.client?.stopTyping(previous.name);
  state.current = key;
  const c = conv(key);
  if (c) c.unread = 0;
  $("draft").value = state.drafts[key] ?? "";
  fitDraft();
  $("send-error").hidden = true;
  persistConversations();
  render(key, { toBottom: true });
  renderMembers();
  setMenu(false); // after render: the composer it may give the focus to is enabled or not by now
}

// ---- the phone menu ------------------------------------------------------------------------
// Below 700 px (app.css) the sidebar is a menu that slides over the chat. Closed, it is off
// screen and inert: Tab skips its buttons and screen readers do not read them.
const narrow = matchMedia("(max-width: 700px)");
const menuOpen = () => $("app").dataset.menu === "open";
function setMenu(open) {
  const sidebar = $("sidebar");
  const hadFocus = sidebar.contains(document.activeElement);
  $("app").dataset.menu = open ? "open" : "closed";
  $("menu").setAttribute("aria-expanded", String(open));
  sidebar.inert = narrow.matches && !open;
  // The focused button went out of reach (a conversation opened from the menu): the
  // composer, where one goes on, else the menu button.
  if (sidebar.inert && hadFocus) ($("draft").disabled ? $("menu") : $("draft")).focus();
}

/** Drop conversation `key` from the view (a room left, a DM closed); the next one opens. */
function closeConversation(key) {
  const hadFocus = focusWithin(key);
  state.conversations.delete(key);
  if (state.current === key) state.current = [...state.conversations.keys()][0] ?? null;
  persistConversations();
  persistFailed();
  renderAll();
  if (hadFocus) focusCurrent();
}

/** Whether the keyboard focus is on conversation `key`'s buttons (they are about to go). */
const focusWithin = (key) => Boolean(document.activeElement?.closest(`[data-conv="${CSS.escape(key)}"]`));

/** After a conversation left the list under the keyboard: focus the open one, else the join box. */
function focusCurrent() {
  const open = state.current && document.querySelector(`[data-conv="${CSS.escape(state.current)}"] > .open`);
  (open || $("join-room")).focus();
}

function showError(node, text) {
  node.textContent = text;
  node.hidden = false;
}
function showSendError(text) { showError($("send-error"), text); }

/** Does the server keep DMs for signed-in users who are away? (`welcome.dm_backlog` is there
 * exactly when it does: ENABLE_PERSISTENCE.) */
const keepsDms = () => state.me != null && "dm_backlog" in state.me;

/** An error in words, for the place it is shown. */
function describe(err, c = null) {
  switch (err?.code) {
    case "message_too_large": return `Too long: ${err.message ?? `at most ${MAX_TEXT} characters`}.`;
    case "user_not_found": return `${c?.name ?? "This user"} is not online${keepsDms()
      ? ", and direct messages are kept only for signed-in users who have connected before."
      : ": direct messages reach only connected users."}`;
    case "invalid_room": return "that is not a valid room name.";
    case "too_many_rooms": return "you are in too many rooms; leave one first.";
    case "not_in_room": return "you are not in this room.";
    case "forbidden": return c?.kind === "dm" ? "You may not send this." : "you may not use this room (private, not granted to you, or banned).";
    case "muted": return "You are muted here: you can read but not post.";
    case "left": return "You left the room before it was sent.";
    case "outbox_full": return "Too many messages are waiting to be sent; wait for the connection.";
    case "rate_limited": return `Slow down: too many requests${err.retryAfterMs ? `; try again in ${Math.ceil(err.retryAfterMs / 1000)} s` : ""}.`;
    case "unavailable": return "The server cannot store messages right now; try again shortly.";
    case "timeout": return "No answer from the server in time.";
    case "disconnected": return "Disconnected.";
    default: return err?.message ?? String(err);
  }
}

// ---- drafts and sending --------------------------------------------------------------------
function saveDraft() {
  if (!state.current) return;
  state.drafts[state.current] = $("draft").value;
  saved.set(`drafts:${identityKey(state.identity)}`, state.drafts);
}

/** The composer grows with its text (up to the CSS max-height). */
function fitDraft() {
  const draft = $("draft");
  draft.style.height = "auto";
  draft.style.height = `${draft.scrollHeight + 2}px`;
}

function submit() {
  const c = conv(state.current);
  const text = $("draft").value;
  if (!c || !text.trim()) return;
  const length = [...text].length; // characters (code points), as the server counts them
  if (length > MAX_TEXT) {
    showSendError(`Too long: ${length} characters, at most ${MAX_TEXT}. Your draft is kept.`);
    return;
  }
  $("send-error").hidden = true;
  send(c, text);
  $("draft").value = "";
  saveDraft();
  fitDraft();
}

// ---- sign-in -------------------------------------------------------------------------------
function showSignin(message = "") {
  const dialog = $("signin");
  const id = state.identity;
  $("signin-name").value = id?.kind === "guest" ? id.name : "";
  $("signin-token").value = "";
  $("signin-token-box").open = id?.kind === "token";
  if (message) showError($("signin-error"), message);
  else $("signin-error").hidden = true;
  if (!dialog.open) dialog.showModal();
  $(id?.kind === "token" ? "signin-token" : "signin-name").focus();
}

function signinSubmitted(event) {
  event.preventDefault();
  const token = $("signin-token").value.trim();
  const name = $("signin-name").value.trim();
  let identity;
  if (token) {
    if (!tokenSubject(token)) { showError($("signin-error"), "That does not look like a JWT (three base64url parts with a `sub`)."); return; }
    identity = { kind: "token", token };
  } else if (NAME_RE.test(name)) {
    identity = { kind: "guest", name };
  } else {
    showError($("signin-error"), name ? "Names are 1-32 letters, digits, _ . - and inner spaces." : "Pick a name, or paste a token.");
    return;
  }
  $("signin").close();
  useIdentity(identity, true);
}

function useIdentity(identity, remember) {
  const changed = state.identity && identityKey(state.identity) !== identityKey(identity);
  state.identity = identity;
  // The tab's identity survives a reload; a guest's name is also the browser's default.
  tabSaved.set("identity", identity);
  if (remember && identity.kind === "guest") saved.set("identity", identity);
  const key = identityKey(identity);
  state.myIds = new Set(saved.get(`myIds:${key}`, []));
  state.drafts = saved.get(`drafts:${key}`, {});
  if (changed || !state.conversations.size) {
    // Rooms are the browser's; DMs belong to the identity.
    for (const [k, c] of state.conversations) {
      if (c.kind === "dm") state.conversations.delete(k);
      else c.pending.clear(); // the other identity's sends wait in its own outbox
    }
    for (const room of saved.get("rooms", ["general"])) {
      if (!conv(roomKey(room))) state.conversations.set(roomKey(room), newConversation(roomKey(room), "room", room));
    }
    for (const d of saved.get(`dms:${key}`, [])) {
      const c = newConversation(dmKey(d.user_id), "dm", d.username, d.user_id);
      for (const m of d.messages ?? []) c.messages.set(dmId(m), m);
      state.conversations.set(c.key, c);
    }
    restoreFailed();
    const current = saved.get("current", null);
    state.current = conv(current) ? current : [...state.conversations.keys()][0] ?? null;
    $("draft").value = state.drafts[state.current] ?? "";
  }
  if (state.client) restartClient();
  else startClient();
  renderAll();
}

// ---- wiring --------------------------------------------------------------------------------
$("join-form").addEventListener("submit", (e) => { e.preventDefault(); joinFromForm($("join-room").value.trim()); });
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submit();
  // Sent with the button (a click, or Tab then Space): the next message is typed at once.
  $("draft").focus();
});
$("draft").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); submit(); }
});
$("draft").addEventListener("input", () => {
  saveDraft();
  fitDraft();
  const c = conv(state.current);
  if (c?.kind !== "room") return;
  // A draft deleted down to nothing ends typing now, not after the library's idle time.
  if ($("draft").value) state.client?.typing(c.name);
  else state.client?.stopTyping(c.name);
});
$("load-older").addEventListener("click", () => {
  const c = conv(state.current);
  if (c) loadOlder(c);
});
$("scroller").addEventListener("scroll", () => {
  const c = conv(state.current);
  if (c && $("scroller").scrollTop < 40) loadOlder(c);
});
$("menu").addEventListener("click", () => {
  setMenu(!menuOpen());
  if (menuOpen()) focusCurrent(); // the menu's first use: its conversations
});
document.querySelector("main.chat").addEventListener("click", (e) => {
  if (menuOpen() && !$("menu").contains(e.target)) setMenu(false);
});
document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape" || !menuOpen() || $("signin").open) return;
  $("menu").focus();
  setMenu(false);
});
narrow.addEventListener("change", () => setMenu(menuOpen()));
setMenu(false);
$("switch-user").addEventListener("click", () => showSignin());
$("retry").addEventListener("click", retryNow);
$("signin-form").addEventListener("submit", signinSubmitted);
$("signin").addEventListener("cancel", (e) => { if (!state.identity) e.preventDefault(); });
document.addEventListener("visibilitychange", () => {
  const c = conv(state.current);
  if (!document.hidden && c?.unread) { c.unread = 0; renderSidebar(); }
});
window.addEventListener("offline", () => setStatus("offline", "No network; messages wait until it is back"));

const start = fromAddress ?? tabSaved.get("identity", null) ?? saved.get("identity", null);
if (start?.kind === "guest" && !NAME_RE.test(start.name)) {
  renderAll();
  showSignin(`"${start.name}" cannot be a name: 1-32 letters, digits, _ . - and inner spaces.`);
} else if (start) useIdentity(start, !fromAddress);
else { renderAll(); showSignin(); }
