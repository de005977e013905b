// wsrouter.js — the JavaScript client of a wsrouter: register a
// registration, join it with a connection that reconnects by itself, and
// (in Node) answer relayed HTTP requests as a device. One ES module, no
// dependencies: browsers and Node >= 22 use the global WebSocket; on Node 20
// pass the `ws` package's WebSocket as the `WebSocket` option.
//
// The wire protocol is the router's docs/protocol.md. The router serves
// this file at /client.js, so a page can `import { connect } from "/client.js"`.
//
// A refused connect (400, 403, 404, 409) ends a connection for good. Node
// with the ws package tells the status (and honours Retry-After on 429 and
// 503). A browser, or Node's global WebSocket, hides it: with a key the
// library asks the router (one POST /publish without a body, which changes
// nothing) and stops on 403, 404 and a malformed id; with a token, and for
// the other refusals, it keeps retrying with backoff.

/**
 * A refused HTTP request.
 */
export class WsrouterError extends Error {
  /**
   * @param {number} status HTTP status
   * @param {string} body the router's one-line answer
   * @param {number} retryAfter seconds to wait before trying again (0: none given)
   */
  constructor(status, body, retryAfter = 0) {
    super(`wsrouter: ${status} ${body}`);
    this.name = "WsrouterError";
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }
}

function base(url) {
  return String(url).replace(/\/+$/, "");
}

async function refusal(resp) {
  const body = (await resp.text()).trim();
  const ra = parseInt(resp.headers.get("Retry-After") || "0", 10);
  return new WsrouterError(resp.status, body, Number.isFinite(ra) ? ra : 0);
}

/**
 * Creates a registration and returns its id.
 * @param {string} baseURL the router, e.g. "http://localhost:8741"
 * @param {{type: "lobby"|"hostclient"|"pubsub", key: string, hostKey: string, id?: string}} r
 * @returns {Promise<string>}
 * @throws {WsrouterError} 400, 409 (id taken), 429 (retryAfter), 503
 */
export async function register(baseURL, r) {
  const form = new URLSearchParams({ reg_type: r.type, key: r.key, host_key: r.hostKey });
  if (r.id) form.set("id_req", r.id);
  // Keys in the body, not the URL, so that no access log sees them.
  const resp = await fetch(base(baseURL) + "/register", {
    method: "POST",
    headers: { Accept: "application/json" },
    body: form,
  });
  if (!resp.ok) throw await refusal(resp);
  return (await resp.json()).id;
}

// Close codes after which trying again cannot help (docs/protocol.md §4.7).
const FINAL = { 4000: "registration removed", 4001: "replaced", 1008: "policy" };

function isFinal(code) {
  return code in FINAL || (code > 4001 && code <= 4999 && code !== 4008);
}

/**
 * The wait before attempt n (from 1): a random time in [0, min(max, min·2ⁿ⁻¹)]
 * ("full jitter"), in milliseconds.
 * @param {number} n @param {number} min @param {number} max
 * @param {() => number} [random] in [0, 1)
 */
export function backoff(n, min, max, random = Math.random) {
  const ceil = Math.min(max, min * 2 ** Math.min(n - 1, 30));
  return Math.floor(random() * (ceil + 1));
}

/**
 * A member that stays connected. Events (EventTarget, with `detail`):
 * - `open` {connId}: a session is up (connId is known in Node only: browsers
 *   do not show response headers);
 * - `message` {data}: a string (text) or an ArrayBuffer (binary);
 * - `reconnecting` {attempt, delay, code, reason}: the session ended or an
 *   attempt failed; the next attempt follows after `delay` ms;
 * - `closed` {code, reason, error}: for good — close() was called, or the
 *   router removed the registration (4000), replaced this member (4001),
 *   closed it from the backend (4002–4999 but 4008), revoked it (1008), or
 *   refused it (400, 403, 404, 409: see the module's comment for where the
 *   status can be told).
 */
