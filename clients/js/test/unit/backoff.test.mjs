import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { backoffDelay, certificateProblem, closePolicy, goingAwayDelay, PAUSE_DELAY, reconnectDelay, refusalPolicy, retryAfterMs } from "../../dist/index.mjs";

test("backoff: min + full jitter up to min(max, min * 2^attempt), capped at max, as in the Python and Rust clients", () => {
  const top = () => 0.999999;
  const caps = [0, 1, 2, 3, 4, 5, 6, 10, 50].map((n) => backoffDelay(n, { random: top }));
  assert.deepEqual(caps, [999, 1499, 2499, 4499, 8499, 16499, 20000, 20000, 20000]);
  for (let n = 0; n < 12; n++) assert.equal(backoffDelay(n, { random: () => 0 }), 500, "never below minDelay: no retry at ~0 ms");
  // The cases of Rust's grows_exponentially_within_bounds and Python's test_backoff.
  assert.equal(backoffDelay(0, { random: () => 1 }), 1000);
  assert.equal(backoffDelay(1, { random: () => 1 }), 1500);
  assert.equal(backoffDelay(3, { random: () => 1 }), 4500);
  assert.equal(backoffDelay(3, { random: () => 0.5 }), 2500);
  assert.equal(backoffDelay(2 ** 40, { random: top }), 20000);
  assert.equal(backoffDelay(4, { minDelay: 1000, maxDelay: 60_000, random: () => 0 }), 1000);
  assert.equal(backoffDelay(2, { minDelay: 100, maxDelay: 300, random: top }), 300);
});

test("backoff: the delays spread (no reconnect storm), never under minDelay", () => {
  const delays = Array.from({ length: 1000 }, () => backoffDelay(0));
  assert.ok(Math.min(...delays) >= 500 && Math.max(...delays) < 1000);
  const buckets = new Set(delays.map((d) => Math.floor(d / 50)));
  assert.equal(buckets.size, 10, "a thousand first attempts fall into every 50 ms slot of 500 .. 1000 ms");
});

test("reconnect delay: 1001 after a stable connection at once (spread), 4101/4102 at least the pause, never before retry_after", () => {
  const half = { random: () => 0.5 };
  assert.equal(goingAwayDelay(half), 250);
  assert.equal(goingAwayDelay({ random: () => 0 }), 0);
  assert.equal(reconnectDelay(1001, "reconnect", 0, half), 250, "going away, the connection stayed up: within minDelay");
  assert.equal(reconnectDelay(1001, "reconnect", 2, half), 1500, "going away again at once: the backoff grows");
  assert.equal(reconnectDelay(1001, "reconnect", 0, half, 3000), 3000, "not before a retry_after");
  assert.equal(reconnectDelay(1006, "reconnect", 0, half), 750);
  assert.equal(reconnectDelay(4102, "pause", 0, half), PAUSE_DELAY, "the pause is a floor, not added");
  assert.equal(reconnectDelay(4102, "pause", 6, half), 10_500, "past the pause, the backoff");
  assert.equal(reconnectDelay(4102, "pause", 0, half, 9000), 9000);
  assert.equal(reconnectDelay(503, "reconnect", 1, half, 5000), 5000, "a refusal's Retry-After");
  assert.equal(reconnectDelay(503, "reconnect", 0, half, -20), 750, "a Retry-After that ran out");
  assert.equal(reconnectDelay(1006, "reconnect", 0, half, 1e12), 2 ** 31 - 1, "no timer over 2^31-1 ms");
});

test("close codes: which reconnect, which pause, which need a token, which stop", () => {
  for (const code of [1000, 1001, 1005, 1006, 1011, 1012, 1013, 4100, 4150]) assert.equal(closePolicy(code), "reconnect", `${code}`);
  for (const code of [4101, 4102]) assert.equal(closePolicy(code), "pause", `${code}`);
  for (const code of [4001, 4002]) assert.equal(closePolicy(code), "token", `${code}`);
  for (const code of [1002, 1003, 1007, 1008, 1009, 1010, 1015, 4000, 4003, 4099, 4200, 4999]) assert.equal(closePolicy(code), "terminal", `${code}`);
  assert.ok(PAUSE_DELAY >= 1000);
});

test("Retry-After: delta-seconds or an HTTP-date, in ms; a past date or anything else is no wait", () => {
  // RFC 9110: IMF-fixdate, or the obsolete RFC 850 and asctime forms a recipient must accept.
  const now = Date.UTC(2015, 9, 21, 7, 27, 30); // Wed, 21 Oct 2015 07:27:30 GMT
  assert.equal(retryAfterMs("5", now), 5000);
  assert.equal(retryAfterMs(["3", "9"], now), 3000);
  for (const date of ["Wed, 21 Oct 2015 07:28:00 GMT", "Wednesday, 21-Oct-15 07:28:00 GMT", "Wed Oct 21 07:28:00 2015"]) {
    assert.equal(retryAfterMs(date, now), 30_000, date);
  }
  assert.equal(retryAfterMs("Wed, 21 Oct 2015 07:27:00 GMT", now), 0, "a date in the past");
  assert.ok(retryAfterMs(new Date(Date.now() + 60_000).toUTCString()) > 50_000, "now by default");
  for (const bad of [undefined, null, "", "0", "-1", "soon", "Infinity", "Wed, 32 Oct 2015 07:28:00 GMT", "Sat, 31 Feb 2015 07:28:00 GMT"]) {
    assert.equal(retryAfterMs(bad, now), 0, String(bad));
  }
});

