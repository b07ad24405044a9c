// The send pacer's maths: the window, the pause and the pace after rate_limited (the
// same cases as the Python library's tests/test_pacer.py).
import { test } from "node:test";
import assert from "node:assert/strict";
import { JOIN_RETRY_FLOOR, JOIN_WINDOW, JoinPacer, Pacer } from "../../dist/index.mjs";

const close = (actual, expected, what) => assert.ok(Math.abs(actual - expected) < 1e-6, `${what}: ${actual} != ${expected}`);

/** Writes sends while the pacer allows at `now`; how many went. */
function drain(pacer, now, waiting, inFlight = 0) {
  let written = 0;
  while (written < waiting && pacer.nextAt(now, inFlight + written) === now) {
    pacer.sent(now);
    written++;
  }
  return written;
}

test("pacer: only the window holds sends back before any refusal", () => {
  const pacer = new Pacer(16);
  assert.equal(drain(pacer, 0, 100), 16);
  assert.equal(pacer.nextAt(0, 16), null);
  assert.equal(pacer.nextAt(0, 15), 0);
});

test("pacer: rate_limited pauses and drops the window to one; each acknowledgement widens it", () => {
  const pacer = new Pacer(4);
  pacer.rateLimited(10_000, 100);
  assert.equal(pacer.nextAt(10_000, 0), 10_100);
  assert.equal(drain(pacer, 10_100, 5), 1);
  assert.equal(pacer.nextAt(10_100, 1), null);
  pacer.acknowledged(10_100, 1);
  assert.equal(pacer.window, 2);
  for (let i = 0; i < 5; i++) pacer.acknowledged(10_100, 0);
  assert.equal(pacer.window, 4);
});

test("pacer: after rate_limited a long queue goes one send per interval, not in refused bursts", () => {
  const pacer = new Pacer(16);
  pacer.rateLimited(0, 20);
  pacer.rateLimited(1, 19); // the rest of the batch: the same token
  close(pacer.interval, 22, "interval");
  let now = 0;
  const times = [];
  for (let i = 0; i < 20; i++) {
    now = pacer.nextAt(now, 0); // each acknowledged before the next
    times.push(now);
    pacer.sent(now);
    pacer.acknowledged(now, 1);
  }
  close(times[0], 20, "first");
  for (let i = 1; i < times.length; i++) close(times[i] - times[i - 1], 22, `gap ${i}`);
});

test("pacer: a quiet spell refills the local bucket up to the window", () => {
  const pacer = new Pacer(8);
  pacer.rateLimited(0, 100);
  for (let i = 0; i < 8; i++) pacer.acknowledged(0, 0);
  assert.equal(drain(pacer, 100, 100), 1);
  assert.equal(drain(pacer, 100 + 4 * pacer.interval, 100), 4);
  assert.equal(drain(pacer, 100_000, 100), 8);
});

test("pacer: reset forgets the pace but not a pause", () => {
  const pacer = new Pacer(4);
  pacer.rateLimited(0, 1000);
  pacer.reset(6);
  assert.deepEqual([pacer.window, pacer.interval], [6, 0]);
  assert.equal(pacer.nextAt(500, 0), 1000);
  assert.equal(drain(pacer, 1000, 100), 6);
});

test("pacer: a pace guessed too fast is corrected by the next refusal", () => {
  // The first refusal came when the bucket was half full again (10 ms of a 20 ms token).
  const pacer = new Pacer(16);
  pacer.sent(0); // accepted: the bucket is empty from here
  pacer.sent(10);
  pacer.rateLimited(11, 10, 10);
  close(pacer.interval, 22, "10 ms since the write before + 10 ms, plus a tenth");
  const fast = new Pacer(16);
  fast.sent(10);
  fast.rateLimited(11, 10, 10); // no write before it known
  close(fast.interval, 11, "retry_after plus a tenth");
  const first = fast.nextAt(11, 0);
  close(first, 21, "first");
  fast.sent(first); // accepted: the server's bucket is empty at 21 ms
  const second = fast.nextAt(first, 0);
  close(second, 32, "second");
  fast.sent(second); // 11 ms later: the server needs 9 more
  fast.rateLimited(second + 1, 9, second);
  close(fast.interval, 20.9, "corrected: 9 ms + the 10 ms the pace stood for, plus a tenth");
});