export class Connection extends EventTarget {
  constructor(baseURL, opts) {
    super();
    this.url = base(baseURL);
    this.opts = { minBackoff: 250, maxBackoff: 30000, ...opts };
    this.WebSocket = this.opts.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new Error("wsrouter: no WebSocket: pass the ws package's as the WebSocket option");
    if (!this.opts.key === !this.opts.token) throw new Error("wsrouter: give exactly one of key and token");
    /** @type {"connecting"|"open"|"reconnecting"|"closed"} */
    this.state = "connecting";
    this.connId = "";
    this.attempt = 0;
    this._ws = null;
    this._timer = null;
    this._filters = [];
    this._dial();
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _wsURL() {
    const u = new URL(this.url + "/connect");
    u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({ id: this.opts.id });
    // A browser cannot set headers on a WebSocket: the credential goes in
    // the query, which the router never logs.
    if (this.opts.key) q.set("key", this.opts.key);
    else q.set("token", this.opts.token);
    if (this.opts.role) q.set("sock_type", this.opts.role);
    if (this.opts.name) q.set("name", this.opts.name);
    u.search = q.toString();
    return u.toString();
  }

  _dial() {
    if (this.state === "closed") return;
    const ws = new this.WebSocket(this._wsURL());
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    let opened = false;
    let status = 0; // the ws package (Node) tells a refusal's status
    let retryAfter = 0; // and its Retry-After, in seconds
    if (typeof ws.on === "function") {
      ws.on("upgrade", (res) => { this.connId = res.headers["x-connection-id"] || ""; });
      ws.on("unexpected-response", (req, res) => {
        status = res.statusCode;
        retryAfter = parseInt(res.headers["retry-after"] || "0", 10) || 0;
        res.resume();
        req.destroy();
        // With this listener the ws package leaves the socket to us and
        // sends no close event: end the attempt here.
        ws.onclose({ code: 1006, reason: "" });
      });
    }
    ws.onopen = () => {
      opened = true;
      this.attempt = 0;
      this.state = "open";
      this._emit("open", { connId: this.connId });
    };
    ws.onmessage = (ev) => {
      let data = ev.data;
      if (typeof data !== "string" && !(data instanceof ArrayBuffer)) {
        data = new Uint8Array(data).buffer; // a Node Buffer
      }
      for (const f of this._filters) if (f(data)) return;
      this._emit("message", { data });
    };
    ws.onerror = () => {}; // onclose follows and says it all
    ws.onclose = async (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this.connId = "";
      if (this.state === "closed") return;
      if (opened && isFinal(ev.code)) return this._end(ev.code, ev.reason, new Error(`closed: ${ev.code} ${ev.reason || FINAL[ev.code] || ""}`.trim()));
      if (!opened) {
        // A browser (or a global WebSocket) hides the status: ask.
        if (!status && this.opts.key && typeof fetch === "function" && typeof ws.on !== "function") status = await this._why();
        if (this.state === "closed") return; // close() while asking
        if (status === 400 || status === 403 || status === 404 || status === 409) {
          return this._end(0, "", new WsrouterError(status, "refused"));
        }
      }
      this._retry(opened ? ev.code : 1006, ev.reason || (status ? `HTTP ${status}` : ""), retryAfter);
    };
  }

  // _why asks the router why a WebSocket was refused, where the status is
  // hidden: POST /publish with the key and no body checks the id (400
  // malformed, 404 unknown) and the key (403) before anything else, and
  // has no effect whatever it answers (a right key gets 400 for the type
  // or the empty body). Only 403, 404 and a malformed id are told; the rest
  // (a full registration, a name taken, the router away) is retried.
  async _why() {
    try {
      const u = new URL(this.url + "/publish");
      u.search = new URLSearchParams({ id: this.opts.id, key: this.opts.key }).toString();
      const resp = await fetch(u, { method: "POST", cache: "no-store" });
      if (resp.status === 404 || resp.status === 403) return resp.status;
      if (resp.status === 400 && (await resp.text()).startsWith("malformed id")) return 400;
    } catch (e) { /* unreachable: a transient failure */ }
    return 0;
  }

  _retry(code, reason, retryAfter = 0) {
    if (this.state === "closed") return;
    this.attempt++;
    const delay = Math.max(backoff(this.attempt, this.opts.minBackoff, this.opts.maxBackoff), retryAfter * 1000);
    this.state = "reconnecting";
    this._emit("reconnecting", { attempt: this.attempt, delay, code, reason });
    this._timer = setTimeout(() => { this._timer = null; this._dial(); }, delay);
  }

  _end(code, reason, error) {
    if (this.state === "closed") return;
    this.state = "closed";
    clearTimeout(this._timer);
    this._emit("closed", { code, reason, error });
  }

  /**
   * Sends a message: a string as text, an ArrayBuffer or typed array as
   * binary. Returns false, sending nothing, while not connected.
   * @param {string|ArrayBuffer|ArrayBufferView} data
   */
  send(data) {
    if (this.state !== "open" || !this._ws) return false;
    this._ws.send(data);
    return true;
  }

  /** Closes for good. */
  close() {
    const ws = this._ws;
    this._ws = null;
    this._end(1000, "", null);
    if (ws) ws.close(1000);
  }
}

/**
 * Joins a registration; see Connection.
 * @param {string} baseURL
 * @param {{id: string, key?: string, token?: string, role?: "host"|"client", name?: string,
 *          minBackoff?: number, maxBackoff?: number, WebSocket?: any}} opts
 */
export function connect(baseURL, opts) {
  return new Connection(baseURL, opts);
}

function b64encode(bytes) {
  if (typeof Buffer !== "undefined") return Buffer.from(bytes).toString("base64");
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function b64decode(s) {
  if (typeof Buffer !== "undefined") return new Uint8Array(Buffer.from(s, "base64"));
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}

/**
 * Answers the relayed HTTP requests that reach conn (a host) with handler,
 * at most `concurrency` at once (default 16); other messages still reach
 * conn's `message` listeners. Returns a function that stops serving.
 *
 * The handler gets {method, path, query: URLSearchParams, headers: object,
 * body: Uint8Array} and returns {status?, headers?, body?}: a string body is
 * sent as text, a Uint8Array/ArrayBuffer as binary (base64), another value
 * as JSON.
 * @param {Connection} conn
 * @param {(req: object) => Promise<object>|object} handler
 */
export function serveRelay(conn, handler, { concurrency = 16 } = {}) {
  let running = 0;
  const waiting = [];
  const run = async (f) => {
    running++;
    try {
      const reply = await answer(f, handler);
      conn.send(JSON.stringify(reply));
    } finally {
      running--;
      if (waiting.length > 0) run(waiting.shift());
    }
  };
  const filter = (data) => {
    if (typeof data !== "string" || !data.includes('"rid"')) return false;
    let f;
    try { f = JSON.parse(data); } catch (e) { return false; }
    if (!f || typeof f.rid !== "string" || typeof f.method !== "string") return false;
    if (running < concurrency) run(f); else waiting.push(f);
    return true;
  };
  conn._filters.push(filter);
  return () => { conn._filters = conn._filters.filter((x) => x !== filter); };
}

async function answer(f, handler) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(f.query || {})) {
    for (const one of Array.isArray(v) ? v : [v]) query.append(k, one);
  }
  let body = new Uint8Array();
  if (typeof f.body === "string") {
    body = f.body_encoding === "base64" ? b64decode(f.body) : new TextEncoder().encode(f.body);
  }
  let res;
  try {
    res = (await handler({ method: f.method, path: f.path, query, headers: f.headers || {}, body })) || {};
  } catch (e) {
    res = { status: 500, body: "device error" };
  }
  const out = { rid: f.rid, status: res.status || 200 };
  const headers = { ...(res.headers || {}) };
  const ctKey = Object.keys(headers).find((k) => k.toLowerCase() === "content-type");
  if (ctKey) { out.type = headers[ctKey]; delete headers[ctKey]; }
  if (Object.keys(headers).length > 0) out.headers = headers;
  let b = res.body;
  if (b instanceof ArrayBuffer) b = new Uint8Array(b);
  if (b === undefined || b === null) {
    out.content = "";
    out.type ??= "text";
  } else if (typeof b === "string") {
    out.content = b;
    out.type ??= "text";
  } else if (ArrayBuffer.isView(b)) {
    out.content = b64encode(new Uint8Array(b.buffer, b.byteOffset, b.byteLength));
    out.encoding = "base64";
    out.type ??= "raw";
  } else {
    out.content = b;
    out.type ??= "json";
  }
  return out;
}
