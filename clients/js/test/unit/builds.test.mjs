import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import vm from "node:vm";
import * as esm from "../../dist/index.mjs";
import { FakeServer } from "./fake-server.mjs";

const require = createRequire(import.meta.url);
const dist = new URL("../../dist/", import.meta.url);

test("builds: CommonJS and ESM export the same API and the package version", () => {
  const cjs = require("../../dist/index.cjs");
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8"));
  assert.equal(cjs.VERSION, pkg.version);
  assert.equal(esm.VERSION, pkg.version);
});

test("builds: the browser bundle has no Node import and works with the page's WebSocket", async () => {
  const code = readFileSync(new URL("wschat-client.browser.js", dist), "utf8");
  assert.doesNotMatch(code, /require\(|from"ws"|node:/);
  const server = new FakeServer();
  globalThis.WebSocket = server.WebSocket;
  try {
    const browser = await import(new URL("wschat-client.browser.js", dist).href);
    const c = new browser.ChatClient({ url: "ws://fake/ws" });
    await c.connect();
    await c.join("r");
    assert.equal((await c.send("r", "from the page")).id, 1);
    c.disconnect();
  } finally {
    delete globalThis.WebSocket;
  }
});

test("builds: the IIFE bundle defines the global WsChat", () => {
  const code = readFileSync(new URL("wschat-client.iife.js", dist), "utf8");
  const context = vm.createContext({});
  vm.runInContext(code, context);
  assert.equal(typeof context.WsChat.ChatClient, "function");
  assert.equal(typeof context.WsChat.webStorageOutbox, "function");
});