test("pacer: a refusal after a quiet spell does not make the quiet spell the pace", () => {
  // One write, a quiet minute, then a send refused for 100 ms because another connection of
  // the same user (the bucket is the user's) emptied the bucket: the gap since the write
  // before counts for at most retry_after, so the next sends go about 0.2 s apart.
  const pacer = new Pacer(16);
  pacer.sent(0);
  pacer.sent(60_000);
  pacer.rateLimited(60_005, 100, 60_000);
  close(pacer.interval, 220, "(100 + min(60000, 100)) plus a tenth");
  let now = pacer.nextAt(60_005, 0);
  close(now, 60_105, "the retried send");
  pacer.sent(now);
  pacer.acknowledged(now, 1);
  for (let i = 0; i < 3; i++) {
    const at = pacer.nextAt(now, 0);
    assert.ok(at - now <= 220 + 1e-6, `send ${i} waits ${at - now} ms`);
    now = at;
    pacer.sent(now);
    pacer.acknowledged(now, 1);
  }
});

test("pacer: the pace is forgotten after a quiet spell and learnt again", () => {
  // Ten intervals with no write and no refusal: a whole window goes at once (not only the ten
  // tokens the local bucket saved); a new refusal learns the pace again. A connection that
  // keeps writing keeps its pace.
  const pacer = new Pacer(16);
  pacer.rateLimited(0, 100);
  const interval = pacer.interval;
  for (let i = 0; i < 16; i++) pacer.acknowledged(0, 0);
  let now = 100;
  for (let i = 0; i < 30; i++) {
    now = pacer.nextAt(now, 0); // a long paced queue: no refusal, but writes all along
    pacer.sent(now);
  }
  assert.equal(pacer.interval, interval);
  assert.equal(drain(pacer, now + 9 * interval, 100), 9, "nine intervals: still paced");
  const quiet = now + 9 * interval + 10.5 * interval;
  assert.equal(drain(pacer, quiet, 100), 16, "the pace is forgotten: the whole window");
  assert.equal(pacer.interval, 0);
  pacer.rateLimited(quiet + 1, 50);
  close(pacer.interval, 55, "learnt again");
});

test("pacer: an acknowledgement keeps the pace across a long round trip", () => {
  // A round trip of twenty intervals, the window full: no write and no refusal for longer than
  // ten intervals, but the acknowledgement shows the connection is still in the paced exchange,
  // so the pace stays. Ten quiet intervals after the acknowledgement (no write, no refusal, no
  // acknowledgement) forget it as before.
  const pacer = new Pacer(16);
  pacer.rateLimited(0, 100);
  const interval = pacer.interval;
  let now = pacer.nextAt(0, 0);
  pacer.sent(now);
  assert.equal(pacer.nextAt(now, 1), null, "the window (one) is full");
  now += 20 * interval; // the round trip
  pacer.acknowledged(now, 1); // the window (one) was full
  assert.equal(drain(pacer, now, 100), 2, "the window (two); the local bucket saved them");
  assert.equal(pacer.interval, interval, "still paced");
  pacer.acknowledged(now + 5 * interval, 2);
  const quiet = now + 15.5 * interval; // ten and a half intervals after the acknowledgement
  assert.equal(drain(pacer, quiet, 100), 3);
  assert.equal(pacer.interval, 0, "forgotten");
});

test("pacer: a late acknowledgement does not bring back a pace forgotten in a quiet spell", () => {
  // One send on the wire, the window (16) not full, then eleven intervals with no write, no
  // refusal and no acknowledgement: nothing waited for an acknowledgement, so the pace is
  // forgotten (the whole window may go), and the late acknowledgement of that send does not
  // bring it back (the local bucket held eleven tokens then, not the whole window). A full
  // window waiting for its acknowledgement keeps the pace (the test above).
  const pacer = new Pacer(16);
  pacer.rateLimited(0, 100);
  const interval = pacer.interval;
  for (let i = 0; i < 15; i++) pacer.acknowledged(0, 0); // the window back to 16
  const now = pacer.nextAt(0, 0);
  pacer.sent(now);
  const late = now + 11 * interval;
  assert.equal(pacer.nextAt(late, 1), late, "forgotten: no wait for a token");
  pacer.acknowledged(late, 1); // one on the wire: the window (16) was not full
  assert.equal(pacer.interval, 0, "the late acknowledgement brought the pace back");
  assert.equal(drain(pacer, late, 100), 16);
});

/**
 * `sends` queued at once, written when the pacer allows, to a server `latency` ms away each
 * way whose bucket (`rate` per second, `burst`) answers as the server's `take`
 * (wschat/ratelimit.py) does: an echo, or `rate_limited` with `retry_after_ms`; a refused send
 * is written again. Returns the number of refusals.
 */