test("Retry-After: capped at a day", () => {
  const now = Date.UTC(2015, 9, 21, 7, 27, 30);
  assert.equal(retryAfterMs("3000000", now), 86_400_000);
  assert.equal(retryAfterMs("100000000000000000000", now), 86_400_000);
  assert.equal(retryAfterMs("Sun, 29 Feb 2032 00:00:00 GMT", now), 86_400_000);
  assert.equal(retryAfterMs(new Date(Date.now() + 30 * 86_400_000).toUTCString()), 86_400_000);
});

test("Retry-After: read as in the Python and Rust clients (clients/conformance/retry-after.json)", () => {
  // Delta-seconds are digits only, an HTTP-date is GMT, a two-digit year follows RFC 9110,
  // second 60 is a leap second, the cap a day.
  const shared = JSON.parse(readFileSync(new URL("../../../conformance/retry-after.json", import.meta.url), "utf8"));
  const wrong = [];
  for (const [value, wait] of shared.cases) {
    const got = retryAfterMs(value, shared.now * 1000);
    if (got !== (wait ?? 0) * 1000) wrong.push(`${JSON.stringify(value)}: ${got} ms, not ${(wait ?? 0) * 1000}`);
  }
  assert.deepEqual(wrong, []);
});

test("refused upgrades: 401 needs a token, 408/429/5xx reconnect, any other answer is terminal", () => {
  assert.equal(refusalPolicy(401), "token");
  for (const status of [408, 429, 500, 502, 503, 504]) assert.equal(refusalPolicy(status), "reconnect", `${status}`);
  for (const status of [200, 301, 400, 403, 404, 405, 426]) assert.equal(refusalPolicy(status), "terminal", `${status}`);
});

test("retry_after_ms: read as in the Python and Rust clients (clients/conformance/retry-after-ms.json)", async () => {
  // Only a finite JSON number >= 0 counts, rounded up to whole ms, capped at a day; a string, a
  // boolean, a negative, 1e400 (JSON.parse: Infinity) are none. Imported by name from the
  // module's namespace, so a library without the function fails this test, not the file.
  const lib = await import("../../dist/index.mjs");
  assert.equal(typeof lib.serverRetryAfterMs, "function", "serverRetryAfterMs is exported");
  const shared = JSON.parse(readFileSync(new URL("../../../conformance/retry-after-ms.json", import.meta.url), "utf8"));
  assert.equal(shared.cap, 86_400_000);
  const wrong = [];
  for (const [text, wait] of shared.cases) {
    const got = lib.serverRetryAfterMs(JSON.parse(text));
    if (!Object.is(got, wait ?? undefined)) wrong.push(`${text}: ${got}, not ${wait ?? undefined}`);
  }
  assert.deepEqual(wrong, []);
});

test("heartbeat_interval: read as in the Python and Rust clients (clients/conformance/heartbeat-interval.json)", async () => {
  // Only a finite JSON number > 0 counts, floored at a second, capped at a day; a string, a
  // boolean, 0, a negative, 1e400 (JSON.parse: Infinity) are none (the default 30 s applies).
  // Imported by name from the module's namespace, so a library without the function fails this
  // test, not the file.
  const lib = await import("../../dist/index.mjs");
  assert.equal(typeof lib.serverHeartbeatInterval, "function", "serverHeartbeatInterval is exported");
  const shared = JSON.parse(readFileSync(new URL("../../../conformance/heartbeat-interval.json", import.meta.url), "utf8"));
  assert.deepEqual([shared.min, shared.max, shared.default], [1, 86_400, 30]);
  const wrong = [];
  for (const [text, seconds] of shared.cases) {
    const got = lib.serverHeartbeatInterval(JSON.parse(text));
    if (!Object.is(got, seconds ?? undefined)) wrong.push(`${text.slice(0, 40)}: ${got}, not ${seconds ?? undefined}`);
  }
  assert.deepEqual(wrong, []);
});

test("certificateProblem: a certificate that failed verification, as Node's errors name it, and nothing else", () => {
  const tls = (code, message = "x") => Object.assign(new Error(message), { code });
  // `ws`'s error event carries Node's error; a wrapper's `cause` is looked into.
  const event = { type: "error", error: tls("DEPTH_ZERO_SELF_SIGNED_CERT", "self-signed certificate") };
  assert.equal(certificateProblem(event), "TLS certificate verification failed: DEPTH_ZERO_SELF_SIGNED_CERT: self-signed certificate");
  const codes = ["UNABLE_TO_VERIFY_LEAF_SIGNATURE", "SELF_SIGNED_CERT_IN_CHAIN", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY", "CERT_HAS_EXPIRED", "CERT_NOT_YET_VALID", "ERR_TLS_CERT_ALTNAME_INVALID", "HOSTNAME_MISMATCH", "CERT_REVOKED"];
  for (const code of codes) assert.match(certificateProblem({ error: tls(code) }) ?? "", new RegExp(code), code);
  assert.match(certificateProblem({ error: new TypeError("fetch failed", { cause: tls("CERT_HAS_EXPIRED") }) }) ?? "", /CERT_HAS_EXPIRED/);
  // Outages: retried, never taken for a certificate.
  for (const code of ["ECONNRESET", "ECONNREFUSED", "ETIMEDOUT", "EPROTO", "ERR_SSL_WRONG_VERSION_NUMBER", undefined]) {
    assert.equal(certificateProblem({ error: tls(code) }), null, String(code));
  }
  for (const ev of [null, undefined, {}, { type: "error" }, "CERT_HAS_EXPIRED"]) assert.equal(certificateProblem(ev), null, String(ev));
});
