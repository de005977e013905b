// Tests of wsrouter.js against the real router binary ($WSROUTER_BIN, built
// by the Go test that runs these: client/js_test.go), on Node 20 with the ws
// package as the WebSocket.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import WebSocket from "ws";
import { register, connect, serveRelay, backoff, WsrouterError } from "../wsrouter.js";

const BIN = process.env.WSROUTER_BIN;
if (!BIN) throw new Error("WSROUTER_BIN is not set: run these through go test ./client");
const dir = mkdtempSync(join(tmpdir(), "wsrouter-js-"));
after(() => rmSync(dir, { recursive: true, force: true }));

// router starts the binary on addr (127.0.0.1:0 for a free port) with a
// data file, and resolves once it listens.
function router(addr = "127.0.0.1:0", data = join(dir, `r-${Date.now()}-${Math.random()}.db`)) {
  const p = spawn(BIN, ["-addr", addr, "-data", data, "-log-format", "json", "-bcrypt-cost", "4",
    "-rate-connect", "0", "-rate-register", "0", "-rate-badkey", "0", "-shutdown-timeout", "2s"], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: p.stderr });
    rl.on("line", (line) => {
      try {
        const rec = JSON.parse(line);
        if (rec.msg === "listening") resolve({ proc: p, addr: rec.addr, url: "http://" + rec.addr, data });
      } catch (e) { /* not JSON */ }
    });
    p.on("exit", (code) => reject(new Error("router exited " + code)));
  });
}

function stop(r) {
  return new Promise((resolve) => { r.proc.on("exit", resolve); r.proc.kill("SIGTERM"); });
}

// next resolves with the next event of type on target (within 10 s).
function next(target, type) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("no " + type + " event")), 10000);
    target.addEventListener(type, (ev) => { clearTimeout(t); resolve(ev.detail); }, { once: true });
  });
}

const opts = (o) => ({ WebSocket, minBackoff: 20, maxBackoff: 200, ...o });

test("backoff is full jitter under min·2ⁿ⁻¹, capped", () => {
  assert.equal(backoff(1, 100, 2000, () => 0.9999999), 100);
  assert.equal(backoff(3, 100, 2000, () => 0.9999999), 400);
  assert.equal(backoff(10, 100, 2000, () => 0.9999999), 2000);
  assert.equal(backoff(10, 100, 2000, () => 0), 0);
});

test("register: an id, and 409 for a taken one", async () => {
  const r = await router();
  after(() => stop(r));
  const id = await register(r.url, { type: "lobby", key: "k", hostKey: "h" });
  assert.match(id, /^[0-9a-f]{32}$/);
  await register(r.url, { type: "lobby", key: "k", hostKey: "h", id: "room" });
  await assert.rejects(register(r.url, { type: "lobby", key: "k", hostKey: "h", id: "room" }),
    (e) => e instanceof WsrouterError && e.status === 409);
});

test("lobby: text and binary; hostclient by role", async () => {
  const r = await router();
  after(() => stop(r));
  await register(r.url, { type: "lobby", key: "k", hostKey: "h", id: "room" });
  const a = connect(r.url, opts({ id: "room", key: "k" }));
  const b = connect(r.url, opts({ id: "room", key: "k" }));
  const [openA] = await Promise.all([next(a, "open"), next(b, "open")]);
  assert.match(openA.connId, /^[0-9a-f]{32}$/);
  let got = next(b, "message");
  assert.equal(a.send("hello"), true);
  assert.equal((await got).data, "hello");
  got = next(b, "message");
  a.send(new Uint8Array([0, 1, 255]));
  assert.deepEqual([...new Uint8Array((await got).data)], [0, 1, 255]);
  a.close(); b.close();

  await register(r.url, { type: "hostclient", key: "k", hostKey: "h", id: "hc" });
  const host = connect(r.url, opts({ id: "hc", key: "k", role: "host" }));
  const client = connect(r.url, opts({ id: "hc", key: "k", role: "client" }));
  await Promise.all([next(host, "open"), next(client, "open")]);
  got = next(host, "message");
  client.send("to the host");
  assert.equal((await got).data, "to the host");
  host.close(); client.close();
});