function simulate(sends, { rate, burst, latency, limit = 16 }) {
  const pacer = new Pacer(limit);
  const events = []; // {at, order, what, writtenAt, retryMs}, taken earliest first (then in order)
  let order = 0;
  const push = (e) => events.push({ ...e, order: order++ });
  const next = () => {
    let best = 0;
    for (let i = 1; i < events.length; i++) {
      const a = events[i], b = events[best];
      if (a.at < b.at || (a.at === b.at && a.order < b.order)) best = i;
    }
    return events.splice(best, 1)[0];
  };
  let tokens = burst, last = 0, queued = sends, inFlight = 0, refusals = 0, writeDue = false;
  const write = (now) => {
    while (queued) {
      const at = pacer.nextAt(now, inFlight);
      if (at === null) return;
      if (at > now) {
        if (!writeDue) push({ at, what: "write" });
        writeDue = true;
        return;
      }
      pacer.sent(now);
      queued--;
      inFlight++;
      push({ at: now + latency, what: "arrive", writtenAt: now });
    }
  };
  write(0);
  while (events.length) {
    const e = next();
    if (e.what === "arrive") {
      tokens = Math.min(burst, tokens + ((e.at - last) / 1000) * rate);
      last = e.at;
      if (tokens >= 1 - 1e-9) {
        tokens = Math.max(0, tokens - 1);
        push({ at: e.at + latency, what: "echo" });
      } else {
        const retryMs = Math.max(1, Math.ceil(((1 - tokens) / rate) * 1000));
        push({ at: e.at + latency, what: "refused", writtenAt: e.writtenAt, retryMs });
      }
      continue;
    }
    if (e.what === "write") {
      writeDue = false;
    } else if (e.what === "echo") {
      pacer.acknowledged(e.at, inFlight);
      inFlight--;
    } else if (e.what === "refused") {
      inFlight--;
      queued++;
      refusals++;
      pacer.rateLimited(e.at, e.retryMs, e.writtenAt);
    }
    write(e.at);
  }
  assert.deepEqual([queued, inFlight], [0, 0]);
  return refusals;
}

test("pacer: a round trip longer than ten intervals does not relearn the pace", () => {
  // 300 sends at a server of 20/s with a burst of 20, 0.3 s away each way (0.6 s, over ten of
  // the pacer's 55 ms intervals): the window, not the pace, holds writes back between
  // acknowledgements. Forgetting the pace in that wait learnt it again, with a window of
  // refusals, every few round trips (24 refusals); kept fresh by the acknowledgements it is
  // learnt once (4).
  const long = simulate(300, { rate: 20, burst: 20, latency: 300 });
  assert.ok(long <= 6, `${long} refusals`);
  const short = simulate(300, { rate: 20, burst: 20, latency: 10 });
  assert.ok(short <= 20, `a short round trip: about a window, not ${short}`);
});

// The join pacer (the same cases as the Python library's test_pacer.py, in ms).

test("joins: a window at a time (a reconnect's 70 rejoins: 4 on the wire, the next when one is answered)", () => {
  const joins = new JoinPacer(undefined, () => 0.5);
  for (let key = 0; key < JOIN_WINDOW; key++) {
    assert.equal(joins.nextAt(0), 0);
    joins.sent(String(key), 0);
  }
  assert.equal(joins.nextAt(0), null);
  assert.ok(joins.joined("0", 10));
  assert.ok(!joins.joined("0", 10), "answered already");
  assert.equal(joins.nextAt(10), 10);
});

test("joins: a rate_limited join holds every join until retry_after, then one at a time at the pace learnt", () => {
  const joins = new JoinPacer(4, () => 0.5);
  for (let key = 0; key < 4; key++) joins.sent(String(key), 0);
  assert.ok(joins.joined("0", 1));
  for (const key of ["1", "2", "3"]) assert.ok(joins.refused(key, 2, 100)); // the bucket is empty
  close(joins.nextAt(2), 102, "not before retry_after");
  joins.sent("4", 102);
  assert.equal(joins.nextAt(102), null, "one at a time after a refusal");
  assert.ok(joins.joined("4", 103));
  assert.ok(joins.nextAt(103) > 103 + 90, "paced at the server's rate, about 100 ms");
});

