// The READMEs' first JavaScript example, run as written by node against a real server (only
// the URL, and the token endpoint, point at the test's): a user's first contact with the
// library is copy-pasting it. It imports "wschat-client" as an app does, by the package's name.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, mkdir, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO, TIMEOUT, startHarness } from "../helpers.mjs";

const README_URL = "ws://localhost:8080/ws";
let harness;
let app; // a directory with node_modules/wschat-client, as after `npm install`

before(async () => {
  harness = await startHarness();
  app = await mkdtemp(join(tmpdir(), "wschat-readme-"));
  await mkdir(join(app, "node_modules"));
  await symlink(join(REPO, "clients", "js"), join(app, "node_modules", "wschat-client"), "dir");
});

after(async () => {
  await harness?.close();
  if (app) await rm(app, { recursive: true, force: true });
});

/** The first ```js block of `readme` (a path from the repository's root). */
async function firstJsBlock(readme) {
  const text = await readFile(join(REPO, readme), "utf8");
  const found = /^```js\n([\s\S]*?)^```/m.exec(text);
  assert.ok(found, `no js block in ${readme}`);
  return found[1];
}

/** Runs `code` as an ES module in the app directory; resolves with its stdout once a line
 * matches `done` (the examples stay connected: the process is then stopped). */
async function runUntil(code, done) {
  const file = join(app, `example-${Date.now()}.mjs`);
  await writeFile(file, code);
  const child = spawn(process.execPath, [file], { cwd: app, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  try {
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no ${done} in time:\n${out}\n${err}`)), TIMEOUT);
      child.stdout.on("data", (d) => {
        out += d;
        if (done.test(out)) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.on("exit", (status) => {
        clearTimeout(timer);
        reject(new Error(`the example exited (${status}):\n${out}\n${err}`));
      });
    });
  } finally {
    child.kill();
  }
  assert.equal(err, "");
  return out;
}

test("the top README's example joins, sends and prints the stored message", async () => {
  const s = await harness.server();
  const code = await firstJsBlock("README.md");
  assert.ok(code.includes(README_URL));
  const out = await runUntil(code.replace(README_URL, s.url), /stored as message \d+\n/);
  assert.equal(out, "connection: connecting\nconnection: connected\n#general alice: Hello!\nstored as message 1\n");
});

test("the client README's example signs in with getToken and sends", async () => {
  const s = await harness.server();
  const token = await harness.token("alice", 3600, "Alice");
  const tokens = createServer((_req, res) => res.end(token));
  await new Promise((resolve) => tokens.listen(0, "127.0.0.1", resolve));
  try {
    const code = await firstJsBlock("clients/js/README.md");
    assert.ok(code.includes(README_URL) && code.includes('fetch("/token")'));
    const tokenUrl = `http://127.0.0.1:${tokens.address().port}/token`;
    const adapted = code.replace(README_URL, s.url).replace('fetch("/token")', `fetch("${tokenUrl}")`);
    const out = await runUntil(adapted, /delivered as message \d+\n/);
    assert.equal(out, "connection: connecting\nconnection: connected\n#general Alice: Hello!\ndelivered as message 1\n");
  } finally {
    tokens.close();
  }
});