test("refusals and final closes end the connection for good", async () => {
  const r = await router();
  after(() => stop(r));
  const unknown = connect(r.url, opts({ id: "nope", key: "k" }));
  const c1 = await next(unknown, "closed");
  assert.ok(c1.error instanceof WsrouterError && c1.error.status === 404, String(c1.error));
  await register(r.url, { type: "lobby", key: "k", hostKey: "h", id: "room" });
  const wrong = connect(r.url, opts({ id: "room", key: "wrong" }));
  assert.equal((await next(wrong, "closed")).error.status, 403);

  // 409: a name held by a member of the other role.
  await register(r.url, { type: "hostclient", key: "k", hostKey: "h", id: "hc" });
  const host = connect(r.url, opts({ id: "hc", key: "k", role: "host", name: "dev" }));
  await next(host, "open");
  const taken = connect(r.url, opts({ id: "hc", key: "k", role: "client", name: "dev" }));
  assert.equal((await next(taken, "closed")).error.status, 409);
  host.close();

  const m = connect(r.url, opts({ id: "room", key: "k" }));
  await next(m, "open");
  const closed = next(m, "closed");
  const resp = await fetch(r.url + "/remove", { method: "POST", body: new URLSearchParams({ id: "room", key: "k", host_key: "h" }) });
  assert.equal(resp.status, 200);
  assert.equal((await closed).code, 4000);
  assert.equal(m.state, "closed");
  assert.equal(m.send("x"), false);
});

test("reconnects after the router restarts on its data file", async () => {
  let r = await router();
  await register(r.url, { type: "lobby", key: "k", hostKey: "h", id: "room" });
  const a = connect(r.url, opts({ id: "room", key: "k" }));
  const b = connect(r.url, opts({ id: "room", key: "k" }));
  await Promise.all([next(a, "open"), next(b, "open")]);
  const first = a.connId;
  const reconnecting = next(a, "reconnecting");
  await stop(r);
  assert.equal((await reconnecting).code, 1001);
  r = await router(r.addr, r.data);
  after(() => stop(r));
  await Promise.all([a.state === "open" || next(a, "open"), b.state === "open" || next(b, "open")]);
  assert.notEqual(a.connId, first);
  const got = next(b, "message");
  a.send("back");
  assert.equal((await got).data, "back");
  a.close(); b.close();
});

test("serveRelay answers /relay with text, JSON, binary, status and headers", async () => {
  const r = await router();
  after(() => stop(r));
  await register(r.url, { type: "hostclient", key: "k", hostKey: "h", id: "dev" });
  const host = connect(r.url, opts({ id: "dev", key: "k", role: "host" }));
  await next(host, "open");
  const png = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0xff]);
  serveRelay(host, async (req) => {
    switch (req.path) {
      case "/text": return { body: "hello " + req.query.get("who") };
      case "/json": return { status: 201, headers: { "X-Device": "yes" }, body: { got: new TextDecoder().decode(req.body), auth: req.headers.Authorization } };
      case "/image.png": return { headers: { "Content-Type": "image/png" }, body: png };
      default: return { status: 404, body: "no such page" };
    }
  });
  const call = (path, init = {}) => fetch(r.url + "/relay/dev" + path, { ...init, headers: { "X-Key": "k", ...(init.headers || {}) } });
  let resp = await call("/text?who=ann");
  assert.equal(resp.status, 200);
  assert.equal(await resp.text(), "hello ann");
  resp = await call("/json", { method: "POST", body: "café", headers: { Authorization: "Basic dXNlcg==" } });
  assert.equal(resp.status, 201);
  assert.equal(resp.headers.get("x-device"), "yes");
  assert.deepEqual(await resp.json(), { got: "café", auth: "Basic dXNlcg==" });
  resp = await call("/image.png");
  assert.equal(resp.headers.get("content-type"), "image/png");
  assert.deepEqual([...new Uint8Array(await resp.arrayBuffer())], [...png]);
  assert.equal((await call("/missing")).status, 404);

  // Other frames still reach the host's listeners.
  const client = connect(r.url, opts({ id: "dev", key: "k", role: "client" }));
  await next(client, "open");
  const got = next(host, "message");
  client.send('{"hello":"host"}');
  assert.equal((await got).data, '{"hello":"host"}');
  host.close(); client.close();
});