test("joins: a join refused again after the pause doubles it, with jitter, up to 32 x; a joined starts again", () => {
  const rnd = [...Array(7).fill(0), 1];
  const joins = new JoinPacer(4, () => rnd.shift());
  joins.sent("a", 0);
  joins.refused("a", 0, 100);
  close(joins.nextAt(0), 100, "the first refusal: retry_after");
  let now = 100;
  const waits = [];
  for (let n = 0; n < 8; n++) {
    joins.sent(String(n), now);
    joins.refused(String(n), now, 100);
    const at = joins.nextAt(now);
    waits.push(Math.round(at - now));
    now = at;
  }
  assert.deepEqual(waits, [200, 400, 800, 1600, 3200, 3200, 3200, 6400]);
  joins.sent("b", now);
  assert.ok(joins.joined("b", now));
  joins.sent("c", now + 1000);
  joins.refused("c", now + 1000, 100);
  close(joins.nextAt(now + 1000), now + 1100, "a joined starts the doubling again");
});

test("requests: a rate_limited request the pacer did not write (the ping behind a join) pauses "
  + "as one of its own, and counts in the refusals in a row", () => {
  const requests = new JoinPacer(4, () => 0);
  requests.refusedUnpaced(10, 100, 5);
  close(requests.nextAt(10), 110, "not before retry_after");
  requests.refusedUnpaced(12, 100, 6); // written with the first, refused with it: not doubled
  close(requests.nextAt(12), 112, "written before the first refusal came");
  requests.refusedUnpaced(150, 100, 120); // written after a refusal, refused too: doubled
  close(requests.nextAt(150), 350, "doubled");
  requests.sent("a", 400);
  assert.equal(requests.nextAt(400), null, "one at a time after a refusal, as after its own");
  assert.ok(requests.joined("a", 401), "its own request is still its own");
  const floor = new JoinPacer(4, () => 0);
  floor.refusedUnpaced(0, 0, 0);
  close(floor.nextAt(0), JOIN_RETRY_FLOOR, "retry_after_ms 0: the floor");
});

test("requests: a request the pacer did not write (the ping behind a join) spends a token of "
  + "the learnt pace, as one of its own does, and takes no place in the window", () => {
  const requests = new JoinPacer(2, () => 0);
  requests.sent("a", 0);
  requests.refused("a", 0, 100); // the pace: 110 ms a token
  requests.sent("a", 100);
  assert.ok(requests.joined("a", 100));
  close(requests.nextAt(320), 320, "two tokens saved up (the window is two)");
  requests.sentUnpaced(320);
  close(requests.nextAt(320), 320, "one token left");
  requests.sentUnpaced(320);
  close(requests.nextAt(320), 430, "none left: the next one waits for its refill");
  requests.sent("b", 430);
  requests.sent("c", 540);
  assert.equal(requests.nextAt(540), null, "the window: its own two, the pings none of it");
  assert.ok(requests.joined("b", 541), "its own requests are still its own");
  const unpaced = new JoinPacer(2);
  unpaced.sentUnpaced(0);
  unpaced.sentUnpaced(0);
  close(unpaced.nextAt(0), 0, "no pace learnt: no token to spend, nothing waits");
});

test("joins: other refusals free a place and pause nothing", () => {
  const one = new JoinPacer(1);
  one.sent("a", 0);
  assert.equal(one.nextAt(0), null);
  assert.ok(one.refused("a", 0, null)); // unavailable: the client retries it after a backoff
  assert.equal(one.nextAt(0), 0);
  assert.ok(!one.refused("zzz", 0, 100), "none of ours");
});

test("joins: a new connection starts clean: no pause, no pace, no count of refusals from the old one", () => {
  const joins = new JoinPacer(4, () => 0);
  for (let key = 0; key < 4; key++) joins.sent(String(key), 0);
  joins.refused("0", 0, 2000);
  joins.reset();
  assert.equal(joins.nextAt(1000), 1000, "the old connection's pause is gone");
  assert.ok(!joins.joined("1", 1000));
  joins.sent("10", 1000);
  joins.refused("10", 1000, 100);
  close(joins.nextAt(1000), 1100, "the new connection's own pause, not a doubled one");
});

test("joins: retry_after_ms 0 still pauses for the floor, and the pause doubles from it", () => {
  const joins = new JoinPacer(4, () => 0);
  joins.sent("1", 0);
  joins.refused("1", 0, 0);
  close(joins.nextAt(0), JOIN_RETRY_FLOOR);
  joins.sent("2", JOIN_RETRY_FLOOR);
  joins.refused("2", JOIN_RETRY_FLOOR, 0);
  close(joins.nextAt(JOIN_RETRY_FLOOR), 3 * JOIN_RETRY_FLOOR, "doubled");
  const slow = new JoinPacer(4, () => 0);
  slow.sent("1", 0);
  slow.refused("1", 0, 300);
  close(slow.nextAt(0), 300, "a wait over the floor is the server's");
});
